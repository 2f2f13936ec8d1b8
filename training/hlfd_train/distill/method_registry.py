"""Registry of distillation methods and the :class:`DistillMethod` base class.

A method is an ``nn.Module`` built once from the channel counts of the taps it uses; its
trainable adapters (1x1 projections, auxiliary heads) are registered submodules, so the
optimizer trains them, and they belong to the student side (never exported, never applied to
a teacher tensor). ``forward`` returns a dict of named, already-weighted loss terms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

METHODS: dict[str, type[DistillMethod]] = {}


def register_method(name: str) -> Callable[[type[DistillMethod]], type[DistillMethod]]:
    """Class decorator: register a :class:`DistillMethod` subclass under ``name``."""

    def decorator(cls: type[DistillMethod]) -> type[DistillMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"distillation method {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
            raise TypeError(f"register_method({name!r}) needs a DistillMethod subclass")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def method_defaults(name: str) -> dict[str, Any]:
    """Default configuration of a registered method."""
    return dict(_lookup(name).defaults)


def _lookup(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        raise ValueError(
            f"unknown distillation method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def build_method(
    name: str,
    teacher_channels: Mapping[str, int],
    student_channels: Mapping[str, int],
    spatial_dims: int,
    **cfg: Any,
) -> DistillMethod:
    """Instantiate method ``name`` for the given tap channel counts (from ``probe_channels``).

    Channel dicts may hold ``"out"`` (logit channels); methods that need the class count take
    it from there unless configured. Unknown method or config key -> ValueError naming it.
    """
    return _lookup(name)(teacher_channels, student_channels, spatial_dims, **cfg)


def _coerce(method: str, key: str, default: Any, value: Any) -> Any:
    """Check a config value against the type of its default; lists become tuples."""
    bad = ValueError(
        f"distillation method {method!r}: config key {key!r} = {value!r} "
        f"should be like its default {default!r}"
    )
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, tuple):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise bad
        if not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    return value


class MissingTapError(ValueError):
    """A method needs a tap (feature) that the network does not provide."""

    def __init__(self, method: str, side: str, tap: str, known: list[str]):
        self.method, self.side, self.tap, self.known = method, side, tap, known
        super().__init__(
            f"distillation method {method!r}: no channel count for {side} tap {tap!r} "
            f"(known: {', '.join(known) or 'none'})"
        )


class DistillMethod(nn.Module):
    """Base class of every distillation method.

    Subclasses set ``defaults`` (every accepted config key with its default), build their
    adapters in ``__init__`` and implement :meth:`required_taps` and :meth:`compute`.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        teacher_channels: Mapping[str, int],
        student_channels: Mapping[str, int],
        spatial_dims: int,
        **cfg: Any,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"distillation method {self.name!r}: spatial_dims must be 2 or 3")
        unknown = sorted(set(cfg) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"distillation method {self.name!r}: unknown config key {unknown[0]!r}; "
                f"accepted keys: {', '.join(sorted(self.defaults)) or '(none)'}"
            )
        self.config: dict[str, Any] = {
            k: _coerce(self.name, k, d, cfg[k]) if k in cfg else d for k, d in self.defaults.items()
        }
        self.spatial_dims = spatial_dims
        self.teacher_channels = dict(teacher_channels)
        self.student_channels = dict(student_channels)

    # -- helpers for subclasses -------------------------------------------------------------
    def channels(self, side: str, tap: str) -> int:
        """Channel count of ``tap`` on ``side`` ("student" | "teacher"); ValueError if unknown."""
        table = self.student_channels if side == "student" else self.teacher_channels
        if tap not in table:
            raise MissingTapError(self.name, side, tap, sorted(table))
        return int(table[tap])

    def conv1x1(self, in_channels: int, out_channels: int) -> nn.Module:
        """A 1x1 (or 1x1x1) convolution for the method's spatial dims."""
        conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
        return conv(in_channels, out_channels, kernel_size=1)

    def positive(self, *keys: str) -> None:
        """ValueError unless every named config value is > 0."""
        for key in keys:
            if not self.config[key] > 0:
                raise ValueError(f"distillation method {self.name!r}: {key!r} must be > 0")

    def non_negative(self, *keys: str) -> None:
        """ValueError unless every named config value is >= 0."""
        for key in keys:
            if self.config[key] < 0:
                raise ValueError(f"distillation method {self.name!r}: {key!r} must be >= 0")

    # -- public contract --------------------------------------------------------------------
    def required_taps(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(student_taps, teacher_taps)`` whose features :meth:`forward` needs."""
        return (), ()

    def needs_logits(self) -> bool:
        """Whether :meth:`forward` uses the student and teacher logits."""
        return False

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named, already-weighted loss terms; teacher tensors are detached first."""
        s_taps, t_taps = self.required_taps()
        nd = self.spatial_dims + 2
        for side, taps, feats in (("student", s_taps, student), ("teacher", t_taps, teacher)):
            for tap in taps:
                if tap not in feats:
                    raise ValueError(
                        f"distillation method {self.name!r}: missing {side} tap {tap!r}"
                    )
                if feats[tap].ndim != nd:
                    raise ValueError(
                        f"distillation method {self.name!r}: {side} tap {tap!r} has shape "
                        f"{tuple(feats[tap].shape)}, expected {nd} dims for spatial_dims="
                        f"{self.spatial_dims}"
                    )
        if self.needs_logits():
            for side, logits in (("student", student_logits), ("teacher", teacher_logits)):
                if logits is None or logits.ndim != nd:
                    shape = None if logits is None else tuple(logits.shape)
                    raise ValueError(
                        f"distillation method {self.name!r}: {side} logits {shape} must be a "
                        f"{nd}-dim tensor"
                    )
        teacher_d = {k: teacher[k].detach() for k in t_taps}
        student_d = {k: student[k] for k in s_taps}
        t_logits = teacher_logits.detach() if teacher_logits is not None else None
        return self.compute(student_d, teacher_d, student_logits, t_logits)

    def compute(
        self,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
        student_logits: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms from validated inputs (teacher already detached)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, spatial_dims={self.spatial_dims}, config={self.config}"
