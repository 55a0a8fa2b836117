"""The stage cache: a stage's result stored under its chained key (``rayuda.engine.plan.stage_key``).

Trials whose upstream configs agree find a stage already computed and reuse it; a file lock makes
concurrent trials compute it once. Locks are per stage and the engine resolves a plan's stages one after
the other, so no lock is held while an upstream stage is being computed.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

DONE = "stage.yaml"


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
    cache_dir: Path, name: str, key: str, record: dict[str, Any], compute: Callable[[Path], dict[str, Any]],
    scratch: tuple[str, ...] = (),
) -> tuple[Path, bool]:
    """Return ``(directory, hit)`` of stage ``name`` with ``key``, computing it if needed.

    ``compute(work_dir)`` writes the stage's files into ``work_dir`` and returns a small dict of facts,
    saved with ``record`` (what the key was made of) and the seconds it took in ``stage.yaml``, the
    done-marker. An interrupted computation keeps its work directory, so a stage that checkpoints
    resumes instead of starting over — whichever trial picks it up next. The files named in ``scratch`` (a train
    stage's resume checkpoint: weights, optimiser moments, discriminators, the average, about three models' size)
    serve only that resume and are deleted once the stage is done; deleted after the stage is marked done, so a
    crash in between leaves a stray file, never an unfinished stage without its checkpoint.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{key}"
    if (final / DONE).exists():
        return final, True
    with file_lock(cache_dir / f".{final.name}.lock"):
        if (final / DONE).exists():
            return final, True
        work = cache_dir / f".{final.name}.partial"
        work.mkdir(parents=True, exist_ok=True)
        tic = time.time()
        facts = compute(work)
        done = {"stage": name, "key": key, **record, "facts": facts, "seconds": round(time.time() - tic, 2)}
        (work / DONE).write_text(yaml.safe_dump(done, sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    for leftover in scratch:
        (final / leftover).unlink(missing_ok=True)
    return final, False


def stage_record(stage_dir: Path) -> dict[str, Any]:
    """What ``stage.yaml`` recorded: the stage's key, config slice, facts and compute seconds."""
    return yaml.safe_load((Path(stage_dir) / DONE).read_text())
