"""``cra`` and ``pixintrada``: their losses on tiny tensors, their labellers on hand-made probability maps, their
training steps on stub networks (which pixels get CE, which label each region gets at D, a planted swap
fails), and both plans end to end on minicity with the stage cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.plan import stage_key, stage_slice
from rayuda.methods import cra as cra_module
from rayuda.methods import default_config, get_method, plan_of, resolve_config
from rayuda.methods import pixintrada as pix_module
from rayuda.methods.context import TrainContext
from rayuda.methods.cra import CrossRegionSplit, cra_adv_loss, cra_d_loss, cra_entropy, region_encoding
from rayuda.methods.fgdem import FGDEM
from rayuda.methods.pixintrada.labeller import ClassThresholdSplit, histogram_median
from rayuda.methods.pixintrada.losses import (
    continuous_index,
    cts_d_loss,
    cts_g_loss,
    kl_to_uniform,
    pla_d_loss,
    pla_g_loss,
)
from rayuda.models import SegOutput
from tests.test_engine import tiny


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_softmax(values: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(v) for v in values))
    return [v - norm for v in values]


def plain_entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


# -- losses -------------------------------------------------------------------------------------------------


def test_cra_entropy_uses_the_k_log_k_normaliser():
    k = 4
    uniform = torch.full((1, k, 1, 1), 1 / k)
    two = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, k, 1, 1)
    assert cra_entropy(uniform).item() == pytest.approx(1 / k, rel=1e-6)  # log K / (K log K)
    assert cra_entropy(two).item() == pytest.approx(math.log(2) / (k * math.log(k)), rel=1e-6)


def test_region_encoding_gives_trusted_pixels_a_0_and_untrusted_0_a():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1×2×1×2
    enc = region_encoding(logits, torch.tensor([[[True, False]]]), temperature=2.0)
    a0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # pixel 0: z/T = [1, 0]
    a1 = torch.softmax(torch.tensor([0.0, 0.5]), 0)
    assert torch.allclose(enc[0, :, 0, 0], torch.cat([a0, torch.zeros(2)]))
    assert torch.allclose(enc[0, :, 0, 1], torch.cat([torch.zeros(2), a1]))
    clamped = region_encoding(torch.tensor([[[[9.0]], [[0.0]]]]), torch.tensor([[[True]]]), 1.0, clamp=0.9)
    assert clamped[0, 0].item() == pytest.approx(0.9)


D0, D1 = [1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 2.0, 0.0]  # D's 2K = 4 logits at two pixels (K = 2)


def cra_expected(a0, a1, trusted=(True, False)):
    """Eq. 8 and eq. 7 by hand for two pixels, sums divided by the pixel count (2)."""
    d_terms, g_terms = [], []
    for a, d, ok in ((a0, D0, trusted[0]), (a1, D1, trusted[1])):
        ls = log_softmax(d)
        d_terms.append(-sum(a[k] * ls[k if ok else 2 + k] for k in range(2)))
        g_terms.append(0.0 if ok else -sum(a[k] * ls[k] for k in range(2)))
    return sum(d_terms) / 2, sum(g_terms) / 2


def test_cra_losses_by_hand():
    a0, a1 = [0.7, 0.3], [0.4, 0.6]
    enc = torch.tensor([a0 + [0, 0], [0, 0] + a1]).t().reshape(1, 4, 1, 2)  # pixel 0 trusted, pixel 1 not
    d_logits = torch.tensor([D0, D1]).t().reshape(1, 4, 1, 2)
    want_d, want_g = cra_expected(a0, a1)
    assert cra_d_loss(d_logits, enc).item() == pytest.approx(want_d, rel=1e-6)
    assert cra_adv_loss(d_logits, enc).item() == pytest.approx(want_g, rel=1e-6)


HARD_D = [0.8, 0.3, 0.6, 0.1]  # D = sigmoid(logits) at four pixels
HARD_M = [1.0, 0.0, 1.0, 0.0]


def pla_inputs():
    d_logits = torch.tensor([logit(v) for v in HARD_D], requires_grad=True).view(1, 1, 2, 2)
    return d_logits, torch.tensor(HARD_M).view(1, 1, 2, 2)


def test_pla_losses_normalised_and_the_papers_unnormalised_form():
    d_logits, hard = pla_inputs()
    # normalised: the mean of D over hard pixels, of 1 − D over easy ones
    assert pla_d_loss(d_logits, hard).item() == pytest.approx(-math.log(0.7) - math.log(0.8), rel=1e-5)
    assert pla_g_loss(d_logits, hard).item() == pytest.approx(-math.log(0.3), rel=1e-5)
    # eq. 6 as written: logs of sums (here ≥ 1 each, so the D loss is negative) — same gradients
    raw = pla_d_loss(d_logits, hard, normalise=False)
    assert raw.item() == pytest.approx(-math.log(1.4) - math.log(1.6), rel=1e-5)
    (grad_raw,) = torch.autograd.grad(raw, d_logits)
    (grad_norm,) = torch.autograd.grad(pla_d_loss(d_logits, hard), d_logits)
    assert torch.allclose(grad_raw, grad_norm)
    assert pla_g_loss(d_logits, hard, normalise=False).item() == pytest.approx(-math.log(0.6), rel=1e-5)


def test_pla_loss_ignores_a_region_an_image_lacks():
    d_logits, _ = pla_inputs()
    all_easy = torch.zeros(1, 1, 2, 2)
    assert pla_d_loss(d_logits, all_easy).item() == pytest.approx(-math.log(1 - sum(HARD_D) / 4), rel=1e-5)
    assert pla_g_loss(d_logits, all_easy).item() == 0.0


def test_continuous_index_and_cts_losses_by_hand():
    prob = torch.tensor([[0.7, 0.4], [0.3, 0.6]]).view(1, 2, 1, 2)
    hard = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    z = continuous_index(prob, hard)
    assert z.flatten().tolist() == pytest.approx([0.0, 0.4])  # easy → 0, hard → 1 − max_k y_k
    d_logits = torch.tensor([logit(0.8), logit(0.3)]).view(1, 1, 1, 2)
    assert cts_d_loss(d_logits, z).item() == pytest.approx((0.8**2 + 0.1**2) / 2, rel=1e-5)
    assert cts_g_loss(d_logits, hard).item() == pytest.approx(0.3**2 / 2, rel=1e-5)


def test_kl_to_uniform_by_hand():
    assert kl_to_uniform(torch.full((1, 3, 2, 2), 1 / 3)).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)
    want = -math.log(3) - (math.log(0.5) + 2 * math.log(0.25)) / 3
    assert kl_to_uniform(p).item() == pytest.approx(want, rel=1e-6)
    two = torch.cat([p, torch.full((1, 3, 1, 1), 1 / 3)], dim=3)  # pixel 1 uniform: KL 0
    assert kl_to_uniform(two).item() == pytest.approx(want / 2, rel=1e-6)
    assert kl_to_uniform(two, torch.tensor([[[True, False]]])).item() == pytest.approx(want, rel=1e-6)


# -- labellers on hand-made probability maps --------------------------------------------------------------


def prob_map(pixels: list[list[float]]) -> torch.Tensor:
    """C×1×W softmax map from a list of per-pixel probability vectors."""
    return torch.tensor(pixels).t().unsqueeze(1)


CRA_IMAGES = {
    # class a: 5 confident + 1 split pixel; class b: 2 confident + 1 unsure; class c (rare, 1 of 10 pixels)
    "one.png": [[0.98, 0.01, 0.01]] * 4 + [[0.55, 0.45, 0.0]],
    "two.png": [[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.98, 0.01], [0.2, 0.7, 0.1], [0.05, 0.4, 0.55]],
}


def run_labeller(labeller, images):
    for name, pixels in images.items():
        labeller.observe(name, prob_map(pixels))
    stats = labeller.decide()
    labels = {name: labeller.label(name, prob_map(pixels)).flatten().tolist() for name, pixels in images.items()}
    return stats, labels


def test_cross_region_split_on_a_hand_made_target():
    e = {name: [plain_entropy(p) / (3 * math.log(3)) for p in pixels] for name, pixels in CRA_IMAGES.items()}
    assert e["one.png"][0] < 0.15 < e["one.png"][4] and e["two.png"][3] > 0.15  # the margins the test relies on
    assert 0.5 * e["two.png"][4] < 0.15 < e["two.png"][4]  # c's pixel is trusted only thanks to the rare rule
    params = {"lambda": 0.15, "rare_fraction": 0.15, "rare_factor": 0.5}
    stats, labels = run_labeller(CrossRegionSplit(params, ["a", "b", "c"]), CRA_IMAGES)
    assert labels == {"one.png": [0, 0, 0, 0, 255], "two.png": [0, 1, 1, 255, 2]}
    assert stats["rare_classes"] == ["c"] and stats["trusted_share"] == pytest.approx(0.8)
    assert stats["per_class"]["a"] == pytest.approx(
        {"threshold": 0.15, "rare": False, "pseudo_label_share": 0.6, "kept_share": 5 / 6})
    assert stats["per_class"]["b"]["kept_share"] == pytest.approx(2 / 3)
    assert stats["per_class"]["c"] == pytest.approx(
        {"threshold": 0.3, "rare": True, "pseudo_label_share": 0.1, "kept_share": 1.0})
    # without the rare-class rule (the ablation) c's pixel is untrusted
    _, plain = run_labeller(CrossRegionSplit({**params, "rare_factor": 1.0}, ["a", "b", "c"]), CRA_IMAGES)
    assert plain["two.png"] == [0, 1, 1, 255, 255]


PIX_IMAGE = {
    "x.png": [
        [0.95, 0.03, 0.02], [0.97, 0.02, 0.01], [0.99, 0.005, 0.005],  # a, confident: easy a
        [0.5, 0.16, 0.34],  # predicted a, a fails α·t_a but c passes α·t_c: easy, label c (not the argmax)
        [0.45, 0.3, 0.25],  # predicted a, no class passes: hard
        [0.2, 0.5, 0.3], [0.05, 0.6, 0.35], [0.1, 0.7, 0.2],  # b (the second passes c too: argmax of passing = b)
        [0.3, 0.3, 0.4],  # c
    ]
}


def test_class_threshold_split_on_a_hand_made_target():
    stats, labels = run_labeller(ClassThresholdSplit({"alpha": 0.8, "cap": 0.9}, ["a", "b", "c"]), PIX_IMAGE)
    per = stats["per_class"]
    # medians: a {.45,.5,.95,.97,.99} → .95, capped to .9; b {.5,.6,.7} → .6; c {.4} → .4 (histogram: ±2e-4)
    assert [per[k]["median"] for k in "abc"] == pytest.approx([0.95, 0.6, 0.4], abs=2e-4)
    assert [per[k]["threshold"] for k in "abc"] == pytest.approx([0.9, 0.6, 0.4], abs=2e-4)
    assert [per[k]["scaled_threshold"] for k in "abc"] == pytest.approx([0.72, 0.48, 0.32], abs=2e-4)
    assert labels["x.png"] == [0, 0, 0, 2, 255, 1, 1, 1, 2]
    assert stats["easy_proportion"] == pytest.approx(8 / 9)  # the paper's Prop. (eq. 4)
    assert [per[k]["kept_share"] for k in "abc"] == pytest.approx([4 / 5, 1.0, 1.0])


def test_histogram_median():
    hist = torch.zeros(10, dtype=torch.int64)
    hist[[2, 5, 5, 9]] = torch.tensor([1, 2, 2, 1])  # index_put: bin 5 gets 2, bin 2 and 9 one each
    assert histogram_median(hist) == pytest.approx((5 + 1 / 2) / 10)  # 2 of 4 values: halfway into bin 5
    assert histogram_median(torch.zeros(10, dtype=torch.int64)) is None


# -- training steps on stub networks ------------------------------------------------------------------------


class StubG(nn.Module):
    """G with learnable 2-class logits on a 1×2 map (pixel 0: [2, 0], pixel 1: [0, 0]) and a deepest feature
    map that *is* D's input: 4 channels at each pixel, ``D0`` and ``D1``."""

    def __init__(self, logits=((2.0, 0.0), (0.0, 0.0))):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(logits).t().reshape(1, 2, 1, 2))
        self.f = nn.Parameter(torch.tensor([D0, D1]).t().reshape(1, 4, 1, 2))

    def forward(self, x):
        n = x.shape[0]
        return SegOutput(logits={"main": self.z.expand(n, -1, -1, -1)},
                         features={"layer4": self.f.expand(n, -1, -1, -1)})


def identity_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        conv.bias.zero_()
    return conv


def linear_d(weights=(3.0, -1.0)) -> nn.Conv2d:
    """A pixel D whose logit is ``3·p_0 − p_1``: different at every pixel of the stub's prediction."""
    conv = nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights).view(1, 2, 1, 1))
        conv.bias.zero_()
    return conv


def context(method: str, params: dict, discriminators: dict, teacher=None) -> TrainContext:
    cfg = default_config(method)
    model = StubG()
    discs = nn.ModuleDict(discriminators)
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=2, params=params,
                       discriminators=discs, opt_g=torch.optim.SGD(model.parameters(), lr=0.0),
                       opt_d=torch.optim.Adam(discs.parameters(), lr=0.0) if len(discs) else None)
    if teacher is not None:
        ctx.freeze("teacher", teacher)
    return ctx


def pseudo_batch(label):
    return {"image": torch.zeros(1, 3, 1, 2), "label": torch.tensor([[label]])}


P0 = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]


CRA_KNOBS = get_method("cra").defaults["cra"]  # w_adv 1, g_steps 2, adv_normalise untrusted (the paper's)


def cra_step():
    params = {**CRA_KNOBS, "temperature": 1.0}
    ctx = context("cra", params, {"region": identity_conv(4)})
    return get_method("cra")().train_step(ctx, pseudo_batch([0, 255]), None)


def check_cra_step(losses):
    assert losses["seg"] == pytest.approx(-math.log(P0), rel=1e-6)  # CE on the trusted pixel 0 only
    want_d, want_g = cra_expected([P0, 1 - P0], [0.5, 0.5])  # pixel 0 → [a;0], pixel 1 → [0;a]; G: pixel 1 → [a;0]
    assert losses["d"] == pytest.approx(want_d, rel=1e-6)
    # eq. 7 is a mean over the untrusted pixels (1 of 2 here), not over all pixels (want_g: ÷ 2)
    assert losses["adv"] == pytest.approx(2 * want_g, rel=1e-6)
    assert losses["trusted"] == 0.5


def test_cra_step_trains_on_trusted_pixels_and_labels_regions_at_d():
    check_cra_step(cra_step())


def test_cra_step_check_catches_a_planted_region_swap(monkeypatch):
    swapped = lambda logits, trusted, t, clamp: region_encoding(logits, ~trusted, t, clamp)  # noqa: E731
    monkeypatch.setattr(cra_module, "region_encoding", swapped)
    with pytest.raises(AssertionError):
        check_cra_step(cra_step())


def test_cra_without_adversarial_part_is_self_training_only():
    ctx = context("cra", {**CRA_KNOBS, "temperature": 1.0, "adversarial": False}, {})
    losses = get_method("cra")().train_step(ctx, pseudo_batch([0, 255]), None)
    assert losses == {"seg": pytest.approx(-math.log(P0), rel=1e-6)}


D_EASY, D_HARD = sigmoid(3 * P0 - (1 - P0)), sigmoid(1.0)  # linear_d at pixel 0 (easy) and pixel 1 (hard)
Z_HARD = 1 - math.e / (1 + math.e)  # teacher's softmax at pixel 1: softmax([1, 0])


def pix_step(adversarial, kld=None):
    params = {"adversarial": adversarial, "beta": 1e-3, **({"kld": kld} if kld is not None else {})}
    ctx = context("pixintrada", params, {"main": linear_d()}, teacher=StubG(logits=((0.0, 1.0), (1.0, 0.0))))
    return get_method("pixintrada")().train_step(ctx, pseudo_batch([0, 255]), None)


def check_pix_step(losses, adversarial):
    assert losses["seg"] == pytest.approx(-math.log(P0), rel=1e-6)  # partial CE: the easy pixel 0 only
    assert losses["easy"] == 0.5
    if adversarial == "binary":  # eq. 6: D → 1 on hard, 0 on easy; G: hard pixels should read easy
        assert losses["d"] == pytest.approx(-math.log(D_HARD) - math.log(1 - D_EASY), rel=1e-5)
        assert losses["adv"] == pytest.approx(-math.log(1 - D_HARD), rel=1e-5)
    else:  # eq. 7–8: Z = 0 easy, 1 − max y (teacher) hard
        assert losses["d"] == pytest.approx((D_EASY**2 + (D_HARD - Z_HARD) ** 2) / 2, rel=1e-5)
        assert losses["adv"] == pytest.approx(D_HARD**2 / 2, rel=1e-5)


@pytest.mark.parametrize("adversarial", ["binary", "continuous"])
def test_pixintrada_step_partial_ce_and_pixel_labels_at_d(adversarial):
    check_pix_step(pix_step(adversarial), adversarial)


@pytest.mark.parametrize("adversarial", ["binary", "continuous"])
def test_pixintrada_step_check_catches_a_planted_easy_hard_swap(adversarial, monkeypatch):
    monkeypatch.setattr(pix_module, "pla_d_loss", lambda d, hard: pla_d_loss(d, 1 - hard))
    monkeypatch.setattr(pix_module, "continuous_index", lambda prob, hard: continuous_index(prob, 1 - hard))
    with pytest.raises(AssertionError):
        check_pix_step(pix_step(adversarial), adversarial)


def test_pixintrada_round_two_adds_kl_to_uniform_on_easy_pixels():
    losses = pix_step("none", kld=0.1)
    want = -math.log(2) - (math.log(P0) + math.log(1 - P0)) / 2  # pixel 0 only (pixel 1 is hard)
    assert losses["kld"] == pytest.approx(want, rel=1e-5) and "adv" not in losses


# -- plans ---------------------------------------------------------------------------------------------------


def test_cra_plan_runs_after_the_chosen_cross_domain_method():
    plan = plan_of(resolve_config("cra", {"params.cda": "fgdem"}))
    assert [(s.name, s.kind) for s in plan] == [("source_only", "train"), ("cda", "train"),
                                                ("regions", "pseudo_labels"), ("cra", "train")]
    assert plan[1].step is FGDEM and plan[1].params == "params.cda_params.fgdem"
    assert plan[3].labelled == "regions:all" and plan[3].reported
    with pytest.raises(ConfigError, match="params.cda"):
        plan_of(resolve_config("cra", {"params.cda": "minent"}))


def chain_keys(cfg) -> dict[str, str]:
    keys, upstream = {}, None
    for stage in plan_of(cfg):
        upstream = keys[stage.name] = stage_key(stage, stage_slice(cfg, stage), upstream)
    return keys


def test_pixintrada_round_one_and_the_inter_stage_are_shared():
    one = chain_keys(resolve_config("pixintrada", {"params.rounds": 1, "params.round2.intra.kld": 0.5}))
    two = chain_keys(resolve_config("pixintrada"))
    assert list(one) == ["source_only", "inter", "split", "intra"] and one.items() <= two.items()
    assert list(two)[4:] == ["split2", "intra2"]
    # with inter_method: advent (the earlier default; now adaptsegnet, the paper's) it is the very stage intrada trains
    advent = chain_keys(resolve_config("pixintrada", {"params.inter_method": "advent"}))
    assert chain_keys(resolve_config("intrada"))["inter"] == advent["inter"] != two["inter"]
    with pytest.raises(ConfigError, match="round2.intra.adversarial"):
        plan_of(resolve_config("pixintrada", {"params.round2.intra.adversarial": "bce"}))


# -- end to end on minicity ----------------------------------------------------------------------------------


def caches(summary) -> dict[str, str]:
    return {s["stage"]: s["cache"] for s in summary["stages"]}


def stage(summary, name) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("selftrain") / "cache"


def test_cra_end_to_end_and_a_threshold_change_reuses_the_cda_stage(cache, tmp_path):
    first = run_pipeline(tiny("cra", **{"params.regions.lambda": 0.05}), tmp_path / "a", cache_dir=cache)
    assert caches(first) == {"source_only": "miss", "cda": "miss", "regions": "miss", "cra": "miss"}
    regions = stage(first, "regions")
    stats = json.loads((Path(regions["dir"]) / "pseudo_labels.json").read_text())["statistics"]
    assert regions["labelled_pixel_share"] == pytest.approx(stats["trusted_share"])  # what CRA trains on
    assert {v["threshold"] for v in regions["per_class"].values()} <= {0.05, 0.1}  # λ, or λ/½ for rare classes
    assert regions["subset/all"] == 600 and math.isfinite(first["miou"])

    second = run_pipeline(tiny("cra", **{"params.regions.lambda": 0.02}), tmp_path / "b", cache_dir=cache)
    assert caches(second) == {"source_only": "hit", "cda": "hit", "regions": "miss", "cra": "miss"}
    assert stage(second, "regions")["labelled_pixel_share"] < regions["labelled_pixel_share"]


def test_pixintrada_end_to_end_and_round_two_reuses_round_one(cache, tmp_path):
    one = run_pipeline(tiny("pixintrada", **{"params.rounds": 1}), tmp_path / "a", cache_dir=cache)
    assert caches(one) == {"source_only": "hit", "inter": "miss", "split": "miss", "intra": "miss"}
    split = stage(one, "split")
    stats = json.loads((Path(split["dir"]) / "pseudo_labels.json").read_text())["statistics"]
    assert split["labelled_pixel_share"] == pytest.approx(stats["easy_proportion"])  # Prop.
    for entry in split["per_class"].values():
        assert entry["scaled_threshold"] == pytest.approx(0.85 * entry["threshold"]) and entry["threshold"] <= 0.9

    seen = []
    two = run_pipeline(tiny("pixintrada"), tmp_path / "b", cache_dir=cache, report=lambda m, d: seen.append(m))
    assert caches(two) == {"source_only": "hit", "inter": "hit", "split": "hit", "intra": "hit", "split2": "miss",
                           "intra2": "miss"}
    assert [(m["iteration"], m["stage"]) for m in seen] == [(3, "intra"), (6, "intra"), (9, "intra2"),
                                                            (12, "intra2")]
    assert seen[-1].get("last_report") and "loss/kld" in seen[-1] and two["iterations"] == 12
