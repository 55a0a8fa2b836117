"""``cram`` — Confidence-and-Refinement Adaptation Model (Zhang et al., IEEE T-ITS 2022).

One stage, end to end, two modules on one forward pass of G per domain:

* **CEA** (eq. 4–9): the confidence-aware entropy map of each output level is aligned adversarially
  across domains with an output-space discriminator per level (multi-level on ResNet-101).
  (choice: the paper does not say how many channels D sees) The discriminator sees the per-class terms
  ``−Q_c log P_c / log C`` (C channels, mirroring AdvEnt; ``ce_channels: summed`` feeds the 1-channel map).
* **SFA** (eq. 10–12): Gram-matrix style features of two intermediate layers (``style_layers``) are pulled
  together, weighted ``w`` and ``1 − w``. Default ``layer1+layer2`` (torchvision names), the paper's layers:
  it numbers ResNet's stages ConvN / layerN (its output-space levels are "Conv4 and Conv5", Sec. IV-A-2 —
  torchvision ``layer3``/``layer4``) and takes the style from "layer2 and layer3" (Sec. III-B, III-C), "Conv2
  and Conv3" (Fig. 6), i.e. torchvision ``layer1``/``layer2``; its deeper "layer4 and layer5" gave "loss
  divergence" (Sec. IV-C-2). ``layer2+layer3`` (rayuda's earlier default: the paper's Conv3+Conv4)
  stays selectable.

Total loss (eq. 13): ``L = L_seg + w_adv·L_adv + λ·L_sty``, ``w_adv = 0.001``, ``w = 0.5``, ``λ = 0.1`` (Sec.
IV-A-3; λ = 0.1 is also Fig. 6b's best; the layer study of Sec. IV-C-2 ran at λ = 1e-4, which the search space
reaches). Update order of Algorithm 1: first the
discriminators with G fixed (eq. 7), then G with L_seg, L_adv (D fixed, eq. 8) and L_sty (eq. 12).
Sec. III-C's text describes the other order (G, then D, as AdvEnt does); ``order: g_first`` selects it,
so that ``entropy: shannon, sfa: false, order: g_first`` is the same computation as ``advent``.

Ablation switches: ``cea`` / ``sfa`` turn a module off; ``entropy: shannon`` replaces the
confidence-aware entropy with AdvEnt's weighted self-information (plain entropy).
"""

from __future__ import annotations

import math

import torch

from rayuda.config import ConfigError
from rayuda.losses import EPS, safe_log, weighted_self_information
from rayuda.methods.adversarial import OutputSpaceAdversarial
from rayuda.methods.base import image_size

# --- losses: confidence-aware entropy (eq. 4–6) and style alignment (eq. 10–12) -----------------------------


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
    terms = -confidence_aware_target(prob, detach_target) * safe_log(prob) / math.log(prob.shape[1])
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



ORDERS = ("d_first", "g_first")  # params.order


def style_layer_weights(layers: str, w: float) -> dict[str, float]:
    """``"layer1+layer2", w`` → ``{"layer1": w, "layer2": 1 − w}`` (eq. 12's w_l)."""
    first, second = layers.split("+")
    return {first: w, second: 1.0 - w}


class CRAM(OutputSpaceAdversarial):
    name = "cram"
    defaults = {
        "w_adv": 1.0e-3,  # eq. 9
        "lambda_style": 0.1,  # λ, eq. 13
        "style_weight": 0.5,  # w: weight of the first style layer, eq. 12
        "style_layers": "layer1+layer2",  # the paper's Conv2 + Conv3 (Fig. 6), torchvision names
        "ce_channels": "per_class",  # or "summed"
        "entropy": "confidence_aware",  # or "shannon" (ablation)
        "cea": True,
        "sfa": True,
        # update order: "d_first" = Algorithm 1 (D, then G through the updated D); "g_first" = the order of
        # Sec. III-C's text and of AdvEnt (G through the current D, then D), so that cram with
        # entropy: shannon, sfa: false is exactly advent (the ablation without the confound)
        "order": "d_first",
    }

    def map_channels(self, ctx):
        return 1 if ctx.params["ce_channels"] == "summed" else ctx.num_classes

    def setup(self, ctx):
        if ctx.params["order"] not in ORDERS:
            raise ConfigError(f"cram: params.order must be one of {', '.join(ORDERS)}, got {ctx.params['order']!r}")
        if ctx.params["cea"]:
            super().setup(ctx)

    def discriminator_input(self, ctx, prob):
        if ctx.params["entropy"] == "shannon":
            maps = weighted_self_information(prob)
        else:
            maps = confidence_aware_entropy(prob, per_class=True)
        return maps.sum(1, keepdim=True) if ctx.params["ce_channels"] == "summed" else maps

    def train_step(self, ctx, labelled, unlabelled):
        p = ctx.params
        size = image_size(unlabelled)
        weights = style_layer_weights(p["style_layers"], p["style_weight"]) if p["sfa"] else {}
        with ctx.generator_update():  # Algorithm 1, steps 6–8: G on L_seg + w_adv·L_adv + λ·L_sty, D fixed
            out_s = ctx.forward(labelled["image"])
            loss_seg = ctx.seg_loss(out_s, labelled["label"])
            losses = {"seg": loss_seg.detach()}
            pending = loss_seg
            if not weights:  # without L_sty (which couples both domains' features) the source graph is freed
                ctx.backward(loss_seg)  # before the target forward (ADVENT's order)
                pending = None
            feats_s = {k: out_s.features[k].float() for k in weights}
            maps_s = self.detached_maps(ctx, out_s, image_size(labelled)) if p["cea"] else None  # its own size
            del out_s
            out_t = ctx.forward(unlabelled["image"])

            if p["cea"]:
                maps_t = self.domain_maps(ctx, out_t, size)
                if p["order"] == "d_first":
                    with ctx.trainable_discriminators():  # Algorithm 1, step 5: D first, on G's detached maps
                        d_loss = self.discriminator_loss(ctx, maps_s, maps_t)
                        ctx.step_discriminators(d_loss)
                loss_adv = self.generator_loss(ctx, maps_t)  # eq. 8, through the (updated when d_first) fixed D
                pending = p["w_adv"] * loss_adv if pending is None else pending + p["w_adv"] * loss_adv
                losses["adv"] = loss_adv.detach()

            if weights:  # eq. 12
                feats_t = {k: out_t.features[k].float() for k in weights}
                loss_sty = layered_style_loss(feats_s, feats_t, weights)
                pending = pending + p["lambda_style"] * loss_sty
                losses["style"] = loss_sty.detach()
            if pending is not None:
                ctx.backward(pending)
        if p["cea"]:
            if p["order"] == "g_first":  # Sec. III-C's text (and AdvEnt): D after G, on the same detached maps
                d_loss = self.discriminator_loss(ctx, maps_s, maps_t)
                ctx.step_discriminators(d_loss)
            losses["d"] = d_loss.detach()
        return losses
