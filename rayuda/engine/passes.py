"""The pseudo-label pass: one eval-mode sweep over target-train with a :class:`rayuda.pseudo.PseudoLabeller`.

The softmax of every image is predicted at the evaluation size and upsampled with the shared helper
(:func:`rayuda.models.upsample_logits`) to the image's own size, so labels are written at each image's own size as
train-id PNGs (``labels/<stem>.png``, 255 = ignored); the labeller's statistics and subsets go to
``pseudo_labels.json``. The pass runs twice over the set when the labeller needs statistics first.
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
from rayuda.pseudo import IGNORE, PseudoLabeller

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


def pseudo_label_pass(
    model: nn.Module, dataset: SegmentationDataset, labeller: PseudoLabeller, work_dir: Path, *, device,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run ``labeller`` over ``dataset`` (target-train, evaluation transform) with ``model`` in eval mode.

    Writes ``labels/<stem>.png`` and ``pseudo_labels.json``; returns a summary of the statistics (facts).
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
    counts = np.zeros(labeller.num_classes, dtype=np.int64)
    labelled = pixels = 0
    for name, prob in _softmaxes(model, dataset, device, batch_size):
        label = labeller.label(name, prob)
        if label is None:
            continue
        array = label.cpu().numpy().astype(np.uint8)
        Image.fromarray(array).save(out / f"{Path(name).stem}.png")
        kept = array[array != IGNORE]
        counts += np.bincount(kept, minlength=labeller.num_classes)[: labeller.num_classes]
        labelled, pixels = labelled + 1, pixels + array.size
    share = counts / max(int(counts.sum()), 1)
    record = {"labeller": labeller.name, "images": len(dataset), "labelled_images": labelled,
              "labelled_pixel_share": float(counts.sum() / max(pixels, 1)),
              "class_share": share.round(6).tolist(), "statistics": stats, "subsets": labeller.subsets()}
    (work_dir / STATS).write_text(json.dumps(record, indent=1))
    facts = {"labelled_images": labelled, "labelled_pixel_share": record["labelled_pixel_share"],
             **{f"subset/{k}": len(v) for k, v in record["subsets"].items()}}
    if "per_class" in stats:
        facts["per_class"] = stats["per_class"]  # per-class thresholds: shown in MLflow and best.yaml
    return facts
