"""``intrada`` — Intra-domain adaptation (Pan et al., CVPR 2020), the image-level baseline of PixIntraDA.

Plan: source-only → ``inter`` (AdvEnt, the inter-domain model) → ``rank`` (entropy ranking pass) →
``intra`` (AdvEnt from the easy split, as labelled source, to the hard split, as target).

* ``rank`` (§3.2, eq. 5): each target-train image is scored by its mean normalised entropy under the
  inter-domain model's *final* weights (the reference picks a snapshot on labelled Cityscapes val; a
  user's target has no labels, so rayuda does not); the lowest fraction λ (``params.rank.lambda``) is
  *easy*, with argmax pseudo-labels on every pixel; the rest is *hard*.
* ``intra`` (eq. 6–7): AdvEnt's losses with easy images in the role of the source domain (CE on their
  pseudo-labels) and hard images as the target; weight ``params.intra.w_adv``.

(choice) ``intra`` starts from the inter-domain model, not from ImageNet weights as the reference does:
on a short CPU schedule a restart would undo the adaptation it is meant to refine. ``params.inter`` and
``params.intra`` hold each AdvEnt stage's own knobs; ``stages.inter`` / ``stages.intra`` their schedules.
"""

from __future__ import annotations

import math

import torch

from rayuda.losses import entropy_map
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import DEFAULT_SCHEDULE, Method, Stage, source_only_stage
from rayuda.pseudo import PseudoLabeller

# --- the ``rank`` pass: entropy ranking (§3.2) ---------------------------------------------------------------


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




class IntraDA(Method):
    name = "intrada"
    defaults = {
        "inter": dict(AdvEnt.defaults),
        "rank": {"lambda": 0.67},  # λ, the easy fraction (paper's value)
        "intra": dict(AdvEnt.defaults),
    }

    @classmethod
    def schedules(cls):
        return {"inter": dict(DEFAULT_SCHEDULE), "intra": dict(DEFAULT_SCHEDULE)}

    @classmethod
    def plan(cls, params):
        return [
            source_only_stage(),
            Stage("inter", step=AdvEnt, params="params.inter"),
            Stage("rank", kind="pseudo_labels", labeller=EntropyRanking, params="params.rank"),
            Stage("intra", step=AdvEnt, params="params.intra", labelled="rank:easy", unlabelled="rank:hard",
                  reported=True),
        ]
