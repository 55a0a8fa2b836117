"""Decode every image and label of a dataset once, before any compute is spent on it.

A corrupt file that a batch draws late would otherwise end a run (or every trial of a search) hours in.
Files already verified are remembered by path, size and modification time (and, for labels, the id table
they were checked against) in ``$RAYUDA_CACHE/verified.json``, so a second run or search pays one ``stat``
per file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rayuda.data.datasets import SegmentationDataset


def verified_cache() -> Path:
    root = Path(os.environ.get("RAYUDA_CACHE", Path.home() / ".cache" / "rayuda"))
    return root / "verified.json"


def _stamp(path: Path, table: str) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{table}"


def verify_dataset(dataset: SegmentationDataset, what: str, cache: Path | None = None, threads: int = 4) -> int:
    """Decode each (image, label) pair of ``dataset`` not verified before; raise the dataset's own
    :class:`~rayuda.data.DatasetError` (naming the file) on the first that fails. ``what`` names the dataset
    in the progress line. Returns the number of pairs decoded now."""
    cache = Path(cache) if cache is not None else verified_cache()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    table = dataset.id_table
    todo = []
    for index, (image, label) in enumerate(dataset.files):
        stamps = [(str(image), _stamp(image, ""))]
        if label is not None:
            stamps.append((str(label), _stamp(label, table)))
        if any(known.get(key) != stamp for key, stamp in stamps):
            todo.append((index, stamps))
    if not todo:
        return 0
    tic, done = time.time(), 0
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes with the GIL released
            for (_, stamps), _ in zip(todo, pool.map(lambda job: dataset.load(job[0]), todo), strict=True):
                known.update(stamps)
                done += 1
                if done % 200 == 0 or done == len(todo):
                    print(f"verifying {what}: {done}/{len(todo)} image/label pairs decoded "
                          f"({time.time() - tic:.0f} s)", file=sys.stderr, flush=True)
    finally:  # what was verified stays verified, even when a later file fails
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    return len(todo)
