"""Evaluation on the target holdout: mIoU, per-class IoU, a few coloured masks, the selection score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rayuda.config import ConfigError
from rayuda.data.labels import palette
from rayuda.losses import entropy_map
from rayuda.metrics import Evaluator
from rayuda.models.predict import predict_logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    device: torch.device,
    class_names: list[str],
    masks_dir: Path | None = None,
    num_masks: int = 0,
    batch_size: int = 16,
    proxies: bool = True,
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``: ``miou`` and ``iou/<class>`` (when labelled) and, unless ``proxies`` is
    false (the test part: half the work, no mirrored pass), the label-free proxies ``target_entropy`` (mean
    normalised prediction entropy) and ``flip_agreement`` (share of pixels whose class is the same when the image
    is mirrored). Everything is at the labels' size; a dataset whose labels keep their own size
    (``data.eval_protocol: label``) is evaluated one image at a time: one label-sized set of logits on the device."""
    if _labels_at_own_size(dataset):
        batch_size = 1
    was_training = model.training
    model.eval()
    evaluator = Evaluator(num_classes)
    entropy_sum, agree, pixels, saved = 0.0, 0, 0, 0
    colours = palette(num_classes) if num_masks else None  # protocols 19/16/13 have as many classes
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        logits = predict_logits(model, images, labels.shape[-2:])
        evaluator.update(logits, labels)
        if proxies:
            ent = entropy_map(torch.softmax(logits, dim=1))
            entropy_sum += float(ent.sum())
            pixels += ent.numel()
            mirrored = predict_logits(model, images, labels.shape[-2:], mirrored=True)
            agree += int((mirrored.argmax(1) == logits.argmax(1)).sum())
        if masks_dir is not None and saved < num_masks:
            masks_dir.mkdir(parents=True, exist_ok=True)
            for pred, name in zip(logits.argmax(1).cpu().numpy(), batch["name"], strict=True):
                if saved >= num_masks:
                    break
                Image.fromarray(colours[pred.astype(np.uint8)]).save(masks_dir / f"{Path(name).stem}.png")
                saved += 1
    model.train(was_training)
    metrics: dict[str, float] = ({"target_entropy": entropy_sum / max(pixels, 1),
                                  "flip_agreement": agree / max(pixels, 1)} if proxies else {})
    if evaluator.confusion.sum() > 0:
        metrics["miou"] = float(evaluator.miou())
        for name, iou in zip(class_names, evaluator.per_class_iou(), strict=True):
            if not np.isnan(iou):
                metrics[f"iou/{name}"] = float(iou)
    return metrics


def _labels_at_own_size(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or the dataset a ``Subset`` takes from) keeps each label at its own size
    (:class:`rayuda.data.transforms.OwnLabelSize`)."""
    while hasattr(dataset, "dataset") and not hasattr(dataset, "transform"):
        dataset = dataset.dataset
    return bool(getattr(getattr(dataset, "transform", None), "keeps_label_size", False))


#: Selection metrics: name → (metric key, sign). Higher score is better. ``miou`` needs a labelled holdout;
#: the others are label-free: ``entropy`` and ``flip_agreement`` on the holdout images, the validators of
#: :mod:`rayuda.validators` on the probe set (``im``, ``bnm``, ``snd``, ``dev``). Ensemble agreement needs
#: every trial, so it is no selection metric during a search (``python -m rayuda.validators SEARCH``).
SELECTION_METRICS = {
    "miou": ("miou", 1.0),
    "entropy": ("target_entropy", -1.0),
    "flip_agreement": ("flip_agreement", 1.0),
    "im": ("proxy/im", 1.0),
    "bnm": ("proxy/bnm", 1.0),
    "snd": ("proxy/snd", 1.0),
    "dev": ("proxy/dev", -1.0),
}
#: ``train.metric: auto``: ``miou`` on a labelled target, otherwise this validator (see docs/BENCHMARKS.md
#: "Label-free selection over many trials" for the measurement behind the choice).
AUTO = "auto"
AUTO_UNLABELLED = "im"


def resolve_metric(metric: str, labelled: bool) -> str:
    """The selection metric ``train.metric`` names; ``auto`` becomes ``miou`` when the target holdout is
    labelled and :data:`AUTO_UNLABELLED` when it is not."""
    if metric == AUTO:
        return "miou" if labelled else AUTO_UNLABELLED
    if metric not in SELECTION_METRICS:
        raise ConfigError(f"unknown selection metric {metric!r}; valid: {AUTO}, {', '.join(sorted(SELECTION_METRICS))}")
    return metric


def selection_score(metric: str, metrics: dict[str, float]) -> float:
    key, sign = SELECTION_METRICS[metric]
    if key not in metrics:
        raise ValueError(f"selection metric {metric!r} needs {key!r}, which this evaluation could not compute")
    return sign * metrics[key]
