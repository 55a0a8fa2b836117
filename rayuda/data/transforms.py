"""Joint image/label transform: resize, random crop, horizontal flip, colour jitter, normalisation.

All randomness comes from the generator passed to :meth:`Transform.__call__` (the datasets seed one per
item from ``(seed, epoch, index)``), so a transform's output is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255

Generator = np.random.Generator | torch.Generator


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """``None``, an int (square) or an (H, W) pair of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"Transform {name} must be None or (H, W) positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _uniform(rng: Generator, low: float, high: float) -> float:
    if isinstance(rng, torch.Generator):
        return low + (high - low) * float(torch.rand((), generator=rng))
    return float(rng.uniform(low, high))


def _randint(rng: Generator, n: int) -> int:
    """A random int in ``[0, n)``."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (), generator=rng))
    return int(rng.integers(n))


class Transform:
    """Resize → random crop → random flip → colour jitter → ImageNet normalisation.

    Args:
        size: (H, W) to resize to (image bilinear, label nearest), or None.
        crop: (H, W) random crop, or None; smaller inputs are padded (image 0, label 255) first.
        flip: random horizontal flip with probability 0.5.
        jitter: colour jitter strength in [0, 1]: brightness, contrast and saturation are each scaled
            by a factor drawn from [1 - jitter, 1 + jitter].
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        crop: int | Sequence[int] | None = None,
        flip: bool = False,
        jitter: float = 0.0,
    ):
        self.size, self.crop = _pair(size, "size"), _pair(crop, "crop")
        self.flip, self.jitter = bool(flip), float(jitter)
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Transform jitter must be in [0, 1], got {jitter!r}")

    @property
    def random(self) -> bool:
        """Whether the transform draws from its generator."""
        return self.crop is not None or self.flip or self.jitter > 0

    def __repr__(self) -> str:
        return f"Transform(size={self.size}, crop={self.crop}, flip={self.flip}, jitter={self.jitter})"

    def __call__(
        self, image: Image.Image, label: np.ndarray | None = None, rng: Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a PIL image and its H×W train-id label (None = all ignore).

        Returns a float32 3×H×W normalised image and an int64 H×W label.
        """
        if rng is None and self.random:
            raise ValueError("Transform with crop, flip or jitter needs a generator (rng)")
        img = F.pil_to_tensor(image.convert("RGB"))
        h, w = img.shape[-2:]
        if label is None:
            lbl = torch.full((1, h, w), IGNORE, dtype=torch.uint8)
        else:
            if label.shape != (h, w):
                raise ValueError(f"label shape {label.shape} differs from image shape {(h, w)}")
            lbl = torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))[None]
        if self.size is not None:
            img = F.resize(img, list(self.size), interpolation=InterpolationMode.BILINEAR, antialias=True)
            lbl = F.resize(lbl, list(self.size), interpolation=InterpolationMode.NEAREST)
        if self.crop is not None:
            img, lbl = self._random_crop(img, lbl, rng)
        if self.flip and _uniform(rng, 0.0, 1.0) < 0.5:
            img, lbl = F.horizontal_flip(img), F.horizontal_flip(lbl)
        if self.jitter > 0:
            low, high = 1.0 - self.jitter, 1.0 + self.jitter
            img = F.adjust_brightness(img, _uniform(rng, low, high))
            img = F.adjust_contrast(img, _uniform(rng, low, high))
            img = F.adjust_saturation(img, _uniform(rng, low, high))
        img = F.normalize(F.to_dtype(img, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
        return img.contiguous(), lbl[0].long()

    def _random_crop(
        self, img: torch.Tensor, lbl: torch.Tensor, rng: Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.crop
        h, w = img.shape[-2:]
        pad_h, pad_w = max(0, ch - h), max(0, cw - w)
        if pad_h or pad_w:  # pad right/bottom: image black, label ignore
            img = F.pad(img, [0, 0, pad_w, pad_h], fill=0)
            lbl = F.pad(lbl, [0, 0, pad_w, pad_h], fill=IGNORE)
            h, w = img.shape[-2:]
        top, left = _randint(rng, h - ch + 1), _randint(rng, w - cw + 1)
        return F.crop(img, top, left, ch, cw), F.crop(lbl, top, left, ch, cw)
