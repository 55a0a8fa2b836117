"""The engine, run for real on minicity: resume, stage cache, atomic checkpoints, configs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.checkpoint import atomic_save
from rayuda.engine.plan import reported_iterations
from rayuda.methods import METHODS, plan_of, resolve_config

TINY = {
    "data.size": [32, 64],
    "data.batch_size": 2,
    "data.holdout": 4,
    "train.eval_every": 3,
    "train.log_every": 3,
    "stages.source_only.iters": 4,
}


def tiny(method: str, **extra) -> dict:
    """A tiny config: source-only 4 iterations, every later train stage 6, evaluated every 3."""
    cfg = resolve_config(method, TINY)
    later = {f"stages.{name}.iters": 6 for name in cfg["stages"] if name != "source_only"}
    return resolve_config(method, {**TINY, **later, **extra})


def stage_dir(summary: dict, name: str) -> Path:
    return Path(next(s["dir"] for s in summary["stages"] if s["stage"] == name))


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    """Raised by a report hook to kill a run, as a SIGKILL between two evaluations would."""


def stop_at(iteration: int):
    """A report hook that interrupts the reported stage at its evaluation of ``iteration`` (after that evaluation's
    checkpoint is written, so the unfinished stage's folder holds it)."""
    def hook(metrics, report_dir):
        if metrics["iteration"] == iteration and not metrics.get("replayed"):
            raise Interrupt
    return hook


def unfinished(cache: Path, stage: str) -> Path:
    """The folder of ``stage``'s unfinished run in ``cache`` (a finished stage is renamed to its key)."""
    return next(cache.glob(f".{stage}-*.partial"))


def test_resume_inside_the_last_stage_of_a_four_stage_plan_continues_identically(tmp_path):
    cfg = tiny("intrada", **{"params.rank.lambda": 0.5})
    straight = run_pipeline(cfg, tmp_path / "straight", cache_dir=tmp_path / "cache-a")

    with pytest.raises(Interrupt):  # killed inside stage 4 (intra), after its checkpoint at iteration 3
        run_pipeline(cfg, tmp_path / "resumed", report=stop_at(3), cache_dir=tmp_path / "cache-b")
    partial = unfinished(tmp_path / "cache-b", "intra")
    assert len(losses(partial)) == 3 and (partial / "checkpoint.pt").exists()
    resumed = run_pipeline(cfg, tmp_path / "resumed", cache_dir=tmp_path / "cache-b")
    assert [s["cache"] for s in resumed["stages"]] == ["hit", "hit", "hit", "miss"]
    # done stages keep their models, not their resume state (three models' size each)
    done = [Path(s["dir"]) for s in resumed["stages"] if s["kind"] == "train"]
    assert all((d / "model.pt").exists() and not (d / "checkpoint.pt").exists() for d in done)
    assert losses(stage_dir(resumed, "intra")) == losses(stage_dir(straight, "intra"))
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["miou"] == straight["miou"]


def test_source_stage_is_cached_across_runs_with_the_same_upstream_config(tmp_path):
    cache = tmp_path / "cache"
    first = run_pipeline(tiny("advent"), tmp_path / "a", cache_dir=cache)
    second = run_pipeline(tiny("minent", **{"stages.minent.lr": 1e-3}), tmp_path / "b", cache_dir=cache)
    other = run_pipeline(tiny("advent", **{"stages.source_only.iters": 5}), tmp_path / "c", cache_dir=cache)
    assert first["stages"][0]["cache"] == "miss"
    assert second["stages"][0]["cache"] == "hit"
    assert second["stages"][0]["dir"] == first["stages"][0]["dir"]
    assert other["stages"][0]["cache"] == "miss"
    assert len(list(cache.glob("source_only-*"))) == 2


def test_a_reported_source_only_run_serves_as_the_warm_start_of_an_adaptation_run(tmp_path):
    reported = run_pipeline(tiny("source_only"), tmp_path / "so", cache_dir=tmp_path / "cache")
    warm = run_pipeline(tiny("adaptsegnet"), tmp_path / "asn", cache_dir=tmp_path / "cache")
    fresh = run_pipeline(tiny("adaptsegnet"), tmp_path / "alone", cache_dir=tmp_path / "fresh-cache")
    assert warm["stages"][0]["cache"] == "hit" and fresh["stages"][0]["cache"] == "miss"
    assert warm["stages"][0]["key"] == fresh["stages"][0]["key"] != reported["stages"][0]["key"]
    assert warm["stages"][0]["trained_as"] == stage_dir(reported, "source_only").name
    # filing it under the unreported key is right only if the evaluations leave the weights alone: bit for bit
    trained = torch.load(stage_dir(reported, "source_only") / "model.pt", weights_only=True)
    alone = torch.load(stage_dir(fresh, "source_only") / "model.pt", weights_only=True)
    assert trained.keys() == alone.keys() and all(torch.equal(trained[k], alone[k]) for k in trained)
    assert warm["miou"] == fresh["miou"]  # so the adaptation stage after it trains the same model too


def test_report_hook_receives_metrics_and_checkpoint(tmp_path):
    seen = []
    run_pipeline(tiny("source_only", **{"stages.source_only.iters": 6}), tmp_path / "r", cache_dir=tmp_path / "c",
                 report=lambda m, d: seen.append((dict(m), sorted(p.name for p in d.iterdir()))))
    assert [m["iteration"] for m, _ in seen] == [3, 6]
    assert [bool(m.get("last_report")) for m, _ in seen] == [False, True]
    metrics, files = seen[-1]
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["score"] == metrics["miou"]
    assert any(k.startswith("iou/") for k in metrics) and "loss/seg" in metrics
    assert "model.pt" in files and "masks" in files


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_end_to_end_on_minicity(method, tmp_path):
    cfg = tiny(method)
    summary = run_pipeline(cfg, tmp_path / method, cache_dir=tmp_path.parent / "shared-cache")
    # 6 per reported stage (4 for source_only); two-round defaults (pixintrada, cada) report two stages
    reported = sum(stage.reported for stage in plan_of(cfg))
    assert summary["method"] == method
    assert summary["iterations"] == reported_iterations(cfg) == (4 if method == "source_only" else 6 * reported)
    assert 0.0 <= summary["miou"] <= 1.0
    logged = set(losses(Path(summary["stages"][-1]["dir"]))[0])
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
        cmd += ["--set", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"method", "miou", "per_class_iou", "iterations", "seconds", "selection_metric", "stages"} <= set(summary)
    assert summary["iterations"] == 4 and summary["selection_metric"] == "miou"
    assert [s["stage"] for s in summary["stages"]] == ["source_only", "advent"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert (out / "best_model.pt").exists() and (stage_dir(summary, "advent") / "model.pt").exists()
    assert "[stage 2/2 advent]" in done.stdout
    # a finished --out gives its summary back without training; another config there is refused
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already holds this finished run" in again.stdout
    assert "iter " not in again.stdout and json.loads((out / "summary.json").read_text()) == summary
    other = subprocess.run([*cmd, "--set", "params.w_adv=0.5"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "params.w_adv" in other.stderr and "Traceback" not in other.stderr
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
    assert bad.returncode == 2 and "optim.lr_d" in bad.stderr and "Traceback" not in bad.stderr


def test_train_refuses_miou_on_an_unlabelled_target_before_any_compute(tmp_path):
    (tmp_path / "mine" / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 8), (i * 90, 40, 200)).save(tmp_path / "mine" / "images" / f"{i}.png")
    out = tmp_path / "run"
    bad = subprocess.run([sys.executable, "-m", "rayuda.train", "advent", "--target", f"folder:{tmp_path / 'mine'}",
                          "--out", str(out), "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True)
    assert bad.returncode == 2 and "has no labels" in bad.stderr and "entropy" in bad.stderr
    assert "Traceback" not in bad.stderr and not out.exists() and not (tmp_path / "cache").exists()  # refused first
