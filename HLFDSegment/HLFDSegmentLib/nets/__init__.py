"""Every segmentation network of HLFDSegment (shared by the runtime and the training package).

>>> net = build_network("mobilenetv2_unet2d", 2, in_channels=1, out_channels=3)

Every built network returns logits ``(N, out_channels, *spatial)`` at the input's spatial size
and carries ``size_divisible`` (input sizes must be multiples of it) and ``taps`` (tap name ->
module path: ``e1..e5`` encoder stages shallow -> deep, ``d5..d2`` decoder stages deep ->
shallow, ``out`` the module producing the logits; see :mod:`.blocks` for the naming rule and
each network's module for the scales).

Only :data:`ARCHITECTURE_NAMES` is imported eagerly; the torch-based names load on first use,
so card validation (and the ONNX backend) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import ARCHITECTURE_NAMES

if TYPE_CHECKING:
    from .architectures import (
        ARCHITECTURES,
        BACKGROUND_CHANNELS,
        ArchitectureSpec,
        UnknownArchitectureError,
        build_network,
        fold_logits,
        get_spec,
        tap_paths,
    )
    from .blocks import TAP_NAMES, SegmentationNet
    from .fuse import fold_batchnorm
    from .profile import count_macs, count_parameters

_MODULE_OF = {
    "TAP_NAMES": "blocks",
    "SegmentationNet": "blocks",
    "fold_batchnorm": "fuse",
    "count_macs": "profile",
    "count_parameters": "profile",
    "ARCHITECTURES": "architectures",
    "BACKGROUND_CHANNELS": "architectures",
    "ArchitectureSpec": "architectures",
    "UnknownArchitectureError": "architectures",
    "build_network": "architectures",
    "fold_logits": "architectures",
    "get_spec": "architectures",
    "tap_paths": "architectures",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAMES",
    "BACKGROUND_CHANNELS",
    "TAP_NAMES",
    "ArchitectureSpec",
    "SegmentationNet",
    "UnknownArchitectureError",
    "build_network",
    "count_macs",
    "count_parameters",
    "fold_batchnorm",
    "fold_logits",
    "get_spec",
    "tap_paths",
]
