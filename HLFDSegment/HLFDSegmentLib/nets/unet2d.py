"""Plain 2D U-Net with five levels: ``tiny_unet2d`` (few parameters, but full-resolution convs).

Level i has ``base * 2**i`` channels; max-pool down, 2x2 transposed conv up, DoubleConv stages.

======  ==========================  =====  ============
tap     module                      scale  channels
======  ==========================  =====  ============
e1      ``encoder.0``               S      base
e2..e5  ``encoder.1..4``            S/2..  2b, 4b, 8b, 16b (e5 = bottleneck at S/16)
d5      ``decoder.0``               S/8    8b
d4      ``decoder.1``               S/4    4b
d3      ``decoder.2``               S/2    2b
d2      ``decoder.3``               S      b
out     ``head`` (1x1 conv)         S      out_channels
======  ==========================  =====  ============
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import DoubleConv, SegmentationNet, anchored_taps, init_weights, upsample_to


class TransposedUpBlock(nn.Module):
    """2x2/2 transposed conv halving channels -> concat skip -> DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([upsample_to(self.up(x), skip), skip], dim=1))


class TinyUNet(SegmentationNet):
    """Five-level 2D U-Net; logits at the input size."""

    size_divisible = 16

    def __init__(self, in_channels: int, out_channels: int, base: int = 16):
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)
        )
        self.decoder = nn.ModuleList(
            TransposedUpBlock(widths[i + 1], widths[i]) for i in (3, 2, 1, 0)
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.taps = anchored_taps(
            [f"encoder.{i}" for i in range(5)], {3 - i: f"decoder.{i}" for i in range(4)}, "head"
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.pool(x))
            feats.append(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = block(y, skip)
        return self.head(y)
