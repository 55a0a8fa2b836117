"""The search service for real: a local Ray cluster, Optuna, ASHA, a SQLite MLflow store, minicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient
from searches import runs_of, tune_cmd, unlabelled_folder

from rayuda.hpo.searcher import JOURNAL, load_search_study
from rayuda.hpo.space import load_space
from rayuda.runs import client_for


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tune")
    proc = subprocess.run(tune_cmd(tmp_path, "--num-samples", "4", "--max-iters", "4", "--grace", "2",
                                   "--max-concurrent", "2", "--confirm-top", "1", "--confirm-seeds", "2",
                                   "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}"),
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})  # count every trial's lines
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp_path, proc


def test_search_tracks_one_parent_and_a_child_per_trial_with_final_statuses(search):
    tmp_path, proc = search
    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        outcome = child.data.tags["rayuda.outcome"]
        assert child.info.status == {"finished": "FINISHED", "early_stopped": "KILLED"}[outcome]
        assert "miou" in child.data.metrics and "iou/road" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "miou")
        assert [m.step for m in history][0] == 2
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"masks", "checkpoint"} <= artifacts
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best.yaml", "trials.csv", "optimization_history.png"} <= parent_artifacts


def test_confirmation_reruns_defaults_and_the_top_config_on_fresh_seeds(search):
    tmp_path, proc = search
    work = tmp_path / "store" / "s" / "work"
    runs = sorted(p.name for p in (work / "confirm").iterdir() if (p / "summary.json").exists())
    top = [r for r in runs if not r.startswith("defaults")]
    assert runs[:2] == ["defaults-seed1", "defaults-seed2"] and len(top) in (0, 2)  # never the search seed 0
    assert all(r.endswith(("-seed1", "-seed2")) for r in top)
    for run in runs:  # a confirmation run is full length and reports on the test images
        summary = json.loads((work / "confirm" / run / "summary.json").read_text())
        assert summary["iterations"] == 4 and summary["test"]["images"] > 0
    report = (tmp_path / "store" / "s" / "confirmation.md").read_text()
    assert "| defaults |" in report and "**Verdict:**" in report
    header = (tmp_path / "best.yaml").read_text().splitlines()[0]
    assert header.startswith("# confirmed: ")
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")  # tracking and registry: this search's store
    parent = runs_of(tmp_path)[1][0]
    model_uri = parent.data.tags["rayuda.model_uri"]
    assert model_uri.startswith("models:/rayuda-advent/")  # the winner, registered
    assert client.get_model_version("rayuda-advent", model_uri.rsplit("/", 1)[1]).status == "READY"
    contexts = {t.value for d in parent.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"source", "target"}  # which images the search ran on
    _, parents, _ = runs_of(tmp_path)
    assert "rayuda.verdict" in parents[0].data.tags and "confirmation.md" in {
        a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(parents[0].info.run_id)}


def test_asha_stopped_trials_are_pruned_in_the_optuna_study(search):
    tmp_path, _ = search
    _, _, children = runs_of(tmp_path)
    stopped = sum(c.data.tags["rayuda.outcome"] == "early_stopped" for c in children)
    trials = load_search_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s").trials
    states = sorted(t.state.name for t in trials)
    assert states.count("PRUNED") == stopped
    assert states.count("COMPLETE") == 4 - stopped
    for trial in trials:
        assert max(trial.intermediate_values) == (4 if trial.state.name == "COMPLETE" else 2)


def test_the_optuna_study_is_kept_in_the_rdb_for_optuna_dashboard(search):
    import optuna

    tmp_path, _ = search
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert study.trials[0].params == load_space("advent").defaults()  # the paper defaults come first
    assert not (tmp_path / "store" / "s" / "work" / JOURNAL).exists()  # the one study lives in the RDB


def test_source_stage_is_trained_once_per_search(search):
    tmp_path, proc = search
    work = tmp_path / "store" / "s" / "work"
    summaries = [json.loads(p.read_text()) for p in work.glob("trials/*/summary.json")]
    assert len(summaries) >= 1  # trials that ran to the end (how many ASHA lets through depends on timing)
    assert len({s["stages"][0]["dir"] for s in summaries}) == 1  # one source-only stage for every trial
    confirm_runs = len(list(work.glob("confirm/*/summary.json")))
    # seed 0 (the search) and seeds 1, 2 (the confirmation): one source-only stage each, computed once
    assert len(list((tmp_path / "store" / "s" / "stage-cache").glob("source_only-*"))) == 3
    assert proc.stdout.count("[stage 1/2 source_only] computed") == 3
    assert proc.stdout.count("[stage 1/2 source_only] cache hit") == 3 + confirm_runs - 2


def test_best_config_is_accepted_by_rayuda_train(search, tmp_path):
    root, _ = search
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best["method"] == "advent"
    proc = subprocess.run([sys.executable, "-m", "rayuda.train", "advent", "--config", str(root / "best.yaml"),
                           "--iters", "1", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "advent"


def test_interrupted_search_resumes_with_every_trial_once(tmp_path):
    cmd = tune_cmd(tmp_path, "--num-samples", "3", "--max-iters", "6", "--grace", "6", "--max-concurrent", "1",
                   "--set", "train.eval_every=2", "--no-confirm")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            start_new_session=True)
    trials = tmp_path / "store" / "s" / "work" / "trials"
    deadline = time.time() + 600
    while time.time() < deadline and not list(trials.glob("*/summary.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    _, _, before = runs_of(tmp_path)
    assert 1 <= len(before) < 3, out[-3000:]  # interrupted mid-search: some trials logged, not all

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    _, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags["rayuda.trial_id"] for c in children]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    study = load_search_study(tmp_path / "store" / "s" / "work" / JOURNAL, "s")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3


def test_label_free_search_on_an_unlabelled_folder_target(tmp_path):
    target = unlabelled_folder(tmp_path / "mycity")
    base = tune_cmd(tmp_path)
    refused = subprocess.run([*base, "--target", f"folder:{target}"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
    assert refused.returncode == 2 and "has no labels" in refused.stderr and "flip_agreement" in refused.stderr
    assert not (tmp_path / "store").exists()  # refused before Ray started

    proc = subprocess.run([*base, "--target", f"folder:{target}", "--metric", "auto", "--num-samples", "1",
                           "--max-iters", "2", "--grace", "2", "--no-confirm"], capture_output=True, text=True,
                          timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "selection metric 'auto' → 'im'" in proc.stdout  # the documented default on an unlabelled target
    assert "(im score" in proc.stdout and "0 labelled images test" in proc.stdout
    _, parents, children = runs_of(tmp_path)
    assert parents[0].data.params["selection_metric"] == "im"
    assert children[0].data.tags["rayuda.selection_metric"] == "im"
    assert {"flip_agreement", "proxy/im", "proxy/snd", "proxy/dev"} <= set(children[0].data.metrics)
    assert "miou" not in children[0].data.metrics
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["train"]["metric"] == "im"
    assert list((tmp_path / "store" / "s" / "work" / "trials").glob("*/probe/eval_*.npz"))


def test_random_search_without_early_stopping_runs_every_trial_to_full_length(tmp_path):
    proc = subprocess.run(tune_cmd(tmp_path, "--sampler", "random", "--scheduler", "none", "--num-samples", "3",
                                   "--max-iters", "4", "--grace", "2", "--max-concurrent", "2", "--no-confirm"),
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "random sampler, no early stopping" in proc.stdout
    _, parents, children = runs_of(tmp_path)
    assert parents[0].data.params["sampler"] == "random" and parents[0].data.params["scheduler"] == "none"
    assert sorted(c.data.tags["rayuda.outcome"] for c in children) == ["finished"] * 3
    summaries = list((tmp_path / "store" / "s" / "work").glob("trials/*/summary.json"))
    assert len(summaries) == 3  # no trial was stopped at the grace rung
