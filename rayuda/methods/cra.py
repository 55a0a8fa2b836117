"""``cra`` — Cross-Region Adaptation (CRA; Wang et al.), run after any cross-domain (CDA) method.

Plan: source-only → ``cda`` → ``regions`` (pseudo-label pass) → ``cra`` (reported).

* ``cda`` (Step 1): the cross-domain method ``params.cda`` ∈ {advent, adaptsegnet, fgdem, cram}, with that
  method's own knobs under ``params.cda_params.<method>`` (only the chosen sub-dict is in the stage's slice,
  so changing another method's knobs or any CRA knob reuses the cached stage); schedule ``stages.cda``.
* ``regions`` (Step 2, :class:`rayuda.pseudo.CrossRegionSplit`, knobs ``params.regions``): argmax
  pseudo-labels (eq. 4) kept on trusted pixels, ``e < λ`` with the ``K·log K``-normalised entropy (eq. 2–3),
  rare classes' entropy scaled by ``rare_factor``. (choice, the paper's reading) Trust and pseudo-labels are
  computed *once*, offline, from the CDA model's final weights; they are not refreshed during CRA.
* ``cra`` (Step 3, knobs ``params.cra``), on target-train images only (255 = untrusted). Per minibatch, the
  four steps of Sec. 3.3 ("Training of the Network"): (1) a G update on eq. 5, the CE on trusted pixels;
  (2) a new forward pass of the updated G gives the region encodings ``[a; 0]`` (trusted) / ``[0; a]``
  (untrusted) from its logits at temperature T (eq. 6) and its deepest features; (3) a second G update, on
  eq. 7 alone (D fixed): D should label untrusted features trusted; (4) a D update on eq. 8, on those
  features detached. D is the fine-grained (2K-way) discriminator on G's deepest features, started fresh
  (choice: the CDA stage's D is not carried over; for advent/adaptsegnet it is another kind of D).

Eq. 7 has no coefficient: ``w_adv`` defaults to 1 (the paper's unweighted step). Both losses are means over
their region (choice: eq. 5 and 7 are plain sums, whose scale would depend on the image size): the CE over the
trusted pixels, eq. 7 over the untrusted ones (``adv_normalise: untrusted``; the count at D's output
resolution, see :func:`rayuda.losses.cra_adv_loss`); eq. 8 over all pixels, so the two regions keep the paper's
relative weight in D's loss. ``g_steps: 1`` with ``adv_normalise: all`` and ``w_adv: 1e-3`` is rayuda's CRA
in version 1: one G step on ``L_seg + w_adv·L_adv`` from one forward pass, eq. 7 divided by every
pixel. The two-step update costs a second forward/backward pass of G per iteration. ``clamp`` caps ``a`` as
FGDEM's code does (``None``: the paper's plain softmax); T = 1.8 is FADA's value (the paper gives none).
Ablations: ``regions.rare_factor: 1`` (no rare-class scaling), ``cra.adversarial: false`` (self-training on
trusted pixels only).
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
G_STEPS = (1, 2)  # params.cra.g_steps
ADV_NORMALISE = ("untrusted", "all")  # params.cra.adv_normalise


def cda_method(name: str) -> type[Method]:
    try:
        return CDA_METHODS[name]
    except KeyError:
        raise ConfigError(f"params.cda={name!r} is not a cross-domain method CRA runs after; "
                          f"valid: {', '.join(CDA_METHODS)}") from None


class CRA(Method):
    name = "cra"
    version = 2  # 2: two G steps (eq. 5, then eq. 7 unweighted), eq. 7 a mean over untrusted pixels
    has_discriminators = True
    defaults = {
        "cda": "advent",
        "cda_params": {name: dict(cls.defaults) for name, cls in CDA_METHODS.items()},
        "regions": {"lambda": 0.01, "rare_fraction": 0.01, "rare_factor": 0.5},  # λ, 1/100, ½ (paper)
        "cra": {
            "w_adv": 1.0,  # eq. 7 has no coefficient
            "g_steps": 2,  # Sec. 3.3: G on eq. 5, then G on eq. 7; 1 = one step on L_seg + w_adv·L_adv
            "adv_normalise": "untrusted",  # eq. 7 ÷ untrusted pixels (as eq. 5 ÷ trusted); "all": ÷ every pixel
            "temperature": 1.8, "clamp": None, "adversarial": True,
        },
    }

    @classmethod
    def schedules(cls):
        return {"cda": dict(DEFAULT_SCHEDULE), "cra": dict(DEFAULT_SCHEDULE)}

    @classmethod
    def plan(cls, params):
        cda = params["cda"]
        knobs = params["cra"]
        if knobs["g_steps"] not in G_STEPS:
            raise ConfigError(f"params.cra.g_steps must be 1 or 2, got {knobs['g_steps']!r}")
        if knobs["adv_normalise"] not in ADV_NORMALISE:
            raise ConfigError(f"params.cra.adv_normalise={knobs['adv_normalise']!r}; valid: {', '.join(ADV_NORMALISE)}")
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

        two_steps = p["g_steps"] == 2
        if two_steps:
            ctx.step_generator(loss_seg)  # step 1: G on eq. 5
            out = ctx.forward(source["image"])  # steps 2–3 read the updated G
        disc = ctx.discriminators["region"]
        trusted = label != 255
        logits = ctx.logits(out, "main", image_size(source)).float()
        encoding = region_encoding(logits, trusted, p["temperature"], p["clamp"])  # eq. 6: [a·m; a·(1−m)]
        feat = deepest_features(out)
        untrusted = ~trusted if p["adv_normalise"] == "untrusted" else None
        loss_adv = cra_adv_loss(disc(feat), encoding, untrusted)  # eq. 7: untrusted → labelled trusted
        # step 3: G on eq. 7, D fixed (g_steps 1: one step on L_seg + w_adv·L_adv)
        ctx.step_generator(p["w_adv"] * loss_adv if two_steps else loss_seg + p["w_adv"] * loss_adv)
        loss_d = cra_d_loss(disc(feat.detach()), encoding)  # step 4: D on eq. 8
        ctx.step_discriminators(loss_d)
        return {"seg": loss_seg.detach(), "adv": loss_adv.detach(), "d": loss_d.detach(),
                "trusted": trusted.float().mean()}
