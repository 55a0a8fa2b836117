"""bench/pseudo_classes.py on a hand-made pass record: labelled pixels over true pixels, precision, bad names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from pseudo_classes import class_rows, main  # noqa: E402


def record() -> dict:
    """A pass that labelled 'bus' on 40 pixels where 10 are bus (8 of them right), 'sky' on 50 of 100, no 'rider'."""
    per_class = {
        "bus": {"precision": 8 / 40, "recall": 0.8, "kept_pixels": 40, "true_pixels": 10, "correct_pixels": 8},
        "sky": {"precision": 1.0, "recall": 0.5, "kept_pixels": 50, "true_pixels": 100, "correct_pixels": 50},
        "rider": {"precision": None, "recall": None, "kept_pixels": 0, "true_pixels": 0, "correct_pixels": 0},
    }
    return {"labelled_pixel_share": 0.6, "truth": {"images": 1, "pixels": 150, "per_class": per_class}}


def test_rows_give_labelled_over_true_pixels_and_precision_for_the_classes_present():
    rows = class_rows(record(), None)
    assert rows == [("bus", pytest.approx(4.0), pytest.approx(0.2)), ("sky", pytest.approx(0.5), 1.0)]
    assert class_rows(record(), ["rider"]) == [("rider", None, None)]  # asked for: shown, with no ratio


def test_an_unknown_class_is_named_and_a_pass_without_truth_is_skipped(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no class 'buss'"):
        class_rows(record(), ["buss"])
    labelled, unlabelled = tmp_path / "a", tmp_path / "b"
    labelled.mkdir(), unlabelled.mkdir()
    (labelled / "pseudo_labels.json").write_text(json.dumps(record()))
    (unlabelled / "pseudo_labels.json").write_text(json.dumps({"labelled_pixel_share": 0.5, "truth": None}))
    assert main([str(labelled), str(unlabelled), "--classes", "bus"]) == 0
    out = capsys.readouterr()
    assert "| bus | 4.00× | 20.0 % |" in out.out and "sky" not in out.out
    assert "no truth record" in out.err and str(unlabelled) in out.err
