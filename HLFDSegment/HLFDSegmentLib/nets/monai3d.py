"""MONAI networks with the zoo's ``size_divisible`` and ``taps`` attributes.

Each class subclasses the MONAI class, so its module tree and ``state_dict`` keys are MONAI's
(weights trained with plain MONAI load unchanged) and taps are paths into that tree. Taps follow
the rule in :mod:`.blocks` (``e5`` = deepest stage; ``d_k`` at ``e_{k-1}``'s scale), so with the
defaults (scales for an input of size S):

- ``monai_unet3d`` (UNet, channels 16..256, strides 2): e1..e4 = the four down convs
  ``model.0``, ``model.1.submodule.0``, ... at S/2..S/16; e5 = the bottom conv at S/16 (stride 1);
  d4, d3, d2 = the up convs at S/8, S/4, S/2; out = ``model.2`` (the top up conv). No ``d5``: the
  UNet has no decoder block at S/16.
- ``monai_segresnet3d`` (SegResNet, init_filters 16, blocks_down (1,2,2,4)): e2..e5 =
  ``down_layers.0..3`` at S..S/8; d5, d4, d3 = ``up_layers.0..2`` at S/4, S/2, S; out =
  ``conv_final``. No ``e1``/``d2`` (four levels only; pass five ``blocks_down`` to get them).
- ``monai_dynunet3d`` (DynUNet, nnU-Net-like, kernels 3, strides (1,2,2,2,2,2), filters
  32..320): e1..e4 = ``downsamples.0..3`` at S/2..S/16, e5 = ``bottleneck`` at S/32; d5..d2 =
  ``upsamples.0..3`` at S/16..S/2; ``upsamples.4`` (S) is not tapped; out = ``output_block``.
  ``input_block`` (S) is not tapped. No deep supervision: forward returns the logits only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from monai.networks.nets import DynUNet, SegResNet, UNet

from .blocks import anchored_taps


def stride_divisor(strides: Sequence[Any], spatial_dims: int) -> int:
    """Smallest input size multiple that every down-sampling in ``strides`` divides exactly."""
    per_dim = [1] * spatial_dims
    for s in strides:
        values = [s] * spatial_dims if isinstance(s, int) else list(s)
        if len(values) != spatial_dims:
            raise ValueError(f"field 'strides': {s!r} does not have {spatial_dims} values")
        per_dim = [p * int(v) for p, v in zip(per_dim, values, strict=True)]
    return math.lcm(*per_dim)


class MonaiUNet(UNet):
    """``monai.networks.nets.UNet`` with zoo defaults, ``size_divisible`` and ``taps``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[Any] = (2, 2, 2, 2),
        **kwargs: Any,
    ):
        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"field 'strides': expected len(channels) - 1 = {len(channels) - 1} values, "
                f"got {len(strides)}"
            )
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kwargs)
        self.size_divisible = stride_divisor(strides, spatial_dims)
        downs, ups = [], {}
        prefix = "model"
        for depth in range(len(channels) - 1):
            downs.append(f"{prefix}.0")
            if depth > 0:  # the up conv at depth i returns to the scale of down conv i - 1
                ups[depth - 1] = f"{prefix}.2"
            prefix += ".1.submodule"
        downs.append(prefix)  # bottom layer
        self.taps = anchored_taps(downs, ups, "model.2")


class MonaiSegResNet(SegResNet):
    """``monai.networks.nets.SegResNet`` with ``size_divisible`` and ``taps``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        levels = len(blocks_down)
        blocks_up = (1,) * (levels - 1) if blocks_up is None else tuple(blocks_up)
        if len(blocks_up) != levels - 1:
            raise ValueError(
                f"field 'blocks_up': expected len(blocks_down) - 1 = {levels - 1} values, "
                f"got {len(blocks_up)}"
            )
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            blocks_down=tuple(blocks_down),
            blocks_up=blocks_up,
            **kwargs,
        )
        self.size_divisible = 2 ** (levels - 1)
        self.taps = anchored_taps(
            [f"down_layers.{i}" for i in range(levels)],
            {levels - 2 - j: f"up_layers.{j}" for j in range(levels - 1)},
            "conv_final",
        )


class MonaiDynUNet(DynUNet):
    """``monai.networks.nets.DynUNet`` (no deep supervision) with ``size_divisible`` and ``taps``.

    MONAI also registers a recursive view of the same blocks as ``skip_layers``; that would list
    every weight twice in ``state_dict`` (which safetensors refuses to save), so it is kept as a
    plain attribute here, and ``skip_layers.*`` keys in MONAI-saved state dicts are ignored.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Any] | None = None,
        strides: Sequence[Any] = (1, 2, 2, 2, 2, 2),
        upsample_kernel_size: Sequence[Any] | None = None,
        **kwargs: Any,
    ):
        strides = tuple(strides)
        kernel_size = (3,) * len(strides) if kernel_size is None else tuple(kernel_size)
        if upsample_kernel_size is None:
            upsample_kernel_size = strides[1:]
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=tuple(upsample_kernel_size),
            **kwargs,
        )
        skip = self._modules.pop("skip_layers")
        object.__setattr__(self, "skip_layers", skip)
        self.size_divisible = stride_divisor(strides, spatial_dims)
        n = len(strides)
        levels = ["input_block", *(f"downsamples.{i}" for i in range(n - 2)), "bottleneck"]
        self.taps = anchored_taps(
            levels, {n - 2 - j: f"upsamples.{j}" for j in range(n - 1)}, "output_block"
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        kept = OrderedDict(
            (k, v) for k, v in state_dict.items() if not k.startswith("skip_layers.")
        )
        return super().load_state_dict(kept, strict=strict, assign=assign)
