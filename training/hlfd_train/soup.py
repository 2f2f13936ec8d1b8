"""Weight averaging of model packages (a "model soup", Wortsman et al., ICML 2022).

Students fine-tuned from one starting point stay in one basin of the loss, and the mean of
their weights is often better than each of them, above all on data unlike the training data,
at no cost in training or inference. The soup keeps the first package's card (labels,
pre-processing, inference settings) and records its ingredients. Where the first package is
fed neighbour slices (``context_slices``, 2.5D), an ingredient fed fewer is lifted first (its
neighbour weights are zero: the same function), so a 2.5D fine-tune can be averaged with the
one-slice model it started from. Calibrate the soup afterwards
(``hlfd-train calibrate --write``): the thresholds of the first package were chosen for other
weights.

A weighted soup (``--weights 0.25 0.75``) interpolates between ingredients, e.g. toward a
fine-tune whose gains a plain mean halves.

    hlfd-train soup OUT PKG PKG [PKG ...] [--weights W W ...] [--version V] [--name N] ...
"""

from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.modelpackage import (
    CARD_NAME,
    ONNX_NAME,
    ModelPackage,
    load_package,
    save_package,
)
from HLFDSegmentLib.nets import BACKGROUND_CHANNELS

from .cards import code_version, lifted_state, package_from_state, widened_state
from .export import onnx_for

SAME = ("task", "network", "labels", "preprocessing")  # card fields every ingredient shares
OTHER_DATA = "; the other ingredients': provenance.ingredients"
WEIGHTS = " Weights: the "  # the description's soup sentence starts here


def _pipeline(card: dict) -> dict:
    """The card fields every ingredient shares, input depth and extra background classes left
    out (an ingredient with fewer is lifted or widened to the first's)."""
    same = copy.deepcopy({field: card[field] for field in SAME})
    same["network"].pop("in_channels")
    same["network"].get("kwargs", {}).pop(BACKGROUND_CHANNELS, None)
    same["preprocessing"].pop("context_slices", None)
    return same


def _background_channels(card: dict) -> int:
    return int((card["network"].get("kwargs") or {}).get(BACKGROUND_CHANNELS, 0))


def mean_state(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Element-wise (weighted) mean of floating-point tensors (in float64, stored in each
    tensor's dtype); integer tensors such as BatchNorm's step counters come from the first state.
    ``weights``: one per state, summing to 1 (None: equal)."""

    def mean(k: str) -> torch.Tensor:
        stacked = torch.stack([s[k].double() for s in states])
        if weights is None:
            return stacked.mean(0)
        return torch.einsum("i,i...->...", torch.tensor(weights, dtype=torch.float64), stacked)

    return {
        k: mean(k).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in states[0].items()
    }


def check_weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    """One finite, non-negative weight per package, summing to 1 (within 1e-6), or None."""
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ModelError(f"soup --weights: {len(weights)} weights for {n} packages; give one each")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ModelError(f"soup --weights: non-negative numbers summing to 1, got {weights}")
    return weights


def soup(
    packages: Sequence[Path],
    out: Path,
    *,
    version: str | None = None,
    card_fields: dict[str, str] | None = None,
    weights: Sequence[float] | None = None,
) -> Path:
    """Write the package whose weights are the mean of ``packages``' (two or more, of one
    network and pipeline; ``weights``: one per package, summing to 1, None: equal); it gets an
    ONNX graph where the first package has one. ``card_fields`` (name, title, description)
    replace the first package's."""
    from safetensors.torch import load as load_safetensors

    if len(packages) < 2:
        raise ModelError("soup: give two or more model packages to average")
    weights = check_weights(weights, len(packages))
    if any(Path(out).resolve() == Path(p).resolve() for p in packages):
        raise ModelError(f"{out}: is one of the packages to average; write the soup elsewhere")
    loaded = [load_package(p) for p in packages]
    base = loaded[0]
    states, shared = [], _pipeline(base.card)
    for package in loaded:
        own = _pipeline(package.card)
        for field in SAME:
            if own[field] != shared[field]:
                raise ModelError(
                    f"{package.path / CARD_NAME}: field {field!r} differs from that of "
                    f"{base.path}; only packages of one network and pipeline can be averaged"
                )
        channels = package.card["network"]["in_channels"]
        if channels > base.card["network"]["in_channels"]:
            raise ModelError(
                f"{package.path / CARD_NAME}: fed more slices ({channels} input channels) than "
                f"{base.path}; put the package with the most context_slices first"
            )
        extra = _background_channels(package.card)
        if extra > _background_channels(base.card):
            raise ModelError(
                f"{package.path / CARD_NAME}: learnt more extra classes ({extra} "
                f"background_channels) than {base.path}; put the package with the most first"
            )
        state = load_safetensors(package.weights)
        if states:
            state = widened_state(lifted_state(state, states[0]), states[0])
        if states and _layout(state) != _layout(states[0]):
            raise ModelError(
                f"{package.path / base.card['weights']}: tensor names or shapes differ from "
                f"those of {base.path}"
            )
        states.append(state)
    card = copy.deepcopy(base.card)
    card.pop("onnx", None)  # made again below; the run times stay (same network, same pipeline)
    card["metrics"] = {}  # the first package's figures are not the soup's
    card["version"] = version or f"{base.version}+soup{len(loaded)}"
    described = card.get("description", "").split(WEIGHTS)[0]  # a soup of a soup: once
    mean = "weighted mean" if weights else "mean"
    card["description"] = (
        f"{described}{WEIGHTS}{mean} of {len(loaded)} packages "
        "fine-tuned from one start (provenance.ingredients)."
    ).strip()
    card.update(card_fields or {})
    card["provenance"] = {
        **card["provenance"],
        "method": f"weight average of {len(loaded)} packages",
        "ingredients": [_ingredient(p, w) for p, w in zip(loaded, weights or [None] * len(loaded))],
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    data = [p.card["provenance"].get("data") for p in loaded]
    if data[0] and len(set(data)) > 1:
        first = data[0].split(OTHER_DATA)[0]  # a soup of a soup says it once
        card["provenance"]["data"] = f"{first}{OTHER_DATA}"
    state = mean_state(states, weights)
    extra = {}
    if base.card.get("onnx"):  # made before anything is written: a failed check writes nothing
        card, extra[ONNX_NAME] = onnx_for(package_from_state(card, state, Path(out)))
    return save_package(out, card, state, extra)


def _ingredient(package: ModelPackage, weight: float | None = None) -> dict:
    """What the soup's card says of one ingredient (with its ``weight`` in a weighted soup);
    an inner soup keeps its own ingredients."""
    provenance = package.card["provenance"]
    entry = {
        "name": package.name,
        "version": package.version,
        "run": provenance.get("run"),
        "method": provenance.get("method"),
        "data": provenance.get("data"),
        "sha256": package.card["files"][package.card["weights"]]["sha256"],
    }
    if weight is not None:
        entry["weight"] = weight
    if provenance.get("ingredients"):
        entry["ingredients"] = provenance["ingredients"]
    return entry


def _layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], bool]]:
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}
