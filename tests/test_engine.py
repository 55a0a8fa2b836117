"""The engine, run for real on minicity: resume, stage cache, atomic checkpoints, configs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rayuda.config import ConfigError, resolve_config
from rayuda.engine import run_pipeline
from rayuda.engine.checkpoint import atomic_save
from rayuda.methods import METHODS

TINY = {
    "data.size": [32, 64],
    "data.batch_size": 2,
    "data.holdout": 4,
    "train.iters": 6,
    "train.eval_every": 3,
    "train.log_every": 3,
    "warm_start.iters": 4,
}


def tiny(method: str, **extra) -> dict:
    return resolve_config(method, {**TINY, **extra})


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def test_resume_continues_identically(tmp_path):
    cfg = tiny("advent", **{"warm_start": None})
    run_pipeline(cfg, tmp_path / "straight", cache_dir=tmp_path / "cache")

    def stop_after_first_eval(metrics, checkpoint_dir):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_pipeline(cfg, tmp_path / "resumed", report=stop_after_first_eval, cache_dir=tmp_path / "cache")
    assert len(losses(tmp_path / "resumed")) == 3
    run_pipeline(cfg, tmp_path / "resumed", cache_dir=tmp_path / "cache")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_source_stage_is_cached_across_runs_with_the_same_upstream_config(tmp_path):
    cache = tmp_path / "cache"
    first = run_pipeline(tiny("advent"), tmp_path / "a", cache_dir=cache)
    second = run_pipeline(tiny("minent", **{"optim.lr": 1e-3}), tmp_path / "b", cache_dir=cache)
    other = run_pipeline(tiny("advent", **{"warm_start.iters": 5}), tmp_path / "c", cache_dir=cache)
    assert first["stages"][0]["cache"] == "miss"
    assert second["stages"][0]["cache"] == "hit"
    assert second["stages"][0]["dir"] == first["stages"][0]["dir"]
    assert other["stages"][0]["cache"] == "miss"
    assert len(list(cache.glob("source_only-*"))) == 2


def test_report_hook_receives_metrics_and_checkpoint(tmp_path):
    seen = []
    run_pipeline(tiny("source_only", **{"warm_start": None}), tmp_path / "r",
                 report=lambda m, d: seen.append((dict(m), sorted(p.name for p in d.iterdir()))))
    assert [m["iteration"] for m, _ in seen] == [3, 6]
    metrics, files = seen[-1]
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["score"] == metrics["miou"]
    assert any(k.startswith("iou/") for k in metrics) and "loss/seg" in metrics
    assert "model.pt" in files and "masks" in files


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_end_to_end_on_minicity(method, tmp_path):
    summary = run_pipeline(tiny(method), tmp_path / method, cache_dir=tmp_path.parent / "shared-cache")
    assert summary["method"] == method and summary["iterations"] == 6
    assert 0.0 <= summary["miou"] <= 1.0
    logged = set(losses(tmp_path / method)[0])
    # every method logs its segmentation loss; adaptation methods log their own terms too
    assert logged == {"iteration", "seg"} if method == "source_only" else logged > {"iteration", "seg"}
    saved = yaml.safe_load((tmp_path / method / "config.yaml").read_text())
    assert saved["method"] == method and saved["params"] == resolve_config(method)["params"]


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'params\.w_adverse'.*params\.w_adv"):
        resolve_config("advent", {"params.w_adverse": 1.0})
    with pytest.raises(ConfigError, match="expects float"):
        resolve_config("advent", {"params.w_adv": "lots"})


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_train_cli_writes_config_summary_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rayuda.train", "advent", "--out", str(out), "--iters", "4", "--seed", "3",
           "--cache-dir", str(tmp_path / "cache")]
    for key, value in TINY.items():
        if key != "train.iters":
            cmd += ["--set", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"method", "miou", "per_class_iou", "iterations", "seconds", "selection_metric"} <= set(summary)
    assert summary["iterations"] == 4 and summary["selection_metric"] == "miou"
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert (out / "checkpoint.pt").exists()
    # the resolved config is accepted back as --config
    again = subprocess.run([sys.executable, "-m", "rayuda.train", "advent", "--config", str(out / "config.yaml"),
                            "--out", str(tmp_path / "again"), "--iters", "2", "--cache-dir", str(tmp_path / "cache")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_train_cli_rejects_unknown_method_and_key(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "rayuda.train", "advnet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "valid methods" in bad.stderr and "advent" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "rayuda.train", "advent", "--set", "optim.lrr=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr
