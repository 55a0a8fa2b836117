"""``minent`` (ADVENT, Vu et al. 2019, eq. 4): G minimises the mean normalised entropy of target predictions."""

from __future__ import annotations

from rayuda.losses import entropy_loss
from rayuda.methods.base import Method, image_size
from rayuda.methods.context import ADV_LEVEL_WEIGHT


class MinEnt(Method):
    name = "minent"
    defaults = {"w_ent": 1.0e-3}  # main level; the aux level gets 2e-4 (×0.2) as in ADVENT

    def train_step(self, ctx, labelled, unlabelled):
        with ctx.generator_update():
            out_s = ctx.forward(labelled["image"])
            loss_seg = ctx.seg_loss(out_s, labelled["label"])
            ctx.backward(loss_seg)  # the source graph is freed before the target forward (ADVENT's order)
            del out_s
            out_t = ctx.forward(unlabelled["image"])
            size = image_size(unlabelled)
            loss_ent = sum(ADV_LEVEL_WEIGHT[lvl] * entropy_loss(ctx.probs(out_t, lvl, size)) for lvl in ctx.levels)
            ctx.backward(ctx.params["w_ent"] * loss_ent)
        return {"seg": loss_seg.detach(), "ent": loss_ent.detach()}
