"""Where a number came from: the library versions, the CUDA stack and the code (rayuda's version and, run from a
checkout, its git commit and whether the work tree had uncommitted changes).

:func:`provenance` goes into every ``summary.json`` (``environment``, with the machine facts of
:func:`rayuda.engine.pipeline.environment`); :func:`mlflow_tags` turns it into the MLflow tags of a search's parent
and trial runs (``rayuda.env.*`` and MLflow's own ``mlflow.source.git.commit``). Versions are read from the
installed distributions' metadata, so nothing heavy (Ray, MLflow) is imported for them.
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import rayuda

#: Distributions whose versions a result depends on (``None`` when one is not installed).
LIBRARIES = ("torch", "torchvision", "numpy", "ray", "optuna", "mlflow")
#: MLflow's reserved tag for the code version (shown in its UI as the run's source version).
GIT_COMMIT_TAG = "mlflow.source.git.commit"
#: Where the commit comes from when rayuda runs from no checkout (the Dockerfile's build arguments).
COMMIT_ENV, DIRTY_ENV = "RAYUDA_GIT_COMMIT", "RAYUDA_GIT_DIRTY"


def library_versions() -> dict[str, str | None]:
    """``{name: version}`` of :data:`LIBRARIES`, and the CUDA and cuDNN versions torch was built with (``None`` on
    a CPU-only build)."""
    import torch

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["cudnn"] = str(cudnn) if cudnn is not None else None
    return versions


@functools.cache
def _checkout() -> Path | None:
    """The git work tree rayuda is imported from, or None (an installed wheel, a copy without ``.git``)."""
    root = Path(rayuda.__file__).resolve().parent.parent
    return root if (root / ".git").exists() else None


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """``rayuda`` (the package version), ``git_commit`` and ``git_dirty`` (tracked files changed since that commit;
    untracked files do not count). Without a git checkout (an image built from the Dockerfile, a wheel) they come
    from ``$RAYUDA_GIT_COMMIT`` / ``$RAYUDA_GIT_DIRTY`` (``true``/``false``, set at image build), else ``None``."""
    out: dict[str, Any] = {"rayuda": rayuda.__version__, "git_commit": None, "git_dirty": None}
    root = _checkout()
    commit = _git(root, "rev-parse", "HEAD") if root is not None else None
    if commit:
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        out.update(git_commit=commit, git_dirty=None if status is None else bool(status))
    elif os.environ.get(COMMIT_ENV):
        dirty = os.environ.get(DIRTY_ENV, "").strip().lower()
        out.update(git_commit=os.environ[COMMIT_ENV].strip(),
                   git_dirty={"true": True, "false": False}.get(dirty))
    return out


def provenance() -> dict[str, Any]:
    """Library and CUDA versions (:func:`library_versions`) and the code version (:func:`code_version`)."""
    return {**library_versions(), **code_version()}


def mlflow_tags(environment: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of an ``environment`` dict (a summary's, or :func:`provenance`): ``rayuda.env.<key>`` for each
    value (``None``: not there, e.g. no GPU), and ``mlflow.source.git.commit`` when the commit is known."""
    tags = {f"rayuda.env.{k}": str(v)[:5000] for k, v in environment.items()}
    if environment.get("git_commit"):
        tags[GIT_COMMIT_TAG] = str(environment["git_commit"])
    return tags
