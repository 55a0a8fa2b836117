"""Each method's training step, on a model whose logits are fixed parameters and discriminators whose
output is a known constant, against loss values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayuda.methods import METHODS, default_config, get_method
from rayuda.methods.context import TrainContext
from rayuda.models import SegOutput


class FixedLogits(nn.Module):
    """G whose logits are one learnable 2-class, 1×2 map (pixel 0: [2, 0], pixel 1: [0, 0])."""

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]]))  # 1×2×1×2

    def forward(self, x):
        z = self.z.expand(x.shape[0], -1, -1, -1)
        return SegOutput(logits={"main": z}, features={})


class ConstantDiscriminator(nn.Module):
    """D whose logit is ``b`` everywhere (a 1×1 conv with zero weights)."""

    def __init__(self, in_channels: int, b: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, b)

    def forward(self, x):
        return self.conv(x)


def make_context(method_name: str, b: float = 0.5, **params) -> tuple[object, TrainContext]:
    cfg = default_config(method_name)
    cfg["params"].update(params)
    method = get_method(method_name)()
    model = FixedLogits()
    discs = nn.ModuleDict({name: ConstantDiscriminator(2, b) for name in ("main",)} if method_name in
                          ("adaptsegnet", "advent") else {})
    ctx = TrainContext(
        config=cfg, model=model, device=torch.device("cpu"), num_classes=2, params=cfg["params"],
        discriminators=discs, opt_g=torch.optim.SGD(model.parameters(), lr=0.0),
        opt_d=torch.optim.Adam(discs.parameters(), lr=0.0) if len(discs) else None,
    )
    return method, ctx


def batch(labels):
    return {"image": torch.zeros(1, 3, 1, 2), "label": torch.tensor([labels])}


# pixel 0: p = softmax([2, 0]) = [e²/(e²+1), 1/(e²+1)]; pixel 1: p = [0.5, 0.5]
P0 = math.exp(2) / (math.exp(2) + 1)


def test_source_only_loss_is_cross_entropy_on_labelled_pixels():
    method, ctx = make_context("source_only")
    losses = method.train_step(ctx, batch([[0, 255]]), None)
    assert losses["seg"] == pytest.approx(-math.log(P0), rel=1e-6)  # only pixel 0 is labelled


def test_minent_loss_is_mean_normalised_entropy():
    method, ctx = make_context("minent")
    losses = method.train_step(ctx, batch([[0, 1]]), batch([[255, 255]]))
    h0 = -(P0 * math.log(P0) + (1 - P0) * math.log(1 - P0)) / math.log(2)
    assert losses["ent"] == pytest.approx((h0 + 1.0) / 2, rel=1e-6)  # pixel 1 is uniform: entropy 1
    assert losses["seg"] == pytest.approx((-math.log(P0) - math.log(0.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["adaptsegnet", "advent"])
def test_output_space_adversarial_losses(name):
    b = 0.5
    method, ctx = make_context(name, b=b)
    losses = method.train_step(ctx, batch([[0, 1]]), batch([[255, 255]]))
    # G: target maps labelled source (1): BCE(b, 1) = log(1 + e^-b)
    assert losses["adv"] == pytest.approx(math.log(1 + math.exp(-b)), rel=1e-6)
    # D: ½ BCE(b, 1) on source + ½ BCE(b, 0) on target
    assert losses["d"] == pytest.approx(0.5 * math.log(1 + math.exp(-b)) + 0.5 * math.log(1 + math.exp(b)), rel=1e-6)


def test_advent_discriminator_sees_weighted_self_information():
    method, ctx = make_context("advent")
    prob = torch.tensor([[[[0.8]], [[0.2]]]])
    expected = torch.tensor([-0.8 * math.log(0.8), -0.2 * math.log(0.2)]) / math.log(2)
    assert torch.allclose(method.discriminator_input(ctx, prob).flatten(), expected, atol=1e-6)


def test_adaptsegnet_discriminator_sees_softmax():
    method, ctx = make_context("adaptsegnet")
    prob = torch.tensor([[[[0.8]], [[0.2]]]])
    assert torch.equal(method.discriminator_input(ctx, prob), prob)


def test_generator_update_changes_only_g_and_discriminator_update_only_d():
    method, ctx = make_context("advent")
    for group in ctx.opt_g.param_groups:
        group["lr"] = 0.1
    for group in ctx.opt_d.param_groups:
        group["lr"] = 0.1
    z_before = ctx.model.z.detach().clone()
    bias_before = ctx.discriminators["main"].conv.bias.detach().clone()
    method.train_step(ctx, batch([[0, 1]]), batch([[255, 255]]))
    assert not torch.equal(ctx.model.z, z_before)
    assert not torch.equal(ctx.discriminators["main"].conv.bias, bias_before)


def test_registry_lists_every_method():
    assert {"source_only", "adaptsegnet", "advent", "minent", "cram", "fgdem", "intrada"} <= set(METHODS)
    with pytest.raises(ValueError, match="valid methods"):
        get_method("nope")
