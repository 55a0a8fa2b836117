"""The losses of every method, as plain functions of tensors.

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


def _log(prob: torch.Tensor) -> torch.Tensor:
    return torch.log(prob + EPS)


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, antialiased when shrinking) of a map to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


# --- entropy (ADVENT) -------------------------------------------------------------------------------


def weighted_self_information(prob: torch.Tensor) -> torch.Tensor:
    """AdvEnt's discriminator input, N×C×H×W: ``I_c = −P_c log P_c / log C``; its channel sum is
    :func:`entropy_map`."""
    return -prob * _log(prob) / math.log(prob.shape[1])


def entropy_map(prob: torch.Tensor) -> torch.Tensor:
    """Normalised Shannon entropy, N×H×W in [0, 1]: ``E = −(1/log C) Σ_c P_c log P_c`` (ADVENT eq. 2)."""
    return weighted_self_information(prob).sum(1)


def entropy_loss(prob: torch.Tensor) -> torch.Tensor:
    """MinEnt (ADVENT eq. 3–4; FGDEM eq. 5–6): mean over images and pixels of :func:`entropy_map`."""
    return entropy_map(prob).mean()


# --- CRAM: confidence-aware entropy (eq. 4–6) and style alignment (eq. 10–12) -------------------------


def confidence_aware_target(prob: torch.Tensor, detach_target: bool = True) -> torch.Tensor:
    """CRAM's auxiliary target distribution Q (eq. 5), N×C×H×W.

    ``f_c = Σ_{h,w} P_c`` is the soft frequency of class c in each image (a sum over pixels), and
    ``Q_c = (P_c² / f_c) / Σ_c' (P_c'² / f_c')`` is normalised over classes at every pixel. Like the
    target distribution of DEC-style clustering it comes from, Q is a target: detached by default.
    """
    if detach_target:
        prob = prob.detach()
    freq = prob.sum(dim=(2, 3), keepdim=True).clamp_min(EPS)
    q = prob.pow(2) / freq
    return q / q.sum(1, keepdim=True).clamp_min(EPS)


def confidence_aware_entropy(
    prob: torch.Tensor, per_class: bool = True, detach_target: bool = True
) -> torch.Tensor:
    """Confidence-aware entropy (CRAM eq. 4/6): ``C(h,w) = −(1/log C) Σ_c Q_c log P_c``, a cross-entropy
    of P against the sharpened target Q of :func:`confidence_aware_target`.

    ``per_class`` returns the C terms ``−Q_c log P_c / log C`` (N×C×H×W; the discriminator input, a
    choice mirroring AdvEnt: the paper does not say how many channels D sees), else their channel sum, the
    CE map itself (N×1×H×W). The ``1/log C`` factor is the paper's (eq. 4), as in AdvEnt's normalised entropy.
    """
    terms = -confidence_aware_target(prob, detach_target) * _log(prob) / math.log(prob.shape[1])
    return terms if per_class else terms.sum(1, keepdim=True)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Style feature (CRAM eq. 10), N×C×C: ``S = V Vᵀ`` with V the C×(H·W) flattened map; unnormalised.

    In float32 even under autocast: the style loss is a difference of Gram matrices, which bfloat16 cancels.
    """
    with torch.autocast(feat.device.type, enabled=False):
        v = feat.float().flatten(2)
        return v @ v.transpose(1, 2)


def style_loss(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Style loss of one layer (CRAM eq. 11): ``‖S_S − S_T‖_F² / (4 N² M²)``, N channels, M = H·W.

    (choice) Each domain's Gram matrix is averaged over its batch first, so a batch of source images is
    compared with a batch of target images. Each is divided by its own M before the difference, i.e. the
    loss is ``‖S_S/M_S − S_T/M_T‖_F² / (4N²)``: exactly eq. 11 when both domains share the feature size,
    and still scale-consistent when source and target images differ in size.
    """
    channels = feat_s.shape[1]
    g_s = gram_matrix(feat_s).mean(0) / feat_s[0, 0].numel()
    g_t = gram_matrix(feat_t).mean(0) / feat_t[0, 0].numel()
    return (g_s - g_t).pow(2).sum() / (4 * channels**2)


def layered_style_loss(
    feats_s: dict[str, torch.Tensor], feats_t: dict[str, torch.Tensor], weights: dict[str, float]
) -> torch.Tensor:
    """Total style loss (CRAM eq. 12): ``Σ_l w_l · L_sty^l`` over the layers named in ``weights``."""
    return sum(w * style_loss(feats_s[layer], feats_t[layer]) for layer, w in weights.items())


# --- adversarial --------------------------------------------------------------------------------------


def bce_adversarial(d_logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Mean BCE-with-logits of discriminator logits against a constant label (1.0 source, 0.0 target)."""
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, float(domain)))


def domain_encoding(
    logits: torch.Tensor, temperature: float, clamp: float | None = None, domain: str = "source"
) -> torch.Tensor:
    """FGDEM's soft domain label (eq. 2), N×2K×H×W: ``a = softmax(z / T)`` over classes (detached), then
    ``[a; 0]`` for ``domain="source"`` or ``[0; a]`` for ``"target"``.

    (choice, reference code) ``clamp`` caps each entry of ``a`` at that value (``a = min(a, clamp)``,
    no renormalisation), as the FADA/FGDEM code does with ``T = 1.8``, ``clamp = 0.9``.
    """
    a = torch.softmax(logits.detach().float() / temperature, dim=1)
    if clamp is not None:
        a = a.clamp(max=clamp)
    zeros = torch.zeros_like(a)
    if domain == "source":
        return torch.cat([a, zeros], dim=1)
    if domain == "target":
        return torch.cat([zeros, a], dim=1)
    raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")


def soft_label_cross_entropy(d_logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``−Σ_k t_k log softmax(d)_k`` (FGDEM eq. 2–4). A target at another
    resolution is first resized bilinearly to the discriminator output's H×W."""
    target = _resize(soft_target, d_logits.shape[-2:])
    return -(target * F.log_softmax(d_logits, dim=1)).sum(1).mean()


def fine_grained_d_loss(
    d_src: torch.Tensor, d_tgt: torch.Tensor, enc_src: torch.Tensor, enc_tgt: torch.Tensor
) -> torch.Tensor:
    """Discriminator loss (FGDEM eq. 2; halved as in the reference code):
    ``½ [CE(D(f_S), [a_S; 0]) + CE(D(f_T), [0; a_T])]``."""
    return 0.5 * (soft_label_cross_entropy(d_src, enc_src) + soft_label_cross_entropy(d_tgt, enc_tgt))


def fine_grained_adv_loss(d_tgt: torch.Tensor, enc_tgt_as_source: torch.Tensor) -> torch.Tensor:
    """G's adversarial loss (FGDEM eq. 3): ``CE(D(f_T), [a_T; 0])``, target features labelled source."""
    return soft_label_cross_entropy(d_tgt, enc_tgt_as_source)


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


# --- CADA: style-vector adversarial alignment (eq. 5) and self-training (eq. 2, 6) ------------------------


def shannon_entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Unnormalised Shannon entropy in nats along ``dim`` (CADA eq. 2): ``E(P) = −Σ_c P_c log P_c``, in
    ``[0, log C]``; also the entropy ``E(f^l)`` of a class centroid (eq. 3)."""
    return -(prob * _log(prob)).sum(dim)


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


# --- CRA: cross-region adaptation (trusted vs untrusted target pixels, eq. 2, 5–8) ---------------------------


def cra_entropy(prob: torch.Tensor) -> torch.Tensor:
    """CRA's confidence map (eq. 2), N×H×W in [0, 1/K]: ``e = −(1/(K log K)) Σ_k p_k log p_k`` (note the
    ``K·log K`` normaliser: two classes at ½ give ``log 2/(K log K)``, 0.012 for K = 19)."""
    return entropy_map(prob) / prob.shape[1]


def region_encoding(
    logits: torch.Tensor, trusted: torch.Tensor, temperature: float, clamp: float | None = None
) -> torch.Tensor:
    """CRA's domain-encoding labels (eq. 6–8), N×2K×H×W: ``a = softmax(z / T)`` (detached, as
    :func:`domain_encoding`), then ``[a; 0]`` on trusted pixels and ``[0; a]`` on untrusted ones, i.e.
    ``[a·m; a·(1 − m)]`` with ``m`` the N×H×W trusted mask (eq. 3) at the logits' size."""
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
    divided by the trusted ones (:func:`seg_cross_entropy`). Without it, by every pixel of D's output, as
    :func:`cra_d_loss` (rayuda's CRA v1: ≈ the untrusted share × the former).
    """
    k = encoding.shape[1] // 2
    untrusted_as_trusted = torch.cat([encoding[:, k:], torch.zeros_like(encoding[:, k:])], dim=1)
    if untrusted is None:
        return soft_label_cross_entropy(d_logits, untrusted_as_trusted)
    target = _resize(untrusted_as_trusted, d_logits.shape[-2:])
    total = -(target * F.log_softmax(d_logits, dim=1)).sum()
    count = _resize(untrusted.to(target.dtype).unsqueeze(1), d_logits.shape[-2:]).sum()
    return total / count.clamp_min(1.0)


# --- PixIntraDA: pixel-level adversarial (eq. 6), continuous indexing (eq. 7–8), KLD regulariser ------------


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
        total = total + torch.where(present, -_log(value), torch.zeros_like(value))
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
    kl = -math.log(prob.shape[1]) - _log(prob.float()).mean(1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
