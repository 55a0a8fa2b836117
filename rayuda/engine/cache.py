"""The stage cache: a pipeline stage's result stored under the hash of everything that determines it.

Trials whose upstream configs agree (same source data, model, source-only schedule and seed) find the
stage already computed and reuse it; a file lock makes concurrent trials compute it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

DONE = "stage.yaml"


def stage_key(stage_config: dict[str, Any]) -> str:
    """A short stable hash of a stage's determining config."""
    text = json.dumps(stage_config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_stage(
    cache_dir: Path, name: str, stage_config: dict[str, Any], compute: Callable[[Path], dict[str, Any]]
) -> tuple[Path, bool]:
    """Return ``(directory, hit)`` of stage ``name`` for ``stage_config``, computing it if needed.

    ``compute(work_dir)`` writes the stage's files into ``work_dir`` and returns a small dict of facts
    (e.g. its evaluation) recorded in ``stage.yaml``. An interrupted computation keeps its work
    directory, so a stage that checkpoints resumes instead of starting over.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{stage_key(stage_config)}"
    if (final / DONE).exists():
        return final, True
    with file_lock(cache_dir / f".{final.name}.lock"):
        if (final / DONE).exists():
            return final, True
        work = cache_dir / f".{final.name}.partial"
        work.mkdir(parents=True, exist_ok=True)
        facts = compute(work)
        (work / DONE).write_text(yaml.safe_dump({"stage": name, "config": stage_config, **facts}))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    return final, False


def stage_facts(stage_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(stage_dir) / DONE).read_text())
