"""What a method's ``train_step`` works with: the networks, their optimisers and the shared steps.

A method says *what* its losses are and in which order the networks are updated; the context owns
*how* (optimisers, mixed precision, freezing discriminators while G learns, level weights). The engine
builds one context per training stage and hands it to :meth:`Method.setup` and every ``train_step``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rayuda.losses import seg_cross_entropy
from rayuda.models.predict import upsample_logits

#: Multi-level DeepLab (AdaptSegNet/AdvEnt): the auxiliary (layer3) output's share of each loss.
SEG_LEVEL_WEIGHT = {"main": 1.0, "aux": 0.1}
ADV_LEVEL_WEIGHT = {"main": 1.0, "aux": 0.2}  # 2e-4 / 1e-3


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(flag)


@dataclass
class TrainContext:
    """One training stage's state.

    ``config`` is the stage's slice of the run config (reading a key outside it raises), ``params`` the
    knobs of the stage's method. ``frozen`` holds modules the stage uses but never trains (e.g. a teacher
    from an earlier stage): eval mode, no gradients, in no optimiser.
    """

    config: dict[str, Any]
    model: nn.Module
    device: torch.device
    num_classes: int
    params: dict[str, Any] = field(default_factory=dict)
    discriminators: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    opt_g: torch.optim.Optimizer | None = None
    opt_d: torch.optim.Optimizer | None = None
    iteration: int = 0
    scaler: torch.amp.GradScaler | None = None

    @property
    def levels(self) -> list[str]:
        """Output levels of G: ``["main"]`` or ``["main", "aux"]`` for multi-level DeepLab."""
        return ["main", "aux"] if self.config["model"]["multi_level"] else ["main"]

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of G's feature maps (``layer1`` …), read from the model, no forward pass needed."""
        return self.model.feature_channels

    def freeze(self, name: str, module: nn.Module) -> nn.Module:
        """Register ``module`` as frozen: eval mode, no gradients; it never enters an optimiser."""
        module.eval()
        set_requires_grad(module, False)
        self.frozen[name] = module
        return module

    def autocast(self):
        if self.scaler is not None:
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return nullcontext()

    def forward(self, images: torch.Tensor):
        """One forward pass of G: logits of every level and the intermediate features."""
        with self.autocast():
            return self.model(images)

    def logits(self, output, level: str, size: tuple[int, int]) -> torch.Tensor:
        """Logits of ``level`` upsampled bilinearly to ``size`` (the input / label size)."""
        return upsample_logits(output.logits[level], size)

    def probs(self, output, level: str, size: tuple[int, int]) -> torch.Tensor:
        return torch.softmax(self.logits(output, level, size), dim=1)

    def seg_loss(self, output, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on labelled images, summed over levels with the multi-level weights."""
        return sum(SEG_LEVEL_WEIGHT[lvl] * seg_cross_entropy(output.logits[lvl].float(), labels) for lvl in self.levels)

    def step_generator(self, loss: torch.Tensor) -> None:
        """Update G on ``loss`` with every discriminator held fixed."""
        for disc in self.discriminators.values():
            set_requires_grad(disc, False)
        self.opt_g.zero_grad(set_to_none=True)
        self._backward_step(loss, self.opt_g)
        for disc in self.discriminators.values():
            set_requires_grad(disc, True)

    def step_discriminators(self, loss: torch.Tensor) -> None:
        """Update the discriminators on ``loss`` (its inputs must be detached from G)."""
        assert self.opt_d is not None, "this method declared no discriminators"
        self.opt_d.zero_grad(set_to_none=True)
        self._backward_step(loss, self.opt_d)

    def _backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
