"""CADA's losses (Wang et al., ICASSP 2021): the Shannon entropy of its thresholds (eq. 2–3), the style
adversarial term of eq. 5 and the self-training cross-entropy of eq. 6."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayuda.losses import bce_adversarial, safe_log
from rayuda.models.predict import upsample_logits


def shannon_entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Unnormalised Shannon entropy in nats along ``dim`` (CADA eq. 2): ``E(P) = −Σ_c P_c log P_c``, in
    ``[0, log C]``; also the entropy ``E(f^l)`` of a class centroid (eq. 3)."""
    return -(prob * safe_log(prob)).sum(dim)


def style_adversarial_loss(
    d_logits: dict[str, torch.Tensor], weights: dict[str, float], domain: float
) -> torch.Tensor:
    """The style term of CADA eq. 5: ``Σ_l w_l · BCE(D_f^l(S^l), domain)`` over the style layers ``l`` (the
    original GAN loss per style discriminator; ``w_l`` are the per-layer style weights, 1 in the paper)."""
    return sum(weights[layer] * bce_adversarial(logits, domain) for layer, logits in d_logits.items())


def self_training_cross_entropy(
    logits: torch.Tensor, pseudo: torch.Tensor, normalise: str = "all", ignore_index: int = 255
) -> torch.Tensor:
    """CADA's self-supervised loss (eq. 6): ``−1/(H·W) Σ_{h,w} m_hw log P_{ŷ_hw}(h, w)`` on pseudo-labels
    ``ŷ`` (``ignore_index`` where the mask ``m`` of eq. 3 rejected the pixel); logits upsampled to label size.

    ``normalise="all"`` divides by every pixel, as eq. 6 writes it (fewer kept pixels → a smaller loss);
    ``"kept"`` divides by the kept pixels only, as BDL's reference CE does (choice, configurable).
    """
    if normalise not in ("all", "kept"):
        raise ValueError(f"normalise must be 'all' or 'kept', got {normalise!r}")
    if logits.shape[-2:] != pseudo.shape[-2:]:
        logits = upsample_logits(logits, pseudo.shape[-2:])
    pseudo = pseudo.long()
    total = F.cross_entropy(logits, pseudo, ignore_index=ignore_index, reduction="sum")
    count = pseudo.numel() if normalise == "all" else (pseudo != ignore_index).sum().clamp_min(1)
    return total / count
