"""Confusion matrix, per-class IoU and mIoU against small examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayuda.metrics import Evaluator, confusion_matrix, mean_iou, per_class_iou

# 3 classes on a 2×3 image; the 255 pixel is ignored.
LABEL = torch.tensor([[[0, 0, 1], [2, 1, 255]]])
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
# rows = ground truth, cols = prediction
CONF = [[1, 1, 0],  # gt 0: one right, one called 1
        [0, 1, 1],  # gt 1: one right, one called 2
        [0, 0, 1]]  # gt 2: right


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PRED, LABEL, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == CONF


def test_labels_outside_the_classes_are_ignored():
    label = LABEL.clone()
    label[0, 0, 0] = 3  # not a class of a 3-class protocol: ignored like 255
    assert confusion_matrix(PRED, label, 3).sum() == 4
    assert confusion_matrix(PRED, LABEL, 3, ignore_index=0).tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_per_class_iou_and_mean_by_hand():
    iou = per_class_iou(torch.tensor(CONF))
    # IoU = TP / (TP + FP + FN): class 0: 1/(1+0+1); class 1: 1/(1+1+1); class 2: 1/(1+1+0)
    assert iou.dtype == np.float64
    np.testing.assert_allclose(iou, [1 / 2, 1 / 3, 1 / 2])
    assert mean_iou(torch.tensor(CONF)) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)  # a fraction, not %


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    # 4 classes: class 2 never occurs nor is predicted; class 3 is predicted once but never occurs.
    conf = confusion_matrix(torch.tensor([[0, 3], [1, 1]]), torch.tensor([[0, 0], [1, 1]]), 4)
    iou = per_class_iou(conf)
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == 1.0
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx(0.75)  # not (0.5 + 1 + 0) / 3: a predicted-only class is NaN


def test_mean_iou_is_nan_without_any_labelled_pixel():
    conf = confusion_matrix(PRED, torch.full_like(LABEL, 255), 3)
    assert conf.sum() == 0 and math.isnan(mean_iou(conf))


def test_evaluator_accumulates_predictions_and_resets():
    ev = Evaluator(3)
    ev.update(PRED, LABEL)
    ev.update(PRED, LABEL)
    assert ev.confusion.device.type == "cpu" and ev.confusion.dtype == torch.int64
    assert ev.confusion.tolist() == (2 * torch.tensor(CONF)).tolist()
    np.testing.assert_allclose(ev.per_class_iou(), [1 / 2, 1 / 3, 1 / 2])
    assert ev.miou() == pytest.approx(4 / 9)
    ev.reset()
    assert ev.confusion.sum() == 0


def test_evaluator_upsamples_logits_bilinearly_to_the_label():
    # 2 classes, 2×2 logits: class 1 minus class 0 is d = [[-1, 4], [4, 4]]. Bilinear (align_corners=False)
    # to 4×4 gives output row/col i the input weights (1, 0), (.75, .25), (.25, .75), (0, 1), so only the
    # corner (0, 0) stays negative: (0, 1) = .75·(−1) + .25·4 = .25; (1, 1) = .5625·(−1) + .4375·4 > 0.
    # Nearest upsampling would make the whole top-left 2×2 block class 0.
    d = torch.tensor([[-1.0, 4.0], [4.0, 4.0]])
    logits = torch.stack([torch.zeros(2, 2), d])[None]  # 1×2×2×2
    label = torch.ones(1, 4, 4, dtype=torch.long)
    label[0, 0, 0] = 0
    ev = Evaluator(2)
    ev.update(logits, label)
    assert ev.confusion.tolist() == [[1, 0], [0, 15]]
    assert ev.miou() == 1.0


def test_evaluator_rejects_mismatched_predictions():
    with pytest.raises(ValueError, match="shape"):
        Evaluator(3).update(PRED[:, :1], LABEL)
