"""``fgdem`` — fine-grained discriminator with entropy minimisation.

A class-aware discriminator on G's deepest features outputs 2K channels (K "source, class k" then K
"target, class k"). Its targets are soft domain encodings from G's temperature-scaled predictions,
``a = softmax(z / T)`` (clamped at ``clamp`` as in the reference code): source ``[a; 0]``, target
``[0; a]`` (paper eq. 2). D minimises the soft-label cross-entropy on both domains; G fools it by
having target features labelled ``[a_T; 0]`` (eq. 3). Target entropy minimisation is folded into the
adversarial term, ``L_adv' = L_adv + λ_ent·L_ent`` (eq. 7), and G minimises ``L_seg + λ_adv·L_adv'``
(eq. 8). The paper starts from a source-only model (20k iterations): the cached warm-start stage.
``lambda_ent = 0`` is the "without entropy" ablation.
"""

from __future__ import annotations

import torch

from rayuda.losses import (
    domain_encoding,
    entropy_loss,
    fine_grained_adv_loss,
    fine_grained_d_loss,
)
from rayuda.methods.base import Method, image_size
from rayuda.models import FineGrainedDiscriminator


def deepest_features(output) -> torch.Tensor:
    """The backbone's last feature map (layer4, or layer3 on a 3-layer backbone)."""
    return output.features[max(output.features)].float()


class FGDEM(Method):
    name = "fgdem"
    defaults = {
        "lambda_adv": 1.0e-3,
        "lambda_ent": 1.0,  # (choice) the paper does not state its value
        "temperature": 1.8,
        "clamp": 0.9,
    }
    has_discriminators = True

    def setup(self, ctx):
        channels = ctx.feature_channels[max(ctx.feature_channels)]  # the deepest layer's
        ctx.discriminators["fine"] = FineGrainedDiscriminator(channels, ctx.num_classes)

    def train_step(self, ctx, source, target):
        p = ctx.params
        disc = ctx.discriminators["fine"]
        out_s = ctx.forward(source["image"])
        out_t = ctx.forward(target["image"])
        feat_s, feat_t = deepest_features(out_s), deepest_features(out_t)
        z_s, z_t = out_s.logits["main"].float(), out_t.logits["main"].float()

        # G: segmentation + λ_adv (fool D on target + λ_ent · target entropy)   (eq. 7–8)
        loss_seg = ctx.seg_loss(out_s, source["label"])
        target_as_source = domain_encoding(z_t, p["temperature"], p["clamp"], domain="source")
        loss_adv = fine_grained_adv_loss(disc(feat_t), target_as_source)
        loss_ent = entropy_loss(ctx.probs(out_t, "main", image_size(target)))
        ctx.step_generator(loss_seg + p["lambda_adv"] * (loss_adv + p["lambda_ent"] * loss_ent))

        # D: source features → [a_S; 0], target features → [0; a_T]
        enc_s = domain_encoding(z_s, p["temperature"], p["clamp"], domain="source")
        enc_t = domain_encoding(z_t, p["temperature"], p["clamp"], domain="target")
        loss_d = fine_grained_d_loss(disc(feat_s.detach()), disc(feat_t.detach()), enc_s, enc_t)
        ctx.step_discriminators(loss_d)
        return {"seg": loss_seg.item(), "adv": loss_adv.item(), "ent": loss_ent.item(), "d": loss_d.item()}
