"""The pseudo-label pass: one eval-mode sweep over target-train with a :class:`rayuda.pseudo.PseudoLabeller`.

The softmax of every image is predicted at the evaluation size and upsampled with the shared helper
(:func:`rayuda.models.upsample_logits`) to the image's own size, so labels are written at each image's own size as
train-id PNGs (``labels/<stem>.png``, 255 = ignored); the labeller's statistics and subsets go to
``pseudo_labels.json``. The pass runs twice over the set when the labeller needs statistics first.

When target-train has labels, the pass then measures every pseudo-label against the true one
(:func:`truth_statistics`, key ``truth`` of ``pseudo_labels.json``, facts ``pseudo/*``). The labeller never sees
them: the true label of an image is read only after :meth:`~rayuda.pseudo.PseudoLabeller.label` has returned,
and nothing computed from it goes back to the labeller or into any selection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from rayuda.data import SegmentationDataset
from rayuda.models.predict import model_align_corners, upsample_logits
from rayuda.pseudo import IGNORE, PseudoLabeller, rare_classes

LABELS = "labels"
STATS = "pseudo_labels.json"


def _image_sizes(dataset: SegmentationDataset) -> list[tuple[int, int]]:
    sizes = []
    for image_path, _ in dataset.files:
        with Image.open(image_path) as image:
            sizes.append((image.height, image.width))
    return sizes


def _softmaxes(model: nn.Module, dataset: SegmentationDataset, device, batch_size: int) -> Iterator[tuple[str, Any]]:
    """(image name, C×H×W softmax at the image's own size) for every image of ``dataset``, in order."""
    sizes = _image_sizes(dataset)
    if dataset.transform.size is None and len(set(sizes)) > 1:
        batch_size = 1  # images of several sizes, not resized: they cannot share a batch
    index = 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images = batch["image"].to(device)
            logits = model(images).logits["main"]
            for j, name in enumerate(batch["name"]):
                own = upsample_logits(logits[j : j + 1], sizes[index], model_align_corners(model))  # own size
                yield name, torch.softmax(own[0], dim=0)
                index += 1


def true_label(dataset: SegmentationDataset, index: int) -> np.ndarray | None:
    """Image ``index``'s true train-id label at the image's own size, or ``None`` when it has none.

    Decoded by the dataset itself (:meth:`SegmentationDataset.load`: its id table, before any transform),
    because the pass's evaluation transform resizes labels (nearest) to ``data.size`` while pseudo-labels
    are written at the image's own size: this way the comparison is pixel for pixel.
    """
    return dataset.load(index)[1]


def confusion(truth: np.ndarray, pseudo: np.ndarray | None, num_classes: int) -> np.ndarray:
    """C×(C+1) pixel counts of (true class, pseudo-label) of one image; column C counts the pixels left
    unlabelled (255, or every pixel when ``pseudo`` is ``None``). Truth pixels of 255 are left out."""
    if pseudo is not None and pseudo.shape != truth.shape:
        raise ValueError(f"pseudo-label of shape {pseudo.shape} but true label of shape {truth.shape}")
    valid = truth != IGNORE
    true = truth[valid].astype(np.int64)
    if true.size and int(true.max()) >= num_classes:
        raise ValueError(f"true label ids up to {int(true.max())}, but the labeller has {num_classes} classes")
    given = np.full_like(true, num_classes) if pseudo is None else pseudo[valid].astype(np.int64)
    given[given == IGNORE] = num_classes
    counts = np.bincount(true * (num_classes + 1) + given, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _scores(correct: int, kept: int, true: int, pixels: int) -> dict[str, Any]:
    return {"precision": _ratio(correct, kept), "recall": _ratio(correct, true), "kept_pixels": kept,
            "true_pixels": true, "correct_pixels": correct, "kept_share_of_pass": _ratio(kept, pixels)}


def truth_statistics(counts: np.ndarray, class_names: list[str], rare: list[str], rare_rule: str) -> dict[str, Any]:
    """Pseudo-labels against the truth, from a pass's summed :func:`confusion` ``counts``.

    Only pixels with a true label count (``pixels``). Per class c: ``precision`` (of the pixels pseudo-labelled
    c, the share whose true label is c), ``recall`` (of the true-c pixels, the share pseudo-labelled c; pixels
    left unlabelled count as missed), ``kept_pixels`` / ``true_pixels`` / ``correct_pixels``, and
    ``kept_share_of_pass`` (pixels kept as c / ``pixels`` — not the labellers' ``kept_share``, which is
    kept / *predicted* c); ``None`` where the denominator is 0. ``overall``: the same over all classes
    (precision = correct / kept pixels, recall = correct / ``pixels``); ``rare``: over the classes ``rare``
    (named with the ``rule`` that chose them). ``confusion``: rows true class, columns pseudo-label, the
    last column unlabelled.
    """
    c = len(class_names)
    kept, true, correct = counts[:, :c].sum(0), counts.sum(1), np.diag(counts[:, :c])
    pixels = int(true.sum())

    def over(mask) -> dict[str, Any]:
        return _scores(int(correct[mask].sum()), int(kept[mask].sum()), int(true[mask].sum()), pixels)

    index = [class_names.index(name) for name in rare]
    return {"pixels": pixels,
            "per_class": {name: over([k]) for k, name in enumerate(class_names)},
            "overall": over(slice(None)),
            "rare": {"classes": list(rare), "rule": rare_rule, **over(index)},
            "confusion": counts.tolist()}


def pseudo_label_pass(
    model: nn.Module, dataset: SegmentationDataset, labeller: PseudoLabeller, work_dir: Path, *, device,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run ``labeller`` over ``dataset`` (target-train, evaluation transform) with ``model`` in eval mode.

    Writes ``labels/<stem>.png`` and ``pseudo_labels.json``; returns a summary of the statistics (facts). When
    ``dataset`` has labels, each image's pseudo-label is then compared with its true label
    (:func:`true_label`, :func:`truth_statistics`): ``truth`` in the JSON, facts ``pseudo/precision``,
    ``pseudo/recall``, ``pseudo/rare_precision``, ``pseudo/rare_recall`` (where defined) and ``truth_per_class``
    (per class precision and recall). Rare classes: those the labeller named (``rare_classes`` in its
    statistics: CRA's), else CRA's rule (:func:`rayuda.pseudo.rare_classes`) on this pass's argmax.
    """
    stems = [Path(p).stem for p, _ in dataset.files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{dataset.root}: image file names are not unique; pseudo-labels are stored by name")
    model.eval()
    if labeller.needs_statistics:
        for name, prob in _softmaxes(model, dataset, device, batch_size):
            labeller.observe(name, prob)
    stats = labeller.decide()
    out = work_dir / LABELS
    out.mkdir(parents=True, exist_ok=True)
    c = labeller.num_classes
    counts = np.zeros(c, dtype=np.int64)
    labelled = pixels = measured = 0
    measure = dataset.has_labels  # against the truth: after label() has returned, never fed back
    matrix, argmax = np.zeros((c, c + 1), dtype=np.int64), np.zeros(c, dtype=np.int64)
    for index, (name, prob) in enumerate(_softmaxes(model, dataset, device, batch_size)):
        label = labeller.label(name, prob)
        array = None if label is None else label.cpu().numpy().astype(np.uint8)
        if array is not None:
            Image.fromarray(array).save(out / f"{Path(name).stem}.png")
            kept = array[array != IGNORE]
            counts += np.bincount(kept, minlength=c)[:c]
            labelled, pixels = labelled + 1, pixels + array.size
        if measure:
            argmax += np.bincount(prob.argmax(0).flatten().cpu().numpy(), minlength=c)[:c]
            truth = true_label(dataset, index)
            if truth is not None:
                matrix, measured = matrix + confusion(truth, array, c), measured + 1
    share = counts / max(int(counts.sum()), 1)
    record = {"labeller": labeller.name, "images": len(dataset), "labelled_images": labelled,
              "labelled_pixel_share": float(counts.sum() / max(pixels, 1)),
              "class_share": share.round(6).tolist(), "statistics": stats, "subsets": labeller.subsets()}
    if measure:
        if "rare_classes" in stats:
            rare, rule = list(stats["rare_classes"]), f"the labeller's ({labeller.name})"
        else:
            mask = rare_classes(torch.from_numpy(argmax)).tolist()
            rare = [name for name, is_rare in zip(labeller.class_names, mask, strict=True) if is_rare]
            rule = "CRA's: argmax share of the pass's pixels below rayuda.pseudo.RARE_FRACTION"
        record["truth"] = {"images": measured, **truth_statistics(matrix, labeller.class_names, rare, rule)}
    (work_dir / STATS).write_text(json.dumps(record, indent=1))
    facts = {"labelled_images": labelled, "labelled_pixel_share": record["labelled_pixel_share"],
             **{f"subset/{k}": len(v) for k, v in record["subsets"].items()}}
    if "per_class" in stats:
        facts["per_class"] = stats["per_class"]  # per-class thresholds: shown in MLflow and best.yaml
    if measure:
        facts.update(truth_facts(record["truth"]))
    return facts


def truth_facts(truth: dict[str, Any]) -> dict[str, Any]:
    """The stage facts of a pass's ``truth`` record: ``pseudo/precision``, ``pseudo/recall``,
    ``pseudo/rare_precision``, ``pseudo/rare_recall`` (those defined; MLflow metrics of the trial, see
    :func:`rayuda.hpo.trial_summary.pseudo_metrics`) and ``truth_per_class`` ({class: {precision, recall}}, columns of
    the thresholds table). Reported, never a selection metric."""
    overall, rare = truth["overall"], truth["rare"]
    values = {"pseudo/precision": overall["precision"], "pseudo/recall": overall["recall"],
              "pseudo/rare_precision": rare["precision"], "pseudo/rare_recall": rare["recall"]}
    return {**{k: v for k, v in values.items() if v is not None},
            "truth_per_class": {name: {"precision": e["precision"], "recall": e["recall"]}
                                for name, e in truth["per_class"].items()}}
