"""What a method's ``train_step`` works with: the networks, their optimisers and the shared steps.

A method says *what* its losses are and in which order the networks are updated; the context owns
*how* (optimisers, mixed precision, freezing discriminators while G learns, level weights). The engine
builds one context per training stage and hands it to :meth:`Method.setup` and every ``train_step``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """``model``'s BatchNorm layers."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def running_statistics_held(norms: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Inside: the BatchNorm layers ``norms`` (:func:`batch_norms`) normalise with the batch's statistics as
    usual in train mode, but their running statistics do not move (momentum 0; restored on exit). In eval mode
    they read the running statistics and move nothing anyway."""
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


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
    #: autocast dtype of G's forward (``torch.bfloat16`` / ``torch.float16``; ``None``: float32). Losses,
    #: probabilities and every ``log`` stay float32: :meth:`logits` and the losses cast up.
    amp_dtype: torch.dtype | None = None
    #: ``torch.compile(model)`` when ``train.compile`` is on: :meth:`forward` runs it; ``model`` (the same
    #: weights) is what is saved, evaluated and put in the optimiser.
    compiled: nn.Module | None = None
    #: ``torch.channels_last`` when ``train.channels_last`` is on (CUDA): images enter G in that layout.
    memory_format: torch.memory_format | None = None
    #: this iteration's source images when ``train.bn_stats`` is ``target`` (set by the engine): their forward
    #: passes normalise with their own batch statistics but leave BatchNorm's running ones to the target's
    held_images: torch.Tensor | None = None
    #: G's BatchNorm layers, which a forward on :attr:`held_images` holds (found at the first such forward)
    held_norms: list[nn.Module] | None = None

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
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    def forward(self, images: torch.Tensor):
        """One forward pass of G: logits of every level and the intermediate features. A pass on
        :attr:`held_images` leaves BatchNorm's running statistics as they were."""
        held = images is self.held_images
        if held and self.held_norms is None:  # the model's layers, found once per stage (not per iteration)
            self.held_norms = batch_norms(self.model)
        if self.memory_format is not None:
            images = images.contiguous(memory_format=self.memory_format)
        with self.autocast(), (running_statistics_held(self.held_norms) if held else nullcontext()):
            return (self.model if self.compiled is None else self.compiled)(images)

    def logits(self, output, level: str, size: tuple[int, int]) -> torch.Tensor:
        """Logits of ``level`` upsampled bilinearly to ``size`` (the input / label size), in float32.

        Memoised on ``output``: the segmentation loss and the domain maps of one forward pass share one
        upsampling per level and size.
        """
        memo = output.__dict__.setdefault("_upsampled", {})
        key = (level, tuple(size))
        if key not in memo:
            logits = output.logits[level]
            align = self.config["model"].get("align_corners", False)  # model.align_corners
            memo[key] = logits.float() if tuple(logits.shape[-2:]) == key[1] else upsample_logits(logits, size, align)
        return memo[key]

    def probs(self, output, level: str, size: tuple[int, int]) -> torch.Tensor:
        return torch.softmax(self.logits(output, level, size), dim=1)

    def seg_loss(self, output, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on labelled images, summed over levels with the multi-level weights."""
        size = tuple(labels.shape[-2:])
        return sum(SEG_LEVEL_WEIGHT[lvl] * seg_cross_entropy(self.logits(output, lvl, size), labels)
                   for lvl in self.levels)

    @contextmanager
    def generator_update(self) -> Iterator[None]:
        """One update of G whose loss is backpropagated in parts (:meth:`backward`), every discriminator
        held fixed: G's gradients are zeroed on entry and G steps on exit.

        Backpropagating the source loss before the target forward pass frees the source graph early (the
        ADVENT reference's order): the peak memory is one domain's graph, not both; the gradients are
        those of the summed loss.
        """
        for disc in self.discriminators.values():
            set_requires_grad(disc, False)
        self.opt_g.zero_grad(set_to_none=True)
        self._updating_g = True  # a float16 loss scale must not change between G's partial backward passes
        try:
            yield
            self._updating_g = False
            self._step(self.opt_g)
        finally:
            self._updating_g = False
            for disc in self.discriminators.values():
                set_requires_grad(disc, True)

    @contextmanager
    def trainable_discriminators(self) -> Iterator[None]:
        """Inside :meth:`generator_update`: let the discriminators learn (a D step between G's partial
        backward passes, e.g. CRAM's Algorithm 1), fixed again on exit."""
        for disc in self.discriminators.values():
            set_requires_grad(disc, True)
        try:
            yield
        finally:
            for disc in self.discriminators.values():
                set_requires_grad(disc, False)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (scaled under float16 mixed precision); frees its graph."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step_generator(self, loss: torch.Tensor) -> None:
        """Update G on ``loss`` with every discriminator held fixed."""
        with self.generator_update():
            self.backward(loss)

    def step_discriminators(self, loss: torch.Tensor) -> None:
        """Update the discriminators on ``loss`` (its inputs must be detached from G)."""
        assert self.opt_d is not None, "this method declared no discriminators"
        self.opt_d.zero_grad(set_to_none=True)
        self._backward_step(loss, self.opt_d)

    def _backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.backward(loss)
        self._step(optimizer)

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            if not getattr(self, "_updating_g", False):  # a D step inside G's update: G's step updates the scale
                self.scaler.update()
