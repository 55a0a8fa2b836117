"""Segmentation metrics: confusion matrix, per-class IoU and mIoU, the papers' protocol (AdaptSegNet/AdvEnt).

Rows of the confusion matrix are the ground truth, columns the prediction; only pixels with a valid
label (``!= ignore_index`` and ``< num_classes``) count. ``IoU_c = TP / (TP + FP + FN)``
= ``diag / (row + col − diag)``. mIoU is the NaN-aware mean over the classes that occur in the
ground truth, as a fraction in [0, 1] (reports multiply by 100). The 19/16/13-class protocols differ
only in ``num_classes`` (labels already mapped to train ids).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """C×C int64 counts, ``[gt, pred]``, via ``bincount(C·label + pred)`` over pixels with a valid label."""
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long().to(pred.device)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = num_classes * label[valid] + pred[valid]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_iou(confusion: torch.Tensor | np.ndarray) -> np.ndarray:
    """IoU of each class, float64; NaN for a class absent from the ground truth (row sum 0).

    (choice) A class that is predicted but never present is NaN, not 0: IoU is only defined for
    classes that occur, so false positives of an absent class are still paid for by the IoU of the
    true classes of those pixels (their FN) but do not add a 0 to the mean.
    """
    conf = confusion.cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    conf = conf.astype(np.float64)
    diag, gt, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    iou = np.full(len(conf), np.nan)
    present = gt > 0
    iou[present] = diag[present] / (gt + predicted - diag)[present]
    return iou


def mean_iou(confusion: torch.Tensor | np.ndarray) -> float:
    """NaN-aware mean of :func:`per_class_iou` as a fraction in [0, 1]; NaN if no class is present."""
    iou = per_class_iou(confusion)
    return float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")


class Evaluator:
    """Accumulates a CPU int64 confusion matrix over batches."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch: N×C×h×w logits (upsampled bilinearly to the label's H×W, then argmax) or N×H×W
        integer predictions; ``label`` is N×H×W."""
        pred = logits_or_pred
        if pred.dim() == 4:
            if pred.shape[-2:] != label.shape[-2:]:
                size = label.shape[-2:]
                pred = F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)
            pred = pred.argmax(1)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        self.confusion += confusion_matrix(pred, label, self.num_classes, self.ignore_index).cpu()

    def per_class_iou(self) -> np.ndarray:
        return per_class_iou(self.confusion)

    def miou(self) -> float:
        return mean_iou(self.confusion)
