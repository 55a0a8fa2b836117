"""The search service over the self-training methods on an unlabelled target: cached stages and the
thresholds each trial reports (a local Ray cluster, Optuna, a SQLite MLflow store)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from searches import TINY, runs_of, unlabelled_folder

SELF_TRAINING = {  # method → (tiny schedules, the stages every trial shares, the pseudo-label stages)
    "cra": (["params.cda=fgdem", "stages.cda.iters=2", "stages.cra.iters=2"], ["source_only", "cda"], ["regions"]),
    "pixintrada": (["params.rounds=1", "stages.inter.iters=2", "stages.intra.iters=2"], ["source_only", "inter"],
                   ["split"]),
    "cada": (["params.rounds=1", "stages.adapt.iters=2", "stages.round1.iters=2"], ["source_only"], ["thresholds1"]),
}


@pytest.mark.parametrize("method", sorted(SELF_TRAINING))
def test_a_self_training_search_on_an_unlabelled_target_caches_its_stages_and_reports_thresholds(tmp_path, method):
    schedules, shared, passes = SELF_TRAINING[method]
    target = unlabelled_folder(tmp_path / "mycity")
    cmd = [sys.executable, "-m", "rayuda.tune", method, "--storage", str(tmp_path / "st"), "--name", "m",
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--best", str(tmp_path / "best.yaml"), *TINY,
           *[a for s in schedules for a in ("--set", s)], "--target", f"folder:{target}", "--metric", "entropy",
           "--num-samples", "2", "--max-concurrent", "1", "--scheduler", "none", "--no-confirm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    trials = tmp_path / "st" / "m" / "work" / "trials"
    summaries = [json.loads(p.read_text()) for p in sorted(trials.glob("*/summary.json"))]
    assert len(summaries) == 2
    for name in shared:  # computed by the first trial, reused by the second
        assert sorted(next(s["cache"] for s in summary["stages"] if s["stage"] == name)
                      for summary in summaries) == ["hit", "miss"], name
    client, parents, children = runs_of(tmp_path, f"rayuda-{method}")
    for child in children:
        assert child.data.tags["rayuda.selection_metric"] == "entropy"
        tables = {a.path for a in client.list_artifacts(child.info.run_id, "thresholds")}
        assert {f"thresholds/thresholds-{p}.{ext}" for p in passes for ext in ("csv", "png")} <= tables
    best = (tmp_path / "best.yaml").read_text()
    assert f"thresholds of stage {passes[0]}," in best  # the winner's per-class thresholds head best.yaml
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert f"thresholds-{passes[0]}.csv" in parent_files, parent_files
