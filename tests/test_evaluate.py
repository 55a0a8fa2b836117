"""Evaluation on the target holdout: mIoU from labels, and the label-free selection proxies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rayuda.engine.evaluate import SELECTION_METRICS, evaluate, selection_score


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a fixed function of the image, so the expected numbers are known."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, images):
        return SimpleNamespace(logits={"main": self.fn(images)})


def holdout(images, labels):
    pairs = enumerate(zip(images, labels, strict=True))
    return [{"image": img, "label": lab, "name": f"img{i}.png"} for i, (img, lab) in pairs]


def run(model, data):
    return evaluate(model, data, num_classes=2, device=torch.device("cpu"), class_names=["a", "b"])


def test_flip_agreement_is_one_for_a_mirror_symmetric_model_and_counts_disagreeing_pixels():
    images = torch.rand(2, 3, 2, 4)
    labels = torch.zeros(2, 2, 4, dtype=torch.long)
    pixelwise = FixedLogits(lambda x: torch.cat([x[:, :1], 1 - x[:, :1]], dim=1))  # depends on the pixel only
    assert run(pixelwise, holdout(images, labels))["flip_agreement"] == pytest.approx(1.0)

    # class b on the left half, a on the right: mirrored, every pixel disagrees
    def left_right(x):
        b = torch.zeros_like(x[:, :1])
        b[..., : x.shape[-1] // 2] = 1.0
        return torch.cat([1 - b, b], dim=1)

    assert run(FixedLogits(left_right), holdout(images, labels))["flip_agreement"] == pytest.approx(0.0)

    # only the leftmost column is b: mirrored, 2 of 4 columns disagree
    def left_column(x):
        b = torch.zeros_like(x[:, :1])
        b[..., 0] = 1.0
        return torch.cat([1 - b, b], dim=1)

    assert run(FixedLogits(left_column), holdout(images, labels))["flip_agreement"] == pytest.approx(0.5)


def test_entropy_proxy_matches_the_normalised_entropy_of_uniform_and_certain_predictions():
    images = torch.rand(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [1, 0]]])
    uniform = run(FixedLogits(lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:])), holdout(images, labels))
    assert uniform["target_entropy"] == pytest.approx(1.0, abs=1e-5)
    certain = run(FixedLogits(lambda x: torch.tensor([[[[50.0, 0], [0, 50]], [[0, 50], [50, 0]]]])),
                  holdout(images, labels))
    assert certain["target_entropy"] == pytest.approx(0.0, abs=1e-5)
    assert certain["miou"] == pytest.approx(1.0)


def test_unlabelled_holdout_gives_proxies_but_no_miou():
    images = torch.rand(1, 3, 2, 2)
    labels = torch.full((1, 2, 2), 255)
    metrics = run(FixedLogits(lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:])), holdout(images, labels))
    assert "miou" not in metrics and {"target_entropy", "flip_agreement"} <= set(metrics)
    with pytest.raises(ValueError, match="miou"):
        selection_score("miou", metrics)


@pytest.mark.parametrize("name", sorted(SELECTION_METRICS))
def test_every_selection_score_is_higher_for_the_better_model(name):
    good = {"miou": 0.6, "target_entropy": 0.1, "flip_agreement": 0.95,
            "proxy/im": 0.9, "proxy/bnm": 0.5, "proxy/snd": 5.0, "proxy/dev": 0.2}
    bad = {"miou": 0.3, "target_entropy": 0.5, "flip_agreement": 0.70,
           "proxy/im": 0.1, "proxy/bnm": 0.1, "proxy/snd": 4.0, "proxy/dev": 0.9}
    assert selection_score(name, good) > selection_score(name, bad)
    assert not math.isnan(selection_score(name, good))
