"""PixIntraDA's losses (Yan et al., ACM MM 2021): the pixel-level adversarial terms (binary PLA, eq. 6), the
continuous indexing (CTS, eq. 7–8) and the KL-to-uniform regulariser of its second round."""

from __future__ import annotations

import math

import torch

from rayuda.losses import safe_log


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: ``Σ x∘mask`` (÷ ``Σ mask`` when ``normalise``), and whether the mask has any pixel."""
    dims = tuple(range(1, x.dim()))
    total, count = (x * mask).sum(dims), mask.sum(dims)
    return (total / count.clamp_min(1) if normalise else total), count > 0


def _neg_log_terms(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over images of ``Σ −log(term)``; a term whose mask is empty in an image counts 0 (its log of an
    empty sum is undefined)."""
    total = 0
    for value, present in terms:
        total = total + torch.where(present, -safe_log(value), torch.zeros_like(value))
    return total.mean()


def pla_d_loss(d_logits: torch.Tensor, hard: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """D's binary pixel-level loss (PixIntraDA eq. 6), per image, averaged over the batch:
    ``−log Σ(D∘M) − log Σ((1−D)∘(1−M))`` with ``D = sigmoid(d_logits)`` (N×1×H×W, D = 1 means *hard*) and
    ``M`` the hard mask (1 hard, 0 easy).

    (choice: eq. 6's unnormalised sums make the logs unbounded) ``normalise`` divides each sum by its mask's
    pixel count (the mean of D over hard pixels, of 1 − D over easy ones): the counts are constants, so the
    gradients are those of the paper's sums, and the value is a log-likelihood in [0, ∞).
    ``normalise=False`` is the paper's literal form.
    """
    d = torch.sigmoid(d_logits.float())
    hard = hard.to(d.dtype).reshape(d.shape)
    return _neg_log_terms([_masked_mean(d, hard, normalise), _masked_mean(1 - d, 1 - hard, normalise)])


def pla_g_loss(d_logits: torch.Tensor, hard: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """G's binary pixel-level loss (PixIntraDA eq. 6): ``−log Σ((1−D)∘M)``: hard pixels should look easy
    (D → 0); normalised as :func:`pla_d_loss`."""
    d = torch.sigmoid(d_logits.float())
    hard = hard.to(d.dtype).reshape(d.shape)
    return _neg_log_terms([_masked_mean(1 - d, hard, normalise)])


def continuous_index(prob: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """PixIntraDA's continuous domain index (eq. 7), N×1×H×W: ``Z = 0`` on easy pixels, ``1 − max_k y_k`` on
    hard ones (``y``: the softmax of the model that made the split; detached)."""
    z = 1 - prob.detach().float().max(1, keepdim=True).values
    return z * hard.to(z.dtype).reshape(z.shape)


def cts_d_loss(d_logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D's continuous loss (PixIntraDA eq. 8): ``‖D − Z‖_F²`` with ``D = sigmoid(d_logits)``. (choice) The
    Frobenius sum is divided by the pixel count (a mean over pixels and images), so β does not scale with the
    image size."""
    return (torch.sigmoid(d_logits.float()) - z.reshape(d_logits.shape)).pow(2).mean()


def cts_g_loss(d_logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """G's continuous loss (PixIntraDA eq. 8): ``‖D ∘ M‖_F²`` (hard pixels pushed towards index 0, easy);
    divided by the pixel count as :func:`cts_d_loss`."""
    d = torch.sigmoid(d_logits.float())
    return (d * hard.to(d.dtype).reshape(d.shape)).pow(2).mean()


def kl_to_uniform(prob: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """CRST's model regulariser MR-KLD (Zou et al. 2019), used by PixIntraDA's second round: mean over pixels
    (those where the N×H×W ``mask`` is true, when given; 0 if none) of ``KL(u ‖ p) = −log C − (1/C) Σ_c log p_c``
    (u uniform over the C classes); 0 for a uniform prediction."""
    kl = -math.log(prob.shape[1]) - safe_log(prob.float()).mean(1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
