"""``cra`` — Cross-Region Adaptation (CRA, seed paper 002), run after any cross-domain (CDA) method.

Plan: source-only → ``cda`` → ``regions`` (pseudo-label pass) → ``cra`` (reported).

* ``cda`` (Step 1): the cross-domain method ``params.cda`` ∈ {advent, adaptsegnet, fgdem, cram}, with that
  method's own knobs under ``params.cda_params.<method>`` (only the chosen sub-dict is in the stage's slice,
  so changing another method's knobs or any CRA knob reuses the cached stage); schedule ``stages.cda``.
* ``regions`` (Step 2, :class:`rayuda.pseudo.CrossRegionSplit`, knobs ``params.regions``): argmax
  pseudo-labels (eq. 4) kept on trusted pixels, ``e < λ`` with the ``K·log K``-normalised entropy (eq. 2–3),
  rare classes' entropy scaled by ``rare_factor``. (choice, the paper's reading) Trust and pseudo-labels are
  computed *once*, offline, from the CDA model's final weights; they are not refreshed during CRA.
* ``cra`` (Step 3, knobs ``params.cra``), on target-train images only (255 = untrusted): per minibatch,
  CE on trusted pixels (eq. 5), the region encodings ``[a; 0]`` (trusted) / ``[0; a]`` (untrusted) from the
  current G's logits at temperature T (eq. 6), G makes D label untrusted features trusted (eq. 7), D
  tells them apart (eq. 8). D is the fine-grained (2K-way) discriminator on G's deepest features, started
  fresh (choice: the CDA stage's D is not carried over; for advent/adaptsegnet it is another kind of D).

(choice) The paper updates G twice per minibatch (eq. 5, then eq. 7); rayuda takes one G step on
``L_seg + w_adv·L_adv`` (one forward pass; the same update to first order), then the D step. ``clamp`` caps
``a`` as FGDEM's code does (``None``: the paper's plain softmax); T = 1.8 and ``w_adv`` = 1e-3 are FADA's
values (the paper gives neither). Ablations: ``regions.rare_factor: 1`` (no rare-class scaling),
``cra.adversarial: false`` (self-training on trusted pixels only).
"""

from __future__ import annotations

from rayuda.config import ConfigError
from rayuda.losses import cra_adv_loss, cra_d_loss, region_encoding
from rayuda.methods.adaptsegnet import AdaptSegNet
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import DEFAULT_SCHEDULE, Method, Stage, image_size, source_only_stage
from rayuda.methods.cram import CRAM
from rayuda.methods.fgdem import FGDEM, deepest_features
from rayuda.models import FineGrainedDiscriminator
from rayuda.pseudo import CrossRegionSplit

#: The cross-domain methods CRA runs after (``params.cda``).
CDA_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (AdvEnt, AdaptSegNet, FGDEM, CRAM)}


def cda_method(name: str) -> type[Method]:
    try:
        return CDA_METHODS[name]
    except KeyError:
        raise ConfigError(f"params.cda={name!r} is not a cross-domain method CRA runs after; "
                          f"valid: {', '.join(CDA_METHODS)}") from None


class CRA(Method):
    name = "cra"
    has_discriminators = True
    defaults = {
        "cda": "advent",
        "cda_params": {name: dict(cls.defaults) for name, cls in CDA_METHODS.items()},
        "regions": {"lambda": 0.01, "rare_fraction": 0.01, "rare_factor": 0.5},  # λ, 1/100, ½ (paper)
        "cra": {"w_adv": 1.0e-3, "temperature": 1.8, "clamp": None, "adversarial": True},
    }

    @classmethod
    def schedules(cls):
        return {"cda": dict(DEFAULT_SCHEDULE), "cra": dict(DEFAULT_SCHEDULE)}

    @classmethod
    def plan(cls, params):
        cda = params["cda"]
        return [
            source_only_stage(),
            Stage("cda", step=cda_method(cda), params=f"params.cda_params.{cda}"),
            Stage("regions", kind="pseudo_labels", labeller=CrossRegionSplit, params="params.regions"),
            Stage("cra", step=cls, params="params.cra", source="regions:all", target=None, reported=True),
        ]

    def setup(self, ctx):
        if ctx.params["adversarial"]:
            channels = ctx.feature_channels[max(ctx.feature_channels)]
            ctx.discriminators["region"] = FineGrainedDiscriminator(channels, ctx.num_classes)

    def train_step(self, ctx, source, target):
        """``source``: target-train images with the regions pass's labels (255 = untrusted)."""
        p = ctx.params
        out = ctx.forward(source["image"])
        label = source["label"]
        loss_seg = ctx.seg_loss(out, label)  # eq. 5: CE on trusted pixels only
        if not p["adversarial"]:
            ctx.step_generator(loss_seg)
            return {"seg": loss_seg.detach()}

        disc = ctx.discriminators["region"]
        trusted = label != 255
        logits = ctx.logits(out, "main", image_size(source)).float()
        encoding = region_encoding(logits, trusted, p["temperature"], p["clamp"])  # eq. 6: [a·m; a·(1−m)]
        feat = deepest_features(out)
        loss_adv = cra_adv_loss(disc(feat), encoding)  # eq. 7: untrusted → labelled trusted
        ctx.step_generator(loss_seg + p["w_adv"] * loss_adv)
        loss_d = cra_d_loss(disc(feat.detach()), encoding)  # eq. 8
        ctx.step_discriminators(loss_d)
        return {"seg": loss_seg.detach(), "adv": loss_adv.detach(), "d": loss_d.detach(),
                "trusted": trusted.float().mean()}
