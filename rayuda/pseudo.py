"""Pseudo-label selectors: what a ``pseudo_labels`` stage computes from a model's target predictions.

The engine makes the pass (``rayuda.engine.passes``): for every target-train image it predicts the
softmax at the image's own size and hands it to a :class:`PseudoLabeller` — first to :meth:`observe`
(statistics over the whole set: rankings, class-wise thresholds), then to :meth:`label` (the train-id
label written as PNG, or ``None`` for an image left unlabelled). What the labeller decided is saved as
JSON beside the labels, and its named image subsets (e.g. IntraDA's easy/hard split) are what later
stages train on (``Stage(source="rank:easy")``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from rayuda.losses import entropy_map

IGNORE = 255


class PseudoLabeller:
    """Base of the pass's selectors. ``params`` are the stage's knobs (its config slice), ``class_names``
    the protocol's classes (train id order).

    ``version`` is part of the stage's cache key: bump it when a change alters the labels. Thresholds a
    labeller decides per class go in :meth:`decide`'s ``"per_class"`` entry, ``{class name: {"threshold":
    …, "kept_share": …, …}}``: the engine copies it into the stage's facts and the search shows it in MLflow
    and ``best.yaml`` ("which thresholds for my target").
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: whether :meth:`observe` must see every image before :meth:`label` (a second pass over the set)
    needs_statistics: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any], class_names: list[str]):
        self.params, self.class_names, self.num_classes = params, list(class_names), len(class_names)

    def observe(self, name: str, prob: torch.Tensor) -> None:
        """First pass: see image ``name``'s softmax ``prob`` (C×H×W)."""

    def decide(self) -> dict[str, Any]:
        """After the first pass: fix thresholds/rankings; return them as JSON-able statistics."""
        return {}

    def label(self, name: str, prob: torch.Tensor) -> torch.Tensor | None:
        """Second pass: the H×W train-id label of image ``name`` (255 = ignored), or ``None`` (no label)."""
        raise NotImplementedError

    def subsets(self) -> dict[str, list[str]]:
        """Named subsets of image names (e.g. ``{"easy": [...], "hard": [...]}``); none by default."""
        return {}


def mean_normalised_entropy(prob: torch.Tensor) -> float:
    """Mean over pixels of ``−Σ_c P_c log P_c / log C`` for one C×H×W softmax (IntraDA's ranking score)."""
    return float(entropy_map(prob[None]).mean())


def easy_hard_split(scores: dict[str, float], fraction: float) -> tuple[list[str], list[str]]:
    """IntraDA's split (Pan et al. 2020, §3.2): sort images by score (ascending entropy); the first
    ``⌊fraction · N⌋`` are *easy*, the rest *hard*. Ties are broken by name, so the split is deterministic."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the easy fraction λ must lie in [0, 1], got {fraction}")
    ranked = sorted(scores, key=lambda name: (scores[name], name))
    cut = math.floor(fraction * len(ranked))
    return ranked[:cut], ranked[cut:]


class EntropyRanking(PseudoLabeller):
    """IntraDA's entropy ranking: images with the lowest mean normalised entropy (fraction ``lambda``) are
    *easy* and get argmax pseudo-labels on every pixel; the others are *hard* and stay unlabelled."""

    name = "entropy_ranking"

    def __init__(self, params, class_names):
        super().__init__(params, class_names)
        self.scores: dict[str, float] = {}
        self.easy: list[str] = []
        self.hard: list[str] = []

    def observe(self, name, prob):
        self.scores[name] = mean_normalised_entropy(prob)

    def decide(self):
        self.easy, self.hard = easy_hard_split(self.scores, float(self.params["lambda"]))
        self._easy = set(self.easy)
        return {"lambda": float(self.params["lambda"]), "easy": len(self.easy), "hard": len(self.hard),
                "mean_entropy": self.scores}

    def label(self, name, prob):
        return prob.argmax(0).to(torch.uint8) if name in self._easy else None

    def subsets(self):
        return {"easy": list(self.easy), "hard": list(self.hard)}
