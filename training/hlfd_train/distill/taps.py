"""Forward-hook feature capture ("taps") on named module paths of any ``nn.Module``.

A tap maps a logical name (``e1`` .. ``e5``, ``d5`` .. ``d2``, ``out`` or anything else) to a
dotted module path (``encoder.layer2``, ``model.1.submodule``; ``""`` is the model itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def resolve_module(model: nn.Module, path: str, *, tap: str = "") -> nn.Module:
    """Return the submodule at dotted ``path``; ValueError naming the path when it is absent."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        where = f"tap {tap!r}: " if tap else ""
        raise ValueError(
            f"{where}module path {path!r} does not exist in {type(model).__name__}"
        ) from exc


class FeatureTaps:
    """Context manager that records the outputs of named submodules during forward passes.

    ``features`` holds the outputs of the last forward (a new forward overwrites them).
    With ``detach=True`` the stored tensors are detached (use it for the teacher, whose
    forward should also run under ``torch.no_grad()``).
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str], *, detach: bool = False):
        self.model = model
        self.taps = dict(taps)
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        # Resolve now so that a wrong path fails before any forward is run.
        self._modules = {
            name: resolve_module(model, path, tap=name) for name, path in self.taps.items()
        }

    def _hook(self, name: str):
        path = self.taps[name]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"tap {name!r} (module path {path!r}) returned {type(output).__name__}, "
                    "expected a Tensor; tap a submodule that outputs one tensor"
                )
            self.features[name] = output.detach() if self.detach else output

        return hook

    def __enter__(self) -> FeatureTaps:
        if self._handles:
            raise RuntimeError("FeatureTaps is already active")
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget the stored features (e.g. to free memory between steps)."""
        self.features = {}

    def collect(self) -> dict[str, torch.Tensor]:
        """Features of the last forward; ValueError naming any tap whose module did not run."""
        missing = [n for n in self.taps if n not in self.features]
        if missing:
            paths = ", ".join(f"{n!r} ({self.taps[n]!r})" for n in missing)
            raise ValueError(f"taps not reached by the forward pass: {paths}")
        return dict(self.features)


def run_with_taps(
    model: nn.Module, taps: Mapping[str, str], x: torch.Tensor, *, teacher: bool = False
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward of ``model`` on ``x``; returns ``(output, features)``.

    ``teacher=True`` runs under ``torch.no_grad()`` and detaches output and features.
    """
    with FeatureTaps(model, taps, detach=teacher) as ft:
        if teacher:
            with torch.no_grad():
                out = model(x)
            out = out.detach() if isinstance(out, torch.Tensor) else out
        else:
            out = model(x)
        return out, ft.collect()


def probe_channels(
    model: nn.Module, taps: Mapping[str, str], example_input: torch.Tensor
) -> dict[str, int]:
    """Channel count (dim 1) of every tap, from one no-grad forward in eval mode.

    The model's training flag is restored afterwards, so BatchNorm statistics are untouched.
    """
    was_training = model.training
    model.eval()
    try:
        _, feats = run_with_taps(model, taps, example_input, teacher=True)
    finally:
        model.train(was_training)
    for name, t in feats.items():
        if t.ndim < 3:
            raise ValueError(
                f"tap {name!r} ({taps[name]!r}) has shape {tuple(t.shape)}: "
                "expected (N, C, *spatial)"
            )
    return {name: int(t.shape[1]) for name, t in feats.items()}
