"""PixIntraDA's pseudo-labels: class-wise confidence thresholds and the pixel-level easy/hard split (§4.1,
eq. 2–4)."""

from __future__ import annotations

from typing import Any

import torch

from rayuda.pseudo import IGNORE, PseudoLabeller

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
