"""Provenance: library, CUDA/cuDNN and code versions (git commit and dirty flag from a checkout) in every
summary.json and as MLflow tags, ``mlflow.source.git.commit`` included."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from rayuda import provenance
from rayuda.engine import run_pipeline
from rayuda.methods import resolve_config

REPO = Path(__file__).resolve().parent.parent
KEYS = {"torch", "torchvision", "numpy", "ray", "optuna", "mlflow", "cuda", "cudnn", "rayuda", "git_commit",
        "git_dirty", "python", "cpu", "gpu", "threads", "deterministic"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_versions_come_from_the_installed_distributions_and_torch_builds():
    versions = provenance.library_versions()
    for name in ("torchvision", "numpy", "ray", "optuna", "mlflow"):
        assert versions[name] == metadata.version(name)
    assert versions["cuda"] == torch.version.cuda
    assert versions["cudnn"] == (str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None)


def test_the_git_commit_and_dirty_flag_of_the_checkout_rayuda_runs_from(tmp_path, monkeypatch):
    if (REPO / ".git").exists():  # this checkout: the same commit git reports
        assert provenance.code_version()["git_commit"] == git(REPO, "rev-parse", "HEAD")

    repo = tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "_checkout", lambda: repo)
    clean = provenance.code_version()
    assert clean == {"rayuda": "0.1.0", "git_commit": git(repo, "rev-parse", "HEAD"), "git_dirty": False}
    (repo / "untracked.txt").write_text("x\n")
    assert provenance.code_version()["git_dirty"] is False  # untracked files do not make it dirty
    (repo / "a.txt").write_text("two\n")
    assert provenance.code_version()["git_dirty"] is True

    monkeypatch.setattr(provenance, "_checkout", lambda: None)  # an installed wheel: no checkout
    monkeypatch.delenv("RAYUDA_GIT_COMMIT", raising=False)
    assert provenance.code_version() == {"rayuda": "0.1.0", "git_commit": None, "git_dirty": None}
    monkeypatch.setenv("RAYUDA_GIT_COMMIT", "0123abc")  # an image built from the Dockerfile
    monkeypatch.setenv("RAYUDA_GIT_DIRTY", "false")
    assert provenance.code_version() == {"rayuda": "0.1.0", "git_commit": "0123abc", "git_dirty": False}


def test_mlflow_tags_carry_every_value_and_mlflows_own_commit_tag():
    tags = provenance.mlflow_tags({"ray": "2.60.0", "gpu": None, "git_commit": "abc123", "git_dirty": True})
    assert tags == {"rayuda.env.ray": "2.60.0", "rayuda.env.gpu": "None", "rayuda.env.git_commit": "abc123",
                    "rayuda.env.git_dirty": "True", "mlflow.source.git.commit": "abc123"}
    assert "mlflow.source.git.commit" not in provenance.mlflow_tags({"git_commit": None})


def test_every_summary_records_the_provenance(tmp_path):
    cfg = resolve_config("source_only", {"data.size": [32, 64], "data.batch_size": 2, "data.holdout": 4,
                                         "stages.source_only.iters": 1, "train.eval_every": 1, "train.log_every": 1,
                                         "train.probe_images": 2})
    run_pipeline(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    env = json.loads((tmp_path / "run" / "summary.json").read_text())["environment"]
    assert KEYS <= set(env)
    assert env["ray"] == metadata.version("ray") and env["mlflow"] == metadata.version("mlflow")
    if (REPO / ".git").exists():
        assert env["git_commit"] == git(REPO, "rev-parse", "HEAD") and isinstance(env["git_dirty"], bool)
