"""Output-space adversarial adaptation, shared by AdaptSegNet, AdvEnt, CRAM's CEA and CADA's D_c.

They differ only in the map the discriminator sees: the softmax (AdaptSegNet, CADA), the weighted
self-information (AdvEnt), or the confidence-aware entropy (CRAM). One discriminator per output level
(:meth:`OutputSpaceAdversarial.adversarial_levels`; CADA: the main output only).
"""

from __future__ import annotations

import torch

from rayuda.losses import bce_adversarial
from rayuda.methods.base import SOURCE, TARGET, Method, image_size
from rayuda.methods.context import ADV_LEVEL_WEIGHT, TrainContext
from rayuda.models import OutputDiscriminator


class OutputSpaceAdversarial(Method, register=False):
    """G fools a per-level output-space discriminator on target maps; D tells source from target.

    Subclasses define :meth:`discriminator_input` (probabilities → map) and :meth:`map_channels`.
    """

    defaults = {"w_adv": 1.0e-3}
    has_discriminators = True

    def map_channels(self, ctx: TrainContext) -> int:
        return ctx.num_classes

    def discriminator_input(self, ctx: TrainContext, prob: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adversarial_levels(self, ctx: TrainContext) -> list[str]:
        """The output levels that get a discriminator: every level of G (AdaptSegNet's multi-level); CADA
        overrides it (one D_c on the main output)."""
        return ctx.levels

    def setup(self, ctx):
        for lvl in self.adversarial_levels(ctx):
            ctx.discriminators[lvl] = OutputDiscriminator(self.map_channels(ctx))

    def domain_maps(self, ctx, output, size) -> dict[str, torch.Tensor]:
        return {lvl: self.discriminator_input(ctx, ctx.probs(output, lvl, size))
                for lvl in self.adversarial_levels(ctx)}

    def detached_maps(self, ctx, output, size) -> dict[str, torch.Tensor]:
        """:meth:`domain_maps` without a graph (the discriminators' input from G's output)."""
        with torch.no_grad():
            return self.domain_maps(ctx, output, size)

    def generator_loss(self, ctx, maps_t: dict) -> torch.Tensor:
        """``L_adv``: target maps should look like source maps to every (fixed) discriminator."""
        disc = ctx.discriminators
        return sum(ADV_LEVEL_WEIGHT[lvl] * bce_adversarial(disc[lvl](maps_t[lvl]), SOURCE)
                   for lvl in self.adversarial_levels(ctx))

    def discriminator_loss(self, ctx, maps_s: dict, maps_t: dict) -> torch.Tensor:
        """``L_D``: tell source maps (label 1) from target maps (label 0); G's maps are detached."""
        disc = ctx.discriminators
        return sum(
            0.5 * bce_adversarial(disc[lvl](maps_s[lvl].detach()), SOURCE)
            + 0.5 * bce_adversarial(disc[lvl](maps_t[lvl].detach()), TARGET)
            for lvl in self.adversarial_levels(ctx)
        )

    def train_step(self, ctx, labelled, unlabelled):
        size = image_size(unlabelled)  # each domain's maps stay at its own size (ADVENT; data.<role>.size)
        with ctx.generator_update():  # G: L_seg + w_adv·L_adv, every D fixed
            out_s = ctx.forward(labelled["image"])
            loss_seg = ctx.seg_loss(out_s, labelled["label"])
            ctx.backward(loss_seg)  # the source graph is freed before the target forward (ADVENT's order)
            maps_s = self.detached_maps(ctx, out_s, image_size(labelled))  # D's source input, at the source's size
            del out_s
            out_t = ctx.forward(unlabelled["image"])
            maps_t = self.domain_maps(ctx, out_t, size)
            loss_adv = self.generator_loss(ctx, maps_t)
            ctx.backward(ctx.params["w_adv"] * loss_adv)
        d_loss = self.discriminator_loss(ctx, maps_s, maps_t)
        ctx.step_discriminators(d_loss)
        return {"seg": loss_seg.detach(), "adv": loss_adv.detach(), "d": d_loss.detach()}
