"""The network architectures by name: builders, argument checking, declared taps."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import check_channels
from .mobilenet_unet import MobileNetV2UNet
from .names import ARCHITECTURE_NAMES
from .resnet_unet import ResNetUNet
from .unet2d import TinyUNet
from .unetpp import UNetPlusPlus

_FIXED = ("spatial_dims", "in_channels", "out_channels")
# every architecture's extra argument: classes learnt in training that count as background
BACKGROUND_CHANNELS = "background_channels"


class UnknownArchitectureError(ValueError):
    """An architecture name that is not in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """One registered architecture.

    Attributes:
        name: registry key.
        builder: ``builder(spatial_dims, in_channels, out_channels, **kwargs) -> nn.Module``.
        spatial_dims: allowed dimensionalities; the first is the default.
        description: one line for listings.
        kwargs: names of the accepted keyword arguments (resolved on first use).
    """

    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    description: str
    accepted: Callable[[], tuple[str, ...]] = field(repr=False, compare=False)

    @property
    def kwargs(self) -> tuple[str, ...]:
        return self.accepted()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"field {name!r}: expected a positive integer, got {value!r}")
    return value


def _tiny_unet(spatial_dims: int, in_channels: int, out_channels: int, base: int = 16) -> nn.Module:
    return TinyUNet(in_channels, out_channels, _positive_int("base", base))


def _resnet18_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> nn.Module:
    channels = check_channels("decoder_channels", decoder_channels, 5)
    return ResNetUNet(in_channels, out_channels, "resnet18", channels)


def _unetpp(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    encoder: str = "resnet34",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> nn.Module:
    channels = check_channels("decoder_channels", decoder_channels, 5)
    return UNetPlusPlus(in_channels, out_channels, encoder, channels)


def _mobilenet_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    width: float = 1.0,
    decoder_channels: tuple[int, ...] = (96, 32, 24, 16),
) -> nn.Module:
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.1 <= width <= 4:
        raise ValueError(f"field 'width': expected a number in [0.1, 4], got {width!r}")
    channels = check_channels("decoder_channels", decoder_channels, 4)
    return MobileNetV2UNet(in_channels, out_channels, float(width), channels)


def _monai_class(name: str) -> type[nn.Module]:
    """MONAI is imported on first use only (it adds ~1.4 s to the import of this package)."""
    return getattr(importlib.import_module(f"{__package__}.monai3d"), name)


def _monai_builder(cls_name: str) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        return _monai_class(cls_name)(spatial_dims, in_channels, out_channels, **kwargs)

    return build


def _accepted(fn: Callable[..., Any], forbidden: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Keyword names ``fn`` takes (following ``**kwargs`` into MONAI base classes)."""
    names: list[str] = []
    targets: list[Callable[..., Any]] = [fn]
    if isinstance(fn, type):
        targets = [
            c.__init__ for c in fn.__mro__ if c.__module__.startswith(("monai", __package__))
        ]
    for target in targets:
        for p in inspect.signature(target).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
    drop = {"self", *_FIXED, *forbidden}
    return tuple(n for n in names if n not in drop)


def _spec(
    name: str,
    builder: Callable[..., nn.Module],
    dims: tuple[int, ...],
    description: str,
    accepts: Callable[[], Any] | str,
    forbidden: tuple[str, ...] = (),
) -> tuple[str, ArchitectureSpec]:
    """``accepts``: the function whose signature lists the kwargs, or a MONAI class name."""

    @functools.cache
    def accepted() -> tuple[str, ...]:
        target = _monai_class(accepts) if isinstance(accepts, str) else accepts
        return _accepted(target, forbidden)

    return name, ArchitectureSpec(name, builder, dims, description, accepted)


ARCHITECTURES: dict[str, ArchitectureSpec] = dict(
    [
        _spec(
            "unetpp2d",
            _unetpp,
            (2,),
            "2D UNet++ (nested dense skips) on a ResNet-34/18 encoder; the teacher",
            _unetpp,
        ),
        _spec(
            "resnet18_unet2d",
            _resnet18_unet,
            (2,),
            "2D U-Net on a ResNet-18 encoder; the paper's student",
            _resnet18_unet,
        ),
        _spec(
            "mobilenetv2_unet2d",
            _mobilenet_unet,
            (2,),
            "2D U-Net on a MobileNetV2 encoder, light decoder; the fast CPU student",
            _mobilenet_unet,
        ),
        _spec(
            "tiny_unet2d",
            _tiny_unet,
            (2,),
            "plain five-level 2D U-Net, `base` channels at full resolution",
            _tiny_unet,
        ),
        _spec(
            "monai_unet3d",
            _monai_builder("MonaiUNet"),
            (3, 2),
            "MONAI UNet, channels 16..256, strides 2",
            "MonaiUNet",
        ),
        _spec(
            "monai_segresnet3d",
            _monai_builder("MonaiSegResNet"),
            (3, 2),
            "MONAI SegResNet, init_filters 16, blocks_down (1, 2, 2, 4)",
            "MonaiSegResNet",
            ("use_conv_final",),
        ),
        _spec(
            "monai_dynunet3d",
            _monai_builder("MonaiDynUNet"),
            (3, 2),
            "MONAI DynUNet (nnU-Net-like), six levels, filters 32..320, no deep supervision",
            "MonaiDynUNet",
            ("deep_supervision", "deep_supr_num"),
        ),
    ]
)

if tuple(ARCHITECTURES) != ARCHITECTURE_NAMES:
    raise RuntimeError("nets/names.py ARCHITECTURE_NAMES must list the registry's architectures")


def _as_tuples(value: Any) -> Any:
    """JSON gives lists; the constructors expect tuples."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def get_spec(architecture: str) -> ArchitectureSpec:
    """The spec of ``architecture``, or :class:`UnknownArchitectureError`."""
    spec = ARCHITECTURES.get(architecture) if isinstance(architecture, str) else None
    if spec is None:
        raise UnknownArchitectureError(
            f"unknown architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    return spec


def build_network(
    architecture: str,
    spatial_dims: int | None,
    in_channels: int,
    out_channels: int,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered network with freshly initialised weights (train mode, CPU, fp32).

    ``spatial_dims=None`` takes the architecture's default. Raises
    :class:`UnknownArchitectureError` for an unknown name and ``ValueError`` naming the field
    for a wrong ``spatial_dims``, channel count or keyword argument.
    """
    spec = get_spec(architecture)
    where = f"architecture {architecture!r}"
    if spatial_dims is None:
        spatial_dims = spec.spatial_dims[0]
    if spatial_dims not in spec.spatial_dims or isinstance(spatial_dims, bool):
        allowed = " or ".join(str(d) for d in spec.spatial_dims)
        raise ValueError(f"{where}: field 'spatial_dims' must be {allowed}, got {spatial_dims!r}")
    try:
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    kwargs = dict(kwargs)
    extra = kwargs.pop(BACKGROUND_CHANNELS, 0)
    if extra != 0:
        try:
            _positive_int(BACKGROUND_CHANNELS, extra)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    unknown = sorted(set(kwargs) - set(spec.kwargs))
    if unknown:
        raise ValueError(
            f"{where}: unknown argument(s) {', '.join(repr(u) for u in unknown)} "
            f"(accepted: {', '.join(spec.kwargs) or 'none'})"
        )
    args = {k: _as_tuples(v) for k, v in kwargs.items()}
    try:
        net = spec.builder(spatial_dims, in_channels, out_channels + extra, **args)
    except (ValueError, TypeError, AssertionError, KeyError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if extra:
        net.background_channels = extra
        net.register_forward_hook(fold_background)
    return net


def fold_background(net: nn.Module, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook of a network built with ``background_channels=k``: its last ``k`` output
    channels are classes learnt in training (the spleen beside a kidney, say) that the task
    counts as background. In training mode the raw ``out_channels + k`` logits pass; in eval
    mode (inference, export) they are folded (:func:`fold_logits`)."""
    return logits if net.training else fold_logits(logits, net.background_channels)


def fold_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The last ``k`` channels of ``logits`` joined to channel 0 as ``log(sum(exp))``: the
    softmax of the result is the softmax of all, their probabilities added to background's."""
    background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, -k:]], 1), 1, keepdim=True)
    return torch.cat([background, logits[:, 1:-k]], 1)


def tap_paths(net: nn.Module) -> dict[str, str]:
    """Tap name -> dotted module path declared by ``net`` (empty for a net that declares none)."""
    return dict(getattr(net, "taps", {}))
