"""The one prediction helper: logits of a level upsampled to a label size, plain or mirrored.

Evaluation, pseudo-label passes, teachers and the methods' losses all go through :func:`upsample_logits`,
so there is exactly one upsampling function in rayuda (bilinear); its ``align_corners`` is the model's
``model.align_corners`` key (default ``False``; the ADVENT/AdaptSegNet/FADA reference code uses ``True``), read
from the model by :func:`predict_logits` and from the stage config by the training context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """``logits`` (N×C×h×w, any float dtype) upsampled bilinearly to ``size`` in float32."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=bool(align_corners))


def model_align_corners(model: nn.Module) -> bool:
    """The ``model.align_corners`` G was built with (``False`` for a model that does not say)."""
    for attr in ("module", "_orig_mod"):  # DataParallel/DDP, torch.compile
        model = getattr(model, attr, model)
    return bool(getattr(model, "align_corners", False))


def predict_logits(
    model: nn.Module, images: torch.Tensor, size: tuple[int, int], *, level: str = "main", mirrored: bool = False
) -> torch.Tensor:
    """Logits of ``model``'s ``level`` at ``size``; ``mirrored`` predicts on the flipped images and flips back.

    The caller chooses the mode (``model.eval()``) and the grad context (``torch.no_grad()``).
    """
    if mirrored:
        return predict_logits(model, images.flip(-1), size, level=level).flip(-1)
    return upsample_logits(model(images).logits[level], size, model_align_corners(model))
