"""Model packages: a folder or ``.zip`` holding ``model.json`` (the card) and safetensors weights.

Loading never unpickles anything: weights are parsed by ``safetensors``, every file listed in
the card is checked against its sha256 and size, and zip members are read in memory (a member
name that is absolute or climbs with ``..`` is refused, so nothing is ever extracted).
Every refusal is a :class:`ModelError` whose message names the file and the field.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema

from .atomic import atomic_folder
from .errors import ModelError

CARD_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
SCHEMA_PATH = (
    Path(__file__).resolve().parents[1] / "Resources" / "Schemas" / "model-card.schema.json"
)
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}

# SNOMED CT codes (coding scheme designator "SCT"), as used by DICOM SEG and Slicer terminologies.
_ANATOMY = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
_ALTERED = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}
_NEOPLASM = {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"}
_ORGANS = {
    "kidney": ({"scheme": "SCT", "code": "64033007", "meaning": "Kidney"}, (185, 102, 83), 2),
    "liver": ({"scheme": "SCT", "code": "10200004", "meaning": "Liver"}, (221, 130, 101), 1),
}


def standard_labels(task: str) -> list[dict[str, Any]]:
    """Label entries for ``task`` ("kidney" | "liver"): 1 organ, 2 tumour (KiTS / LiTS values)."""
    if task not in _ORGANS:
        raise ModelError(f"unknown task {task!r}: expected one of {sorted(_ORGANS)}")
    organ, colour, components = _ORGANS[task]
    name = organ["meaning"]
    return [
        {
            "value": 1,
            "name": name,
            "color": list(colour),
            "terminology": {"category": _ANATOMY, "type": organ},
            "keep_largest": components,
        },
        {
            "value": 2,
            "name": f"{name} tumor",
            "color": [255, 210, 0],
            "terminology": {"category": _ALTERED, "type": _NEOPLASM, "region": organ},
            "inside": 1,
        },
    ]


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_card(card: Any, where: str = CARD_NAME) -> None:
    """Check ``card`` against the JSON schema and the cross-field rules; raise one clear line."""
    errors = sorted(_validator().iter_errors(card), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ModelError(f"{where}: field '{path}': {err.message}")
    values = [lab["value"] for lab in card["labels"]]
    if values != list(range(1, len(values) + 1)):
        raise ModelError(
            f"{where}: field 'labels': values must be 1..{len(values)} in order, got {values}"
        )
    out = card["network"]["out_channels"]
    if out != len(values) + 1:
        raise ModelError(
            f"{where}: field 'network/out_channels' is {out} but {len(values)} labels + background "
            f"need {len(values) + 1} output channels"
        )
    for lab in card["labels"]:
        parent = lab.get("inside")
        if parent is not None and parent not in values:
            raise ModelError(
                f"{where}: field 'labels/{lab['value'] - 1}/inside': no label {parent}"
            )
    if card["weights"] not in card["files"]:
        raise ModelError(
            f"{where}: field 'files': weights file {card['weights']!r} has no checksum"
        )
    if card.get("onnx") and card["onnx"] not in card["files"]:
        raise ModelError(f"{where}: field 'files': ONNX file {card['onnx']!r} has no checksum")
    _check_sense(card, where)
    spatial = card["network"]["spatial_dims"]
    context = int(card["preprocessing"].get("context_slices", 0))
    if context and spatial != 2:
        raise ModelError(f"{where}: field 'preprocessing/context_slices': 2D networks only")
    if card["network"]["in_channels"] != 2 * context + 1:
        raise ModelError(
            f"{where}: field 'network/in_channels' is {card['network']['in_channels']} but "
            f"{context} context slice(s) on each side need {2 * context + 1} input channels"
        )
    if spatial == 3 and "roi_size" not in card["inference"]:
        raise ModelError(f"{where}: field 'inference/roi_size' is required for a 3D network")
    from .nets import ARCHITECTURE_NAMES  # torch-free: the ONNX path never imports torch

    arch = card["network"]["architecture"]
    if arch not in ARCHITECTURE_NAMES:
        raise ModelError(
            f"{where}: field 'network/architecture': unknown architecture {arch!r} "
            f"(known: {', '.join(sorted(ARCHITECTURE_NAMES))})"
        )


MAX_TTA_FLIPS = 7  # every non-empty subset of three axes
MAX_MIN_ISLAND_ML = 50.0


def _check_sense(card: Mapping[str, Any], where: str) -> None:
    """Values the schema's types allow but no model can mean: one line naming the field."""

    def bad(field: str, problem: str) -> ModelError:
        return ModelError(f"{where}: field '{field}': {problem}")

    for i, lab in enumerate(card["labels"]):
        name = str(lab.get("name", ""))
        if not name.strip() or any(ch in name for ch in "\r\n\t") or len(name) > 64:
            raise bad(f"labels/{i}/name", f"{name!r} is not a one-line segment name (1-64 chars)")
    pre = card["preprocessing"]
    window = pre.get("window")
    if window is not None and not (
        len(window) == 2 and all(map(math.isfinite, window)) and window[0] < window[1]
    ):
        raise bad("preprocessing/window", f"{window} needs finite low < high")
    for axis, v in enumerate(pre.get("spacing") or []):
        if v is not None and not (math.isfinite(v) and 0.05 <= v <= 50):
            raise bad(f"preprocessing/spacing/{axis}", f"{v} mm is outside 0.05-50 mm")
    norm = pre.get("normalize") or {}
    std = norm.get("std")
    if std is not None and not (math.isfinite(std) and std >= 1e-3):
        raise bad("preprocessing/normalize/std", f"{std} would blow up the intensities")
    flips = card["inference"].get("tta_flips", [])
    if len(flips) > MAX_TTA_FLIPS:
        raise bad("inference/tta_flips", f"{len(flips)} flips; at most {MAX_TTA_FLIPS}")
    for key in ("logit_offsets", "seed_offsets"):
        offsets = card["inference"].get(key)
        if offsets is not None and len(offsets) != len(card["labels"]) + 1:
            n = len(card["labels"]) + 1
            raise bad(f"inference/{key}", f"{len(offsets)} numbers for {n} classes")
        if offsets is not None and not all(math.isfinite(v) and abs(v) <= 20 for v in offsets):
            raise bad(f"inference/{key}", f"{offsets}: each must be finite, within +-20")
    island = card["postprocessing"].get("min_island_ml", 0.0)
    if not (math.isfinite(island) and 0 <= island <= MAX_MIN_ISLAND_ML):
        raise bad("postprocessing/min_island_ml", f"{island} mL is outside 0-{MAX_MIN_ISLAND_ML:g}")


class _Source:
    """Read-only access to the files of a package folder or zip, confined to the package."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: dict[str, zipfile.ZipInfo] | None = None
        if path.is_file():
            _refuse_pickle(path)
            if not zipfile.is_zipfile(path):
                raise ModelError(f"{path}: not a model package (expected a folder or a .zip)")
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                raise ModelError(
                    f"{path}: {len(infos)} members in the zip; a model package holds a few files "
                    f"(at most {MAX_ZIP_MEMBERS})"
                )
            self._zip = {}
            for info in infos:
                name = info.filename
                pure = PurePosixPath(name)
                if name.startswith(("/", "\\")) or ":" in pure.parts[0] or ".." in pure.parts:
                    raise ModelError(
                        f"{path}: unsafe member name {name!r} in zip (absolute or '..')"
                    )
                if not info.is_dir():
                    self._zip[str(pure)] = info
            self._prefix = _common_folder(list(self._zip))
            if any(n.endswith("data.pkl") for n in self._zip):
                raise ModelError(
                    f"{path}: this is a pickled torch checkpoint, not a model package; "
                    "refusing to unpickle it (export it with hlfd-train export)"
                )
        elif not path.is_dir():
            raise ModelError(f"{path}: no such model folder or file")

    def read(self, name: str, field_name: str = "files", size: int | None = None) -> bytes:
        """The bytes of ``name``; a file whose size differs from ``size`` (the card's) or that
        exceeds the card limit is refused before it is read (no zip bomb is inflated)."""
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise ModelError(
                f"{self.path / CARD_NAME}: field '{field_name}': path {name!r} "
                "points outside the package"
            )
        if self._zip is not None:
            key = str(PurePosixPath(self._prefix) / pure) if self._prefix else str(pure)
            if key not in self._zip:
                raise ModelError(f"{self.path}: missing file {name!r} (field '{field_name}')")
            _check_size(self.path / name, self._zip[key].file_size, size, field_name)
            try:
                with zipfile.ZipFile(self.path) as zf:
                    return zf.read(self._zip[key])
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise ModelError(f"{self.path}: member {name!r} is corrupt ({exc})") from None
        root = self.path.resolve()
        target = (root / pure).resolve()
        if root not in target.parents:
            raise ModelError(
                f"{self.path / CARD_NAME}: field '{field_name}': path {name!r} "
                "points outside the package"
            )
        if not target.is_file():
            raise ModelError(f"{self.path / name}: missing file (field '{field_name}')")
        _check_size(self.path / name, target.stat().st_size, size, field_name)
        return target.read_bytes()


MAX_ZIP_MEMBERS = 64
MAX_CARD_BYTES = 1 << 20


def _check_size(path: Path, actual: int, declared: int | None, field_name: str) -> None:
    limit = MAX_CARD_BYTES if declared is None else declared
    if (declared is None and actual > limit) or (declared is not None and actual != declared):
        said = f"the card says {declared} B" if declared is not None else f"limit {limit} B"
        raise ModelError(f"{path}: {actual} B ({said}; field '{field_name}'): refusing to read it")


def _common_folder(names: list[str]) -> str:
    """The single top-level folder of a zip made by zipping a folder, else ''."""
    if any(PurePosixPath(n).name == CARD_NAME and len(PurePosixPath(n).parts) == 1 for n in names):
        return ""
    tops = {PurePosixPath(n).parts[0] for n in names}
    return tops.pop() if len(tops) == 1 else ""


def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(1)
    if head == b"\x80" or (
        path.suffix.lower() in _PICKLE_SUFFIXES and not zipfile.is_zipfile(path)
    ):
        raise ModelError(
            f"{path}: looks like a pickle file; refusing to unpickle it "
            "(model packages carry safetensors weights)"
        )


_SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def safetensors_arrays(data: bytes) -> dict[str, tuple[Any, int]]:
    """Read-only numpy views of the tensors of safetensors ``data`` (numpy only, no torch), each
    with its byte offset in ``data``: ``{name: (array, offset)}``. Types other than those in
    the runtime's packages (bf16, int8, ...) are skipped."""
    import numpy as np

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in _SAFETENSORS_DTYPES:
            continue
        start, end = (8 + n + o for o in meta["data_offsets"])
        dtype = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]])
        array = np.frombuffer(data, dtype, (end - start) // dtype.itemsize, start)
        out[name] = (array.reshape(meta["shape"]), start)
    return out


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package: its card and the verified bytes of its weights (and of its
    ONNX graph when the card names one)."""

    path: Path
    card: dict[str, Any]
    weights: bytes = field(repr=False)
    onnx: bytes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return self.card["labels"]

    @property
    def spatial_dims(self) -> int:
        return self.card["network"]["spatial_dims"]

    def build_network(self):
        """The network with the package weights loaded (strict), in eval mode, on the CPU.
        Built on torch's meta device and checked against the weights' shapes first, so no
        memory is allocated for a wrong network and no random init is computed to be
        overwritten."""
        from safetensors.torch import load as load_safetensors

        net_cfg = self.card["network"]
        net = self._checked_meta_network()
        persistent = set(net.state_dict())
        if all(name in persistent for name, _ in net.named_buffers()):
            net = net.to_empty(device="cpu")  # every tensor is then set by the weights
        else:  # a non-persistent buffer gets its value from the constructor, not the file
            net = self._card_network()
        try:
            state = load_safetensors(self.weights)
        except Exception as exc:
            raise ModelError(
                f"{self.path / self.card['weights']}: unreadable safetensors ({exc})"
            ) from None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:2])
            raise ModelError(
                f"{self.path / self.card['weights']}: weights do not fit network "
                f"{net_cfg['architecture']!r}: {detail}"
            ) from None
        return net.eval()

    def _card_network(self):
        """The network the card describes, randomly initialised (on torch's current device)."""
        from .nets import build_network

        net_cfg = self.card["network"]
        try:
            return build_network(
                net_cfg["architecture"],
                net_cfg["spatial_dims"],
                net_cfg["in_channels"],
                net_cfg["out_channels"],
                **net_cfg.get("kwargs", {}),
            )
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{self.path / CARD_NAME}: field 'network': {exc}") from None

    def _checked_meta_network(self):
        """The card's network on torch's meta device, its tensor shapes compared with the
        weights' (from the safetensors header): a card asking for a huge network fails here,
        before any memory is allocated for it."""
        import torch

        net_cfg = self.card["network"]
        where = self.path / self.card["weights"]
        try:
            (n,) = struct.unpack("<Q", self.weights[:8])
            header = json.loads(self.weights[8 : 8 + n])
            shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (struct.error, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelError(f"{where}: unreadable safetensors header ({exc})") from None
        with torch.device("meta"):
            meta = self._card_network()
        for key, tensor in meta.state_dict().items():
            if key in shapes and shapes[key] != tuple(tensor.shape):
                raise ModelError(
                    f"{where}: weights do not fit network {net_cfg['architecture']!r} of the card "
                    f"(field 'network/kwargs'): {key} is {list(shapes[key])} in the file, "
                    f"{list(tensor.shape)} in the network"
                )
        return meta


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Open, validate and checksum a package folder or ``.zip``."""
    path = Path(path)
    src = _Source(path)
    raw = src.read(CARD_NAME, "model.json")
    where = str(path / CARD_NAME)
    try:
        card = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where}: not valid JSON ({exc})") from None
    validate_card(card, where)
    blobs = {}
    for name, meta in card["files"].items():
        data = src.read(name, f"files/{name}", meta["size"])
        if len(data) != meta["size"] or sha256_bytes(data) != meta["sha256"]:
            raise ModelError(
                f"{path / name}: sha256/size mismatch with {CARD_NAME} "
                f"(expected {meta['sha256'][:12]}…, {meta['size']} B; got "
                f"{sha256_bytes(data)[:12]}…, {len(data)} B): file altered or corrupt"
            )
        blobs[name] = data
    onnx = blobs[card["onnx"]] if card.get("onnx") else None
    return ModelPackage(path=path, card=card, weights=blobs[card["weights"]], onnx=onnx)


def make_card(
    *,
    name: str,
    version: str,
    task: str,
    architecture: str,
    spatial_dims: int,
    labels: list[dict[str, Any]] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    license: str = "Apache-2.0",
    **extra: Any,
) -> dict[str, Any]:
    """A card with sensible defaults for a CT kidney/liver model (files are filled by save)."""
    labels = copy.deepcopy(labels) if labels is not None else standard_labels(task)
    pre = {
        "orientation": "LPS",
        "spacing": [1.5, 1.5, None if spatial_dims == 2 else 1.5],
        "window": [-200.0, 300.0],
        "normalize": {"mode": "minmax"},
    }
    infer: dict[str, Any] = (
        {"slice_batch": 16, "bf16_cpu": True}
        if spatial_dims == 2
        else {"roi_size": [96, 96, 96], "overlap": 0.25, "sw_batch_size": 2, "bf16_cpu": True}
    )
    from . import __version__

    return {
        "format_version": 1,
        "name": name,
        "version": version,
        "task": task,
        "labels": labels,
        "network": {
            "architecture": architecture,
            "spatial_dims": spatial_dims,
            "in_channels": 2 * int((preprocessing or {}).get("context_slices", 0)) + 1,
            "out_channels": len(labels) + 1,
            "kwargs": dict(network_kwargs or {}),
        },
        "preprocessing": {**pre, **(preprocessing or {})},
        "inference": {**infer, **(inference or {})},
        "postprocessing": {"enabled": True, "min_island_ml": 0.1, **(postprocessing or {})},
        "provenance": {
            "code_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
        "license": license,
        "weights": WEIGHTS_NAME,
        "files": {},
        **extra,
    }


def save_package(
    out_dir: str | os.PathLike[str],
    card: Mapping[str, Any],
    state_dict: Mapping,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``card`` + weights (+ extra files such as ``model.onnx``) with their checksums.

    The package appears atomically: it is written into a temporary sibling folder and renamed.
    """
    from safetensors.torch import save as save_safetensors

    out = Path(out_dir)
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    blobs = {card.get("weights", WEIGHTS_NAME): weights, **(extra_files or {})}
    card = {
        **copy.deepcopy(dict(card)),
        "files": {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in blobs.items()},
    }
    validate_card(card, str(out / CARD_NAME))
    if out.exists() and any(out.iterdir()) and not (out / CARD_NAME).is_file():
        raise ModelError(f"{out}: exists and is not a model package; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return out
