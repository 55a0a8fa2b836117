"""``source_only``: supervised cross-entropy on the labelled source domain, the first stage of every pipeline.

As a method of its own, its plan is that one stage, reported: the source-only baseline of a target.
"""

from __future__ import annotations

from rayuda.methods.base import Method, Stage


class SourceOnly(Method):
    name = "source_only"

    @classmethod
    def schedules(cls):
        return {}  # stages.source_only is in the base config: every plan starts with it

    @classmethod
    def plan(cls, params):
        return [Stage("source_only", step=cls, params=None, target=None, reported=True)]

    def train_step(self, ctx, source, target):
        output = ctx.forward(source["image"])
        loss_seg = ctx.seg_loss(output, source["label"])
        ctx.step_generator(loss_seg)
        return {"seg": loss_seg.detach()}
