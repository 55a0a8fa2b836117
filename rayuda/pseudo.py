"""Pseudo-label selectors: what a ``pseudo_labels`` stage computes from a model's target predictions.

The engine makes the pass (``rayuda.engine.passes``): for every target-train image it predicts the
softmax at the image's own size and hands it to a :class:`PseudoLabeller` — first to :meth:`observe`
(statistics over the whole set: rankings, class-wise thresholds), then to :meth:`label` (the train-id
label written as PNG, or ``None`` for an image left unlabelled). What the labeller decided is saved as
JSON beside the labels, and its named image subsets (e.g. IntraDA's easy/hard split) are what later
stages train on (``Stage(labelled="rank:easy")``).

Each labeller lives beside the method that uses it: ``EntropyRanking`` in ``rayuda.methods.intrada``,
``CrossRegionSplit`` in ``rayuda.methods.cra``, ``CategoryAdaptiveThresholds`` in ``rayuda.methods.cada.labeller``,
``ClassThresholdSplit`` in ``rayuda.methods.pixintrada.labeller``. Here: their base, and CRA's rare-class rule,
which the engine's measurement of pseudo-labels against the truth applies to every pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

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
        """After the first pass: fix thresholds/rankings; return them as JSON-able statistics. The engine
        writes this dict after the labelling sweep, so :meth:`label` may add counts to it (kept shares)."""
        return {}

    def label(self, name: str, prob: torch.Tensor) -> torch.Tensor | None:
        """Second pass: the H×W train-id label of image ``name`` (255 = ignored), or ``None`` (no label)."""
        raise NotImplementedError

    def subsets(self) -> dict[str, list[str]]:
        """Named subsets of image names (e.g. ``{"easy": [...], "hard": [...]}``); none by default."""
        return {}


#: CRA's share below which a class is *rare* (the paper's 1/100; ``params.regions.rare_fraction``'s default).
RARE_FRACTION = 0.01


def rare_classes(counts: torch.Tensor, fraction: float = RARE_FRACTION) -> torch.Tensor:
    """CRA's rare classes (§3.3): a boolean mask of the classes whose share of the argmax ``counts`` (one per
    class, over every pixel of target-train) is below ``fraction``."""
    return counts.double() / max(int(counts.sum()), 1) < fraction
