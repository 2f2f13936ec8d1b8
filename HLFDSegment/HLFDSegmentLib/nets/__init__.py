"""Every segmentation network of HLFDSegment (shared by the runtime and the training package).

>>> net = build_network("mobilenetv2_unet2d", 2, in_channels=1, out_channels=3)

Every built network returns logits ``(N, out_channels, *spatial)`` at the input's spatial size
and carries ``size_divisible`` (input sizes must be multiples of it) and ``taps`` (tap name ->
module path: ``e1..e5`` encoder stages shallow -> deep, ``d5..d2`` decoder stages deep ->
shallow, ``out`` the module producing the logits; see :mod:`.blocks` for the naming rule and
each network's module for the scales).
"""

from __future__ import annotations

from .architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnknownArchitectureError,
    build_network,
    get_spec,
    tap_paths,
)
from .blocks import TAP_NAMES, SegmentationNet
from .fuse import fold_batchnorm
from .profile import count_macs, count_parameters

__all__ = [
    "ARCHITECTURES",
    "TAP_NAMES",
    "ArchitectureSpec",
    "SegmentationNet",
    "UnknownArchitectureError",
    "build_network",
    "count_macs",
    "count_parameters",
    "fold_batchnorm",
    "get_spec",
    "tap_paths",
]
