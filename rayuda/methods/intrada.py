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

from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import DEFAULT_SCHEDULE, Method, Stage, source_only_stage
from rayuda.pseudo import EntropyRanking


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
            Stage("intra", step=AdvEnt, params="params.intra", source="rank:easy", target="rank:hard",
                  reported=True),
        ]
