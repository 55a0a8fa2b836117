"""CADA's pseudo-labels: category-adaptive entropy thresholds (Wang et al., §2.2, eq. 1–3)."""

from __future__ import annotations

import math
from typing import Any

import torch

from rayuda.methods.cada.losses import shannon_entropy
from rayuda.pseudo import IGNORE, PseudoLabeller


def class_centroids(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """CADA eq. 1: ``f^l = (1/|P^l|) Σ_{pixels predicted l} P(h,w)``, an L×C matrix from the per-class sums of
    prediction vectors (L×C) and pixel counts (L); rows of classes never predicted are NaN."""
    centroids = sums / counts[:, None].to(sums.dtype)
    centroids[counts == 0] = float("nan")
    return centroids


def category_adaptive_mask(prob: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CADA eq. 3 for one C×H×W softmax: ``(argmax, keep)`` with ``keep = E(P(h,w)) < τ_l`` where ``l`` is the
    pixel's argmax and ``τ_l = E(f^l) − Δ`` (``thresholds``, C values; a NaN threshold keeps nothing)."""
    pred = prob.argmax(0)
    entropy = shannon_entropy(prob.double(), dim=0)
    return pred, entropy < thresholds.to(entropy)[pred]


def silenced_classes(per_class: dict[str, dict[str, Any]]) -> list[str]:
    """The predicted classes whose threshold ``E(f^l) − Δ`` is ≤ 0: an entropy is never negative, so eq. 3 keeps
    none of their pixels (on ``minicity:suburb-dusk`` Δ 0.5 silenced sky, centroid entropy 0.49; BENCHMARKS
    §36g)."""
    return [cls for cls, entry in per_class.items() if entry["threshold"] is not None and entry["threshold"] <= 0]


class CategoryAdaptiveThresholds(PseudoLabeller):
    """CADA's pseudo-labels (§2.2): every class ``l`` gets its own threshold ``E(f^l) − Δ`` (``params.delta``,
    nats), with ``f^l`` the mean prediction vector of the pixels predicted ``l`` over all of target-train
    (eq. 1); a pixel keeps its argmax when its entropy is below its class's threshold (eq. 3), else 255.

    Statistics (``decide``): per class the pixel count, ``centroid_entropy``, ``threshold`` and
    ``kept_share`` (kept / predicted pixels of the class); classes no pixel was predicted as have ``None``
    there and are listed under ``"not_predicted"``; predicted classes whose threshold is ≤ 0 (Δ at or above their
    centroid entropy) are listed under ``"silenced"``, with a warning. ``kept_share`` is counted while labelling
    (the second sweep), into the statistics dict ``decide`` returned, which the engine writes after that sweep.
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
                      "silenced": silenced_classes(per_class), "kept_pixel_share": 0.0}
        if self.stats["silenced"]:
            named = ", ".join(f"{cls} ({per_class[cls]['centroid_entropy']:.3f})" for cls in self.stats["silenced"])
            print(f"WARNING: CADA's Δ = {self.delta} nats reaches the centroid entropy of {named}: their thresholds "
                  f"are ≤ 0, so none of their pixels can be kept and they get no pseudo-labels this round (eq. 3)",
                  flush=True)
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
