"""Stage plans and their chained cache keys, run for real on minicity; the pseudo-label pass on a hand-made
target whose entropies are computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rayuda.config import ConfigError
from rayuda.data import Transform, open_dataset
from rayuda.engine import run_pipeline
from rayuda.engine.passes import pseudo_label_pass
from rayuda.engine.plan import ConfigSlice, StageConfigError, check_plan, stage_key, stage_keys, stage_slice
from rayuda.methods import METHODS, plan_of, register_plugins, resolve_config
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import Stage, source_only_stage
from rayuda.methods.intrada import EntropyRanking, easy_hard_split
from rayuda.models import SegOutput
from tests.test_engine import TINY, tiny


def caches(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["cache"] for s in summary["stages"]}


@pytest.fixture(scope="module")
def intrada_cache(tmp_path_factory):
    """One intrada run whose stage cache the tests below reuse (λ = 0.5 keeps both subsets non-empty)."""
    root = tmp_path_factory.mktemp("intrada")
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.5}), root / "first", cache_dir=root / "cache")
    assert set(caches(summary).values()) == {"miss"}
    return root


def test_a_downstream_knob_change_reuses_every_upstream_stage(intrada_cache, tmp_path):
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.5, "params.intra.w_adv": 0.01}),
                           tmp_path / "run", cache_dir=intrada_cache / "cache")
    assert caches(summary) == {"source_only": "hit", "inter": "hit", "rank": "hit", "intra": "miss"}


def test_a_ranking_knob_change_recomputes_the_pass_and_what_follows(intrada_cache, tmp_path):
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.25}), tmp_path / "run",
                           cache_dir=intrada_cache / "cache")
    assert caches(summary) == {"source_only": "hit", "inter": "hit", "rank": "miss", "intra": "miss"}
    assert summary["stages"][2]["subset/easy"] == math.floor(0.25 * 600)


def test_an_upstream_change_recomputes_everything_below_it(intrada_cache, tmp_path):
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.5, "params.inter.w_adv": 0.01}),
                           tmp_path / "run", cache_dir=intrada_cache / "cache")
    assert caches(summary) == {"source_only": "hit", "inter": "miss", "rank": "miss", "intra": "miss"}


def test_a_stage_code_version_bump_invalidates_that_stage_and_below(intrada_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(EntropyRanking, "version", EntropyRanking.version + 1)
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.5}), tmp_path / "run",
                           cache_dir=intrada_cache / "cache")
    assert caches(summary) == {"source_only": "hit", "inter": "hit", "rank": "miss", "intra": "miss"}


def test_a_cached_reported_stage_replays_its_evaluations_on_the_trial_step_axis(intrada_cache, tmp_path):
    seen = []
    summary = run_pipeline(tiny("intrada", **{"params.rank.lambda": 0.5}), tmp_path / "run",
                           cache_dir=intrada_cache / "cache", report=lambda m, d: seen.append((m, d)))
    first = json.loads((intrada_cache / "first" / "summary.json").read_text())
    assert set(caches(summary).values()) == {"hit"} and summary["miou"] == first["miou"]
    assert [(m["iteration"], m["stage"], bool(m.get("last_report"))) for m, _ in seen] == [
        (3, "intra", False), (6, "intra", True)]
    assert seen[0][1] is None and (seen[1][1] / "model.pt").is_file()


def test_reported_iterations_count_across_reported_stages(tmp_path, monkeypatch):
    register_plugins("tests.two_rounds_method")
    seen = []
    summary = run_pipeline(resolve_config("two_rounds", TINY), tmp_path / "r", cache_dir=tmp_path / "c",
                           report=lambda m, d: seen.append(m))
    assert [(m["iteration"], m["stage"], m["stage_iteration"]) for m in seen] == [
        (3, "round1", 3), (6, "round2", 3)]
    assert [bool(m.get("last_report")) for m in seen] == [False, True] and summary["iterations"] == 6


def test_a_config_key_read_outside_the_stage_slice_raises(tmp_path, monkeypatch):
    class Sneaky(AdvEnt, register=False):
        name = "sneaky"

        def train_step(self, ctx, labelled, unlabelled):
            ctx.config["train"]["device"]  # not in the slice: the cache key would not cover it
            return super().train_step(ctx, labelled, unlabelled)

    monkeypatch.setitem(METHODS, "sneaky", Sneaky)
    with pytest.raises(StageConfigError, match=r"stage 'sneaky' read config key train\.'device'"):
        run_pipeline(resolve_config("sneaky", TINY), tmp_path / "r", cache_dir=tmp_path / "c")
    cfg = resolve_config("intrada")
    rank = plan_of(cfg)[2]
    assert "params.intra" not in stage_keys(rank) and "params.rank" in stage_keys(rank)
    with pytest.raises(StageConfigError):
        stage_slice(cfg, rank)["params"]["intra"]


def test_stage_keys_stay_those_of_the_stages_users_have_cached():
    """Guards the stage cache: these keys were computed by rayuda before Stage's data slots were renamed
    (``source``/``target`` → ``labelled``/``unlabelled``) and before the losses and labellers moved beside their
    methods. If one changes, every stage cached until then is recomputed: bump a version on purpose instead.
    ``train.bn_stats: mixed`` is how every stage computed before the key existed, so it keeps their keys; the
    default (``target``) computes the two-domain stages otherwise, so their keys, and those downstream, differ."""
    cfg = resolve_config("intrada", {"train.bn_stats": "mixed"})
    plan = plan_of(cfg)
    upstream = None
    for stage in plan:  # source_only → inter → rank → intra, the default config of before
        upstream = stage_key(stage, stage_slice(cfg, stage), upstream)
    assert upstream == "d969d0a91084d842"
    default, keys, before = resolve_config("intrada"), {}, None
    for stage in plan:
        before = keys[stage.name] = stage_key(stage, stage_slice(default, stage), before)
    assert keys["source_only"] == stage_key(plan[0], stage_slice(cfg, plan[0]), None) and keys["intra"] != upstream
    intra, cra = plan[3], plan_of(resolve_config("cra"))[3]  # two slots set; the unlabelled one None
    assert stage_key(intra, ConfigSlice({"params": {"w_adv": 0.001}}, "intra"), "0123456789abcdef") == \
        "679a33cbba09c198"
    assert stage_key(cra, ConfigSlice({"params": {"w_adv": 1.0}}, "cra"), "0123456789abcdef") == "05ce7a1dea3f40b5"


def test_plans_are_checked_before_any_compute():
    cfg = resolve_config("intrada")
    bad = [source_only_stage(), Stage("intra", step=AdvEnt, labelled="rank:easy", reported=True)]
    with pytest.raises(ConfigError, match="earlier pseudo_labels stage 'rank'"):
        check_plan(bad, cfg)
    with pytest.raises(ConfigError, match="no schedule stages.round9"):
        check_plan([source_only_stage(), Stage("round9", step=AdvEnt, reported=True)], cfg)
    with pytest.raises(ConfigError, match="reports no stage"):
        check_plan([source_only_stage()], cfg)
    with pytest.raises(ConfigError, match="train.metric 'foo'"):
        check_plan(plan_of(cfg), {**cfg, "train": {**cfg["train"], "metric": "foo"}})
    cfg["stages"]["intra"]["iters"] = -1
    with pytest.raises(ConfigError, match="stages.intra.iters"):
        check_plan(plan_of(cfg), cfg)


# -- the ranking pass, by hand ---------------------------------------------------------------------------
class ColourLogits(nn.Module):
    """G whose 2 logits at a pixel are the pixel's normalised red and green values."""

    def forward(self, x):
        return SegOutput(logits={"main": x[:, :2]}, features={})


def normalised(value: int, channel: int) -> float:
    mean, std = (0.485, 0.456)[channel], (0.229, 0.224)[channel]
    return (value / 255 - mean) / std


def binary_entropy(u: float, v: float) -> float:
    """Normalised entropy (÷ log 2) of softmax([u, v])."""
    p = 1 / (1 + math.exp(v - u))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_entropy_ranking_pass_on_a_hand_made_target(tmp_path):
    colours = {"a": (250, 10), "b": (130, 120), "c": (20, 230), "d": (110, 140)}  # (red, green) per image
    sizes = {"a": (3, 5), "b": (4, 4), "c": (2, 6), "d": (5, 3)}  # each image its own size (H, W)
    (tmp_path / "images").mkdir()
    for name, (red, green) in colours.items():
        pixels = np.zeros((*sizes[name], 3), dtype=np.uint8)
        pixels[..., 0], pixels[..., 1] = red, green
        Image.fromarray(pixels).save(tmp_path / "images" / f"{name}.png")
    expected = {f"{n}.png": binary_entropy(normalised(r, 0), normalised(g, 1)) for n, (r, g) in colours.items()}
    dataset = open_dataset(f"folder:{tmp_path}", "train", role="target", transform=Transform())
    labeller = EntropyRanking({"lambda": 0.5}, class_names=["red", "green"])
    facts = pseudo_label_pass(ColourLogits(), dataset, labeller, tmp_path / "out", device=torch.device("cpu"))

    stats = json.loads((tmp_path / "out" / "pseudo_labels.json").read_text())
    for name, value in expected.items():
        assert stats["statistics"]["mean_entropy"][name] == pytest.approx(value, rel=1e-5)
    by_entropy = sorted(expected, key=expected.get)  # a and c are confident, b and d near-uniform
    assert stats["subsets"] == {"easy": by_entropy[:2], "hard": by_entropy[2:]}
    assert set(by_entropy[:2]) == {"a.png", "c.png"} and facts["subset/easy"] == 2
    label_a = np.array(Image.open(tmp_path / "out" / "labels" / "a.png"))
    label_c = np.array(Image.open(tmp_path / "out" / "labels" / "c.png"))
    assert label_a.shape == sizes["a"] and (label_a == 0).all()  # red wins: class 0, at the image's own size
    assert label_c.shape == sizes["c"] and (label_c == 1).all()
    assert not (tmp_path / "out" / "labels" / "b.png").exists()  # hard images stay unlabelled
    assert stats["class_share"] == pytest.approx([15 / 27, 12 / 27])  # a: 3×5 pixels of class 0, c: 2×6 of 1


def test_easy_hard_split_takes_the_floor_of_the_fraction_and_breaks_ties_by_name():
    scores = {"x": 0.2, "y": 0.1, "z": 0.2, "w": 0.9, "v": 0.5}
    assert easy_hard_split(scores, 0.67) == (["y", "x", "z"], ["v", "w"])  # ⌊0.67·5⌋ = 3
    with pytest.raises(ValueError, match="λ"):
        easy_hard_split(scores, 1.5)
