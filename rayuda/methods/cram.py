"""``cram`` — Confidence-and-Refinement Adaptation Model (Zhang et al., IEEE T-ITS 2022).

One stage, end to end, two modules on one forward pass of G per domain:

* **CEA** (eq. 4–9): the confidence-aware entropy map of each output level is aligned adversarially
  across domains with an output-space discriminator per level (multi-level on ResNet-101).
  (choice, METHODS.md) The discriminator sees the per-class terms ``−Q_c log P_c / log C`` (C channels,
  mirroring AdvEnt; ``ce_channels: summed`` feeds the 1-channel map instead).
* **SFA** (eq. 10–12): Gram-matrix style features of two intermediate layers (``style_layers``,
  layer2+layer3 by default) are pulled together, weighted ``w`` and ``1 − w``.

Total loss (eq. 13): ``L = L_seg + w_adv·L_adv + λ·L_sty``. Update order of Algorithm 1: first the
discriminators with G fixed (eq. 7), then G with L_seg, L_adv (D fixed, eq. 8) and L_sty (eq. 12).

Ablation switches: ``cea`` / ``sfa`` turn a module off; ``entropy: shannon`` replaces the
confidence-aware entropy with AdvEnt's weighted self-information (plain entropy).
"""

from __future__ import annotations

from rayuda.losses import confidence_aware_entropy, layered_style_loss, weighted_self_information
from rayuda.methods.adversarial import OutputSpaceAdversarial
from rayuda.methods.base import image_size


def style_layer_weights(layers: str, w: float) -> dict[str, float]:
    """``"layer2+layer3", w`` → ``{"layer2": w, "layer3": 1 − w}`` (eq. 12's w_l)."""
    first, second = layers.split("+")
    return {first: w, second: 1.0 - w}


class CRAM(OutputSpaceAdversarial):
    name = "cram"
    defaults = {
        "w_adv": 1.0e-3,  # eq. 9
        "lambda_style": 0.1,  # λ, eq. 13
        "style_weight": 0.5,  # w: weight of the first style layer, eq. 12
        "style_layers": "layer2+layer3",
        "ce_channels": "per_class",  # or "summed"
        "entropy": "confidence_aware",  # or "shannon" (ablation)
        "cea": True,
        "sfa": True,
    }

    def map_channels(self, ctx):
        return 1 if ctx.params["ce_channels"] == "summed" else ctx.num_classes

    def setup(self, ctx):
        if ctx.params["cea"]:
            super().setup(ctx)

    def discriminator_input(self, ctx, prob):
        if ctx.params["entropy"] == "shannon":
            maps = weighted_self_information(prob)
        else:
            maps = confidence_aware_entropy(prob, per_class=True)
        return maps.sum(1, keepdim=True) if ctx.params["ce_channels"] == "summed" else maps

    def train_step(self, ctx, source, target):
        p = ctx.params
        out_s = ctx.forward(source["image"])
        out_t = ctx.forward(target["image"])
        losses = {}
        loss_g = ctx.seg_loss(out_s, source["label"])
        losses["seg"] = loss_g.item()

        if p["cea"]:
            size = image_size(target)
            maps_s, maps_t = self.domain_maps(ctx, out_s, size), self.domain_maps(ctx, out_t, size)
            d_loss = self.discriminator_loss(ctx, maps_s, maps_t)  # Algorithm 1, step 5: D first, G fixed
            ctx.step_discriminators(d_loss)
            loss_adv = self.generator_loss(ctx, maps_t)  # eq. 8, through the updated (now fixed) D
            loss_g = loss_g + p["w_adv"] * loss_adv
            losses.update(adv=loss_adv.item(), d=d_loss.item())

        if p["sfa"]:
            weights = style_layer_weights(p["style_layers"], p["style_weight"])
            feats_s = {k: out_s.features[k].float() for k in weights}
            feats_t = {k: out_t.features[k].float() for k in weights}
            loss_sty = layered_style_loss(feats_s, feats_t, weights)
            loss_g = loss_g + p["lambda_style"] * loss_sty
            losses["style"] = loss_sty.item()

        ctx.step_generator(loss_g)  # Algorithm 1, steps 6–8
        return losses
