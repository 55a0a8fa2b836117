"""``source_only``: supervised cross-entropy on the labelled source domain, the first stage of every pipeline."""

from __future__ import annotations

from rayuda.methods.base import Method


class SourceOnly(Method):
    name = "source_only"
    uses_target = False

    def train_step(self, ctx, source, target):
        output = ctx.forward(source["image"])
        loss_seg = ctx.seg_loss(output, source["label"])
        ctx.step_generator(loss_seg)
        return {"seg": loss_seg.item()}
