"""Where a search's things go: its name, rayuda's POSIX folder, Ray's storage, the stage cache, MLflow.

::

    WORK_DIR/NAME/                 rayuda's files (``--work-dir``, default: ``--storage`` when it is a path)
      base_config.yaml             each method's base config
      trials.csv, best.yaml, confirmation.md, *.png
      stage-cache/                 the shared stage cache (``--cache-dir`` elsewhere)
      work/                        search.json, optuna.journal, winner.json, dropped_pairs.tsv,
                                   trials/TRIAL/ (run folders), confirm/CANDIDATE-seedS/
    STORAGE/NAME/                  Ray's experiment state (the same folder when --storage is a path)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayuda.config import ConfigError

DEFAULT_STORAGE = "rayuda_results"
WINNER = "winner.json"  # under work/: the run folder of the search's (confirmed) winner
DROPPED = "dropped_pairs.tsv"  # under work/: the bad pairs data.bad_pairs=skip left out


@dataclass(frozen=True)
class Places:
    """A search's name and folders (see the module docstring)."""

    name: str
    exp_dir: Path  # rayuda's folder of this search
    cache_dir: Path  # the stage cache, shared by every node
    storage: str  # --storage as given (a path or an object-store URI)
    ray_storage: str  # Ray's ``storage_path``: exp_dir's parent, or the --storage URI
    ray_experiment: str  # what --resume restores
    method: str  # the command's METHOD (the MLflow experiment is rayuda-METHOD)

    @property
    def work(self) -> Path:
        return self.exp_dir / "work"

    @property
    def experiment(self) -> str:
        return f"rayuda-{self.method}"

    def resume_command(self) -> str:
        """The command that continues this search."""
        if self.ray_storage == str(self.exp_dir.parent):  # a path: Ray's state and rayuda's files in one folder
            where = f"--storage {self.exp_dir.parent}"
        else:
            where = f"--storage {self.storage} --work-dir {self.exp_dir.parent}"
        return f"python -m rayuda.tune {self.method} --resume --name {self.name} {where}"

    def record(self) -> dict[str, Any]:
        """What the search set out to do (``work/search.json``: trial count, MLflow URI, Optuna storage)."""
        path = self.work / "search.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def locate(args) -> Places:
    """The search's places from the command line (``--storage``, ``--work-dir``, ``--name``, ``--resume``,
    ``--cache-dir``); a new search's name must be free, a resumed one must exist."""
    from rayuda.storage import check_storage_uri, is_uri, join

    remote = is_uri(args.storage)
    if remote:
        check_storage_uri(args.storage)
    root = Path(args.work_dir or (DEFAULT_STORAGE if remote else args.storage.removeprefix("file://"))).resolve()
    name = experiment_name(args.method, args.name, args.resume, root)
    exp_dir = root / name
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else exp_dir / "stage-cache"
    return Places(name=name, exp_dir=exp_dir, cache_dir=cache_dir, storage=args.storage,
                  ray_storage=args.storage if remote else str(root),
                  ray_experiment=join(args.storage, name) if remote else str(exp_dir), method=args.method)


def experiment_name(method: str, name: str | None, resume: bool, root: Path) -> str:
    """``--name``, the latest search of ``method`` (``--resume``), or ``METHOD-DATE-TIME``."""
    if resume:
        if not name:
            found = sorted(root.glob(f"{method}-*"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise ConfigError(f"--resume: no {method} search under {root}")
            name = found[-1].name
        if not (root / name).is_dir():
            raise ConfigError(f"--resume: no search named {name!r} under {root}")
        return name
    name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (root / name).exists():
        raise ConfigError(f"a search named {name!r} already exists under {root}; use --resume or another --name")
    return name


def check_trusted(exp_dir: Path) -> None:
    """``--resume`` makes Ray unpickle the search's state files: refuse files another user owns or anyone can
    write (a planted file would run its code as you); warn about group-writable ones."""
    uid = os.getuid()
    for path in [exp_dir, *(p for p in exp_dir.iterdir() if p.is_file())]:
        st = path.stat()
        if st.st_uid != uid or st.st_mode & 0o002:
            who = "is owned by another user" if st.st_uid != uid else "is writable by anyone"
            raise ConfigError(f"--resume: {path} {who}; Ray unpickles a search's state files when it resumes it, so "
                              f"only resume searches whose storage only you (or people you trust) can write")
        if st.st_mode & 0o020:
            print(f"WARNING: {path} is writable by its group: everyone in it can run code in your --resume",
                  file=sys.stderr)


def write_dropped(dropped, path: Path) -> None:
    """The bad pairs ``data.bad_pairs=skip`` drops, one ``image<TAB>label<TAB>reason`` line each (the search's
    MLflow artifact); no file when none is dropped."""
    if dropped:
        path.write_text("".join(f"{p.image}\t{p.label}\t{p.reason}\n" for p in dropped))
    else:
        path.unlink(missing_ok=True)
