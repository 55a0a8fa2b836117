"""Paper-scale settings: Caffe preprocessing, per-domain sizes, the poly decay length, the
upsampling convention — each a config key that reaches the code that uses it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rayuda.config import ConfigError
from rayuda.data.transforms import CAFFE_MEAN_BGR, Transform, config_transform
from rayuda.engine.loop import Runtime, StageData, train_stage
from rayuda.engine.plan import check_plan, stage_slice
from rayuda.methods import plan_of, resolve_config
from rayuda.methods.base import Method
from rayuda.models import SegOutput, build_segmenter, predict_logits


def test_per_domain_sizes_fall_back_to_the_shared_keys():
    cfg = resolve_config("advent", {"data.size": [32, 64], "data.crop": [16, 32], "data.source.size": [36, 64],
                                    "data.source.crop": [20, 40]})
    src, tgt = config_transform(cfg, "source", train=True), config_transform(cfg, "target", train=True)
    assert (src.size, src.crop) == ((36, 64), (20, 40))
    assert (tgt.size, tgt.crop) == ((32, 64), (16, 32))  # the shorthand
    assert config_transform(cfg, "target", train=False).size == (32, 64) and \
        config_transform(cfg, "target", train=False).crop is None


def test_every_stage_slice_holds_the_keys_its_transforms_read():
    cfg = resolve_config("intrada", {"data.target.size": [32, 64], "model.preprocessing": "caffe"})
    for stage in plan_of(cfg):
        slc = stage_slice(cfg, stage)
        if stage.kind == "pseudo_labels":
            assert config_transform(slc, "target", train=False).size == (32, 64)  # the pass's size
            continue
        for role in ("source", "target"):
            assert config_transform(slc, role, train=True).preprocessing == "caffe"


def test_train_and_eval_images_follow_the_per_domain_size(tmp_path):
    cfg = resolve_config("advent", {"data.source.size": [8, 12], "data.target.size": [6, 10]})
    image = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    label = np.zeros((20, 30), dtype=np.uint8)
    rng = np.random.default_rng(0)
    assert config_transform(cfg, "source", train=True)(image, label, rng)[0].shape == (3, 8, 12)
    assert config_transform(cfg, "target", train=True)(image, label, rng)[1].shape == (6, 10)


def test_caffe_preprocessing_is_bgr_0_255_minus_the_mean_without_std():
    pixel = np.array([10, 20, 30], dtype=np.uint8)  # R, G, B
    image = Image.fromarray(np.tile(pixel, (2, 3, 1)))
    cfg = resolve_config("advent", {"model.preprocessing": "caffe"})
    img, _ = config_transform(cfg, "source", train=False)(image)
    expected = torch.tensor([30 - CAFFE_MEAN_BGR[0], 20 - CAFFE_MEAN_BGR[1], 10 - CAFFE_MEAN_BGR[2]])
    assert torch.allclose(img[:, 0, 0], expected, atol=1e-4)
    default, _ = config_transform(resolve_config("advent"), "source", train=False)(image)  # unchanged default
    assert torch.allclose(default[:, 0, 0], (torch.tensor([10, 20, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)
    with pytest.raises(ValueError, match="model.preprocessing"):
        build_segmenter({"backbone": "resnet18", "layers": 3, "preprocessing": "bgr"}, 2)


def test_a_caffe_checkpoint_warns_unless_preprocessing_is_caffe(tmp_path):
    model = build_segmenter({"backbone": "resnet18", "layers": 3}, 2)
    path = tmp_path / "deeplab_caffe.pth"
    torch.save({f"Scale.{k}": v for k, v in model.backbone.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="model.preprocessing=caffe"):
        build_segmenter({"backbone": "resnet18", "layers": 3, "init": str(path)}, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = build_segmenter({"backbone": "resnet18", "layers": 3, "init": str(path), "preprocessing": "caffe"}, 2)
    assert built.preprocessing == "caffe"


def test_align_corners_key_sets_the_logits_upsampling():
    images = torch.randn(1, 3, 17, 23)
    for align in (False, True):
        model = build_segmenter({"backbone": "resnet18", "layers": 3, "align_corners": align}, 3).eval()
        with torch.no_grad():
            low = model(images).logits["main"]
            expected = F.interpolate(low, size=(17, 23), mode="bilinear", align_corners=align)
            assert torch.allclose(predict_logits(model, images, (17, 23)), expected, atol=1e-6)
    assert not torch.allclose(F.interpolate(low, size=(17, 23), mode="bilinear", align_corners=True),
                              F.interpolate(low, size=(17, 23), mode="bilinear", align_corners=False))


def test_decay_iters_must_cover_the_iterations():
    cfg = resolve_config("advent", {"stages.advent.iters": 10, "stages.advent.decay_iters": 5})
    with pytest.raises(ConfigError, match="stages.advent.decay_iters"):
        check_plan(plan_of(cfg), cfg)
    assert resolve_config("advent")["stages"]["advent"]["decay_iters"] is None  # default: decay over iters


class _Tiny(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 2, 2), "label": torch.zeros(2, 2, dtype=torch.long), "name": f"{i}"}


class _Stub(nn.Module):
    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(1, 2, 2, 2))

    def forward(self, x):
        return SegOutput(logits={"main": self.z.expand(x.shape[0], -1, -1, -1)}, features={})


class _RecordLr(Method, register=False):
    name = "record_lr"

    def __init__(self):
        self.rates = []

    def train_step(self, ctx, labelled, unlabelled):
        self.rates.append(ctx.opt_g.param_groups[0]["lr"])
        return {}


@pytest.mark.parametrize("decay", [None, 8])
def test_poly_schedule_decays_over_decay_iters(decay, tmp_path):
    cfg = resolve_config("source_only", {"stages.source_only.iters": 4, "stages.source_only.lr": 1.0,
                                         "stages.source_only.decay_iters": decay, "data.batch_size": 1})
    method = _RecordLr()
    train_stage(label="source_only", config=cfg, params={}, method=method, model=_Stub(),
                data=StageData(labelled=_Tiny(), unlabelled=None, holdout=None, class_names=["a", "b"]),
                work_dir=tmp_path, runtime=Runtime(device=torch.device("cpu"), log_every=100, checkpoint_every=100))
    length = decay or 4
    assert method.rates == pytest.approx([(1 - i / length) ** 0.9 for i in range(4)])


def test_photometric_augmentations_are_config_keys_checked_before_any_compute():
    cfg = resolve_config("source_only", {"data.augment.hue": 0.6})
    with pytest.raises(ConfigError, match="data.augment.hue"):
        check_plan(plan_of(cfg), cfg)
    cfg = resolve_config("source_only", {"data.source.size": [0, 3]})
    with pytest.raises(ConfigError, match="source"):
        check_plan(plan_of(cfg), cfg)
    cfg = resolve_config("source_only", {"data.augment.hue": 0.2, "data.augment.noise": 0.05, "data.augment.blur": 1.0,
                                         "data.jitter": 0.3, "data.augment.contrast": 0.0})
    check_plan(plan_of(cfg), cfg)
    tf = config_transform(cfg, "source", train=True)
    assert tf.augment == {"brightness": 0.3, "contrast": 0.0, "saturation": 0.3, "hue": 0.2, "blur": 1.0,
                          "noise": 0.05}


def _grid(h=12, w=16):
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = (np.arange(h * w) % 19).reshape(h, w).astype(np.uint8)
    return Image.fromarray(arr), label


@pytest.mark.parametrize("key,value", [("hue", 0.3), ("blur", 2.0), ("noise", 0.1)])
def test_each_photometric_augmentation_changes_only_the_image_and_is_seeded(key, value):
    image, label = _grid()
    plain, plain_lbl = Transform()(image, label)
    tf = Transform(**{key: value})
    outs = [tf(image, label, np.random.default_rng(s)) for s in (0, 0, 1, 2, 3)]
    assert torch.equal(outs[0][0], outs[1][0])  # same generator state → same image
    assert any(not torch.allclose(img, plain, atol=1e-4) for img, _ in outs)
    assert len({img.sum().item() for img, _ in outs[1:]}) > 1  # other seeds, other draws
    assert all(torch.equal(lbl, plain_lbl) for _, lbl in outs)  # the label is never altered


def test_the_global_torch_rng_is_left_untouched():
    image, label = _grid()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Transform(crop=(8, 8), flip=True, hue=0.2, noise=0.1)(image, label, np.random.default_rng(0))
    assert torch.equal(torch.rand(3), expected)
