"""What the search-service tests share: the tiny config flags, the `rayuda.tune` command line, its MLflow runs
and an unlabelled target folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow_store import fresh_store

TINY = ["--set", "data.size=[32,64]", "--set", "data.batch_size=2", "--set", "data.holdout=4",
        "--set", "stages.source_only.iters=4", "--set", "train.log_every=2", "--set", "train.num_masks=2"]


def tune_cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rayuda.tune", "advent", "--storage", str(tmp_path / "store"), "--name", "s",
            "--mlflow-uri", fresh_store(tmp_path / "mlflow.db"), "--best", str(tmp_path / "best.yaml"),
            *TINY, *extra]


def runs_of(tmp_path: Path, experiment: str = "rayuda-advent"):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("rayuda.role") == "search"]
    children = [r for r in all_runs if r.data.tags.get("rayuda.role") == "trial"]
    return client, parents, children


def unlabelled_folder(root: Path, count: int = 6) -> Path:
    """A user's new target with images only: real PNGs copied from minicity's target rendering."""
    from rayuda.data.minicity import ensure_minicity

    images = sorted((ensure_minicity() / "target" / "leftImg8bit" / "train").rglob("*.png"))[:count]
    (root / "images").mkdir(parents=True)
    for path in images:
        shutil.copy(path, root / "images" / path.name)
    return root
