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
        """After the first pass: fix thresholds/rankings; return them as JSON-able statistics. The engine
        writes this dict after the labelling sweep, so :meth:`label` may add counts to it (kept shares)."""
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


# --- CADA: category-adaptive entropy thresholds (Wang et al., eq. 1–3) ------------------------------------


def class_centroids(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """CADA eq. 1: ``f^l = (1/|P^l|) Σ_{pixels predicted l} P(h,w)``, an L×C matrix from the per-class sums of
    prediction vectors (L×C) and pixel counts (L); rows of classes never predicted are NaN."""
    centroids = sums / counts[:, None].to(sums.dtype)
    centroids[counts == 0] = float("nan")
    return centroids


def category_adaptive_mask(prob: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CADA eq. 3 for one C×H×W softmax: ``(argmax, keep)`` with ``keep = E(P(h,w)) < τ_l`` where ``l`` is the
    pixel's argmax and ``τ_l = E(f^l) − Δ`` (``thresholds``, C values; a NaN threshold keeps nothing)."""
    from rayuda.losses import shannon_entropy

    pred = prob.argmax(0)
    entropy = shannon_entropy(prob.double(), dim=0)
    return pred, entropy < thresholds.to(entropy)[pred]


class CategoryAdaptiveThresholds(PseudoLabeller):
    """CADA's pseudo-labels (§2.2): every class ``l`` gets its own threshold ``E(f^l) − Δ`` (``params.delta``,
    nats), with ``f^l`` the mean prediction vector of the pixels predicted ``l`` over all of target-train
    (eq. 1); a pixel keeps its argmax when its entropy is below its class's threshold (eq. 3), else 255.

    Statistics (``decide``): per class the pixel count, ``centroid_entropy``, ``threshold`` and
    ``kept_share`` (kept / predicted pixels of the class); classes no pixel was predicted as have ``None``
    there and are listed under ``"not_predicted"``. ``kept_share`` is counted while labelling (the second
    sweep), into the statistics dict ``decide`` returned, which the engine writes after that sweep.
    Subset ``"all"``: every image (CADA trains on all target images, unkept pixels ignored).
    """

    name = "category_adaptive_thresholds"

    def __init__(self, params, class_names):
        super().__init__(params, class_names)
        self.delta = float(params["delta"])
        c = self.num_classes
        self.sums = torch.zeros(c, c, dtype=torch.float64)
        self.counts = torch.zeros(c, dtype=torch.int64)
        self.kept = torch.zeros(c, dtype=torch.int64)
        self.labelled = torch.zeros(c, dtype=torch.int64)
        self.names: list[str] = []
        self.thresholds = torch.full((c,), float("nan"), dtype=torch.float64)
        self.stats: dict[str, Any] = {}

    def observe(self, name, prob):
        pred = prob.argmax(0).flatten().cpu()
        flat = prob.flatten(1).t().double().cpu()  # pixels × C
        self.sums.index_add_(0, pred, flat)
        self.counts += torch.bincount(pred, minlength=self.num_classes)
        self.names.append(name)

    def decide(self):
        from rayuda.losses import shannon_entropy

        centroid_entropy = shannon_entropy(class_centroids(self.sums, self.counts), dim=1)  # NaN: not predicted
        self.thresholds = centroid_entropy - self.delta
        per_class = {}
        for c, cls in enumerate(self.class_names):
            seen = bool(self.counts[c] > 0)
            per_class[cls] = {"pixels": int(self.counts[c]),
                              "centroid_entropy": float(centroid_entropy[c]) if seen else None,
                              "threshold": float(self.thresholds[c]) if seen else None,
                              "kept_share": 0.0 if seen else None}
        self.stats = {"delta": self.delta, "entropy_unit": "nats", "max_entropy": math.log(self.num_classes),
                      "per_class": per_class,
                      "not_predicted": [cls for c, cls in enumerate(self.class_names) if self.counts[c] == 0],
                      "kept_pixel_share": 0.0}
        return self.stats

    def label(self, name, prob):
        pred, keep = category_adaptive_mask(prob, self.thresholds)
        pred_cpu, keep_cpu = pred.flatten().cpu(), keep.flatten().cpu()
        self.labelled += torch.bincount(pred_cpu, minlength=self.num_classes)
        self.kept += torch.bincount(pred_cpu[keep_cpu], minlength=self.num_classes)
        for c in torch.unique(pred_cpu).tolist():
            entry = self.stats["per_class"][self.class_names[c]]
            if entry["kept_share"] is not None:
                entry["kept_share"] = int(self.kept[c]) / int(self.labelled[c])
        self.stats["kept_pixel_share"] = int(self.kept.sum()) / max(int(self.labelled.sum()), 1)
        return torch.where(keep, pred, torch.full_like(pred, IGNORE)).to(torch.uint8)

    def subsets(self):
        return {"all": list(self.names)}


# --- CRA: trusted / untrusted regions (cross-region adaptation, eq. 2–4) ------------------------------------

#: CRA's share below which a class is *rare* (the paper's 1/100; ``params.regions.rare_fraction``'s default).
RARE_FRACTION = 0.01


def rare_classes(counts: torch.Tensor, fraction: float = RARE_FRACTION) -> torch.Tensor:
    """CRA's rare classes (§3.3): a boolean mask of the classes whose share of the argmax ``counts`` (one per
    class, over every pixel of target-train) is below ``fraction``."""
    return counts.double() / max(int(counts.sum()), 1) < fraction


class CrossRegionSplit(PseudoLabeller):
    """CRA's region split (§3.3), computed once from the cross-domain model (the paper's Step 2, offline).

    Every pixel gets the argmax pseudo-label (eq. 4) and the confidence ``e`` of eq. 2 (``K·log K``
    normaliser, :func:`rayuda.losses.cra_entropy`). Classes whose argmax share of all target-train pixels is
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
        from rayuda.losses import cra_entropy

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
        from rayuda.losses import cra_entropy

        e = cra_entropy(prob[None].float())[0]
        pred = prob.argmax(0)
        e = torch.where(self.rare.to(pred.device)[pred], e * self.rare_factor, e)
        return torch.where(e < self.threshold, pred, torch.full_like(pred, IGNORE)).to(torch.uint8)

    def subsets(self):
        return {"all": list(self.names)}


# --- PixIntraDA: class-wise confidence thresholds (eq. 2–4) --------------------------------------------------

#: Confidence histogram bins per class for the median of PixIntraDA's thresholds (resolution 1e-4).
CONFIDENCE_BINS = 10_000


def histogram_median(hist: torch.Tensor) -> float | None:
    """Median of values in [0, 1] from a histogram over equal bins (linear inside the median's bin, the
    grouped-data median; exact to one bin width); ``None`` for an empty histogram."""
    n = int(hist.sum())
    if n == 0:
        return None
    cum = hist.cumsum(0)
    j = int(torch.nonzero(cum.double() >= n / 2)[0])  # the bin holding the middle value
    before = int(cum[j] - hist[j])
    return (j + (n / 2 - before) / int(hist[j])) / len(hist)


class ClassThresholdSplit(PseudoLabeller):
    """PixIntraDA's pixel-level easy/hard split (§4.1), from the latest model of the plan.

    ``t_k = min(cap, median confidence of the pixels predicted as k over all of target-train)`` (eq. 2, after
    BDL; ``cap`` 0.9 in the paper; a class predicted nowhere gets the cap). A pixel is *easy* when some class passes
    ``y_k > α·t_k`` and then takes the argmax over the passing classes (eq. 3); otherwise it is *hard* (255).
    The median comes from a per-class histogram of ``CONFIDENCE_BINS`` bins (choice: memory independent of the
    dataset size, exact to 1e-4).

    Statistics: per predicted class ``median``, ``threshold`` (``t_k``), ``scaled_threshold`` (``α·t_k``),
    ``pseudo_label_share`` and ``kept_share`` (easy pixels among those predicted k); ``easy_proportion``
    (the paper's Prop., eq. 4). The last two are counted while labelling (the second sweep), into the
    dict ``decide`` returned, which the engine writes after that sweep. Subset ``"all"``.
    """

    name = "class_threshold"

    def __init__(self, params, class_names):
        super().__init__(params, class_names)
        self.alpha, self.cap = float(params["alpha"]), float(params["cap"])
        c = self.num_classes
        self.hist = torch.zeros(c, CONFIDENCE_BINS, dtype=torch.int64)
        self.thresholds = torch.full((c,), self.cap, dtype=torch.float64)
        self.predicted = torch.zeros(c, dtype=torch.int64)
        self.kept = torch.zeros(c, dtype=torch.int64)
        self.pixels = self.easy = 0
        self.names: list[str] = []
        self.stats: dict[str, Any] = {}

    def observe(self, name, prob):
        conf, pred = prob.float().max(0)
        bins = (conf.flatten() * CONFIDENCE_BINS).long().clamp(0, CONFIDENCE_BINS - 1).cpu()
        flat = pred.flatten().cpu() * CONFIDENCE_BINS + bins
        self.hist += torch.bincount(flat, minlength=self.num_classes * CONFIDENCE_BINS).view_as(self.hist)
        self.names.append(name)

    def decide(self):
        counts = self.hist.sum(1)
        per_class = {}
        for c, cls in enumerate(self.class_names):
            median = histogram_median(self.hist[c])
            threshold = self.cap if median is None else min(self.cap, median)
            self.thresholds[c] = threshold
            if median is not None:
                per_class[cls] = {"median": median, "threshold": threshold, "scaled_threshold": self.alpha * threshold,
                                  "pseudo_label_share": int(counts[c]) / max(int(counts.sum()), 1), "kept_share": 0.0}
        self.stats = {"alpha": self.alpha, "cap": self.cap, "easy_proportion": 0.0, "per_class": per_class,
                      "not_predicted": [cls for c, cls in enumerate(self.class_names) if counts[c] == 0]}
        return self.stats

    def split(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-label, easy mask) of one C×H×W softmax (eq. 2–3)."""
        passing = prob > (self.alpha * self.thresholds).to(prob)[:, None, None]
        easy = passing.any(0)
        label = torch.where(passing, prob, torch.full_like(prob, -1.0)).argmax(0)
        return label, easy

    def label(self, name, prob):
        label, easy = self.split(prob)
        pred = prob.argmax(0).flatten().cpu()
        c = self.num_classes
        self.predicted += torch.bincount(pred, minlength=c)
        self.kept += torch.bincount(pred[easy.flatten().cpu()], minlength=c)
        self.pixels, self.easy = self.pixels + easy.numel(), self.easy + int(easy.sum())
        for cls, entry in self.stats["per_class"].items():
            k = self.class_names.index(cls)
            entry["kept_share"] = int(self.kept[k]) / max(int(self.predicted[k]), 1)
        self.stats["easy_proportion"] = self.easy / max(self.pixels, 1)
        return torch.where(easy, label, torch.full_like(label, IGNORE)).to(torch.uint8)

    def subsets(self):
        return {"all": list(self.names)}
