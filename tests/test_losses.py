"""Every loss on tiny tensors, against values worked out by hand with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from rayuda.losses import (
    bce_adversarial,
    entropy_loss,
    entropy_map,
    seg_cross_entropy,
    soft_label_cross_entropy,
    weighted_self_information,
)
from rayuda.methods.cram import (
    confidence_aware_entropy,
    confidence_aware_target,
    gram_matrix,
    layered_style_loss,
    style_loss,
)
from rayuda.methods.fgdem import domain_encoding, fine_grained_adv_loss, fine_grained_d_loss

LN2 = math.log(2)


def probs(*pixels):
    """1×C×1×n probabilities from n per-pixel distributions."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def close(tensor, expected, tol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float64).flatten()
    return torch.allclose(tensor.double().flatten(), expected, atol=tol)


# --- entropy -------------------------------------------------------------------------------------------


def test_entropy_maps_by_hand():
    p = probs([0.8, 0.2], [0.5, 0.5], [1.0, 0.0])
    h0 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / LN2
    assert close(weighted_self_information(p), [[-0.8 * math.log(0.8) / LN2, 0.5, 0.0],
                                                [-0.2 * math.log(0.2) / LN2, 0.5, 0.0]])
    assert entropy_map(p).shape == (1, 1, 3)
    assert close(entropy_map(p), [h0, 1.0, 0.0])  # uniform → 1, one-hot → 0 (no NaN from 0·log 0)
    assert entropy_loss(p).item() == pytest.approx((h0 + 1.0) / 3, rel=1e-6)


def test_entropy_is_normalised_by_log_of_the_number_of_classes():
    p = torch.full((2, 5, 3, 3), 0.2)
    assert torch.allclose(entropy_map(p), torch.ones(2, 3, 3))


def test_entropy_gradient_is_finite_at_zero_probability():
    p = probs([1.0, 0.0]).requires_grad_()
    entropy_loss(p).backward()
    assert torch.isfinite(p.grad).all()


# --- CRAM: confidence-aware entropy (eq. 4–6) -----------------------------------------------------------

# Two classes, one image of two pixels: A = [0.9, 0.1] (confident), B = [0.5, 0.5] (uniform).
PA, PB = [0.9, 0.1], [0.5, 0.5]
F0, F1 = 0.9 + 0.5, 0.1 + 0.5  # soft class frequencies, summed over the image's pixels


def q_by_hand(p):
    raw = [p[0] ** 2 / F0, p[1] ** 2 / F1]
    return [raw[0] / sum(raw), raw[1] / sum(raw)]  # normalised over the classes of one pixel


QA, QB = q_by_hand(PA), q_by_hand(PB)  # QA ≈ [0.972, 0.028], QB = [0.3, 0.7]


def test_confidence_aware_target_by_hand():
    q = confidence_aware_target(probs(PA, PB))
    assert QB == pytest.approx([0.3, 0.7])
    assert close(q, [[QA[0], QB[0]], [QA[1], QB[1]]])
    assert torch.allclose(q.sum(1), torch.ones(1, 1, 2))  # a distribution over classes at each pixel


def test_confidence_aware_target_uses_each_images_own_frequencies():
    other = probs([0.2, 0.8], [0.6, 0.4])
    both = confidence_aware_target(torch.cat([probs(PA, PB), other]))
    assert torch.allclose(both[1:], confidence_aware_target(other))
    assert close(both[:1], [[QA[0], QB[0]], [QA[1], QB[1]]])
    # an image of a single pixel has f = P, so Q ∝ P²/P = P
    assert torch.allclose(confidence_aware_target(probs(PA)), probs(PA))


def test_confidence_aware_target_is_detached_by_default():
    p = probs(PA, PB).requires_grad_()
    assert not confidence_aware_target(p).requires_grad
    assert confidence_aware_target(p, detach_target=False).requires_grad
    assert confidence_aware_entropy(p).requires_grad  # gradients still flow through log P


def test_confidence_aware_entropy_by_hand():
    p = probs(PA, PB)
    terms = [[-QA[0] * math.log(PA[0]) / LN2, -QB[0] * math.log(0.5) / LN2],
             [-QA[1] * math.log(PA[1]) / LN2, -QB[1] * math.log(0.5) / LN2]]
    per_class = confidence_aware_entropy(p)
    assert per_class.shape == (1, 2, 1, 2)
    assert close(per_class, terms)
    summed = confidence_aware_entropy(p, per_class=False)
    assert summed.shape == (1, 1, 1, 2)
    ce_a = terms[0][0] + terms[1][0]
    assert close(summed, [ce_a, 1.0])  # log P is constant at a uniform pixel: CE = 1 whatever Q is
    assert torch.allclose(per_class.sum(1, keepdim=True), summed)


def test_confident_pixel_has_lower_confidence_aware_entropy_than_shannon_entropy():
    # Q sharpens A towards its argmax ([0.9, 0.1] → [0.972, 0.028]), so −Σ Q log P < −Σ P log P
    ce_a = -(QA[0] * math.log(0.9) + QA[1] * math.log(0.1)) / LN2  # ≈ 0.241
    h_a = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / LN2  # ≈ 0.469
    assert ce_a == pytest.approx(0.2408, abs=1e-3) and h_a == pytest.approx(0.4690, abs=1e-3)
    ce = confidence_aware_entropy(probs(PA, PB), per_class=False)
    assert ce[0, 0, 0, 0].item() == pytest.approx(ce_a, rel=1e-5)
    assert ce[0, 0, 0, 0] < entropy_map(probs(PA, PB))[0, 0, 0]


# --- CRAM: style alignment (eq. 10–12) ---------------------------------------------------------------------

# 2 channels on a 2×1 map (N_l = 2, M_l = 2)
FS = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # channels (1, 2) and (3, 4)
FT = torch.tensor([[[[0.0], [1.0]], [[1.0], [0.0]]]])  # channels (0, 1) and (1, 0)
GS = [[1 * 1 + 2 * 2, 1 * 3 + 2 * 4], [3 * 1 + 4 * 2, 3 * 3 + 4 * 4]]  # [[5, 11], [11, 25]]
GT = [[1, 0], [0, 1]]
NORM = 4 * 2**2 * 2**2  # 4 N_l² M_l² = 64


def sq_dist(a, b):
    return sum((a[i][j] - b[i][j]) ** 2 for i in range(2) for j in range(2))


def test_gram_matrix_is_unnormalised_v_vt():
    assert gram_matrix(FS).tolist() == [GS]
    assert gram_matrix(torch.cat([FS, FT])).shape == (2, 2, 2)


def test_style_loss_by_hand():
    assert sq_dist(GS, GT) == 16 + 121 + 121 + 576
    assert style_loss(FS, FT).item() == pytest.approx(834 / NORM)  # 13.03…; 834 without 1/(4N²M²)
    assert style_loss(FS, FS).item() == 0.0


def test_style_loss_averages_each_domains_gram_matrices_over_its_batch():
    g_mean = [[(GS[i][j] + GT[i][j]) / 2 for j in range(2)] for i in range(2)]  # [[3, 5.5], [5.5, 13]]
    assert style_loss(torch.cat([FS, FT]), FT).item() == pytest.approx(sq_dist(g_mean, GT) / NORM)


def test_style_loss_normalises_each_domain_by_its_own_size():
    # the target map is the source map repeated: twice the pixels, twice the Gram matrix, same style
    assert style_loss(FS, FS.repeat(1, 1, 2, 1)).item() == pytest.approx(0.0, abs=1e-7)


def test_layered_style_loss_weights_the_layers():
    zero = torch.zeros_like(FS)
    feats_s, feats_t = {"layer2": FS, "layer3": zero}, {"layer2": FT, "layer3": FT}
    expected = 0.25 * 834 / NORM + 0.75 * sq_dist([[0, 0], [0, 0]], GT) / NORM
    loss = layered_style_loss(feats_s, feats_t, {"layer2": 0.25, "layer3": 0.75})
    assert loss.item() == pytest.approx(expected)
    assert layered_style_loss(feats_s, feats_t, {"layer3": 1.0}).item() == pytest.approx(2 / NORM)


# --- adversarial -------------------------------------------------------------------------------------------


def test_bce_adversarial_by_hand():
    d = torch.tensor([[[[0.5, -1.0]]]])
    # BCE(x, 1) = log(1 + e^−x), BCE(x, 0) = log(1 + e^x)
    as_source = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.e)) / 2
    as_target = (math.log(1 + math.exp(0.5)) + math.log(1 + 1 / math.e)) / 2
    assert bce_adversarial(d, 1.0).item() == pytest.approx(as_source)
    assert bce_adversarial(d, 0.0).item() == pytest.approx(as_target)


def test_domain_encoding_by_hand():
    z = torch.tensor([[[[2.0]], [[0.0]]]], requires_grad=True)  # K = 2, one pixel
    a0 = math.e / (math.e + 1)  # softmax([2, 0] / T) with T = 2
    src = domain_encoding(z, 2.0, domain="source")
    assert not src.requires_grad and src.shape == (1, 4, 1, 1)
    assert close(src, [a0, 1 - a0, 0, 0])
    assert close(domain_encoding(z, 2.0, domain="target"), [0, 0, a0, 1 - a0])
    clamped = domain_encoding(z, 2.0, clamp=0.7, domain="source")
    assert close(clamped, [0.7, 1 - a0, 0, 0])  # capped, not renormalised
    with pytest.raises(ValueError):
        domain_encoding(z, 2.0, domain="both")


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_soft_label_cross_entropy_by_hand():
    # 2K = 4 channels (rows) × 2 pixels (columns): pixel 0 logits (1, 0, −1, 2), pixel 1 all zero
    d = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [2.0, 0.0]]).reshape(1, 4, 1, 2)
    t = torch.tensor([[0.6, 0.0], [0.0, 0.5], [0.3, 0.0], [0.1, 0.5]]).reshape(1, 4, 1, 2)
    px0 = -(0.6 * (1 - lse([1, 0, -1, 2])) + 0.3 * (-1 - lse([1, 0, -1, 2])) + 0.1 * (2 - lse([1, 0, -1, 2])))
    px1 = -(0.5 + 0.5) * (0 - math.log(4))
    assert soft_label_cross_entropy(d, t).item() == pytest.approx((px0 + px1) / 2, rel=1e-6)


def test_fine_grained_losses_by_hand():
    d_src = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)  # K = 1
    d_tgt = torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1)
    enc_src = torch.tensor([0.8, 0.0]).reshape(1, 2, 1, 1)  # [a; 0]
    enc_tgt = torch.tensor([0.0, 0.9]).reshape(1, 2, 1, 1)  # [0; a]
    ce_src = -0.8 * (0 - lse([0, 1]))
    ce_tgt = -0.9 * (0 - lse([2, 0]))
    assert fine_grained_d_loss(d_src, d_tgt, enc_src, enc_tgt).item() == pytest.approx((ce_src + ce_tgt) / 2)
    enc_as_source = torch.tensor([0.9, 0.0]).reshape(1, 2, 1, 1)
    assert fine_grained_adv_loss(d_tgt, enc_as_source).item() == pytest.approx(-0.9 * (2 - lse([2, 0])))


def test_fine_grained_losses_resize_the_encoding_to_the_discriminator_output():
    # a 1×2 encoding against 1×4 discriminator logits: bilinear (align_corners=False) weights of the two
    # source pixels at the four outputs are (1, 0), (.75, .25), (.25, .75), (0, 1)
    enc = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 1, 2)  # pixel 0 → [1, 0], pixel 1 → [0, 1]
    x = [0.0, 1.0, 2.0, 3.0]
    d = torch.stack([torch.zeros(4), torch.tensor(x)]).reshape(1, 2, 1, 4)
    w1 = [0.0, 0.25, 0.75, 1.0]
    # −[(1 − w) log σ0 + w log σ1] with log σ0 = −log(1 + eˣ), log σ1 = x − log(1 + eˣ)
    expected = sum(math.log(1 + math.exp(xi)) - wi * xi for xi, wi in zip(x, w1, strict=True)) / 4
    assert fine_grained_adv_loss(d, enc).item() == pytest.approx(expected, rel=1e-6)
    assert fine_grained_d_loss(d, d, enc, enc).item() == pytest.approx(expected, rel=1e-6)
    # shrinking: a constant encoding stays constant
    enc_big = domain_encoding(torch.zeros(1, 2, 8, 8), 1.8, domain="target")  # [0, 0, .5, .5]
    d_small = torch.zeros(1, 4, 2, 2)
    assert soft_label_cross_entropy(d_small, enc_big).item() == pytest.approx(math.log(4), rel=1e-6)


# --- supervised --------------------------------------------------------------------------------------------


def test_seg_cross_entropy_ignores_unlabelled_pixels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    p0 = math.exp(2) / (math.exp(2) + 1)
    only_first = seg_cross_entropy(logits, torch.tensor([[[0, 255]]])).item()
    assert only_first == pytest.approx(-math.log(p0), rel=1e-6)
    both = seg_cross_entropy(logits, torch.tensor([[[1, 1]]])).item()
    assert both == pytest.approx((-math.log(1 - p0) - math.log(0.5)) / 2, rel=1e-6)


def test_seg_cross_entropy_upsamples_logits_to_the_label():
    logits = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)  # constant: any bilinear upsampling keeps it
    label = torch.tensor([[[0, 1], [1, 255]]])
    expected = (-math.log(math.e / (math.e + 1)) - 2 * math.log(1 / (math.e + 1))) / 3
    assert seg_cross_entropy(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_seg_cross_entropy_without_labelled_pixels_is_a_zero_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = seg_cross_entropy(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
