"""Each method's training step, on a model whose logits are fixed parameters and discriminators whose
output is a known constant, against loss values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayuda.methods import METHODS, Method, default_config, get_method
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
    assert float(losses["adv"]) == pytest.approx(math.log(1 + math.exp(-b)), rel=1e-6)
    # D: ½ BCE(b, 1) on source + ½ BCE(b, 0) on target
    expected_d = 0.5 * math.log(1 + math.exp(-b)) + 0.5 * math.log(1 + math.exp(b))
    assert float(losses["d"]) == pytest.approx(expected_d, rel=1e-6)


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
    builtin = {name for name, cls in METHODS.items() if cls.__module__.startswith("rayuda.methods.")}
    assert builtin == {"source_only", "adaptsegnet", "advent", "minent", "cram", "fgdem", "intrada", "cra",
                       "pixintrada", "cada"}
    with pytest.raises(ValueError, match="valid methods"):
        get_method("nope")


def test_a_method_registers_itself_and_a_stage_step_does_not():
    assert "cada_adapt" not in METHODS and "cada_ssl" not in METHODS  # CADA's stage steps: register=False

    class Mine(Method):
        name = "test_mine"

    try:
        assert get_method("test_mine") is Mine
    finally:
        del METHODS["test_mine"]
    with pytest.raises(TypeError, match="no name of its own"):
        class Nameless(Method):
            pass


# --- steps on a stub G whose maps depend on the image, with discriminators that see their input ------------
# (a constant D cannot tell a label swap; "both changed" cannot tell a G step that also moves D)

from rayuda.methods.base import SOURCE, TARGET  # noqa: E402


class StubG(nn.Module):
    """G with learnable logits (plus the image's first C channels, so source and target maps differ), an
    ``aux`` level when ``multi_level``, and learnable feature maps ``layer1``..``layer4`` scaled by the image."""

    def __init__(self, num_classes: int = 2, multi_level: bool = False, size=(2, 2), channels=(3, 4, 5)):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.num_classes = num_classes
        self.z = nn.Parameter(torch.randn(1, num_classes, *size, generator=gen))
        self.z_aux = nn.Parameter(torch.randn(1, num_classes, *size, generator=gen)) if multi_level else None
        self.feats = nn.ParameterDict({f"layer{i + 2}": nn.Parameter(torch.randn(1, c, *size, generator=gen))
                                       for i, c in enumerate(channels)})
        # layer1 (CRAM's default style layer, the paper's Conv2), drawn last so layer2..layer4 keep their values
        self.feats["layer1"] = nn.Parameter(torch.randn(1, 2, *size, generator=gen))

    @property
    def feature_channels(self):
        return {name: p.shape[1] for name, p in self.feats.items()}

    def forward(self, x):
        offset = x[:, : self.num_classes]
        at = lambda z: z if z.shape[-2:] == x.shape[-2:] else nn.functional.interpolate(z, size=x.shape[-2:])  # noqa: E731
        logits = {"main": at(self.z) + offset}
        if self.z_aux is not None:
            logits["aux"] = at(self.z_aux) + offset
        scale = 1 + x.mean(dim=(1, 2, 3), keepdim=True)
        return SegOutput(logits=logits, features={k: p * scale for k, p in self.feats.items()})


class LinearD(nn.Module):
    """A 1×1-conv discriminator with known weights; records every input it sees."""

    def __init__(self, in_channels: int, out_channels: int = 1, seed: int = 1, bias: torch.Tensor | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(out_channels, generator=gen) if bias is None else bias)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.conv(x)


def stub_context(method_name: str, *, multi_level=False, lr_g=0.1, lr_d=0.1, discs=None, **params):
    cfg = default_config(method_name)
    cfg["params"].update(params)
    cfg["model"]["multi_level"] = multi_level
    method = get_method(method_name)()
    model = StubG(multi_level=multi_level)
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=2, params=cfg["params"])
    if discs is None:
        method.setup(ctx)  # the method's own discriminators, then replaced by linear ones of the same names
        channels = {name: next(d.parameters()).shape[1] for name, d in ctx.discriminators.items()}
        outs = {name: (2 * ctx.num_classes if name.startswith("fine") else 1) for name in channels}
        discs = {name: LinearD(channels[name], outs[name], seed=i + 1) for i, name in enumerate(sorted(channels))}
    ctx.discriminators = nn.ModuleDict(discs)
    ctx.opt_g = torch.optim.SGD(model.parameters(), lr=lr_g)
    ctx.opt_d = torch.optim.SGD(ctx.discriminators.parameters(), lr=lr_d) if len(ctx.discriminators) else None
    return method, ctx


def image_batch(value: float, labels=((0, 1), (1, 255))):
    """A 1×3×2×2 image filled with ``value`` (its first two channels offset G's logits) and a 2×2 label."""
    image = torch.full((1, 3, 2, 2), value)
    image[:, 1] = -value
    return {"image": image, "label": torch.tensor([labels])}


SRC, TGT = image_batch(0.0), image_batch(1.5, labels=((255, 255), (255, 255)))


def _snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class PhaseLog(list):
    """Wraps both optimisers' ``step``: each call appends which network's optimiser stepped and whether G / D
    moved since the previous entry; ``record("after")`` adds what moved after the last step."""

    def __init__(self, ctx: TrainContext):
        super().__init__()
        self.ctx, self.last = ctx, (_snapshot(ctx.model), _snapshot(ctx.discriminators))
        for name, opt in (("G", ctx.opt_g), ("D", ctx.opt_d)):
            opt.step = self._wrap(name, opt.step)

    def record(self, name: str) -> None:
        g, d = _snapshot(self.ctx.model), _snapshot(self.ctx.discriminators)
        self.append({"phase": name, "g_moved": not _same(self.last[0], g), "d_moved": not _same(self.last[1], d)})
        self.last = (g, d)

    def _wrap(self, name, step):
        def run(*args, **kwargs):
            out = step(*args, **kwargs)
            self.record(name)
            return out
        return run


def bce(logits: torch.Tensor, label: float) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label)))


@pytest.mark.parametrize("name,order", [("adaptsegnet", ["G", "D"]), ("advent", ["G", "D"]),
                                        ("cram", ["D", "G"]), ("fgdem", ["G", "D"])])
def test_g_step_moves_only_g_and_d_step_only_d(name, order):
    method, ctx = stub_context(name)
    phases = PhaseLog(ctx)
    method.train_step(ctx, SRC, TGT)
    phases.record("after")
    assert [p["phase"] for p in phases] == [*order, "after"]
    for p in phases:
        assert p["g_moved"] == (p["phase"] == "G"), p
        assert p["d_moved"] == (p["phase"] == "D"), p


@pytest.mark.parametrize("name", ["adaptsegnet", "advent", "cram"])
def test_discriminator_step_pushes_source_towards_source_label(name):
    """With G fixed, D's update must move D(source map) − D(target map) towards SOURCE − TARGET."""
    method, ctx = stub_context(name, lr_g=0.0, lr_d=0.5)
    disc = ctx.discriminators["main"]
    with torch.no_grad():
        maps_s = method.domain_maps(ctx, ctx.model(SRC["image"]), (2, 2))["main"]
        maps_t = method.domain_maps(ctx, ctx.model(TGT["image"]), (2, 2))["main"]
        gap_before = float(disc(maps_s).mean() - disc(maps_t).mean())
    method.train_step(ctx, SRC, TGT)
    with torch.no_grad():
        gap_after = float(disc(maps_s).mean() - disc(maps_t).mean())
    assert (gap_after - gap_before) * (SOURCE - TARGET) > 0


@pytest.mark.parametrize("name", ["adaptsegnet", "advent"])
def test_output_space_losses_with_a_discriminator_that_sees_its_input(name):
    method, ctx = stub_context(name, lr_g=0.0, lr_d=0.0)
    disc = ctx.discriminators["main"]
    with torch.no_grad():
        d_s = disc(method.domain_maps(ctx, ctx.model(SRC["image"]), (2, 2))["main"])
        d_t = disc(method.domain_maps(ctx, ctx.model(TGT["image"]), (2, 2))["main"])
    losses = method.train_step(ctx, SRC, TGT)
    assert float(losses["adv"]) == pytest.approx(bce(d_t, SOURCE), rel=1e-5)  # G: target maps labelled source
    assert float(losses["d"]) == pytest.approx(0.5 * bce(d_s, SOURCE) + 0.5 * bce(d_t, TARGET), rel=1e-5)


def test_multi_level_losses_weight_each_level():
    """seg = CE(main) + 0.1·CE(aux); adv = BCE(D_main) + 0.2·BCE(D_aux) (AdvEnt's 1e-3 / 2e-4); D: both levels."""
    method, ctx = stub_context("advent", multi_level=True, lr_g=0.0, lr_d=0.0)
    assert set(ctx.discriminators) == {"main", "aux"}
    model = ctx.model
    with torch.no_grad():
        out_s, out_t = model(SRC["image"]), model(TGT["image"])
        ce = {lvl: float(torch.nn.functional.cross_entropy(out_s.logits[lvl], SRC["label"], ignore_index=255))
              for lvl in ("main", "aux")}
        maps_s, maps_t = method.domain_maps(ctx, out_s, (2, 2)), method.domain_maps(ctx, out_t, (2, 2))
        d_s = {lvl: ctx.discriminators[lvl](maps_s[lvl]) for lvl in ("main", "aux")}
        d_t = {lvl: ctx.discriminators[lvl](maps_t[lvl]) for lvl in ("main", "aux")}
    losses = method.train_step(ctx, SRC, TGT)
    assert float(losses["seg"]) == pytest.approx(ce["main"] + 0.1 * ce["aux"], rel=1e-5)
    assert float(losses["adv"]) == pytest.approx(bce(d_t["main"], SOURCE) + 0.2 * bce(d_t["aux"], SOURCE), rel=1e-5)
    assert float(losses["d"]) == pytest.approx(sum(0.5 * bce(d_s[lvl], SOURCE) + 0.5 * bce(d_t[lvl], TARGET)
                                            for lvl in ("main", "aux")), rel=1e-5)


def _ce_terms(logits: torch.Tensor) -> torch.Tensor:
    """CRAM eq. 4–5 by hand: f_c = Σ_hw P_c, Q_c ∝ P_c²/f_c, terms −Q_c log P_c / log C."""
    p = torch.softmax(logits, dim=1)
    q = p**2 / p.sum(dim=(2, 3), keepdim=True)
    q = q / q.sum(1, keepdim=True)
    return -q * torch.log(p) / math.log(p.shape[1])


@pytest.mark.parametrize("channels", ["per_class", "summed"])
def test_cram_feeds_d_the_confidence_aware_entropy_map(channels):
    method, ctx = stub_context("cram", lr_g=0.0, lr_d=0.0, ce_channels=channels, sfa=False)
    disc = ctx.discriminators["main"]
    with torch.no_grad():
        expected_s, expected_t = _ce_terms(ctx.model(SRC["image"]).logits["main"]), \
            _ce_terms(ctx.model(TGT["image"]).logits["main"])
    if channels == "summed":
        expected_s, expected_t = expected_s.sum(1, keepdim=True), expected_t.sum(1, keepdim=True)
    method.train_step(ctx, SRC, TGT)
    # D's step sees source then target; G's adversarial term sees target
    assert len(disc.inputs) == 3
    assert torch.allclose(disc.inputs[0], expected_s, atol=1e-5)
    assert torch.allclose(disc.inputs[1], expected_t, atol=1e-5)
    assert torch.allclose(disc.inputs[2], expected_t, atol=1e-5)


def test_cram_generator_is_fooled_through_the_updated_discriminator():
    """Algorithm 1: D steps first, so G's adversarial loss is computed with D's new weights."""
    method, ctx = stub_context("cram", lr_g=0.0, lr_d=0.5, sfa=False)
    disc = ctx.discriminators["main"]
    losses = method.train_step(ctx, SRC, TGT)
    with torch.no_grad():
        d_t = disc(_ce_terms(ctx.model(TGT["image"]).logits["main"]))
    assert float(losses["adv"]) == pytest.approx(bce(d_t, SOURCE), rel=1e-5)


def _style(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """CRAM eq. 11 by hand for one image per domain: ‖S_S − S_T‖² / (4 N² M²)."""
    n, m = fs.shape[1], fs.shape[2] * fs.shape[3]
    vs, vt = fs.reshape(n, m), ft.reshape(n, m)
    return float(((vs @ vs.T - vt @ vt.T) ** 2).sum() / (4 * n**2 * m**2))


@pytest.mark.parametrize("layers", ["layer2+layer3", "layer3+layer4"])
def test_cram_style_loss_weights_its_two_layers(layers):
    w = 0.3
    method, ctx = stub_context("cram", lr_g=0.0, lr_d=0.0, cea=False, style_layers=layers, style_weight=w)
    first, second = layers.split("+")
    with torch.no_grad():
        fs, ft = ctx.model(SRC["image"]).features, ctx.model(TGT["image"]).features
    losses = method.train_step(ctx, SRC, TGT)
    expected = w * _style(fs[first], ft[first]) + (1 - w) * _style(fs[second], ft[second])
    assert float(losses["style"]) == pytest.approx(expected, rel=1e-5)
    assert "adv" not in losses and len(ctx.discriminators) == 0


def _soft_ce(d_logits: torch.Tensor, target: torch.Tensor) -> float:
    return float(-(target * torch.log_softmax(d_logits, dim=1)).sum(1).mean())


def test_fgdem_uses_2k_soft_labels_and_labels_target_as_source_for_g():
    """D: source features → [a_S; 0], target → [0; a_T] (2K channels, a = min(softmax(z/T), clamp)); G:
    target features → [a_T; 0]. A D whose 2K outputs differ per channel tells every swap apart."""
    temperature, clamp = 1.8, 0.6
    bias = torch.tensor([0.5, -1.0, 1.5, 0.2])  # "source, class 0/1", "target, class 0/1"
    fine = LinearD(5, 4, bias=bias)
    method, ctx = stub_context("fgdem", lr_g=0.0, lr_d=0.0, discs={"fine": fine}, temperature=temperature,
                               clamp=clamp)
    with torch.no_grad():
        out_s, out_t = ctx.model(SRC["image"]), ctx.model(TGT["image"])
        d_s, d_t = fine(out_s.features["layer4"]), fine(out_t.features["layer4"])
        a_s = torch.softmax(out_s.logits["main"] / temperature, 1).clamp(max=clamp)
        a_t = torch.softmax(out_t.logits["main"] / temperature, 1).clamp(max=clamp)
    zeros = torch.zeros_like(a_s)
    assert bool((a_s == clamp).any())  # the clamp is exercised
    losses = method.train_step(ctx, SRC, TGT)
    assert fine.inputs[0].shape[1] == 5  # the deepest features (layer4)
    assert float(losses["adv"]) == pytest.approx(_soft_ce(d_t, torch.cat([a_t, zeros], 1)), rel=1e-5)
    expected_d = 0.5 * (_soft_ce(d_s, torch.cat([a_s, zeros], 1)) + _soft_ce(d_t, torch.cat([zeros, a_t], 1)))
    assert float(losses["d"]) == pytest.approx(expected_d, rel=1e-5)


def test_cram_order_g_first_updates_g_then_d():
    method, ctx = stub_context("cram", order="g_first")
    phases = PhaseLog(ctx)
    method.train_step(ctx, SRC, TGT)
    assert [p["phase"] for p in phases] == ["G", "D"]


def test_cram_rejects_an_unknown_order():
    with pytest.raises(ValueError, match="params.order"):
        stub_context("cram", order="sideways")


@pytest.mark.parametrize("order,same", [("g_first", True), ("d_first", False)])
def test_cram_with_shannon_entropy_and_no_style_is_advent_only_in_g_first_order(order, same):
    """The ablation ``entropy: shannon, sfa: false`` equals advent when the order matches."""
    m_cram, c_cram = stub_context("cram", multi_level=True, entropy="shannon", sfa=False, order=order, w_adv=1.0)
    m_adv, c_adv = stub_context("advent", multi_level=True, w_adv=1.0)
    for method, ctx in ((m_cram, c_cram), (m_adv, c_adv)):
        for _ in range(2):
            method.train_step(ctx, SRC, TGT)
    g_equal = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(c_cram.model.parameters(),
                                                                  c_adv.model.parameters(), strict=True))
    d_equal = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(c_cram.discriminators.parameters(),
                                                                  c_adv.discriminators.parameters(), strict=True))
    assert (g_equal and d_equal) == same


@pytest.mark.parametrize("name", ["adaptsegnet", "advent", "cram"])
def test_adversarial_maps_keep_each_domain_at_its_own_size(name):
    """Source maps are not resized to the target's size before D (ADVENT keeps both)."""
    method, ctx = stub_context(name, lr_g=0.0, lr_d=0.0)
    target = {"image": torch.full((1, 3, 3, 5), 1.5), "label": torch.full((1, 3, 5), 255)}
    method.train_step(ctx, SRC, target)
    shapes = {tuple(x.shape[-2:]) for x in ctx.discriminators["main"].inputs}
    assert shapes == {(2, 2), (3, 5)}


def test_fgdem_adapts_both_levels_of_a_multi_level_g():
    """Conv4 (aux) and conv5 (main) features each get a fine-grained D; level weights 1 / 0.2."""
    temperature, clamp = 1.8, 0.9
    method, ctx = stub_context("fgdem", multi_level=True, lr_g=0.0, lr_d=0.0, lambda_ent=0.5)
    assert set(ctx.discriminators) == {"fine", "fine_aux"}
    with torch.no_grad():
        out_s, out_t = ctx.model(SRC["image"]), ctx.model(TGT["image"])
    feats = {"main": "layer4", "aux": "layer3"}
    adv = d = ent = 0.0
    for lvl, weight in (("main", 1.0), ("aux", 0.2)):
        disc = ctx.discriminators["fine" if lvl == "main" else "fine_aux"]
        with torch.no_grad():
            d_s, d_t = disc(out_s.features[feats[lvl]]), disc(out_t.features[feats[lvl]])
        disc.inputs.clear()
        a_s = torch.softmax(out_s.logits[lvl] / temperature, 1).clamp(max=clamp)
        a_t = torch.softmax(out_t.logits[lvl] / temperature, 1).clamp(max=clamp)
        zeros = torch.zeros_like(a_s)
        adv += weight * _soft_ce(d_t, torch.cat([a_t, zeros], 1))
        d += 0.5 * (_soft_ce(d_s, torch.cat([a_s, zeros], 1)) + _soft_ce(d_t, torch.cat([zeros, a_t], 1)))
        p_t = torch.softmax(out_t.logits[lvl], 1)
        ent += weight * float((-(p_t * torch.log(p_t)).sum(1) / math.log(2)).mean())
    losses = method.train_step(ctx, SRC, TGT)
    assert {x.shape[1] for x in ctx.discriminators["fine"].inputs} == {5}  # layer4
    assert {x.shape[1] for x in ctx.discriminators["fine_aux"].inputs} == {4}  # layer3
    assert float(losses["adv"]) == pytest.approx(adv, rel=1e-5)
    assert float(losses["d"]) == pytest.approx(d, rel=1e-5)
    assert float(losses["ent"]) == pytest.approx(ent, rel=1e-5)
