"""``fgdem`` — fine-grained discriminator with entropy minimisation.

A class-aware discriminator on G's deepest features outputs 2K channels (K "source, class k" then K
"target, class k"). Its targets are soft domain encodings from G's temperature-scaled predictions,
``a = softmax(z / T)`` (clamped at ``clamp`` as in the reference code): source ``[a; 0]``, target
``[0; a]`` (paper eq. 2). D minimises the soft-label cross-entropy on both domains; G fools it by
having target features labelled ``[a_T; 0]`` (eq. 3). Target entropy minimisation is folded into the
adversarial term, ``L_adv' = L_adv + λ_ent·L_ent`` (eq. 7), and G minimises ``L_seg + λ_adv·L_adv'``
(eq. 8). The paper starts from a source-only model (20k iterations): the cached warm-start stage.
``lambda_ent = 0`` is the "without entropy" ablation.

Multi-level G (``model.multi_level``; the paper "also adapts the multilevel outputs from the conv4 and conv5
features", Sec. 4.2, after AdaptSegNet): one fine-grained discriminator per level — ``fine`` on the deepest
features with the main logits' encodings, ``fine_aux`` on the features below with the aux logits' — and G's
adversarial term is ``Σ_l w_l (L_adv^l + λ_ent·L_ent^l)`` with AdaptSegNet's level weights ``w`` (main 1,
aux 0.2 = 2e-4 / 1e-3; (choice) the paper gives no aux weight and does not say whether entropy is per level).
"""

from __future__ import annotations

import torch

from rayuda.losses import entropy_loss, soft_label_cross_entropy
from rayuda.methods.base import Method, image_size
from rayuda.methods.context import ADV_LEVEL_WEIGHT
from rayuda.models import FineGrainedDiscriminator

# --- losses: soft domain encodings (eq. 2) and the fine-grained adversarial terms (eq. 2–3) ----------------


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


def fine_grained_d_loss(
    d_src: torch.Tensor, d_tgt: torch.Tensor, enc_src: torch.Tensor, enc_tgt: torch.Tensor
) -> torch.Tensor:
    """Discriminator loss (FGDEM eq. 2; halved as in the reference code):
    ``½ [CE(D(f_S), [a_S; 0]) + CE(D(f_T), [0; a_T])]``."""
    return 0.5 * (soft_label_cross_entropy(d_src, enc_src) + soft_label_cross_entropy(d_tgt, enc_tgt))


def fine_grained_adv_loss(d_tgt: torch.Tensor, enc_tgt_as_source: torch.Tensor) -> torch.Tensor:
    """G's adversarial loss (FGDEM eq. 3): ``CE(D(f_T), [a_T; 0])``, target features labelled source."""
    return soft_label_cross_entropy(d_tgt, enc_tgt_as_source)




def deepest_features(output) -> torch.Tensor:
    """The backbone's last feature map (layer4, or layer3 on a 3-layer backbone)."""
    return output.features[max(output.features)].float()


#: The discriminator of each output level, and which feature map (from the deepest) it sees.
LEVEL_DISCRIMINATOR = {"main": "fine", "aux": "fine_aux"}
LEVEL_DEPTH = {"main": -1, "aux": -2}


def level_features(output, level: str) -> torch.Tensor:
    """The features a level's classifier reads: the deepest map (main), the one below it (aux)."""
    return output.features[sorted(output.features)[LEVEL_DEPTH[level]]].float()


class FGDEM(Method):
    name = "fgdem"
    defaults = {
        "lambda_adv": 1.0e-3,
        "lambda_ent": 1.0,  # (choice) the paper does not state its value
        "temperature": 1.8,
        "clamp": 0.9,
    }
    has_discriminators = True
    version = 2  # 2: multi-level G adapts both levels

    def setup(self, ctx):
        layers = sorted(ctx.feature_channels)
        for lvl in ctx.levels:
            channels = ctx.feature_channels[layers[LEVEL_DEPTH[lvl]]]
            ctx.discriminators[LEVEL_DISCRIMINATOR[lvl]] = FineGrainedDiscriminator(channels, ctx.num_classes)

    def train_step(self, ctx, labelled, unlabelled):
        p = ctx.params
        disc = {lvl: ctx.discriminators[LEVEL_DISCRIMINATOR[lvl]] for lvl in ctx.levels}
        # G: segmentation + λ_adv (fool D on target + λ_ent · target entropy)   (eq. 7–8), per level
        with ctx.generator_update():
            out_s = ctx.forward(labelled["image"])
            loss_seg = ctx.seg_loss(out_s, labelled["label"])
            ctx.backward(loss_seg)  # the source graph is freed before the target forward (ADVENT's order)
            feat_s = {lvl: level_features(out_s, lvl).detach() for lvl in ctx.levels}
            z_s = {lvl: out_s.logits[lvl].detach().float() for lvl in ctx.levels}
            del out_s
            out_t = ctx.forward(unlabelled["image"])
            size = image_size(unlabelled)
            feat_t = {lvl: level_features(out_t, lvl) for lvl in ctx.levels}
            z_t = {lvl: out_t.logits[lvl].float() for lvl in ctx.levels}
            loss_adv = loss_ent = 0.0
            for lvl in ctx.levels:
                target_as_source = domain_encoding(z_t[lvl], p["temperature"], p["clamp"], domain="source")
                loss_adv = loss_adv + ADV_LEVEL_WEIGHT[lvl] * fine_grained_adv_loss(disc[lvl](feat_t[lvl]),
                                                                                    target_as_source)
                loss_ent = loss_ent + ADV_LEVEL_WEIGHT[lvl] * entropy_loss(ctx.probs(out_t, lvl, size))
            ctx.backward(p["lambda_adv"] * (loss_adv + p["lambda_ent"] * loss_ent))

        # D: source features → [a_S; 0], target features → [0; a_T]
        loss_d = 0.0
        for lvl in ctx.levels:
            enc_s = domain_encoding(z_s[lvl], p["temperature"], p["clamp"], domain="source")
            enc_t = domain_encoding(z_t[lvl], p["temperature"], p["clamp"], domain="target")
            loss_d = loss_d + fine_grained_d_loss(disc[lvl](feat_s[lvl]), disc[lvl](feat_t[lvl].detach()), enc_s,
                                                  enc_t)
        ctx.step_discriminators(loss_d)
        return {"seg": loss_seg.detach(), "adv": loss_adv.detach(), "ent": loss_ent.detach(), "d": loss_d.detach()}
