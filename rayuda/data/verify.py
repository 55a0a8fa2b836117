"""Decode every image and label of a dataset once, before any compute is spent on it.

A corrupt file that a batch draws late would otherwise end a run (or every trial of a search) hours in.
Files already verified are remembered by path, size and modification time (and, for labels, the id table
they were checked against) in ``$RAYUDA_CACHE/verified.json``, so a second run or search pays one ``stat``
per file.

An image and label that both decode but differ in size (the stock GTA5 download has such pairs) is a *bad
pair*: :func:`verify_pairs` lists them (remembered too, with the sizes), and the config key
``data.bad_pairs`` decides: ``refuse`` (the default; :func:`refuse_bad_pairs` names them in one line) or
``skip`` (:func:`drop_pairs` leaves them out of every dataset a run opens).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rayuda.config import cache_root
from rayuda.data.datasets import SegmentationDataset
from rayuda.data.labels import DatasetError, PairSizeError

#: ``data.bad_pairs``: what a run does with image/label pairs of different sizes.
BAD_PAIR_POLICIES = ("refuse", "skip")
_BAD = "\tsize\t"  # a label's cache entry for a bad pair: "<stamp>\tsize\t<reason>"
SHOWN = 10  # bad pairs named in an error line; the rest are counted
PROGRESS_SECONDS = 5.0  # a progress line at most this often while decoding (and one at the end)


@dataclass(frozen=True)
class BadPair:
    """An image and its label of different sizes; ``reason``: ``label WxH, image WxH``."""

    image: str
    label: str
    reason: str

    def line(self) -> str:
        return f"{self.label} ({self.reason})"


def verified_cache() -> Path:
    return cache_root() / "verified.json"


def _stamp(path: Path, table: str) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{table}"


def content_digest(dataset: SegmentationDataset) -> str:
    """A digest of what ``dataset`` reads: each file's path, size and modification time, and the
    id table its labels are mapped with (``classes.yaml`` included). One ``stat`` per file, nothing decoded. The
    stage keys hold it (:func:`rayuda.engine.pipeline.input_digests`), so a stage computed on these files is not
    served from the cache once a label is fixed, an image added or removed, or the mapping edited."""
    digest = hashlib.sha256(dataset.id_table.encode())
    for pair in dataset.files:
        for path in pair:
            if path is None:
                digest.update(b"-\n")
                continue
            st = os.stat(path)
            digest.update(f"{path}\t{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _reason(err: PairSizeError) -> str:
    (lw, lh), (iw, ih) = err.label_size, err.image_size
    return f"label {lw}x{lh}, image {iw}x{ih}"


def _read_cache(cache: Path) -> dict[str, str]:
    try:
        return json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(cache: Path, known: dict[str, str]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, cache)


def _remembered(known: dict[str, str], stamps: list[tuple[str, str]]) -> str | None:
    """``"ok"`` when the pair was verified as it is now, ``"bad:<reason>"`` when it was found a bad pair, else
    None (decode it)."""
    if known.get(stamps[0][0]) != stamps[0][1]:
        return None
    if len(stamps) == 1 or known.get(stamps[1][0]) == stamps[1][1]:
        return "ok"
    entry = known.get(stamps[1][0], "")
    if entry.startswith(stamps[1][1] + _BAD):
        return "bad:" + entry[len(stamps[1][1] + _BAD):]
    return None


def progress_line(what: str, done: int, total: int, seconds: float, bad: int) -> str:
    """``verifying WHAT: done/total image/label pairs decoded (s, pairs/s, time left, bad pairs so far)``."""
    rate = done / max(seconds, 1e-9)
    left = f", ~{(total - done) / rate:.0f} s left" if done < total else ""
    found = f", {bad} of different sizes" if bad else ""
    return (f"verifying {what}: {done}/{total} image/label pairs decoded ({seconds:.0f} s, {rate:.0f}/s{left}"
            f"{found})")


def verify_pairs(dataset: SegmentationDataset, what: str, cache: Path | None = None, threads: int = 4
                 ) -> tuple[int, list[BadPair]]:
    """Decode each (image, label) pair of ``dataset`` not verified before; raise the dataset's own
    :class:`~rayuda.data.DatasetError` (naming the file) on the first that fails to decode or holds ids outside
    its table. ``what`` names the dataset in the progress line (to stderr, every :data:`PROGRESS_SECONDS` and at
    the end).

    Returns (pairs decoded now, every bad pair of the dataset — remembered ones included — in file order)."""
    cache = Path(cache) if cache is not None else verified_cache()
    known = _read_cache(cache)
    table = dataset.id_table
    todo, bad = [], {}
    for index, (image, label) in enumerate(dataset.files):
        stamps = [(str(image), _stamp(image, ""))]
        if label is not None:
            stamps.append((str(label), _stamp(label, table)))
        state = _remembered(known, stamps)
        if state is None:
            todo.append((index, stamps))
        elif state.startswith("bad:"):
            bad[index] = BadPair(str(image), str(label), state[4:])
    if not todo:
        return 0, [bad[i] for i in sorted(bad)]

    def decode(job):
        try:
            dataset.load(job[0])
        except PairSizeError as err:
            return err
        return None

    tic = shown = time.time()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes with the GIL released
            for done, ((index, stamps), err) in enumerate(zip(todo, pool.map(decode, todo), strict=True), 1):
                if err is None:
                    known.update(stamps)
                else:
                    known[stamps[0][0]] = stamps[0][1]
                    known[stamps[1][0]] = stamps[1][1] + _BAD + _reason(err)
                    bad[index] = BadPair(stamps[0][0], stamps[1][0], _reason(err))
                if done == len(todo) or time.time() - shown >= PROGRESS_SECONDS:
                    shown = time.time()
                    print(progress_line(what, done, len(todo), shown - tic, len(bad)), file=sys.stderr, flush=True)
    finally:  # what was verified stays verified, even when a later file fails
        _write_cache(cache, known)
    return len(todo), [bad[i] for i in sorted(bad)]


def verify_dataset(dataset: SegmentationDataset, what: str, cache: Path | None = None, threads: int = 4) -> int:
    """:func:`verify_pairs` that refuses bad pairs (:func:`refuse_bad_pairs`); returns the pairs decoded now."""
    decoded, bad = verify_pairs(dataset, what, cache, threads)
    refuse_bad_pairs(bad)
    return decoded


def refuse_bad_pairs(bad: list[BadPair]) -> None:
    """Raise one :class:`~rayuda.data.DatasetError` line naming the bad pairs (the first :data:`SHOWN`) and the
    option that drops them; nothing when ``bad`` is empty."""
    if not bad:
        return
    shown = "; ".join(pair.line() for pair in bad[:SHOWN])
    more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    raise DatasetError(f"{len(bad)} image/label pair(s) differ in size: {shown}{more}; "
                       f"drop them with --set data.bad_pairs=skip (every dropped file is listed)")


def drop_pairs(dataset: SegmentationDataset, images: frozenset[str] | set[str]) -> SegmentationDataset:
    """``dataset`` without the pairs whose image path is in ``images`` (a shallow copy; ``dataset`` itself is
    unchanged). Items are seeded by their index, so the pairs after a dropped one draw other (still
    reproducible) augmentations than in the full dataset."""
    if not images:
        return dataset
    out = copy.copy(dataset)
    out.files = [(image, label) for image, label in dataset.files if str(image) not in images]
    out.has_labels = any(label is not None for _, label in out.files)
    return out
