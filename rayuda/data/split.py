"""Select/test split of the labelled target holdout: choose on one set of images, report on another.

Each image is assigned on its own, from a seeded hash of its file name, so the split is deterministic,
the two parts are disjoint, and adding images to the target never moves an image between the parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: Below this many test images a ~1 mIoU difference between candidates is not measurable: warn.
SMALL_TEST = 30


def is_test_image(name: str, test_fraction: float, seed: int) -> bool:
    """Whether image ``name`` belongs to the test part: its hash, read as a number in [0, 1), is below
    ``test_fraction``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def split_images(names: Sequence[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``names`` in the selection part and in the test part."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must lie in [0, 1), got {test_fraction}")
    test = [i for i, name in enumerate(names) if is_test_image(name, test_fraction, seed)]
    chosen = set(test)
    return [i for i in range(len(names)) if i not in chosen], test
