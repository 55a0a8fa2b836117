"""CADA: the category-adaptive threshold rule on a hand-made prediction map, the style vector and its
discriminators, one training step of each stage on stub networks against losses computed by hand, and a tiny
minicity pipeline whose stage cache is shared across Δ and rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.plan import stage_key, stage_slice
from rayuda.methods import cada as cada_module
from rayuda.methods import default_config, plan_of, resolve_config
from rayuda.methods.cada import CADAAdapt, CADASelfTraining
from rayuda.methods.cada.labeller import CategoryAdaptiveThresholds, class_centroids
from rayuda.methods.cada.losses import self_training_cross_entropy, shannon_entropy, style_adversarial_loss
from rayuda.methods.context import TrainContext
from rayuda.models import SegOutput, StyleDiscriminator, build_segmenter, style_vector
from tests.test_engine import tiny

CLASSES = ["road", "car", "sky"]
# six pixels (3-class softmax vectors): a, b, c are predicted class 0, d, e, f class 1, none class 2
PIXELS = {"a": [0.90, 0.05, 0.05], "b": [0.60, 0.30, 0.10], "c": [0.40, 0.35, 0.25],
          "d": [0.10, 0.80, 0.10], "e": [0.25, 0.45, 0.30], "f": [0.05, 0.90, 0.05]}
IMAGES = {"x.png": "adb", "y.png": "cef"}  # two 1×3 images


def entropy(p) -> float:
    return -sum(v * math.log(v) for v in p)


def prob_map(pixels: str) -> torch.Tensor:
    """C×1×W softmax of an image whose pixels are the named vectors."""
    return torch.tensor([PIXELS[k] for k in pixels]).t().reshape(3, 1, len(pixels))


def run_labeller(delta: float) -> tuple[CategoryAdaptiveThresholds, dict, dict[str, list[int]]]:
    labeller = CategoryAdaptiveThresholds({"delta": delta}, CLASSES)
    for name, pixels in IMAGES.items():
        labeller.observe(name, prob_map(pixels))
    stats = labeller.decide()
    labels = {name: labeller.label(name, prob_map(pixels)).flatten().tolist() for name, pixels in IMAGES.items()}
    return labeller, stats, labels


# By hand: E(a) = E(f) = 0.394, E(b) = 0.898, E(c) = 1.081, E(d) = 0.639, E(e) = 1.067 nats; the centroids
# f^0 = mean(a, b, c) = [0.633, 0.233, 0.133], E(f^0) = 0.8975 (just below E(b)); f^1 = mean(d, e, f),
# E(f^1) = 0.792. Class 2 is never predicted.
@pytest.mark.parametrize("delta, expected", [
    (0.0, {"x.png": [0, 1, 255], "y.png": [255, 255, 1]}),  # b sits 4e-4 nats above its threshold: dropped
    (0.2, {"x.png": [0, 255, 255], "y.png": [255, 255, 1]}),  # d (0.639) > E(f^1) − 0.2 = 0.592: dropped
    (-0.2, {"x.png": [0, 1, 0], "y.png": [0, 255, 1]}),  # c (1.081) < 1.0975: kept; e (1.067) > 0.992: not
])
def test_centroid_entropy_rule_keeps_the_pixels_below_their_class_threshold(delta, expected):
    f0 = np.mean([PIXELS[k] for k in "abc"], axis=0)
    f1 = np.mean([PIXELS[k] for k in "def"], axis=0)
    assert entropy(f0) == pytest.approx(0.8975, abs=1e-4) and entropy(PIXELS["b"]) > entropy(f0)
    labeller, stats, labels = run_labeller(delta)
    assert labels == expected
    per_class = stats["per_class"]
    assert per_class["road"]["centroid_entropy"] == pytest.approx(entropy(f0), rel=1e-6)
    assert per_class["car"]["centroid_entropy"] == pytest.approx(entropy(f1), rel=1e-6)
    assert per_class["road"]["threshold"] == pytest.approx(entropy(f0) - delta, rel=1e-6)
    assert per_class["car"]["threshold"] == pytest.approx(entropy(f1) - delta, rel=1e-6)
    kept = [v for pixels in expected.values() for v in pixels]
    assert per_class["road"]["kept_share"] == pytest.approx(kept.count(0) / 3)
    assert per_class["car"]["kept_share"] == pytest.approx(kept.count(1) / 3)
    assert per_class["road"]["pixels"] == 3 and per_class["car"]["pixels"] == 3
    # a class no pixel was predicted as is reported, not dropped
    assert per_class["sky"] == {"pixels": 0, "centroid_entropy": None, "threshold": None, "kept_share": None}
    assert stats["not_predicted"] == ["sky"]
    assert stats["kept_pixel_share"] == pytest.approx(sum(v != 255 for v in kept) / 6)
    assert labeller.subsets() == {"all": ["x.png", "y.png"]}


def test_a_delta_at_or_above_a_class_centroid_entropy_silences_the_class_and_says_so(capsys):
    # E(f^1) = 0.792 (car) and E(f^0) = 0.8975 (road): Δ 0.8 puts car's threshold at −0.008, so no entropy is
    # below it; road's threshold, 0.0975, is positive but under every road pixel's entropy (kept none, not silenced)
    labeller, stats, labels = run_labeller(0.8)
    assert stats["silenced"] == ["car"]
    assert stats["per_class"]["car"]["threshold"] < 0 < stats["per_class"]["road"]["threshold"]
    assert stats["per_class"]["car"]["kept_share"] == 0 and stats["per_class"]["road"]["kept_share"] == 0
    assert labels == {"x.png": [255, 255, 255], "y.png": [255, 255, 255]}
    warning = capsys.readouterr().out
    assert "WARNING" in warning and "car (0.792)" in warning and "road" not in warning
    _, stats, _ = run_labeller(0.0)
    assert stats["silenced"] == [] and "WARNING" not in capsys.readouterr().out


def test_centroids_and_entropy_helpers():
    sums = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    centroids = class_centroids(sums, torch.tensor([2, 0]))
    assert torch.equal(centroids[0], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.isnan(centroids[1]).all()
    uniform = torch.full((1, 19, 2, 2), 1 / 19)
    assert torch.allclose(shannon_entropy(uniform), torch.full((1, 2, 2), math.log(19)))  # nats, not ÷ log C
    assert shannon_entropy(torch.tensor([[1.0, 0.0]]))[0] == 0


# -- style vectors and their discriminators ----------------------------------------------------------------


def test_style_vector_is_the_channel_mean_and_discriminators_fit_each_layer():
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(style_vector(feats), feats.flatten(2).mean(-1))
    disc = StyleDiscriminator(64)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 4 and all(c.kernel_size == (4,) for c in convs)  # the paper's four 1-D convs, kernel 4
    assert disc(torch.randn(5, 64)).shape == (5, 1, 4)
    assert StyleDiscriminator(128)(torch.randn(5, 128)).shape == (5, 1, 8)
    with pytest.raises(ValueError, match="expects B×64"):
        disc(torch.randn(5, 128))

    cfg = default_config("cada")
    model = build_segmenter(cfg["model"], 19)
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=19,
                       params=cfg["params"]["adapt"])
    CADAAdapt().setup(ctx)
    assert sorted(ctx.discriminators) == ["main", "style_layer1", "style_layer2"]  # layer3 has weight 0
    out = model(torch.randn(2, 3, 32, 64))
    for layer, length in (("layer1", 4), ("layer2", 8)):
        assert ctx.discriminators[f"style_{layer}"](style_vector(out.features[layer])).shape == (2, 1, length)
    ctx.params["style_weights"]["layer4"] = 1.0  # model.layers = 3: no layer4 to take a style from
    with pytest.raises(ConfigError, match="style_weights.layer4"):
        CADAAdapt().setup(TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=19,
                                       params=ctx.params))


# -- one training step on stub networks -------------------------------------------------------------------


class StubG(nn.Module):
    """Logits: one learnable 2-class 1×2 map (pixel 0: [2, 0], pixel 1: [0, 0]); features: the image's first
    two channels (``layer1``), so source and target styles differ."""

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]]))

    def forward(self, x):
        return SegOutput(logits={"main": self.z.expand(x.shape[0], -1, -1, -1)}, features={"layer1": x[:, :2]})


class ConstantDiscriminator(nn.Module):
    def __init__(self, b: float):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, b)

    def forward(self, x):
        return self.conv(x)


def sum_discriminator() -> nn.Linear:
    """A style D whose logit is the sum of the style vector's entries."""
    disc = nn.Linear(2, 1)
    nn.init.ones_(disc.weight)
    nn.init.zeros_(disc.bias)
    return disc


def image(red: float, green: float, labels) -> dict:
    img = torch.zeros(1, 3, 1, 2)
    img[:, 0], img[:, 1] = red, green
    return {"image": img, "label": torch.tensor([labels])}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # BCE-with-logits: BCE(l, 1) = softplus(−l), BCE(l, 0) = softplus(l)


P0 = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]
B = 0.5  # output D's constant logit
SOURCE_IMAGE, TARGET_IMAGE = (1.0, 3.0), (-1.0, 0.5)  # style vectors: D_f(S_s) = 4, D_f(S_t) = −0.5


def adapt_step(w_layer1: float = 0.5) -> dict:
    cfg = default_config("cada")
    params = cfg["params"]["adapt"]
    params["style_weights"] = {"layer1": w_layer1, "layer2": 0.0, "layer3": 0.0, "layer4": 0.0}
    model = StubG()
    discs = nn.ModuleDict({"main": ConstantDiscriminator(B), "style_layer1": sum_discriminator()})
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=2, params=params,
                       discriminators=discs, opt_g=torch.optim.SGD(model.parameters(), lr=0.0),
                       opt_d=torch.optim.Adam(discs.parameters(), lr=0.0))
    return CADAAdapt().train_step(ctx, image(*SOURCE_IMAGE, [[0, 1]]), image(*TARGET_IMAGE, [[255, 255]]))


def matches_paper(losses: dict, w_layer1: float = 0.5) -> bool:
    """Eq. 5 by hand: G wants the target labelled source (1); each D labels source 1, target 0."""
    expected = {
        "seg": (-math.log(P0) - math.log(0.5)) / 2,
        "adv": softplus(-B),
        "style": w_layer1 * softplus(0.5),  # BCE(D_f(S_t) = −0.5, 1)
        "d_style": 0.5 * softplus(-4.0) + 0.5 * softplus(-0.5),  # BCE(4, 1), BCE(−0.5, 0)
    }
    expected["d"] = 0.5 * softplus(-B) + 0.5 * softplus(B) + expected["d_style"]
    return all(math.isclose(losses[k], v, rel_tol=1e-6) for k, v in expected.items())


def test_adapt_step_losses_match_equation_5_and_a_planted_domain_label_swap_fails(monkeypatch):
    assert matches_paper(adapt_step())
    assert matches_paper(adapt_step(w_layer1=2.0), w_layer1=2.0)  # the per-layer weight scales its term
    monkeypatch.setattr(cada_module, "SOURCE", 0.0)  # planted bug: source and target labels swapped
    monkeypatch.setattr(cada_module, "TARGET", 1.0)
    assert not matches_paper(adapt_step())


def test_self_training_step_is_equation_6_on_the_kept_pixels_plus_source_ce():
    cfg = default_config("cada")
    model = StubG()
    ctx = TrainContext(config=cfg, model=model, device=torch.device("cpu"), num_classes=2,
                       params=dict(cfg["params"]["ssl"]), opt_g=torch.optim.SGD(model.parameters(), lr=0.0))
    source, target = image(0, 0, [[0, 1]]), image(0, 0, [[0, 255]])  # pixel 1 rejected by eq. 3
    losses = CADASelfTraining().train_step(ctx, source, target)
    assert losses["ssl"] == pytest.approx(-math.log(P0) / 2, rel=1e-6)  # eq. 6: ÷ H·W = 2 pixels
    assert losses["seg"] == pytest.approx((-math.log(P0) - math.log(0.5)) / 2, rel=1e-6)
    swapped = CADASelfTraining().train_step(ctx, source, image(0, 0, [[1, 255]]))  # planted class swap
    assert float(swapped["ssl"]) != pytest.approx(float(losses["ssl"]), rel=1e-3)  # losses are 0-d tensors
    ctx.params["normalise"] = "kept"
    assert CADASelfTraining().train_step(ctx, source, target)["ssl"] == pytest.approx(-math.log(P0), rel=1e-6)
    ctx.params["w_source"] = 0.0
    assert "seg" not in CADASelfTraining().train_step(ctx, source, target)


def test_losses_of_eq_5_and_6():
    logits = {"layer1": torch.tensor([[2.0]]), "layer2": torch.tensor([[-1.0]])}
    value = style_adversarial_loss(logits, {"layer1": 0.25, "layer2": 1.0}, 1.0)
    assert value.item() == pytest.approx(0.25 * softplus(-2.0) + softplus(1.0), rel=1e-6)
    z = torch.zeros(1, 2, 1, 4, requires_grad=True)
    loss = self_training_cross_entropy(z, torch.tensor([[[0, 255, 255, 255]]]))
    assert loss.item() == pytest.approx(math.log(2) / 4, rel=1e-6)
    loss.backward()
    with pytest.raises(ValueError, match="normalise"):
        self_training_cross_entropy(z, torch.zeros(1, 1, 4), normalise="mean")


# -- plans, and a tiny pipeline on minicity ------------------------------------------------------------------


def test_plan_has_stable_round_names_and_round_1_keys_agree_across_round_counts():
    names = {r: [s.name for s in plan_of(resolve_config("cada", {"params.rounds": r}))] for r in range(4)}
    assert names[0] == ["source_only", "adapt"]
    assert names[3] == ["source_only", "adapt", "thresholds1", "round1", "thresholds2", "round2", "thresholds3",
                        "round3"]
    assert names[1] == names[3][:4] and names[2] == names[3][:6]
    assert [s.reported for s in plan_of(resolve_config("cada", {"params.rounds": 0}))] == [False, True]
    with pytest.raises(ConfigError, match="params.rounds"):
        plan_of(resolve_config("cada", {"params.rounds": 4}))

    def keys(cfg):
        out, upstream = {}, None
        for stage in plan_of(cfg):
            upstream = out[stage.name] = stage_key(stage, stage_slice(cfg, stage), upstream)
        return out

    one, three = keys(resolve_config("cada", {"params.rounds": 1})), keys(resolve_config("cada"))
    assert all(one[name] == three[name] for name in one)
    other_delta = keys(resolve_config("cada", {"params.thresholds.delta": 0.3}))
    assert other_delta["adapt"] == one["adapt"] and other_delta["thresholds1"] != one["thresholds1"]


def caches(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["cache"] for s in summary["stages"]}


def check_pass(stage: dict) -> dict:
    """The pass's per-class statistics agree with the label PNGs it wrote; returns them."""
    stats = json.loads((Path(stage["dir"]) / "pseudo_labels.json").read_text())["statistics"]
    counts = np.zeros(19, dtype=np.int64)
    for png in (Path(stage["dir"]) / "labels").glob("*.png"):
        array = np.array(Image.open(png))
        counts += np.bincount(array[array != 255], minlength=19)[:19]
    per_class = stats["per_class"]
    assert stage["per_class"] == per_class  # the facts (MLflow, best.yaml) carry the per-class thresholds
    for c, (name, entry) in enumerate(per_class.items()):
        if entry["pixels"] == 0:
            assert entry["kept_share"] is None and name in stats["not_predicted"] and counts[c] == 0
        else:
            assert counts[c] == round(entry["kept_share"] * entry["pixels"])
            assert entry["threshold"] == pytest.approx(entry["centroid_entropy"] - stats["delta"])
    return per_class


def test_tiny_minicity_pipeline_reuses_stage_1_across_delta_and_round_1_across_rounds(tmp_path):
    cache = tmp_path / "cache"
    first = run_pipeline(tiny("cada", **{"params.rounds": 1}), tmp_path / "a", cache_dir=cache)
    assert caches(first) == dict.fromkeys(["source_only", "adapt", "thresholds1", "round1"], "miss")
    assert first["iterations"] == 6 and 0 < first["miou"] < 1
    losses = [json.loads(line) for line in (Path(first["stages"][1]["dir"]) / "log.jsonl").read_text().splitlines()]
    assert {"seg", "adv", "style", "d", "d_style"} <= set(losses[-1])
    loose = check_pass(first["stages"][2])

    strict = run_pipeline(tiny("cada", **{"params.rounds": 1, "params.thresholds.delta": 0.3}), tmp_path / "b",
                          cache_dir=cache)
    assert caches(strict) == {"source_only": "hit", "adapt": "hit", "thresholds1": "miss", "round1": "miss"}
    tight = check_pass(strict["stages"][2])
    assert tight["road"]["centroid_entropy"] == loose["road"]["centroid_entropy"]  # same model, same centroids
    for name, entry in loose.items():  # a larger Δ keeps fewer pixels of every class
        if entry["pixels"]:
            assert tight[name]["kept_share"] <= entry["kept_share"]
    assert strict["stages"][2]["labelled_pixel_share"] < first["stages"][2]["labelled_pixel_share"]

    two = run_pipeline(tiny("cada", **{"params.rounds": 2}), tmp_path / "c", cache_dir=cache)
    assert caches(two) == {"source_only": "hit", "adapt": "hit", "thresholds1": "hit", "round1": "hit",
                           "thresholds2": "miss", "round2": "miss"}
    assert two["iterations"] == 12
    check_pass(two["stages"][4])


def test_a_pixel_exactly_at_its_threshold_is_dropped():
    """Eq. 3 is strict: pixels identical to their class centroid have ``E(P) = E(f^l)``, so Δ = 0 keeps none."""
    labeller = CategoryAdaptiveThresholds({"delta": 0.0}, CLASSES)
    same = torch.tensor([0.25, 0.25, 0.5]).reshape(3, 1, 1).expand(3, 1, 2)
    labeller.observe("z.png", same)
    labeller.decide()
    assert labeller.label("z.png", same).tolist() == [[255, 255]]
    labeller.thresholds += 1e-9
    assert labeller.label("z.png", same).tolist() == [[2, 2]]
