"""DeepLab-v2 G, its weight loading and the discriminators — on tiny inputs, CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayuda.models import (
    ASPP,
    FineGrainedDiscriminator,
    OutputDiscriminator,
    PixelDiscriminator,
    SegOutput,
    StyleDiscriminator,
    build_segmenter,
    imagenet_checkpoint_paths,
    load_backbone_weights,
    param_groups,
)

H, W = 33, 65  # odd sizes: output stride 8 must give ceil(H/8) × ceil(W/8)
K = 5


def small(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_segmenter({"backbone": "resnet18", **cfg}, K)


def donor_backbone(seed=1):
    """A resnet18 G whose backbone tensors (BN statistics included) are all random."""
    model = small(seed)
    with torch.no_grad():
        for name, tensor in model.backbone.state_dict().items():
            if tensor.is_floating_point():
                new = torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor)
                tensor.copy_(new)
    return model


def image(batch=1):
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "cfg",
    [
        {"backbone": "resnet18"},
        {"backbone": "resnet18", "layers": 3},
        {"backbone": "vgg16"},
        {"backbone": "vgg16", "layers": 3},
    ],
)
def test_output_stride_is_8(cfg):
    model = build_segmenter(cfg, K).eval()
    with torch.no_grad():
        out = model(image())
    assert isinstance(out, SegOutput)
    assert set(out.logits) == {"main"}
    assert out.logits["main"].shape == (1, K, math.ceil(H / 8), math.ceil(W / 8))
    layers = cfg.get("layers", 4)
    assert list(out.features) == [f"layer{i}" for i in range(1, layers + 1)]
    for name in list(out.features)[1:]:  # stride 8 from layer2 on
        assert out.features[name].shape[-2:] == (math.ceil(H / 8), math.ceil(W / 8))


def test_resnet101_multi_level_has_aux_on_layer3_and_main_on_layer4():
    model = build_segmenter({"backbone": "resnet101", "multi_level": True}, K).eval()
    assert model.levels == {"main": "layer4", "aux": "layer3"}
    assert model.classifiers["main"].branches[0].in_channels == 2048
    assert model.classifiers["aux"].branches[0].in_channels == 1024
    with torch.no_grad():
        out = model(torch.randn(1, 3, 17, 17))
    assert set(out.logits) == {"main", "aux"}
    for logits in out.logits.values():
        assert logits.shape == (1, K, 3, 3)
    assert out.features["layer4"].shape == (1, 2048, 3, 3)


def test_resnet18_multi_level_returns_main_and_aux():
    model = small(multi_level=True).eval()
    with torch.no_grad():
        out = model(image())
    assert set(out.logits) == {"main", "aux"}
    assert not torch.equal(out.logits["main"], out.logits["aux"])
    three = small(multi_level=True, layers=3)
    assert three.levels == {"main": "layer3", "aux": "layer2"}


def test_aspp_sums_all_four_branches():
    torch.manual_seed(0)
    aspp = ASPP(8, K).eval()
    assert [conv.dilation for conv in aspp.branches] == [(d, d) for d in (6, 12, 18, 24)]
    assert [conv.padding for conv in aspp.branches] == [(d, d) for d in (6, 12, 18, 24)]
    x = torch.randn(1, 8, 30, 30)  # large enough that every dilation sees real pixels
    with torch.no_grad():
        full = aspp(x)
        assert torch.allclose(full, sum(conv(x) for conv in aspp.branches), atol=1e-6)
        for conv in aspp.branches:
            saved_w, saved_b = conv.weight.clone(), conv.bias.clone()
            conv.weight.zero_()
            conv.bias.zero_()
            assert not torch.allclose(aspp(x), full), f"branch with dilation {conv.dilation} is not used"
            conv.weight.copy_(saved_w)
            conv.bias.copy_(saved_b)
    std = torch.cat([conv.weight.flatten() for conv in ASPP(256, 19).branches]).std().item()
    assert std == pytest.approx(0.01, rel=0.05)


def test_features_come_from_the_same_forward_pass():
    model = small().eval()
    calls = {"layer1": 0, "layer4": 0, "stem": 0}
    model.backbone.conv1.register_forward_hook(lambda *a: calls.__setitem__("stem", calls["stem"] + 1))
    model.backbone.layer1.register_forward_hook(lambda *a: calls.__setitem__("layer1", calls["layer1"] + 1))
    model.backbone.layer4.register_forward_hook(lambda *a: calls.__setitem__("layer4", calls["layer4"] + 1))
    captured = {}
    model.backbone.layer4.register_forward_hook(lambda m, i, o: captured.setdefault("layer4", o))
    out = model(image())
    assert calls == {"layer1": 1, "layer4": 1, "stem": 1}
    assert out.features["layer4"] is captured["layer4"]
    assert out.features["layer4"].requires_grad  # features carry gradients for style/feature losses


def test_freeze_bn_keeps_backbone_bn_in_eval_with_fixed_statistics():
    model = small(freeze_bn=True)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert model.classifiers["main"].training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(image(2)).logits["main"].sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # without freezing, a training forward moves the running statistics
    free = small().train()
    stats = free.backbone.bn1.running_mean.clone()
    free(image(2))
    assert not torch.equal(stats, free.backbone.bn1.running_mean)
    assert all(p.requires_grad for p in free.parameters())


def test_param_groups_put_classifiers_at_ten_times_lr():
    model = small(multi_level=True, freeze_bn=True)
    groups = param_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    head = {id(p) for p in model.classifiers.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # frozen BN affine left out
    assert len(trainable) < len(list(model.parameters()))
    torch.optim.SGD(groups, lr=1e-3, momentum=0.9)  # usable as is


def test_scale_prefixed_deeplab_checkpoint_loads(tmp_path):
    donor = donor_backbone()
    # the DeepLab file has no num_batches_tracked counters, and carries its own classifier (ignored)
    state = {f"Scale.{k}": v for k, v in donor.backbone.state_dict().items() if "num_batches" not in k}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.randn(21, 512, 3, 3)
    state["Scale.fc.weight"] = torch.randn(1000, 512)
    path = tmp_path / "DeepLab_init.pth"
    torch.save(state, path)
    fresh = small(seed=2)
    assert not torch.equal(fresh.backbone.conv1.weight, donor.backbone.conv1.weight)
    ignored = load_backbone_weights(fresh, path)
    assert set(ignored) == {"layer5.conv2d_list.0.weight", "fc.weight"}
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value), key
    # the same file through the config, and nested/'module.'-prefixed variants
    via_cfg = build_segmenter({"backbone": "resnet18", "init": str(path)}, K)
    assert torch.equal(via_cfg.backbone.layer4[1].bn2.running_var, donor.backbone.layer4[1].bn2.running_var)
    nested = tmp_path / "nested.pt"
    prefixed = {f"module.backbone.{k}": v for k, v in donor.backbone.state_dict().items()}
    torch.save({"state_dict": prefixed}, nested)
    other = small(layers=3)  # a 3-layer backbone takes what it has and ignores layer4
    ignored = load_backbone_weights(other, nested)
    assert ignored and all(k.startswith("layer4.") for k in ignored)
    assert torch.equal(other.backbone.layer3[0].conv1.weight, donor.backbone.layer3[0].conv1.weight)


def test_mismatched_file_raises_listing_the_keys(tmp_path):
    donor = small()
    state = donor.backbone.state_dict()
    for key in ("layer4.1.conv2.weight", "layer4.1.bn2.weight"):
        del state[key]
    state["conv1.weight"] = torch.randn(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(small(), path)
    text = str(err.value)
    assert "bad.pth" in text
    assert "2 missing" in text and "layer4.1.conv2.weight" in text and "layer4.1.bn2.weight" in text
    assert "conv1.weight (file 64×3×3×3, model 64×3×7×7)" in text
    # a file for another network: the first keys are listed, plus how many more
    vgg = tmp_path / "vgg.pth"
    torch.save(build_segmenter({"backbone": "vgg16", "layers": 3}, K).backbone.state_dict(), vgg)
    with pytest.raises(ValueError, match=r"missing key\(s\): conv1.weight, .*\(and \d+ more\)"):
        load_backbone_weights(small(), vgg)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_weights(small(), tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="imagnet"):
        build_segmenter({"init": "imagnet"}, K)


def test_imagenet_init_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    (url, path), *_ = imagenet_checkpoint_paths("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_segmenter({"backbone": "resnet18", "init": "imagenet"}, K)
    text = str(err.value)
    assert str(path) in text and "never downloads" in text and "model.init" in text and url in text
    # once the file is in the cache it is used
    donor = donor_backbone(seed=3)
    path.parent.mkdir(parents=True)
    torch.save({**donor.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512)}, path)
    model = build_segmenter({"backbone": "resnet18", "init": "imagenet"}, K)
    assert torch.equal(model.backbone.conv1.weight, donor.backbone.conv1.weight)


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"backbone": "resnet34"}, "backbone"),
        ({"layers": 5}, "layers"),
        ({"multi_level": "yes"}, "multi_level"),
        ({"freeze_bn": 1}, "freeze_bn"),
        ({"backbone": "vgg16", "multi_level": True}, "multi_level"),
        ({"depth": 3}, "depth"),
    ],
)
def test_bad_config_values_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key):
        build_segmenter(cfg, K)


def test_bad_backbone_lists_the_valid_values():
    with pytest.raises(ValueError, match="valid values: 'resnet18', 'resnet50', 'resnet101', 'vgg16'"):
        build_segmenter({"backbone": "resnet34"}, K)


def test_discriminator_shapes():
    out = OutputDiscriminator(19)(torch.randn(1, 19, 64, 128))
    assert out.shape == (1, 1, 2, 4)
    convs = [m for m in OutputDiscriminator(19).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)

    fine = FineGrainedDiscriminator(64, 7)
    assert [c.out_channels for c in fine.modules() if isinstance(c, nn.Conv2d)] == [256, 128, 14]
    assert fine(torch.randn(2, 64, 5, 9)).shape == (2, 14, 5, 9)

    assert PixelDiscriminator(19)(torch.randn(2, 19, 64, 128)).shape == (2, 1, 64, 128)

    style = StyleDiscriminator(64)
    assert style(torch.randn(3, 64)).shape == (3, 1, 4)
    assert style(torch.randn(3, 64, 5, 9)).shape == (3, 1, 4)  # a feature map is pooled to its style
    convs = [c for c in style.modules() if isinstance(c, nn.Conv1d)]
    assert all(c.kernel_size == (4,) and c.stride == (2,) for c in convs)
    assert StyleDiscriminator(512)(torch.randn(2, 512)).shape == (2, 1, 32)
    with pytest.raises(ValueError, match="B×64"):
        style(torch.randn(3, 32))
