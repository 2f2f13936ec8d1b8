"""Building blocks shared by the 2D zoo networks, and the tap-naming rule used by every network.

Tap naming rule (all networks, MONAI's included):
- encoder stages are listed shallow -> deep; the deepest one (the bottleneck) is always ``e5``,
  the one above it ``e4``, and so on (a network with fewer than five stages has no ``e1``...);
- ``d_k`` is the decoder block whose output lies at the scale of ``e_{k-1}`` (so ``d5`` is the
  first decoder block, at ``e4``'s scale, and ``d2`` is at ``e1``'s scale); a decoder level with
  no such encoder partner is not tapped;
- ``out`` is the module whose output is the final logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TAP_NAMES = ("e1", "e2", "e3", "e4", "e5", "d5", "d4", "d3", "d2", "out")


class SegmentationNet(nn.Module):
    """Base of the zoo's own networks: ``forward(x)`` returns logits at the input's size.

    Attributes:
        size_divisible: input height/width (and depth) must be multiples of this.
        taps: tap name -> dotted module path, resolvable with ``get_submodule``.
    """

    size_divisible: int = 1
    taps: dict[str, str]


def anchored_taps(
    encoder_levels: Sequence[str], decoder_levels: dict[int, str], out: str
) -> dict[str, str]:
    """Name taps by the module docstring's rule.

    Args:
        encoder_levels: module paths of the encoder stages, shallow -> deep (index = level).
        decoder_levels: encoder level index -> path of the decoder block whose output is at
            that level's scale.
        out: path of the module producing the final logits.
    """
    n = len(encoder_levels)
    taps: dict[str, str] = {}
    for m in range(1, 6):
        level = n - 6 + m
        if 0 <= level < n:
            taps[f"e{m}"] = encoder_levels[level]
    for k in range(5, 1, -1):
        level = n - 7 + k
        if level >= 0 and level in decoder_levels:
            taps[f"d{k}"] = decoder_levels[level]
    taps["out"] = out
    return taps


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation (ReLU, ReLU6 or none)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif act == "relu6":
            layers.append(nn.ReLU6(inplace=True))
        elif act is not None:
            raise ValueError(f"unknown activation {act!r}")
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvBNAct layers: the classic U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            ConvBNAct(in_channels, out_channels), ConvBNAct(out_channels, out_channels)
        )


def upsample_to(x: torch.Tensor, ref: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resize ``x`` to ``ref``'s spatial size (no-op when they already match)."""
    size = ref.shape[2:]
    if x.shape[2:] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class UpConcatBlock(nn.Module):
    """U-Net decoder block: upsample x (nearest) to the skip's size, concatenate, DoubleConv.

    Without a skip (``skip_channels == 0``) it upsamples by 2 and convolves.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = torch.cat([upsample_to(x, skip), skip], dim=1)
        return self.conv(x)


class SegHead(nn.Module):
    """Final logits: a conv, then (optionally) bilinear resize to the network input's size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = self.conv(x)
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit/zero norms, zero biases. Nothing on the meta
    device: a network built there (for its shapes) has no values to set, and the random
    generator is left as it is either way."""
    if any(p.is_meta for p in module.parameters()):
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_channels(name: str, value: object, length: int | None = None) -> tuple[int, ...]:
    """Validate a channel tuple kwarg (positive ints, optional exact length)."""
    if isinstance(value, int) or not isinstance(value, Sequence):
        raise ValueError(f"field {name!r}: expected a sequence of positive integers, got {value!r}")
    out = tuple(value)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in out):
        raise ValueError(f"field {name!r}: expected positive integers, got {value!r}")
    if length is not None and len(out) != length:
        raise ValueError(f"field {name!r}: expected {length} values, got {len(out)}")
    return out
