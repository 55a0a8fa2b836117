"""The discriminators the adaptation methods use. All return logits (no sigmoid/softmax); the losses
apply it.

* :class:`OutputDiscriminator` — AdaptSegNet/AdvEnt/CRAM output-space D: five 4×4 convs, stride 2,
  padding 1, channels ndf·(1, 2, 4, 8) then 1, LeakyReLU(0.2) between them. A H×W input gives
  ``floor(H/32)×floor(W/32)`` patch logits (64×128 → 2×4), so feed it maps upsampled to image size.
  ``downsample=16`` (CADA's D_c, its §3.2) makes the last conv stride 1, PatchGAN's final layer:
  ``H/16 − 1`` patch logits (64×128 → 3×7).
* :class:`FineGrainedDiscriminator` — FGDEM/CRA class-aware D on backbone features: three 3×3 convs,
  stride 1, padding 1, channels 256, 128, 2K, LeakyReLU(0.2) after the first two. Channels
  ``0..K-1`` mean "source, class k", ``K..2K-1`` "target, class k"; output at feature size.
* :class:`PixelDiscriminator` — PixIntraDA pixel-level D: the output-space D whose 1-channel logits
  are bilinearly upsampled to the input's H×W.
* :class:`StyleDiscriminator` — CADA style D: PatchGAN-like 1-D convs (kernel 4, stride 2,
  padding 1) over a channel-mean style vector B×C read as a B×1×C sequence.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def _leaky() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


#: ``OutputDiscriminator(downsample=…)`` → the stride of its last (1-channel) conv.
LAST_STRIDE = {32: 2, 16: 1}


class OutputDiscriminator(nn.Module):
    """Five 4×4 convs (ndf, 2ndf, 4ndf, 8ndf, 1), LeakyReLU(0.2) between; B×1×H/32×W/32 logits.

    ``downsample``: 32 (every conv stride 2, AdaptSegNet's D) or 16 (the last conv stride 1, padding 1, as
    PatchGAN's final layer: B×1×(H/16 − 1)×(W/16 − 1) logits; CADA's D_c).
    """

    def __init__(self, in_channels: int, ndf: int = 64, downsample: int = 32):
        super().__init__()
        if downsample not in LAST_STRIDE:
            raise ValueError(f"OutputDiscriminator: downsample must be 16 or 32, got {downsample!r}")
        widths = [in_channels, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1), _leaky()]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=LAST_STRIDE[downsample], padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FineGrainedDiscriminator(nn.Module):
    """Three 3×3 stride-1 convs (ndf, ndf/2, 2K), LeakyReLU(0.2) after the first two; B×2K×H×W logits."""

    def __init__(self, in_channels: int, num_classes: int, ndf: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, kernel_size=3, stride=1, padding=1),
            _leaky(),
            nn.Conv2d(ndf, ndf // 2, kernel_size=3, stride=1, padding=1),
            _leaky(),
            nn.Conv2d(ndf // 2, 2 * num_classes, kernel_size=3, stride=1, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PixelDiscriminator(nn.Module):
    """:class:`OutputDiscriminator` with its B×1 logits bilinearly upsampled to the input's H×W."""

    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        self.body = OutputDiscriminator(in_channels, ndf)

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def style_vector(features: Tensor) -> Tensor:
    """CADA's style of a B×C×H×W feature map: its channel means, B×C (global average pooling)."""
    return features.mean(dim=(-2, -1))


class StyleDiscriminator(nn.Module):
    """PatchGAN-like 1-D D over a B×C style vector (read as B×1×C): ``n`` convs with kernel 4, stride 2,
    padding 1, channels ndf, 2ndf, 4ndf, …, 1 with LeakyReLU(0.2) between them; B×1×L patch logits.

    ``n = min(n_layers, floor(log2 C))`` so that short vectors still give at least one logit
    (C = 64 → L = 4). ``forward`` also takes a B×1×C sequence or a B×C×H×W feature map (then
    :func:`style_vector` is applied first).
    """

    def __init__(self, channels: int, ndf: int = 64, n_layers: int = 4):
        super().__init__()
        if channels < 2:
            raise ValueError(f"StyleDiscriminator needs at least 2 channels, got {channels}")
        self.channels = channels
        n = max(1, min(n_layers, int(math.log2(channels))))
        widths = [1] + [ndf * 2**i for i in range(n - 1)] + [1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Conv1d(cin, cout, kernel_size=4, stride=2, padding=1))
            if i < n - 1:
                layers.append(_leaky())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = style_vector(x)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.channels:
            raise ValueError(
                f"StyleDiscriminator({self.channels}) expects B×{self.channels} style vectors, "
                f"got {tuple(x.shape)}"
            )
        return self.net(x)


__all__ = [
    "FineGrainedDiscriminator",
    "OutputDiscriminator",
    "PixelDiscriminator",
    "StyleDiscriminator",
    "style_vector",
]
