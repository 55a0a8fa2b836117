"""The search service over multi-stage plans: reported stages on one step axis, a search across methods, shared
stages trained once (a local Ray cluster, Optuna, ASHA, a SQLite MLflow store, minicity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient
from searches import TINY

from rayuda.hpo.searcher import JOURNAL, load_search_study


def test_two_reported_stages_under_asha_share_one_step_axis(tmp_path):
    """A real search of a two-round method: trials reach round 2, Optuna holds round 2's values, ASHA's
    max_t covers both rounds, and round 1 (its knobs fixed) is computed once for all trials."""
    space = tmp_path / "two_rounds.yaml"
    space.write_text("method: two_rounds\nknobs:\n"
                     "  params.round2.w_adv: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, default: 1.0e-3}\n")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "RAYUDA_METHODS": "tests.two_rounds_method", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "rayuda.tune", "two_rounds", "--space", str(space),
           "--storage", str(tmp_path / "store"), "--name", "s", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--best", str(tmp_path / "best.yaml"),
           *TINY, "--set", "stages.round1.iters=2", "--set", "stages.round2.iters=2", "--num-samples", "3",
           "--grace", "2", "--max-concurrent", "1", "--no-confirm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "3 trials × 4 iterations" in proc.stdout  # max_t = round 1 + round 2
    trials = load_search_study(tmp_path / "store" / "s" / "work" / JOURNAL, "s").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(set(t.intermediate_values) == {2, 4} for t in complete)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "store" / "s" / "work").glob("trials/*/summary.json")]
    assert len(summaries) == len(complete)
    round1 = sorted(next(s["cache"] for s in summary["stages"] if s["stage"] == "round1") for summary in summaries)
    assert round1.count("miss") <= 1 and len(list((tmp_path / "store" / "s" / "stage-cache").glob("round1-*"))) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayuda-two_rounds")
    finished = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rayuda.outcome") == "finished"]
    assert len(finished) == len(complete)
    for run in finished:
        assert {"rayuda.stage.source_only", "rayuda.stage.round1", "rayuda.stage.round2"} <= set(run.data.tags)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [2, 4]


def test_a_search_across_methods_shares_the_source_only_stage(tmp_path):
    cmd = [sys.executable, "-m", "rayuda.tune", "auto", "--methods", "advent,minent", "--storage", str(tmp_path / "st"),
           "--name", "a", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--best", str(tmp_path / "best.yaml"),
           *TINY, "--num-samples", "4", "--max-iters", "2", "--grace", "2", "--max-concurrent", "1", "--no-confirm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "st" / "a" / "work").glob("trials/*/summary.json")]
    assert {s["method"] for s in summaries} == {"advent", "minent"}
    source = sorted(s["stages"][0]["cache"] for s in summaries)
    assert source == ["hit"] * (len(summaries) - 1) + ["miss"]  # one source-only stage for both methods
    assert len(list((tmp_path / "st" / "a" / "stage-cache").glob("source_only-*"))) == 1
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["method"] in ("advent", "minent")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayuda-auto")
    methods = {r.data.params.get("method") for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("rayuda.role") == "trial"}
    assert methods == {"advent", "minent"}


def test_an_intrada_search_trains_its_shared_stages_once(tmp_path):
    cmd = [sys.executable, "-m", "rayuda.tune", "intrada", "--storage", str(tmp_path / "st"), "--name", "i",
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--best", str(tmp_path / "best.yaml"), *TINY,
           "--set", "stages.inter.iters=2", "--num-samples", "3", "--max-iters", "2", "--grace", "2",
           "--max-concurrent", "1", "--no-confirm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "st" / "i" / "work").glob("trials/*/summary.json")]
    assert len(summaries) == 3  # every trial ran to the end (2 iterations, one rung)
    by_stage = {name: sorted(next(s["cache"] for s in summary["stages"] if s["stage"] == name)
                             for summary in summaries) for name in ("source_only", "inter", "rank", "intra")}
    assert by_stage["source_only"] == by_stage["inter"] == ["hit", "hit", "miss"]  # trained once per search
    assert by_stage["intra"] == ["miss"] * 3  # every trial's own knobs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayuda-intrada")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rayuda.role") == "trial"]
    assert all({f"rayuda.stage.{n}" for n in by_stage} <= set(r.data.tags) for r in trials)
    assert "[stage 3/4 rank]" in proc.stdout
