"""What a real search hands on, checked on one small search for real (local Ray, SQLite MLflow store):
the bad pairs it dropped (output, summary.json, MLflow), provenance tags on its parent and trial runs
(``mlflow.source.git.commit`` included), and the confirmed winner as ``models:/rayuda-METHOD@champion``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from mlflow_store import fresh_store
from test_stock_datasets import bad_labels, gta5_with_bad_pairs

from rayuda.runs import client_for

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "data.size=[32,64]", "--set", "data.batch_size=2", "--set", "data.holdout=4",
        "--set", "stages.source_only.iters=2", "--set", "train.log_every=2", "--set", "train.num_masks=1",
        "--set", "train.probe_images=2"]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("search")
    source = gta5_with_bad_pairs(tmp_path / "gta5")
    cmd = [sys.executable, "-m", "rayuda.tune", "advent", "--source", f"gta5:{source}", "--set", "data.bad_pairs=skip",
           "--storage", str(tmp_path / "store"), "--name", "s", "--mlflow-uri", fresh_store(tmp_path / "mlflow.db"),
           "--best", str(tmp_path / "best.yaml"), *TINY, "--num-samples", "2", "--max-iters", "2", "--grace", "2",
           "--max-concurrent", "1", "--confirm-top", "1", "--confirm-seeds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")  # tracking and registry: this search's store
    exp = client.get_experiment_by_name("rayuda-advent")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("rayuda.role") == "search")
    children = [r for r in runs if r.data.tags.get("rayuda.role") == "trial"]
    return tmp_path, proc, source, client, parent, children


def test_the_dropped_pairs_are_listed_once_in_the_output_and_in_mlflow(search):
    tmp_path, proc, source, client, parent, children = search
    for label in bad_labels(source):
        assert proc.stdout.count(label) == 1, proc.stdout[-4000:]
    assert parent.data.params["dropped_pairs"] == "2" and parent.data.tags["rayuda.dropped_pairs"] == "2"
    listed = Path(client.download_artifacts(parent.info.run_id, "dropped_pairs.tsv", str(tmp_path)))
    assert [line.split("\t")[1] for line in listed.read_text().splitlines()] == bad_labels(source)
    assert len(children) == 2 and all(c.data.tags["rayuda.dropped_pairs"] == "2" for c in children)
    for summary in (tmp_path / "store" / "s" / "work").glob("*/*/summary.json"):  # trials and confirmation runs
        assert [d["label"] for d in json.loads(summary.read_text())["bad_pairs"]["dropped"]] == bad_labels(source)


def test_parent_and_trial_runs_carry_the_provenance(search):
    _, _, _, _, parent, children = search
    for run in [parent, *children]:
        tags = run.data.tags
        for name in ("ray", "optuna", "mlflow", "torchvision", "numpy"):
            assert tags[f"rayuda.env.{name}"] == metadata.version(name), name
        assert {"rayuda.env.cuda", "rayuda.env.cudnn", "rayuda.env.rayuda", "rayuda.env.git_dirty"} <= set(tags)
        if (REPO / ".git").exists():
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            assert tags["mlflow.source.git.commit"] == tags["rayuda.env.git_commit"] == commit


def test_the_confirmed_winner_is_the_champion_and_predict_finds_it_by_name(search):
    tmp_path, proc, _, client, parent, _ = search
    version = client.get_model_version_by_alias("rayuda-advent", "champion")
    assert parent.data.tags["rayuda.model_uri"] == f"models:/rayuda-advent/{version.version}"
    # one fresh seed cannot beat the defaults beyond noise: the champion is the paper defaults, and says so
    assert "keep the defaults" in parent.data.tags["rayuda.verdict"]
    assert "the paper defaults" in version.description and "keep the defaults" in version.description
    assert "models:/rayuda-advent@champion" in proc.stdout
    out = tmp_path / "pred"
    images = next((tmp_path / "gta5" / "images").glob("*.png")).parent
    predicted = subprocess.run([sys.executable, "-m", "rayuda.predict", "models:/rayuda-advent@champion",
                                "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--images", str(images),
                                "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(list((out / "labels").glob("*.png"))) == 12
