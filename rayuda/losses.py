"""The losses two or more methods share (and the engine's entropy), as plain functions of tensors. A loss only
one method uses lives beside that method (``rayuda/methods/<name>.py``, or ``<name>/losses.py``).

Notation (the papers'): ``P = softmax(G(x))``, N×C×H×W; ``C`` classes; ignore label 255. Every log of a
probability is ``log(P + EPS)`` with ``EPS = 1e-30`` (AdvEnt's convention), so ``0·log 0`` is 0 and
gradients stay finite; probabilities are expected in float32 (1e-30 underflows in float16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayuda.models.predict import upsample_logits

EPS = 1e-30


def safe_log(prob: torch.Tensor) -> torch.Tensor:
    """``log(P + EPS)``, the log of every probability in the losses."""
    return torch.log(prob + EPS)


def resize_map(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, antialiased when shrinking) of a map to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


# --- entropy (ADVENT) -------------------------------------------------------------------------------


def weighted_self_information(prob: torch.Tensor) -> torch.Tensor:
    """AdvEnt's discriminator input, N×C×H×W: ``I_c = −P_c log P_c / log C``; its channel sum is
    :func:`entropy_map`."""
    return -prob * safe_log(prob) / math.log(prob.shape[1])


def entropy_map(prob: torch.Tensor) -> torch.Tensor:
    """Normalised Shannon entropy, N×H×W in [0, 1]: ``E = −(1/log C) Σ_c P_c log P_c`` (ADVENT eq. 2)."""
    return weighted_self_information(prob).sum(1)


def entropy_loss(prob: torch.Tensor) -> torch.Tensor:
    """MinEnt (ADVENT eq. 3–4; FGDEM eq. 5–6): mean over images and pixels of :func:`entropy_map`."""
    return entropy_map(prob).mean()


# --- adversarial --------------------------------------------------------------------------------------


def bce_adversarial(d_logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Mean BCE-with-logits of discriminator logits against a constant label (1.0 source, 0.0 target)."""
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, float(domain)))


def soft_label_cross_entropy(d_logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``−Σ_k t_k log softmax(d)_k`` (FGDEM eq. 2–4). A target at another
    resolution is first resized bilinearly to the discriminator output's H×W."""
    target = resize_map(soft_target, d_logits.shape[-2:])
    return -(target * F.log_softmax(d_logits, dim=1)).sum(1).mean()


# --- supervised -----------------------------------------------------------------------------------------


def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy over labelled pixels, logits upsampled bilinearly to the label size.

    Mean over labelled pixels; with none it returns a zero that still has a graph, not NaN.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = upsample_logits(logits, label.shape[-2:])
    label = label.long()
    total = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    return total / (label != ignore_index).sum().clamp_min(1)  # no host sync; 0 with a graph if none valid
