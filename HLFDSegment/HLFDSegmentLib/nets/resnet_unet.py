"""ResNet encoders (18/34, BasicBlock) and the 2D U-Net built on them (``resnet18_unet2d``).

Scales of the taps for an input of size S (``size_divisible`` = 32):

======  ==============================  ========  ==========================
tap     module                          scale     channels (defaults)
======  ==============================  ========  ==========================
e1      ``encoder.stem`` (7x7/2 conv)   S/2       64
e2      ``encoder.layer1`` (after pool) S/4       64
e3      ``encoder.layer2``              S/8       128
e4      ``encoder.layer3``              S/16      256
e5      ``encoder.layer4``              S/32      512
d5..d2  ``decoder.blocks.0..3``         S/16..S/2 decoder_channels[0..3]
out     ``head``                        S         out_channels
======  ==============================  ========  ==========================

``decoder.final`` (no skip, at S) sits between d2 and the head and is not tapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBNAct, SegHead, SegmentationNet, UpConcatBlock, anchored_taps, init_weights

RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3, stride=stride)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, act=None)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBNAct(in_channels, out_channels, 1, stride=stride, act=None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-18/34 trunk: stem (7x7/2) -> maxpool -> four BasicBlock stages (no classifier)."""

    def __init__(self, in_channels: int, depth: str = "resnet18"):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(
                f"field 'encoder': unknown encoder {depth!r} (known: {', '.join(RESNET_LAYERS)})"
            )
        blocks = RESNET_LAYERS[depth]
        widths = (64, 128, 256, 512)
        self.stem = ConvBNAct(in_channels, 64, 7, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        prev = 64
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = [BasicBlock(prev, w, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            prev = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = (64, *widths)
        self.paths = ("stem", "layer1", "layer2", "layer3", "layer4")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at S/2, S/4, S/8, S/16, S/32 (shallow -> deep)."""
        e1 = self.stem(x)
        e2 = self.layer1(self.pool(e1))
        e3 = self.layer2(e2)
        e4 = self.layer3(e3)
        e5 = self.layer4(e4)
        return [e1, e2, e3, e4, e5]


class UNetDecoder(nn.Module):
    """Plain U-Net decoder over five encoder features: four skip blocks, one full-size block."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1]  # e4, e3, e2, e1
        blocks = []
        prev = encoder_channels[-1]
        for skip, out in zip(skips, decoder_channels[:4], strict=True):
            blocks.append(UpConcatBlock(prev, skip, out))
            prev = out
        self.blocks = nn.ModuleList(blocks)
        self.final = UpConcatBlock(prev, 0, decoder_channels[4])

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1]), strict=True):
            x = block(x, skip)
        return self.final(x)


class ResNetUNet(SegmentationNet):
    """2D U-Net with a ResNet encoder; logits at the input size."""

    size_divisible = 32

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        encoder: str = "resnet18",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ):
        super().__init__()
        self.encoder = ResNetEncoder(in_channels, encoder)
        self.decoder = UNetDecoder(self.encoder.channels, decoder_channels)
        self.head = SegHead(decoder_channels[4], out_channels)
        self.taps = anchored_taps(
            [f"encoder.{p}" for p in self.encoder.paths],
            {3 - i: f"decoder.blocks.{i}" for i in range(4)},
            "head",
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)), x.shape[2:])
