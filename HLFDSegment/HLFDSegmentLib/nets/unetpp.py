"""2D UNet++ (nested dense skip decoder) on a ResNet-34/18 encoder: ``unetpp2d``, the teacher.

Node ``X[i][j]`` lives at encoder level i (scale S/2^(i+1)); ``X[i][0]`` is encoder stage
``e_{i+1}`` and, for j >= 1, ``X[i][j] = conv(cat(X[i][0..j-1], up(X[i+1][j-1])))``. The
top-level path ends in the diagonal nodes X[3][1], X[2][2], X[1][3], X[0][4]; a last block at S
(no skip) and a 3x3 head follow X[0][4]. Only the logits are returned (no deep supervision).

======  ===============================  =====  ==========================
tap     module                           scale  channels (defaults)
======  ===============================  =====  ==========================
e1..e5  ``encoder.stem``, ``layer1..4``  S/2..  64, 64, 128, 256, 512
d5      ``decoder.nodes.x3_1``           S/16   decoder_channels[0] (256)
d4      ``decoder.nodes.x2_2``           S/8    decoder_channels[1] (128)
d3      ``decoder.nodes.x1_3``           S/4    decoder_channels[2] (64)
d2      ``decoder.nodes.x0_4``           S/2    decoder_channels[3] (32)
out     ``head``                         S      out_channels
======  ===============================  =====  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import (
    DoubleConv,
    SegHead,
    SegmentationNet,
    UpConcatBlock,
    anchored_taps,
    init_weights,
    upsample_to,
)
from .resnet_unet import ResNetEncoder


class NestedNode(nn.Module):
    """One UNet++ node: upsample the deeper input to the skips' size, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, deeper: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([*skips, upsample_to(deeper, skips[0])], dim=1))


class NestedDecoder(nn.Module):
    """The UNet++ decoder over five encoder features (levels 0..4)."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        depth = len(encoder_channels) - 1  # 4 decoder levels
        # Channels of every node X[i][j]: encoder channels for j == 0, else the level's width.
        level_width = [decoder_channels[depth - 1 - i] for i in range(depth)]

        def width(i: int, j: int) -> int:
            return encoder_channels[i] if j == 0 else level_width[i]

        nodes = {}
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                in_ch = sum(width(i, k) for k in range(j)) + width(i + 1, j - 1)
                nodes[f"x{i}_{j}"] = NestedNode(in_ch, level_width[i])
        self.nodes = nn.ModuleDict(nodes)
        self.final = UpConcatBlock(level_width[0], 0, decoder_channels[depth])
        self.depth = depth

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        grid: list[list[torch.Tensor]] = [[f] for f in feats]
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                grid[i].append(self.nodes[f"x{i}_{j}"](grid[i + 1][j - 1], *grid[i][:j]))
        return self.final(grid[0][self.depth])


class UNetPlusPlus(SegmentationNet):
    """2D UNet++ with a ResNet encoder; logits at the input size."""

    size_divisible = 32

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        encoder: str = "resnet34",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        self.encoder = ResNetEncoder(in_channels, encoder)
        self.decoder = NestedDecoder(self.encoder.channels, decoder_channels)
        self.head = SegHead(decoder_channels[4], out_channels)
        self.taps = anchored_taps(
            [f"encoder.{p}" for p in self.encoder.paths],
            {i: f"decoder.nodes.x{i}_{4 - i}" for i in range(4)},
            "head",
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)), x.shape[2:])
