"""The one prediction helper: logits of a level upsampled to a label size, plain or mirrored.

Evaluation, pseudo-label passes, teachers and the methods' losses all go through :func:`upsample_logits`,
so there is exactly one upsampling convention in rayuda (bilinear, ``align_corners=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``logits`` (N×C×h×w, any float dtype) upsampled bilinearly to ``size`` in float32."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def predict_logits(
    model: nn.Module, images: torch.Tensor, size: tuple[int, int], *, level: str = "main", mirrored: bool = False
) -> torch.Tensor:
    """Logits of ``model``'s ``level`` at ``size``; ``mirrored`` predicts on the flipped images and flips back.

    The caller chooses the mode (``model.eval()``) and the grad context (``torch.no_grad()``).
    """
    if mirrored:
        return predict_logits(model, images.flip(-1), size, level=level).flip(-1)
    return upsample_logits(model(images).logits[level], size)
