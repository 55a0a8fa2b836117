"""The method interface: a method is its knobs, the discriminators it needs, and one training step."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from rayuda.engine.context import TrainContext

SOURCE, TARGET = 1.0, 0.0  # discriminator labels (AdvEnt convention: source = 1)


class Method:
    """Base of every UDA method.

    Subclasses set ``name`` and ``defaults`` (their knobs, at the paper's values; config ``params.*``)
    and implement :meth:`train_step`, the update order of one iteration readable top to bottom.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    uses_target: ClassVar[bool] = True

    def discriminators(self, ctx: TrainContext) -> dict[str, nn.Module]:
        """The discriminators this method trains (keyed by name); none by default."""
        return {}

    def train_step(self, ctx: TrainContext, source: dict, target: dict | None) -> dict[str, float]:
        """One iteration: update the networks, return the losses to log (plain floats)."""
        raise NotImplementedError


def image_size(batch: dict) -> tuple[int, int]:
    return tuple(batch["label"].shape[-2:])
