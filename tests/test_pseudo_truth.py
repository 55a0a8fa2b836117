"""Pseudo-labels measured against the true labels (``truth`` of ``pseudo_labels.json``, facts ``pseudo/*``): counted
by hand on two 4×4 images, absent without labels, without any effect on the labels written, on the selection
score of a real pipeline run, and on what a search may select on; the thresholds table and MLflow metrics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rayuda.config import ConfigError
from rayuda.data import Transform, open_dataset
from rayuda.engine import pipeline as pipeline_module
from rayuda.engine import run_pipeline
from rayuda.engine.evaluate import SELECTION_METRICS, resolve_metric
from rayuda.engine.passes import pseudo_label_pass
from rayuda.hpo.tracking import MlflowTracker
from rayuda.hpo.trial_summary import pseudo_metrics, read_summary, threshold_tables
from rayuda.methods.cra import CrossRegionSplit
from rayuda.methods.intrada import EntropyRanking
from rayuda.models import SegOutput
from rayuda.pseudo import IGNORE, rare_classes
from tests.test_engine import tiny

CLASSES = ["road", "sidewalk", "building"]  # train ids 0, 1, 2 under protocol 19
COLOURS = {"R": (255, 0, 0), "G": (0, 255, 0), "B": (0, 0, 255), "K": (0, 0, 0)}
# R/G/B: that class, confidently (CRA entropy e ≈ 0.03–0.05 < λ = 0.1); K (black): near-uniform softmax
# (argmax building, e ≈ 0.33, × rare_factor 0.165 > λ), so CRA leaves it unlabelled.
PSEUDO = {"R": 0, "G": 1, "B": 2, "K": IGNORE}
IMAGES = {"a": ["RRGG", "RRGG", "BBKK", "RRKK"], "b": ["GGGG", "BBRR", "KKKK", "GGBB"]}
TRUTH = {"a": ["0011", "0111", "22x0", "0222"], "b": ["1101", "2200", "11xx", "112x"]}  # x: ignore (255)
CRA_PARAMS = {"lambda": 0.1, "rare_fraction": 0.3, "rare_factor": 0.5}


class ColourLogits(nn.Module):
    """G whose 3 logits at a pixel are the pixel's normalised red, green and blue values."""

    def forward(self, x):
        return SegOutput(logits={"main": x}, features={})


def make_target(root: Path, labelled: bool) -> Path:
    """The two hand-drawn images in a ``folder:`` dataset, with their true labels (raw values 0, 1, 2, 255
    mapped by ``classes.yaml``) when ``labelled``."""
    (root / "images").mkdir(parents=True)
    for name, rows in IMAGES.items():
        pixels = np.array([[COLOURS[ch] for ch in row] for row in rows], dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    if labelled:
        (root / "labels").mkdir()
        (root / "classes.yaml").write_text("mapping: {0: road, 1: sidewalk, 2: building, 255: ignore}\n")
        for name, rows in TRUTH.items():
            ids = np.array([[255 if ch == "x" else int(ch) for ch in row] for row in rows], dtype=np.uint8)
            Image.fromarray(ids).save(root / "labels" / f"{name}.png")
    return root


def run_pass(root: Path, labeller, out: Path) -> tuple[dict, dict]:
    dataset = open_dataset(f"folder:{root}", "train", role="target", transform=Transform())
    facts = pseudo_label_pass(ColourLogits(), dataset, labeller, out, device=torch.device("cpu"))
    return facts, json.loads((out / "pseudo_labels.json").read_text())


def test_cra_pass_measures_precision_and_recall_counted_by_hand(tmp_path):
    facts, record = run_pass(make_target(tmp_path / "t", True), CrossRegionSplit(CRA_PARAMS, CLASSES), tmp_path / "o")
    for name, rows in IMAGES.items():  # the set-up: the labels written are the colours' classes, black unlabelled
        written = np.array(Image.open(tmp_path / "o" / "labels" / f"{name}.png"))
        assert written.tolist() == [[PSEUDO[ch] for ch in row] for row in rows]
    # argmax pixels: road 8 (R), sidewalk 10 (G), building 14 (B + K) of 32: road's share 0.25 < 0.3, rare
    assert record["statistics"]["rare_classes"] == ["road"]
    truth = record["truth"]
    # by hand, (pseudo, true) over the 28 pixels with a true label (4 are x):
    #   pseudo road 8 pixels (a: 6 R, b: 2 R), 6 truly road (a: 4, b: 2)
    #   pseudo sidewalk 10 (a: 4 G, b: 6 G), 9 truly sidewalk (a: 4, b: 5)
    #   pseudo building 5 (a: 2 B, b: 3 B), 5 truly building
    #   unlabelled (K) 5: a truly road 1, building 2; b sidewalk 2
    #   true pixels: road 8 (a 5, b 3), sidewalk 12 (a 5, b 7), building 8 (a 5, b 3)
    assert truth["images"] == 2 and truth["pixels"] == 28
    want = {"road": (6 / 8, 6 / 8, 8, 8), "sidewalk": (9 / 10, 9 / 12, 10, 12), "building": (5 / 5, 5 / 8, 5, 8)}
    for name, (precision, recall, kept, true) in want.items():
        entry = truth["per_class"][name]
        assert (entry["precision"], entry["recall"]) == pytest.approx((precision, recall)), name
        assert (entry["kept_pixels"], entry["true_pixels"]) == (kept, true), name
        assert entry["kept_share_of_pass"] == pytest.approx(kept / 28), name
    overall = truth["overall"]
    assert (overall["precision"], overall["recall"]) == pytest.approx((20 / 23, 20 / 28))  # 6 + 9 + 5 correct
    assert (overall["kept_pixels"], overall["correct_pixels"], overall["true_pixels"]) == (23, 20, 28)
    assert truth["rare"]["classes"] == ["road"] and "cross_region" in truth["rare"]["rule"]
    assert (truth["rare"]["precision"], truth["rare"]["recall"]) == pytest.approx((6 / 8, 6 / 8))
    assert truth["confusion"] == [[6, 1, 0, 1], [1, 9, 0, 2], [1, 0, 5, 2]]  # rows true, last column unlabelled
    assert facts["pseudo/precision"] == pytest.approx(20 / 23) and facts["pseudo/recall"] == pytest.approx(20 / 28)
    assert facts["pseudo/rare_precision"] == pytest.approx(6 / 8)
    assert facts["pseudo/rare_recall"] == pytest.approx(6 / 8)
    assert facts["truth_per_class"]["sidewalk"] == pytest.approx({"precision": 9 / 10, "recall": 9 / 12})


def test_an_unlabelled_image_counts_as_missed_and_rare_classes_follow_cras_rule(tmp_path):
    """EntropyRanking (λ = ½) labels only the more confident image b (every pixel its argmax, K as building),
    and has no rare classes of its own: CRA's rule (share < 1 %) on the pass's argmax finds none."""
    facts, record = run_pass(make_target(tmp_path / "t", True), EntropyRanking({"lambda": 0.5}, CLASSES),
                             tmp_path / "o")
    assert record["subsets"] == {"easy": ["b.png"], "hard": ["a.png"]}
    truth = record["truth"]
    # b: pseudo road 2 (2 right), sidewalk 6 (5 right), building 5 (B 3 right, K 2 truly sidewalk); a: all missed
    assert (truth["overall"]["kept_pixels"], truth["overall"]["correct_pixels"]) == (13, 10)
    assert (truth["overall"]["precision"], truth["overall"]["recall"]) == pytest.approx((10 / 13, 10 / 28))
    assert truth["per_class"]["road"]["recall"] == pytest.approx(2 / 8)  # a's 5 true road pixels missed
    assert truth["rare"]["classes"] == [] and "CRA" in truth["rare"]["rule"]
    assert truth["rare"]["precision"] is None and truth["rare"]["recall"] is None
    assert "pseudo/rare_precision" not in facts and "pseudo/rare_recall" not in facts
    assert facts["pseudo/precision"] == pytest.approx(10 / 13)


def test_rare_classes_is_cras_share_rule():
    assert rare_classes(torch.tensor([500, 4, 496])).tolist() == [False, True, False]  # 0.4 % < 1 %
    assert rare_classes(torch.tensor([8, 10, 14]), 0.3).tolist() == [True, False, False]


def test_without_labels_nothing_is_measured_and_the_labels_are_byte_identical(tmp_path):
    """The truth cannot leak into labelling: the same images with and without labels give the same files."""
    outputs = {}
    for labelled in (True, False):
        root = make_target(tmp_path / f"t{labelled}", labelled)
        facts, record = run_pass(root, CrossRegionSplit(CRA_PARAMS, CLASSES), tmp_path / f"o{labelled}")
        outputs[labelled] = (facts, record)
    (facts, record), (facts_free, record_free) = outputs[True], outputs[False]
    assert "truth" in record and "truth" not in record_free
    assert not any(k.startswith("pseudo/") or k == "truth_per_class" for k in facts_free)
    assert {k: v for k, v in record.items() if k != "truth"} == record_free
    assert {k: v for k, v in facts.items() if not k.startswith("pseudo/") and k != "truth_per_class"} == facts_free
    for name in IMAGES:
        png = f"labels/{name}.png"
        assert (tmp_path / "oTrue" / png).read_bytes() == (tmp_path / "oFalse" / png).read_bytes()


def test_pseudo_metrics_are_no_selection_metric():
    assert not any(key.startswith("pseudo") for key, _ in SELECTION_METRICS.values())
    for name in ("pseudo/precision", "pseudo/recall", "pseudo/rare_precision", "pseudo/rare_recall"):
        with pytest.raises(ConfigError, match="unknown selection metric"):
            resolve_metric(name, True)


SUMMARY_STAGES = [
    {"stage": "cda", "cache": "hit", "seconds": 1.0},
    {"stage": "regions", "cache": "miss", "seconds": 2.0, "pseudo/precision": 0.8, "pseudo/recall": 0.5,
     "pseudo/rare_precision": 0.25,
     "per_class": {"road": {"threshold": 0.1, "kept_share": 0.7}, "building": {"threshold": 0.2, "kept_share": 0.4}},
     "truth_per_class": {"road": {"precision": 0.9, "recall": 0.6}, "sidewalk": {"precision": None, "recall": 0.0},
                         "building": {"precision": 0.3, "recall": 0.2}, "sky": {"precision": None, "recall": None}}},
    {"stage": "cra", "cache": "miss", "seconds": 3.0},
]


def test_thresholds_table_gets_precision_and_recall_columns(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"stages": SUMMARY_STAGES}))
    table, chart = threshold_tables(read_summary(summary), tmp_path / "out")
    rows = list(csv.DictReader(open(table)))
    # class order; sidewalk has true pixels (recall 0) though never kept, sky has none and no thresholds
    assert [r["class"] for r in rows] == ["road", "sidewalk", "building"]
    assert [(r["threshold"], r["precision"], r["recall"]) for r in rows] == [
        ("0.1", "0.9", "0.6"), ("", "", "0.0"), ("0.2", "0.3", "0.2")]
    assert chart.stat().st_size > 1000


def test_pseudo_metrics_reach_the_trials_mlflow_run(tmp_path):
    from rayuda.hpo.tracking import ensure_experiment
    from rayuda.runs import client_for

    trial_dir = tmp_path / "trials" / "t1"
    trial_dir.mkdir(parents=True)
    (trial_dir / "summary.json").write_text(json.dumps({"stages": SUMMARY_STAGES}))
    assert pseudo_metrics(read_summary(trial_dir / "summary.json")) == [
        ("pseudo/precision", 0.8, 1), ("pseudo/recall", 0.5, 1), ("pseudo/rare_precision", 0.25, 1)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run_id = client.create_run(ensure_experiment(client, "e", uri)).info.run_id
    tracker = MlflowTracker(uri, "e", "s", "r", {}, {}, str(tmp_path))
    tracker._runs = {"t1": run_id}
    tracker._finish(type("Trial", (), {"trial_id": "t1"})(), "finished")
    metrics = client.get_run(run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("pseudo/")} == {
        "pseudo/precision": 0.8, "pseudo/recall": 0.5, "pseudo/rare_precision": 0.25}
    assert [m.step for m in client.get_metric_history(run_id, "pseudo/precision")] == [1]  # the stage's place
    tables = {a.path for a in client.list_artifacts(run_id, "thresholds")}
    assert tables == {"thresholds/thresholds-regions.csv", "thresholds/thresholds-regions.png"}


def test_cra_pipeline_measures_its_pass_and_the_truth_changes_no_score(tmp_path, monkeypatch):
    cfg = tiny("cra", **{"params.regions.lambda": 0.05})
    cache = tmp_path / "cache"
    seen = []
    summary = run_pipeline(cfg, tmp_path / "a", cache_dir=cache, report=lambda m, d: seen.append(m))
    regions = next(s for s in summary["stages"] if s["stage"] == "regions")
    record = json.loads((Path(regions["dir"]) / "pseudo_labels.json").read_text())
    truth = record["truth"]

    # recount overall precision and recall from the written files and the dataset's own labels
    target = open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"])
    correct = kept = true = 0
    for index, (image_path, _) in enumerate(target.files):
        label = target.load(index)[1]
        written = Path(regions["dir"]) / "labels" / f"{image_path.stem}.png"
        pseudo = np.array(Image.open(written)) if written.is_file() else np.full_like(label, IGNORE)
        valid = label != IGNORE
        correct += int(((pseudo == label) & valid).sum())
        kept += int(((pseudo != IGNORE) & valid).sum())
        true += int(valid.sum())
    assert truth["images"] == len(target) and truth["pixels"] == true
    assert truth["overall"]["kept_pixels"] == kept and truth["overall"]["correct_pixels"] == correct
    assert regions["pseudo/precision"] == pytest.approx(correct / kept)
    assert regions["pseudo/recall"] == pytest.approx(correct / true)
    assert truth["rare"]["classes"] == record["statistics"]["rare_classes"]
    assert set(regions["truth_per_class"]) == set(target.class_names)
    assert not any(k.startswith("pseudo") for m in seen for k in m)  # the reports a search selects on

    # the same run with the target's labels hidden from the pass: same labels, same scores, no truth
    for name in ("regions", "cra"):
        shutil.rmtree(next(s["dir"] for s in summary["stages"] if s["stage"] == name))
    real_pass = pipeline_module.pseudo_label_pass

    def label_free_pass(model, dataset, *args, **kw):
        dataset.has_labels = False
        return real_pass(model, dataset, *args, **kw)

    monkeypatch.setattr(pipeline_module, "pseudo_label_pass", label_free_pass)
    free = run_pipeline(cfg, tmp_path / "b", cache_dir=cache)
    assert {s["stage"]: s["cache"] for s in free["stages"]} == {"source_only": "hit", "cda": "hit", "regions": "miss",
                                                                "cra": "miss"}
    regions_free = next(s for s in free["stages"] if s["stage"] == "regions")
    assert "truth" not in json.loads((Path(regions_free["dir"]) / "pseudo_labels.json").read_text())
    assert not any(k.startswith("pseudo/") for k in regions_free)
    for key in ("score", "best_score", "best_iteration", "miou"):
        assert free[key] == summary[key], key
    labels = sorted((Path(regions_free["dir"]) / "labels").iterdir())
    assert len(labels) == len(target)
    for path in labels:
        assert path.read_bytes() == (Path(regions["dir"]) / "labels" / path.name).read_bytes()
