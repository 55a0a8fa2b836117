"""``cra`` — Cross-Region Adaptation (CRA; Wang et al.), run after any cross-domain (CDA) method.

Plan: source-only → ``cda`` → ``regions`` (pseudo-label pass) → ``cra`` (reported).

* ``cda`` (Step 1): the cross-domain method ``params.cda`` ∈ {advent, adaptsegnet, fgdem, cram}, with that
  method's own knobs under ``params.cda_params.<method>`` (only the chosen sub-dict is in the stage's slice,
  so changing another method's knobs or any CRA knob reuses the cached stage); schedule ``stages.cda``.
* ``regions`` (Step 2, :class:`CrossRegionSplit`, knobs ``params.regions``): argmax
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
resolution, see :func:`cra_adv_loss`); eq. 8 over all pixels, so the two regions keep the paper's
relative weight in D's loss. ``g_steps: 1`` with ``adv_normalise: all`` and ``w_adv: 1e-3`` is rayuda's CRA
in version 1: one G step on ``L_seg + w_adv·L_adv`` from one forward pass, eq. 7 divided by every
pixel. The two-step update costs a second forward/backward pass of G per iteration. ``clamp`` caps ``a`` as
FGDEM's code does (``None``: the paper's plain softmax); T = 1.8 is FADA's value (the paper gives none).
Ablations: ``regions.rare_factor: 1`` (no rare-class scaling), ``cra.adversarial: false`` (self-training on
trusted pixels only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayuda.config import ConfigError
from rayuda.losses import entropy_map, resize_map, soft_label_cross_entropy
from rayuda.methods.adaptsegnet import AdaptSegNet
from rayuda.methods.advent import AdvEnt
from rayuda.methods.base import DEFAULT_SCHEDULE, Method, Stage, image_size, source_only_stage
from rayuda.methods.cram import CRAM
from rayuda.methods.fgdem import FGDEM, deepest_features
from rayuda.models import FineGrainedDiscriminator
from rayuda.pseudo import IGNORE, PseudoLabeller, rare_classes

# --- losses: trusted vs untrusted target pixels (eq. 2, 5–8) ----------------------------------------------


def cra_entropy(prob: torch.Tensor) -> torch.Tensor:
    """CRA's confidence map (eq. 2), N×H×W in [0, 1/K]: ``e = −(1/(K log K)) Σ_k p_k log p_k`` (note the
    ``K·log K`` normaliser: two classes at ½ give ``log 2/(K log K)``, 0.012 for K = 19)."""
    return entropy_map(prob) / prob.shape[1]


def region_encoding(
    logits: torch.Tensor, trusted: torch.Tensor, temperature: float, clamp: float | None = None
) -> torch.Tensor:
    """CRA's domain-encoding labels (eq. 6–8), N×2K×H×W: ``a = softmax(z / T)`` (detached, as FGDEM's
    :func:`rayuda.methods.fgdem.domain_encoding`), then ``[a; 0]`` on trusted pixels and ``[0; a]`` on untrusted
    ones, i.e. ``[a·m; a·(1 − m)]`` with ``m`` the N×H×W trusted mask (eq. 3) at the logits' size."""
    a = torch.softmax(logits.detach().float() / temperature, dim=1)
    if clamp is not None:
        a = a.clamp(max=clamp)
    m = trusted.to(a.dtype).unsqueeze(1)
    return torch.cat([a * m, a * (1 - m)], dim=1)


def cra_d_loss(d_logits: torch.Tensor, encoding: torch.Tensor) -> torch.Tensor:
    """D's loss (CRA eq. 8): ``−Σ_i Σ_k [a_ik m_i log P(d=0,c=k|f_i) + a_ik (1−m_i) log P(d=1,c=k|f_i)]``,
    the soft-label CE against :func:`region_encoding`. (choice) The sum over pixels is divided by their count
    (H·W of D's output; the encoding is resized to it as in FGDEM), so trusted and untrusted pixels keep the
    paper's relative weight."""
    return soft_label_cross_entropy(d_logits, encoding)


def cra_adv_loss(
    d_logits: torch.Tensor, encoding: torch.Tensor, untrusted: torch.Tensor | None = None
) -> torch.Tensor:
    """G's loss (CRA eq. 7): ``−Σ_i Σ_k a_ik (1−m_i) log P(d=0, c=k | f_i)``: untrusted pixels labelled
    *trusted* (``[a; 0]``), trusted pixels contribute nothing.

    Normalisation (choice: eq. 7 is a plain sum): with ``untrusted`` (the N×H×W mask ``1 − m``, any
    resolution) the sum is divided by the number of untrusted pixels — the mask resized to D's output as the
    encoding is, summed over the batch (at least 1) — a mean over the untrusted pixels, as eq. 5's CE is
    divided by the trusted ones (:func:`rayuda.losses.seg_cross_entropy`). Without it, by every pixel of D's output, as
    :func:`cra_d_loss` (rayuda's CRA v1: ≈ the untrusted share × the former).
    """
    k = encoding.shape[1] // 2
    untrusted_as_trusted = torch.cat([encoding[:, k:], torch.zeros_like(encoding[:, k:])], dim=1)
    if untrusted is None:
        return soft_label_cross_entropy(d_logits, untrusted_as_trusted)
    target = resize_map(untrusted_as_trusted, d_logits.shape[-2:])
    total = -(target * F.log_softmax(d_logits, dim=1)).sum()
    count = resize_map(untrusted.to(target.dtype).unsqueeze(1), d_logits.shape[-2:]).sum()
    return total / count.clamp_min(1.0)


# --- the ``regions`` pass: trusted and untrusted regions (§3.3, eq. 2–4) --------------------------------------


class CrossRegionSplit(PseudoLabeller):
    """CRA's region split (§3.3), computed once from the cross-domain model (the paper's Step 2, offline).

    Every pixel gets the argmax pseudo-label (eq. 4) and the confidence ``e`` of eq. 2 (``K·log K``
    normaliser, :func:`cra_entropy`). Classes whose argmax share of all target-train pixels is
    below ``rare_fraction`` (paper 1/100) are *rare*: their pixels' ``e`` is multiplied by ``rare_factor``
    (paper ½) before the threshold. A pixel is trusted when ``e < lambda`` (eq. 3) and keeps its label;
    untrusted pixels are 255. Subset ``"all"``: CRA trains on every target image (255 = untrusted).

    Statistics: per predicted class its ``threshold`` on the unscaled ``e`` (``λ`` or ``λ / rare_factor``),
    ``rare``, ``pseudo_label_share`` and ``kept_share`` (trusted / predicted pixels); ``trusted_share``
    overall. Both candidate thresholds are known before the pass, so the first sweep counts both and the
    statistics are exact before any label is written.
    """

    name = "cross_region"

    def __init__(self, params, class_names):
        super().__init__(params, class_names)
        self.threshold = float(params["lambda"])
        self.rare_fraction, self.rare_factor = float(params["rare_fraction"]), float(params["rare_factor"])
        if self.rare_factor <= 0:
            raise ValueError(f"rare_factor must be > 0, got {self.rare_factor}")
        c = self.num_classes
        self.counts = torch.zeros(c, dtype=torch.int64)  # argmax pixels per class
        self.below = torch.zeros(c, dtype=torch.int64)  # … with e < λ
        self.below_scaled = torch.zeros(c, dtype=torch.int64)  # … with rare_factor·e < λ
        self.rare = torch.zeros(c, dtype=torch.bool)
        self.names: list[str] = []

    def observe(self, name, prob):
        e = cra_entropy(prob[None].float())[0].flatten().cpu()
        pred = prob.argmax(0).flatten().cpu()
        c = self.num_classes
        self.counts += torch.bincount(pred, minlength=c)
        self.below += torch.bincount(pred[e < self.threshold], minlength=c)
        self.below_scaled += torch.bincount(pred[e * self.rare_factor < self.threshold], minlength=c)
        self.names.append(name)

    def decide(self):
        total = max(int(self.counts.sum()), 1)
        share = self.counts.double() / total
        self.rare = rare_classes(self.counts, self.rare_fraction)
        kept = torch.where(self.rare, self.below_scaled, self.below)
        per_class = {}
        for c, cls in enumerate(self.class_names):
            if self.counts[c] == 0:
                continue
            rare = bool(self.rare[c])
            per_class[cls] = {"threshold": self.threshold / self.rare_factor if rare else self.threshold,
                              "rare": rare, "pseudo_label_share": float(share[c]),
                              "kept_share": int(kept[c]) / int(self.counts[c])}
        return {"lambda": self.threshold, "rare_fraction": self.rare_fraction, "rare_factor": self.rare_factor,
                "normaliser": f"K log K, K = {self.num_classes}", "trusted_share": int(kept.sum()) / total,
                "rare_classes": [cls for cls, v in per_class.items() if v["rare"]], "per_class": per_class,
                "not_predicted": [cls for c, cls in enumerate(self.class_names) if self.counts[c] == 0]}

    def label(self, name, prob):
        e = cra_entropy(prob[None].float())[0]
        pred = prob.argmax(0)
        e = torch.where(self.rare.to(pred.device)[pred], e * self.rare_factor, e)
        return torch.where(e < self.threshold, pred, torch.full_like(pred, IGNORE)).to(torch.uint8)

    def subsets(self):
        return {"all": list(self.names)}



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
            Stage("cra", step=cls, params="params.cra", labelled="regions:all", unlabelled=None, reported=True),
        ]

    def setup(self, ctx):
        if ctx.params["adversarial"]:
            channels = ctx.feature_channels[max(ctx.feature_channels)]
            ctx.discriminators["region"] = FineGrainedDiscriminator(channels, ctx.num_classes)

    def train_step(self, ctx, labelled, unlabelled):
        """``labelled``: target-train images with the regions pass's labels (255 = untrusted)."""
        p = ctx.params
        out = ctx.forward(labelled["image"])
        label = labelled["label"]
        loss_seg = ctx.seg_loss(out, label)  # eq. 5: CE on trusted pixels only
        if not p["adversarial"]:
            ctx.step_generator(loss_seg)
            return {"seg": loss_seg.detach()}

        two_steps = p["g_steps"] == 2
        if two_steps:
            ctx.step_generator(loss_seg)  # step 1: G on eq. 5
            out = ctx.forward(labelled["image"])  # steps 2–3 read the updated G
        disc = ctx.discriminators["region"]
        trusted = label != 255
        logits = ctx.logits(out, "main", image_size(labelled)).float()
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
