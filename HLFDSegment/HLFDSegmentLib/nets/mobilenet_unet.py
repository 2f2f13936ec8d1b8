"""2D U-Net with a MobileNetV2 encoder and a light decoder: ``mobilenetv2_unet2d``, the CPU student.

Speed first: nothing convolves at full resolution. Each decoder block projects the deeper
feature with a 1x1 conv at its own (low) scale, upsamples it, concatenates the skip and applies
a depthwise-separable 3x3. The head is a 3x3 conv at S/2 followed by a bilinear resize of the
logits to S.

======  ======================================  =====  ===========================
tap     module                                  scale  channels (width 1.0)
======  ======================================  =====  ===========================
e1      ``encoder.stage1`` (stem + IR t=1)      S/2    16
e2      ``encoder.stage2``                      S/4    24
e3      ``encoder.stage3``                      S/8    32
e4      ``encoder.stage4``                      S/16   96
e5      ``encoder.stage5``                      S/32   320
d5..d2  ``decoder.blocks.0..3``                 S/16.. decoder_channels (96,32,24,16)
out     ``head`` (conv at S/2 + resize)         S      out_channels
======  ======================================  =====  ===========================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBNAct, SegHead, SegmentationNet, anchored_taps, init_weights, upsample_to

# MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n, first stride s,
# grouped into the five tapped stages.
MBV2_STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1),),
    ((6, 24, 2, 2),),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear project (+ identity)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act="relu6"))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act="relu6"),
            ConvBNAct(hidden, out_channels, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 feature trunk (no 1280-channel conv, no classifier), five stages."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        stem_ch = make_divisible(32 * width)
        prev = stem_ch
        channels = []
        for s, groups in enumerate(MBV2_STAGES):
            layers: list[nn.Module] = (
                [ConvBNAct(in_channels, stem_ch, 3, 2, act="relu6")] if s == 0 else []
            )
            for t, c, n, first_stride in groups:
                out = make_divisible(c * width)
                for r in range(n):
                    layers.append(InvertedResidual(prev, out, first_stride if r == 0 else 1, t))
                    prev = out
            self.add_module(f"stage{s + 1}", nn.Sequential(*layers))
            channels.append(prev)
        self.channels = tuple(channels)
        self.paths = tuple(f"stage{s + 1}" for s in range(5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at S/2, S/4, S/8, S/16, S/32 (shallow -> deep)."""
        feats = []
        for p in self.paths:
            x = getattr(self, p)(x)
            feats.append(x)
        return feats


class LightUpBlock(nn.Module):
    """1x1 project at low resolution -> upsample -> concat skip -> depthwise 3x3 -> 1x1."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.project = ConvBNAct(in_channels, out_channels, 1)
        mid = out_channels + skip_channels
        self.depthwise = ConvBNAct(mid, mid, 3, groups=mid)
        self.pointwise = ConvBNAct(mid, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([upsample_to(self.project(x), skip), skip], dim=1)
        return self.pointwise(self.depthwise(x))


class MobileNetV2UNet(SegmentationNet):
    """MobileNetV2-encoder U-Net; logits at the input size."""

    size_divisible = 32

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: float = 1.0,
        decoder_channels: Sequence[int] = (96, 32, 24, 16),
    ):
        super().__init__()
        self.encoder = MobileNetV2Encoder(in_channels, width)
        enc = self.encoder.channels
        blocks = []
        prev = enc[-1]
        for skip, out in zip(enc[-2::-1], decoder_channels, strict=True):
            blocks.append(LightUpBlock(prev, skip, out))
            prev = out
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList(blocks)
        self.head = SegHead(prev, out_channels)
        self.taps = anchored_taps(
            [f"encoder.{p}" for p in self.encoder.paths],
            {3 - i: f"decoder.blocks.{i}" for i in range(4)},
            "head",
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder.blocks, reversed(feats[:-1]), strict=True):
            y = block(y, skip)
        return self.head(y, x.shape[2:])
