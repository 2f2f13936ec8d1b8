"""Public dataset layouts -> a list of :class:`Case` (image file, label file, source labels).

Layouts (``discover(root, layout)``; ``"auto"`` detects them in this order):

- ``nnunet``: ``imagesTr/CASE_0000<file_ending>``, ``labelsTr/CASE<file_ending>``,
  ``dataset.json`` with ``labels`` ({name: value}) and ``file_ending`` (channel 0 is the CT).
- ``msd`` (Task03_Liver style): ``imagesTr/``, ``labelsTr/``, ``dataset.json`` whose
  ``labels`` ({value: name}) and ``training`` list ([{image, label}]) are used as they are.
- ``kits19`` / ``kits21`` / ``kits23``: ``case_XXXXX/imaging.nii.gz`` with
  ``segmentation.nii.gz`` (KiTS21: ``aggregated_MAJ_seg.nii.gz`` when present), in ``root``,
  ``root/data`` or ``root/dataset``. Labels 1 kidney, 2 tumour; KiTS21/23 add 3 cyst.
  Auto-detection says kits23 when a case has ``instances/`` or ``kits23.json`` exists, kits21
  when a case has ``aggregated_MAJ_seg.nii.gz``, else kits19 (pass the layout to be explicit).
- ``lits``: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` beside it, anywhere below
  ``root`` (e.g. "Training Batch 1/2"). Labels 1 liver, 2 tumour.
- ``folder``: any NIfTI/NRRD/MHA folder, either ``images/X.nii.gz`` + ``labels/X.nii.gz``, or
  pairs ``X.nii.gz`` + ``X_seg.nii.gz`` side by side. Labels 1 organ, 2 tumour unless
  ``root/labels.json`` gives ``{"value": "name", ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.io import IMAGE_SUFFIXES, check_image, full_suffix, read_image

from .labels import LAYOUT_LABELS, DataError

LAYOUTS = ("kits19", "kits21", "kits23", "lits", "msd", "nnunet", "folder")


@dataclass(frozen=True)
class Case:
    """One training case: its id, CT file, label file and the layout's source labels."""

    case_id: str
    image: Path
    label: Path | None
    layout: str = ""
    labels: Mapping[int, str] = field(default_factory=dict, compare=False)


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(full_suffix(path, IMAGE_SUFFIXES))]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable dataset.json ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: dataset.json must hold a JSON object")
    return data


def _kits_root(root: Path) -> Path | None:
    for base in (root, root / "data", root / "dataset"):
        if base.is_dir() and any(
            (p / "imaging.nii.gz").is_file() for p in base.glob("case_*") if p.is_dir()
        ):
            return base
    return None


def detect_layout(root: str | Path) -> str:
    """The layout of ``root`` (see the module docstring), or :class:`DataError`."""
    root = _check_root(root)
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
        if "file_ending" in meta or "channel_names" in meta:
            return "nnunet"
        if "training" in meta:
            return "msd"
    base = _kits_root(root)
    if base is not None:
        cases = [p for p in base.glob("case_*") if p.is_dir()]
        if (base / "kits23.json").is_file() or any((p / "instances").is_dir() for p in cases):
            return "kits23"
        if any((p / "aggregated_MAJ_seg.nii.gz").is_file() for p in cases):
            return "kits21"
        return "kits19"
    if next(root.rglob("volume-*.nii*"), None) is not None:
        return "lits"
    if _folder_pairs(root):
        return "folder"
    raise DataError(
        f"{root}: cannot tell the dataset layout (no dataset.json, case_*/imaging.nii.gz, "
        f"volume-N.nii, images/+labels/ or X + X_seg files); layouts: {', '.join(LAYOUTS)}"
    )


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if next(root.iterdir(), None) is None:
        raise DataError(f"{root}: dataset folder is empty")
    return root


def _folder_pairs(root: Path) -> list[tuple[str, Path, Path | None]]:
    def images(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.is_file() and full_suffix(p, IMAGE_SUFFIXES)]

    if (root / "images").is_dir() and (root / "labels").is_dir():
        labels = {_stem(p): p for p in images(root / "labels")}
        return [(_stem(p), p, labels.get(_stem(p))) for p in images(root / "images")]
    found = {_stem(p): p for p in images(root)}
    pairs = []
    for stem, path in found.items():
        if stem.endswith("_seg"):
            continue
        pairs.append((stem, path, found.get(f"{stem}_seg")))
    return pairs if any(lab is not None for _, _, lab in pairs) else []


def source_labels(root: str | Path, layout: str) -> dict[int, str]:
    """Source label value -> name of the dataset at ``root`` in ``layout``."""
    root = Path(root)
    if layout in ("msd", "nnunet"):
        meta = _read_json(root / "dataset.json")
        labels = meta.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{root / 'dataset.json'}: no 'labels' mapping")
        try:
            if layout == "msd":
                return {int(v): str(n) for v, n in labels.items()}
            return _nnunet_labels(labels)
        except (TypeError, ValueError):
            raise DataError(f"{root / 'dataset.json'}: 'labels' values are not integers") from None
    if layout == "folder" and (root / "labels.json").is_file():
        try:
            return {int(v): str(n) for v, n in _read_json(root / "labels.json").items()}
        except ValueError:
            raise DataError(f"{root / 'labels.json'}: keys must be label values") from None
    if layout not in LAYOUT_LABELS:
        raise DataError(f"unknown layout {layout!r}: expected auto or one of {', '.join(LAYOUTS)}")
    return dict(LAYOUT_LABELS[layout])


def _nnunet_labels(labels: Mapping[str, int | list[int]]) -> dict[int, str]:
    """nnU-Net v2 {name: value}; region entries ({name: [values]}) name each value not named
    on its own after the smallest region holding it."""
    out = {int(v): n for n, v in labels.items() if not isinstance(v, list)}
    regions = sorted(
        ((n, v) for n, v in labels.items() if isinstance(v, list)), key=lambda r: len(r[1])
    )
    for name, values in regions:
        for v in values:
            out.setdefault(int(v), name)
    return dict(sorted(out.items()))


def discover(root: str | Path, layout: str = "auto", unlabelled: str = "error") -> list[Case]:
    """Cases of the dataset at ``root``, sorted by id. A case without a label file is a
    :class:`DataError` naming it (``unlabelled="skip"`` drops such cases, "keep" keeps them
    with ``label=None``, e.g. the KiTS19 test cases)."""
    root = _check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    labels = source_labels(root, layout)
    if layout.startswith("kits"):
        found = _kits(root, layout)
    elif layout == "lits":
        found = _lits(root)
    elif layout == "msd":
        found = _msd(root)
    elif layout == "nnunet":
        found = _nnunet(root)
    else:
        found = _folder_pairs(root)
    if not found:
        raise DataError(f"{root}: no {layout} cases found")
    ids = [cid for cid, _, _ in found]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise DataError(f"{root}: case ids occur more than once: {', '.join(dupes[:5])}")
    cases = []
    for cid, image, label in sorted(found, key=lambda f: _natural(f[0])):
        if label is None or not label.is_file():
            if unlabelled == "skip":
                continue
            if unlabelled != "keep":
                where = label or "no label file"
                raise DataError(f"case {cid}: missing label file ({where}); image {image}")
            label = None
        cases.append(Case(cid, image, label, layout, labels))
    if not cases:
        raise DataError(f"{root}: no labelled {layout} cases")
    return cases


def _kits(root: Path, layout: str) -> list[tuple[str, Path, Path | None]]:
    base = _kits_root(root)
    if base is None:
        raise DataError(f"{root}: no case_*/imaging.nii.gz folders (KiTS layout)")
    out = []
    for case in base.glob("case_*"):
        if not (case / "imaging.nii.gz").is_file():
            continue
        label = case / "segmentation.nii.gz"
        if layout == "kits21" and (case / "aggregated_MAJ_seg.nii.gz").is_file():
            label = case / "aggregated_MAJ_seg.nii.gz"
        out.append((case.name, case / "imaging.nii.gz", label))
    return out


def _lits(root: Path) -> list[tuple[str, Path, Path | None]]:
    out = []
    for image in root.rglob("volume-*.nii*"):
        match = re.fullmatch(r"volume-(\d+)(\.nii(\.gz)?)", image.name)
        if not match or image.name.startswith("."):
            continue
        n = match.group(1)
        label = next(
            (
                image.with_name(f"segmentation-{n}{s}")
                for s in (".nii", ".nii.gz")
                if image.with_name(f"segmentation-{n}{s}").is_file()
            ),
            image.with_name(f"segmentation-{n}{match.group(2)}"),
        )
        out.append((f"volume-{n}", image, label))
    return out


def _msd(root: Path) -> list[tuple[str, Path, Path | None]]:
    meta = _read_json(root / "dataset.json")
    items = meta.get("training")
    if not isinstance(items, list):
        raise DataError(f"{root / 'dataset.json'}: no 'training' list")
    out = []
    for item in items:
        try:
            image, label = root / item["image"], root / item["label"]
        except (TypeError, KeyError):
            raise DataError(
                f"{root / 'dataset.json'}: training entry {item!r} lacks image/label"
            ) from None
        out.append((_stem(image), image, label))
    return out


def _nnunet(root: Path) -> list[tuple[str, Path, Path | None]]:
    ending = str(_read_json(root / "dataset.json").get("file_ending", ".nii.gz"))
    images = sorted((root / "imagesTr").glob(f"*_0000{ending}"))
    out = []
    for image in images:
        cid = image.name[: -len(f"_0000{ending}")]
        out.append((cid, image, root / "labelsTr" / f"{cid}{ending}"))
    return out


# -- loading and validation ---------------------------------------------------------------------
def grid_mismatch(image: sitk.Image, label: sitk.Image, tol: float = 1e-3) -> str | None:
    """Why ``label``'s voxel grid differs from ``image``'s (size exactly; spacing relative
    ``tol``; origin within 0.1 voxel; direction within ``tol``), or None when they match."""
    if image.GetSize() != label.GetSize():
        return f"size {label.GetSize()} != image size {image.GetSize()}"
    sp_i, sp_l = np.array(image.GetSpacing()), np.array(label.GetSpacing())
    if np.any(np.abs(sp_i - sp_l) > tol * np.maximum(sp_i, 1.0)):
        return f"spacing {tuple(sp_l)} != image spacing {tuple(sp_i)}"
    if np.any(np.abs(np.subtract(image.GetOrigin(), label.GetOrigin())) > 0.1 * sp_i.min()):
        return f"origin {label.GetOrigin()} != image origin {image.GetOrigin()}"
    if np.any(np.abs(np.subtract(image.GetDirection(), label.GetDirection())) > tol):
        return f"direction {label.GetDirection()} != image direction {image.GetDirection()}"
    return None


def label_values(arr: np.ndarray) -> np.ndarray:
    """Distinct values of an integer-valued label array (bincount; no full sort)."""
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255 or (np.issubdtype(arr.dtype, np.floating) and np.any(arr % 1)):
        return np.unique(arr)
    counts = np.zeros(int(hi) + 1, dtype=np.int64)
    for start in range(0, arr.shape[0], 16):
        counts += np.bincount(
            arr[start : start + 16].astype(np.int64).ravel(), minlength=len(counts)
        )
    return np.flatnonzero(counts)


def load_case(
    case: Case, expected: Mapping[int, str] | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """(image, uint8 label on exactly the image's grid) of ``case``, validated: the label grid
    matches the image grid and its values are among ``expected`` (default ``case.labels``)."""
    if case.label is None:
        raise DataError(f"case {case.case_id}: has no label file")
    try:
        image = read_image(case.image)
        check_image(image, f"case {case.case_id} ({case.image})")
        label = read_image(case.label)
    except DataError:
        raise
    except InputError as exc:
        raise DataError(f"case {case.case_id}: {exc}") from None
    why = grid_mismatch(image, label)
    if why:
        raise DataError(
            f"case {case.case_id}: label grid does not match the image: {why} ({case.label})"
        )
    arr = sitk.GetArrayViewFromImage(label)
    values = label_values(arr)
    allowed = set(expected if expected is not None else case.labels)
    bad = [v.item() for v in values if allowed and v not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10])
        raise DataError(
            f"case {case.case_id}: unexpected label values {shown} in {case.label} "
            f"(the {case.layout or 'dataset'} labels are {sorted(allowed)}"
            + (
                "; KiTS21/23 data with cysts (3) needs layout kits21 or kits23)"
                if case.layout == "kits19"
                else ")"
            )
        )
    out = sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8))
    out.CopyInformation(image)
    return image, out
