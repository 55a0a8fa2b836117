"""The moving average of G's weights (``train.ema``): its arithmetic, what a stage hands on, and resume; the
float16 loss scale across a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.loop import weight_average
from tests.test_engine import Interrupt, stage_dir, stop_at, tiny, unfinished


def test_the_average_follows_decay_times_old_plus_the_rest_times_new():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = weight_average(model, 0.9)
    for value in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
    # start 1 → 0.9·1 + 0.1·3 = 1.2 → 0.9·1.2 + 0.1·5 = 1.58
    assert average.module.weight.item() == pytest.approx(1.58)
    assert model.weight.item() == 5.0  # training goes on with the raw weights


def test_no_average_at_decay_zero():
    assert weight_average(nn.Linear(1, 1), 0.0) is None


def test_a_stage_with_an_average_evaluates_and_hands_on_the_average_not_the_raw_weights(tmp_path):
    cfg = tiny("advent", **{"train.ema": 0.5})
    plain = run_pipeline(tiny("advent"), tmp_path / "plain", cache_dir=tmp_path / "cache")
    with pytest.raises(Interrupt):  # stopped at the first evaluation: the checkpoint holds raw weights and average
        run_pipeline(cfg, tmp_path / "ema", report=stop_at(3), cache_dir=tmp_path / "cache")
    partial = unfinished(tmp_path / "cache", "advent")
    state = torch.load(partial / "checkpoint.pt", weights_only=True)
    raw, evaluated = state["model"], torch.load(partial / "report" / "model.pt", weights_only=True)
    assert any(not torch.equal(raw[k], evaluated[k]) for k in raw if raw[k].is_floating_point())
    assert all(torch.equal(state["ema"][f"module.{k}"], evaluated[k]) for k in evaluated)
    averaged = run_pipeline(cfg, tmp_path / "ema", cache_dir=tmp_path / "cache")
    # the average reaches back to the warm start: the source-only stage differs too (train.ema is in its key)
    assert stage_dir(plain, "source_only") != stage_dir(averaged, "source_only")
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)
    assert set(a) == set(b)  # the same architecture: the average's weights load into a plain G
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_resuming_a_stage_with_an_average_gives_the_uninterrupted_result(tmp_path):
    cfg = tiny("advent", **{"train.ema": 0.7})
    straight = run_pipeline(cfg, tmp_path / "straight", cache_dir=tmp_path / "cache-a")
    with pytest.raises(Interrupt):  # stopped at the first evaluation, after its checkpoint
        run_pipeline(cfg, tmp_path / "resumed", report=stop_at(3), cache_dir=tmp_path / "cache-b")
    resumed = run_pipeline(cfg, tmp_path / "resumed", cache_dir=tmp_path / "cache-b")
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["miou"] == straight["miou"]


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.9"])
def test_a_decay_outside_zero_to_one_is_refused_before_any_compute(value, tmp_path):
    cfg = tiny("advent")
    cfg["train"]["ema"] = value
    with pytest.raises(ConfigError, match="train.ema"):
        run_pipeline(cfg, tmp_path / "r", cache_dir=tmp_path / "c")
    assert not (tmp_path / "r").exists()


def test_resuming_under_float16_amp_restores_the_loss_scale(tmp_path, monkeypatch):
    """float16 autocast with a gradient scaler, emulated on the CPU: the scaler's state (its scale and growth
    count) is checkpointed, so a resumed stage ends with the uninterrupted run's scaler and weights."""
    from rayuda.engine import accel

    monkeypatch.setattr(accel, "amp_dtype", lambda train, device: torch.float16)
    cfg = tiny("advent")
    # a done stage keeps no checkpoint: both runs stop at the last evaluation, whose checkpoint is then kept
    with pytest.raises(Interrupt):
        run_pipeline(cfg, tmp_path / "straight", report=stop_at(6), cache_dir=tmp_path / "cache-a")
    with pytest.raises(Interrupt):
        run_pipeline(cfg, tmp_path / "resumed", report=stop_at(3), cache_dir=tmp_path / "cache-b")
    with pytest.raises(Interrupt):
        run_pipeline(cfg, tmp_path / "resumed", report=stop_at(6), cache_dir=tmp_path / "cache-b")
    states = [torch.load(unfinished(tmp_path / cache, "advent") / "checkpoint.pt", weights_only=True)
              for cache in ("cache-a", "cache-b")]
    assert [state["iteration"] for state in states] == [6, 6]
    straight_scaler, resumed_scaler = (state["scaler"] for state in states)
    assert straight_scaler is not None and straight_scaler["scale"] > 1
    assert straight_scaler == resumed_scaler
    assert all(torch.equal(a, b) for a, b in zip(states[0]["model"].values(), states[1]["model"].values(),
                                                strict=True))
