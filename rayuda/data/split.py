"""Select/test split of the labelled target holdout: choose on one set of images, report on another.

Each image is assigned on its own, from a seeded hash of its file name, so the split is deterministic,
the two parts are disjoint, and adding images to the target never moves an image between the parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: Below this many test images a ~1 mIoU difference between candidates is not measurable: warn.
SMALL_TEST = 30


def image_draw(name: str, seed: int) -> float:
    """Image ``name``'s seeded hash, read as a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_images(names: Sequence[str], test_fraction: float, seed: int,
                 max_selection: int | None = None) -> tuple[list[int], list[int]]:
    """Indices of ``names`` in the selection part and in the test part: an image is test when its draw
    (:func:`image_draw`) is below ``test_fraction``.

    ``max_selection`` caps the selection part: its images with the highest draws beyond the cap join the test
    part. The selection part is scored at every evaluation of every trial, the test part once per run, so on a
    large labelled holdout the images buy most as test images (``data.max_selection``).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must lie in [0, 1), got {test_fraction}")
    if max_selection is not None and (isinstance(max_selection, bool) or not isinstance(max_selection, int)
                                      or max_selection < 1):
        raise ValueError(f"data.max_selection must be an int ≥ 1 or null, got {max_selection!r}")
    draws = [image_draw(name, seed) for name in names]
    select = [i for i, d in enumerate(draws) if d >= test_fraction]
    if max_selection is not None and len(select) > max_selection:
        select = sorted(sorted(select, key=lambda i: draws[i])[:max_selection])
    chosen = set(select)
    return select, [i for i in range(len(names)) if i not in chosen]
