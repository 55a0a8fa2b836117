"""GPU speed settings (rayuda.engine.accel): what each resolves to per device, and the losses under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from rayuda.config import ConfigError
from rayuda.engine import accel
from rayuda.engine.loop import Runtime, StageData, build_context
from rayuda.losses import bce_adversarial, entropy_loss, seg_cross_entropy, weighted_self_information
from rayuda.methods import default_config, get_method
from rayuda.methods.cada.losses import self_training_cross_entropy, shannon_entropy
from rayuda.methods.cra import cra_adv_loss, region_encoding
from rayuda.methods.cram import confidence_aware_entropy, style_loss
from rayuda.methods.fgdem import domain_encoding, fine_grained_adv_loss, fine_grained_d_loss
from rayuda.methods.pixintrada.losses import (
    continuous_index,
    cts_d_loss,
    cts_g_loss,
    kl_to_uniform,
    pla_d_loss,
    pla_g_loss,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _train(**over):
    train = dict(default_config("advent")["train"])
    train.update(over)
    return train


def test_defaults_are_on_with_cuda_and_off_on_cpu():
    train = _train()
    assert accel.amp_dtype(train, CPU) is None
    assert accel.channels_last(train, CPU) is False and accel.channels_last(train, CUDA) is True
    assert accel.cudnn_benchmark(train, CPU, None) is False and accel.cudnn_benchmark(train, CUDA, None) is True
    assert accel.compile_flag(train) is False
    assert accel.num_workers(None, CPU) == 0 and 0 <= accel.num_workers(None, CUDA) <= 4
    runtime = Runtime.of(default_config("advent"), CPU)
    assert (runtime.num_workers, runtime.channels_last, runtime.cudnn_benchmark, runtime.compile) == (0, False, False,
                                                                                                     False)


def test_cudnn_autotuning_is_off_when_trials_share_a_gpu_or_runs_are_deterministic():
    assert accel.cudnn_benchmark(_train(), CUDA, 0.5) is False  # --gpus-per-trial 0.5: two trials on one card
    assert accel.cudnn_benchmark(_train(), CUDA, 1.0) is True
    assert accel.cudnn_benchmark(_train(cudnn_benchmark=True), CUDA, 0.5) is True  # asked for explicitly
    assert accel.cudnn_benchmark(_train(deterministic=True, cudnn_benchmark=True), CUDA, None) is False
    assert accel.gpu_share() is None  # outside a Ray task


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="amp_dtype"):
        accel.amp_dtype(_train(amp_dtype="fp8"), CPU)
    with pytest.raises(ConfigError, match="channels_last"):
        accel.channels_last(_train(channels_last="yes"), CPU)
    with pytest.raises(ConfigError, match="num_workers"):
        accel.num_workers(-1, CPU)


def test_channels_last_context_trains_on_cpu_with_the_contiguous_losses():
    """The same step in NHWC and NCHW memory: the same losses (to float rounding), so the layout changes
    nothing but speed."""
    cfg = default_config("advent")
    from rayuda.models import build_segmenter

    data = StageData(labelled=None, unlabelled=None, holdout=None, class_names=["a", "b", "c"])
    batch = {"image": torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)),
             "label": torch.randint(0, 3, (1, 64, 96), generator=torch.Generator().manual_seed(2))}
    results = {}
    for channels_last in (True, False):
        torch.manual_seed(0)
        model = build_segmenter(cfg["model"], 3)
        runtime = Runtime(device=CPU, channels_last=channels_last)
        ctx = build_context(cfg, cfg["params"], get_method("advent")(), model, data, 0.01, CPU, runtime)
        if channels_last:
            assert ctx.memory_format == torch.channels_last and ctx.amp_dtype is None and ctx.scaler is None
            assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.manual_seed(3)
        results[channels_last] = get_method("advent")().train_step(ctx, batch, {**batch, "image": batch["image"] + 1})
    assert set(results[True]) == set(results[False])
    for name, value in results[True].items():
        assert torch.isfinite(value), name
        assert value.item() == pytest.approx(results[False][name].item(), rel=1e-4, abs=1e-6), name


# --- the losses under bf16 autocast: finite and close to float32 ------------------------------------------

def _inputs():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 4, 1)
    x = torch.randn(2, 8, 6, 10, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x) * 3  # what G gives under autocast
    assert logits.dtype == torch.bfloat16
    label = torch.randint(0, 4, (2, 12, 20), generator=g)
    label[:, :3] = 255
    feats = (torch.randn(2, 16, 6, 10, generator=g), torch.randn(2, 16, 6, 10, generator=g) * 1.1 + 0.05)
    d = torch.randn(2, 1, 6, 10, generator=g)
    d2k = torch.randn(2, 8, 3, 5, generator=g)
    hard = (torch.rand(2, 1, 6, 10, generator=g) > 0.5).float()
    return logits.detach(), label, feats, d, d2k, hard


def _losses(logits, label, feats, d, d2k, hard):
    prob = torch.softmax(logits.float(), 1)  # TrainContext.probs: float32 probabilities
    enc = domain_encoding(logits, 1.8, 0.9, "source")
    return {
        "seg_cross_entropy": seg_cross_entropy(logits, label),
        "self_training_cross_entropy": self_training_cross_entropy(logits, label),
        "entropy_loss": entropy_loss(prob),
        "weighted_self_information": weighted_self_information(prob).mean(),
        "confidence_aware_entropy": confidence_aware_entropy(prob).mean(),
        "style_loss": style_loss(*feats),
        "bce_adversarial": bce_adversarial(d, 1.0),
        "fine_grained": fine_grained_d_loss(d2k, d2k.flip(0), enc, domain_encoding(logits, 1.8, 0.9, "target")),
        "fine_grained_adv": fine_grained_adv_loss(d2k, enc),
        "cra": cra_adv_loss(d2k, region_encoding(logits, label[:, ::2, ::2] != 255, 1.8)),
        "pla": pla_d_loss(d, hard) + pla_g_loss(d, hard),
        "cts": cts_d_loss(d, continuous_index(prob, hard)) + cts_g_loss(d, hard),
        "kl_to_uniform": kl_to_uniform(prob),
        "shannon_entropy": shannon_entropy(prob).mean(),
    }


def test_losses_stay_float32_finite_and_close_under_bf16_autocast():
    inputs = _inputs()
    reference = _losses(inputs[0].float(), *inputs[1:])  # float32 throughout, on the same (bf16) logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _losses(*inputs)
    for name, value in under.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-6, msg=name)
