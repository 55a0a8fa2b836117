"""The lean training step: the source loss is backpropagated before the target forward pass (the
ADVENT reference's order, so the source graph is freed early) with the gradients of the old single
backward over both domains; losses stay on the device until the loop logs them."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from rayuda.engine.loop import losses_as_floats
from rayuda.methods import default_config, get_method
from rayuda.methods.base import image_size
from rayuda.methods.context import TrainContext
from rayuda.methods.cram import layered_style_loss, style_layer_weights
from rayuda.models import build_segmenter, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_profile import old_adversarial, old_fgdem  # noqa: E402

NUM_CLASSES = 5


def _context(name: str, multi_level: bool, **params) -> tuple[object, TrainContext]:
    torch.manual_seed(0)
    cfg = default_config(name)
    cfg["model"].update(multi_level=multi_level)
    cfg["params"].update(params)
    model = build_segmenter(cfg["model"], NUM_CLASSES)
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=NUM_CLASSES,
                       params=cfg["params"])
    method = get_method(name)()
    method.setup(ctx)
    ctx.opt_g = torch.optim.SGD(param_groups(model, 0.05), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if len(ctx.discriminators):
        ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters(), lr=1e-3, betas=(0.9, 0.99))
    return method, ctx


def _batches():
    g = torch.Generator().manual_seed(1)
    source = {"image": torch.randn(2, 3, 32, 48, generator=g),
              "label": torch.randint(0, NUM_CLASSES, (2, 32, 48), generator=g)}
    source["label"][:, :4] = 255
    target = {"image": torch.randn(2, 3, 32, 48, generator=g) + 0.5,
              "label": torch.full((2, 32, 48), 255)}
    return source, target


# --- the old order: both forward passes, one backward over the summed loss (rayuda's step before the lean order)

def _old_cram(method, ctx, source, target):
    p = ctx.params
    out_s, out_t = ctx.forward(source["image"]), ctx.forward(target["image"])
    loss_g = ctx.seg_loss(out_s, source["label"])
    if p["cea"]:
        size = image_size(target)
        maps_s, maps_t = method.domain_maps(ctx, out_s, size), method.domain_maps(ctx, out_t, size)
        ctx.step_discriminators(method.discriminator_loss(ctx, maps_s, maps_t))
        loss_g = loss_g + p["w_adv"] * method.generator_loss(ctx, maps_t)
    if p["sfa"]:
        weights = style_layer_weights(p["style_layers"], p["style_weight"])
        loss_g = loss_g + p["lambda_style"] * layered_style_loss(
            {k: out_s.features[k] for k in weights}, {k: out_t.features[k] for k in weights}, weights)
    ctx.step_generator(loss_g)


# the single-backward steps as they were before the lean order (bench/step_profile.py measures them too)
OLD = {"advent": old_adversarial, "adaptsegnet": old_adversarial, "cram": _old_cram, "fgdem": old_fgdem}


@pytest.mark.parametrize(("name", "multi_level", "params"), [
    ("advent", True, {}),
    ("cram", True, {"sfa": False}),  # CEA alone: the source graph is freed early
    ("cram", False, {}),  # CEA + SFA: the style loss couples the domains, one backward as before
    ("fgdem", False, {}),
])
def test_step_in_reference_order_gives_the_single_backward_update(name, multi_level, params):
    method, ctx = _context(name, multi_level, **params)
    old_method, old_ctx = copy.deepcopy(method), copy.deepcopy(ctx)
    source, target = _batches()

    losses = method.train_step(ctx, source, target)
    OLD[name](old_method, old_ctx, source, target)

    assert all(torch.is_tensor(v) and not v.requires_grad for v in losses.values())  # no host sync in the step
    for (key, new), old in zip(ctx.model.named_parameters(), old_ctx.model.parameters(), strict=True):
        assert new.grad is not None, key
        torch.testing.assert_close(new.grad, old.grad, rtol=1e-4, atol=1e-6, msg=key)
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7, msg=key)
    for (key, new), old in zip(ctx.discriminators.named_parameters(), old_ctx.discriminators.parameters(),
                               strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7, msg=key)
        assert new.requires_grad, key  # every D trainable again after G's update


@pytest.mark.parametrize("name", ["advent", "fgdem", "minent"])
def test_source_loss_is_backpropagated_before_the_target_forward(name):
    method, ctx = _context(name, False)
    seen = []  # at each forward of G: has G already received a gradient in this step?
    ctx.model.register_forward_pre_hook(lambda module, args: seen.append(next(module.parameters()).grad is not None))
    ctx.opt_g.zero_grad(set_to_none=True)
    method.train_step(ctx, *_batches())
    assert seen == [False, True]


def test_losses_are_read_in_one_go_as_floats():
    rows = [{"seg": torch.tensor(0.5), "kept": 1}, {"seg": torch.tensor([2.25]), "kept": 0.5}]
    assert losses_as_floats(rows) == [{"seg": 0.5, "kept": 1.0}, {"seg": 2.25, "kept": 0.5}]
    assert all(type(v) is float for row in losses_as_floats(rows) for v in row.values())
    assert math.isnan(losses_as_floats([{"x": torch.tensor(float("nan"))}])[0]["x"])


def test_upsampled_logits_are_shared_by_the_loss_and_the_maps():
    _, ctx = _context("advent", False)
    out = ctx.forward(torch.randn(1, 3, 32, 48))
    first = ctx.logits(out, "main", (32, 48))
    assert ctx.logits(out, "main", (32, 48)) is first
    assert first.dtype == torch.float32 and first.shape[-2:] == (32, 48)
    assert ctx.logits(out, "main", (16, 24)) is not first


def test_float16_loss_scale_is_the_same_for_every_partial_backward_of_g():
    """A D step between G's partial backward passes (CRAM's Algorithm 1) must not change the loss scale G's
    gradients were scaled with (growth every step here): the update equals the unscaled one."""
    method, ctx = _context("cram", False, sfa=False)
    plain_method, plain_ctx = copy.deepcopy(method), copy.deepcopy(ctx)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    source, target = _batches()
    method.train_step(ctx, source, target)
    plain_method.train_step(plain_ctx, source, target)
    assert ctx.scaler.get_scale() == 2.0**9  # updated once, after G's step
    for new, old in zip(ctx.model.parameters(), plain_ctx.model.parameters(), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7)
