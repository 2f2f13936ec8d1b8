"""What a run's network is: its label set, its model card and its in-memory model package.

Training validation, evaluation and export all build the card here, so the runtime pipeline
that measures a network during training is configured exactly as the exported package is.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.modelpackage import ModelPackage, make_card, standard_labels

N_CLASSES = {"organ+tumour": 3, "tumour": 2, "organ": 2}


def labels_for(task: str, labelset: str) -> list[dict[str, Any]]:
    """The card's label entries of ``labelset`` (values 1..n, SNOMED coded)."""
    organ, tumour = standard_labels(task)
    if labelset == "organ+tumour":
        return [organ, tumour]
    if labelset == "organ":
        return [organ]
    tumour = {k: v for k, v in tumour.items() if k != "inside"}
    return [{**tumour, "value": 1}]


def preprocessing_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run's preprocessing: the runtime default with the config's overrides."""
    from .data import default_preprocessing

    dims = cfg["model"]["spatial_dims"]
    return {
        **default_preprocessing(cfg["data"]["task"], dims),
        **copy.deepcopy(cfg["data"]["preprocessing"]),
    }


def input_channels(cfg: Mapping[str, Any]) -> int:
    """The networks' input channels: 2k + 1 for ``data.preprocessing.context_slices`` = k."""
    from HLFDSegmentLib.pipeline import context_slices

    return 2 * context_slices(cfg["data"]["preprocessing"]) + 1


def lifted_state(
    state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` of a network fed fewer slices (odd channel counts, e.g. 1) made to fit ``like``,
    the same network fed more: each input-convolution weight goes to the centre channels and
    the extra neighbour channels are zero, so the lifted network computes exactly what the
    narrower one did. Tensors of matching shape pass unchanged."""
    out = {}
    for key, value in state.items():
        want = like.get(key)
        if (
            want is not None
            and value.ndim == want.ndim >= 3
            and value.shape[1] < want.shape[1]
            and (want.shape[1] - value.shape[1]) % 2 == 0
            and want.shape[:1] + want.shape[2:] == value.shape[:1] + value.shape[2:]
        ):
            start = (want.shape[1] - value.shape[1]) // 2
            wide = torch.zeros(want.shape, dtype=value.dtype)
            wide[:, start : start + value.shape[1]] = value
            value = wide
        out[key] = value
    return out


def widened_state(
    state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], bias: float = -4.0
) -> dict[str, torch.Tensor]:
    """``state`` of a network made to fit ``like``, the same network with extra output channels
    (``background_channels``): each new channel of the output layer starts as a copy of the
    background channel with its bias ``bias`` lower, so that, folded into background, the wider
    network computes what the narrower one did within ``log(1 + k e^bias)`` (0.018 for one
    channel at -4). Tensors of matching shape pass unchanged."""
    out = {}
    for key, value in state.items():
        want = like.get(key)
        if (
            want is not None
            and value.ndim == want.ndim >= 1
            and value.shape[0] < want.shape[0]
            and value.shape[1:] == want.shape[1:]
        ):
            extra = want.shape[0] - value.shape[0]
            rows = value[:1].repeat(extra, *([1] * (value.ndim - 1)))
            if value.ndim == 1:
                rows = rows + bias
            value = torch.cat([value, rows.to(value.dtype)])
        out[key] = value
    return out


def code_version() -> str:
    """``git describe`` of the source tree, else the package version."""
    from HLFDSegmentLib import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def card_for(
    cfg: Mapping[str, Any],
    role: str,
    preprocessing: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Model card of the run's ``role`` network ("teacher" | "student")."""
    net = cfg["model"][role]
    dims = cfg["model"]["spatial_dims"]
    inference = {}
    if dims == 3:
        inference = {"roi_size": list(cfg["data"]["patch"])}
    return make_card(
        name=str(cfg["name"]).replace("/", "-").replace(" ", "-"),
        version="0.1.0",
        task=cfg["data"]["task"],
        architecture=net["architecture"],
        spatial_dims=dims,
        labels=labels_for(cfg["data"]["task"], cfg["data"]["labelset"]),
        network_kwargs=net["kwargs"],
        preprocessing=preprocessing or preprocessing_of(cfg),
        inference=inference,
        provenance={
            "method": cfg["distill"]["method"] if role == "student" else "none (teacher)",
            "seed": cfg["seed"],
            "code_version": code_version(),
            **(provenance or {}),
        },
        **extra,
    )


def package_from_state(
    card: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: Path
) -> ModelPackage:
    """An in-memory model package (what ``load_package`` would give after ``save_package``)."""
    return ModelPackage(
        path=Path(where), card=copy.deepcopy(dict(card)), weights=state_bytes(state)
    )


def state_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of a state dict (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (never a pickle)."""
    from safetensors.torch import load

    data = Path(path).read_bytes()
    try:
        return load(data)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a safetensors weight file ({reason})") from None
