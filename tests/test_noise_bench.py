"""bench/noise.py's accounting on hand-made confusion matrices: mIoU of resampled images, the bootstrap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from noise import bootstrap_counts, bootstrap_std, miou_of  # noqa: E402


def image(tp0: int, fp0: int, tp1: int) -> np.ndarray:
    """A 2-class confusion matrix [gt, pred]: class 0 right tp0 times, class 1 predicted as 0 fp0 times."""
    return np.array([[tp0, 0], [fp0, tp1]])


def test_miou_of_resampled_images_counts_each_image_as_often_as_drawn():
    a, b = image(3, 1, 2), image(1, 0, 4)
    # a twice, b once: class 0 IoU 7/(7+2) = 7/9, class 1 IoU 8/(8+2) = 8/10
    assert miou_of(np.stack([a, b]), np.array([2, 1])) == pytest.approx(100 * (7 / 9 + 8 / 10) / 2)
    assert miou_of(np.stack([a, b])) == pytest.approx(miou_of(np.stack([a, b]), np.array([1, 1])))


def test_bootstrap_draws_n_images_with_replacement_reproducibly():
    counts = bootstrap_counts(5, 200, seed=3)
    assert counts.shape == (200, 5) and (counts.sum(1) == 5).all()
    assert (counts == bootstrap_counts(5, 200, seed=3)).all() and (counts.max(1) > 1).any()


def test_bootstrap_std_is_zero_for_identical_images_and_for_a_model_against_itself():
    same = np.stack([image(3, 1, 2)] * 6)
    counts = bootstrap_counts(6, 50)
    assert bootstrap_std(same, counts) == pytest.approx(0.0)
    mixed = np.stack([image(3, 1, 2), image(1, 3, 0), image(5, 0, 5), image(0, 2, 1), image(2, 2, 2), image(4, 0, 1)])
    assert bootstrap_std(mixed, counts) > 1.0  # images that disagree: the resampled mIoU moves
    assert bootstrap_std(mixed, counts, mixed) == pytest.approx(0.0)  # paired: the same redraws for both
