"""Slicer segmentation files (``.seg.nrrd``): a uint8 labelmap as one shared labelmap layer,
one segment per label entry with name, colour and SNOMED CT terminology.

The file is what ``vtkMRMLSegmentationStorageNode`` writes: NRRD0004, LPS space, gzip data on the
full image grid, ``Segmentation_*`` fields (including the reference image geometry, so Slicer's
Segment Editor keeps the CT grid) and ``SegmentN_*`` fields. The header is written here (UTF-8
names) and the data are compressed slab by slab, so no copy of the volume is made.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

# Slicer's terminology contexts (Modules/Loadable/Terminologies/Resources, Slicer 5.6 to 5.10).
# The category/type context is the DICOM master list: it holds every code of the 3D Slicer
# General Anatomy list that the runtime uses (Kidney, Liver, Mass) *and* Neoplasm
# (SCT 108369006), which the General Anatomy list lacks (Slicer 5.6 cannot select it there).
SEGMENT_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_TAG = "TerminologyEntry"
_CODE_KEYS = ("category", "type", "type_modifier", "region", "region_modifier")
_CODE_PARTS = ("scheme", "code", "meaning")
_TERM_FORBIDDEN = set("~^|\\") | {chr(c) for c in range(32)}
_TEXT_FORBIDDEN = {"\\"} | {chr(c) for c in range(32)}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SLAB_BYTES = 8 << 20
# gzip level 1: 512x512x1000 labelmap with 2 organs in 0.7 s / 1.5 MB (level 6: 1.7 s / 0.4 MB)
GZIP_LEVEL = 1


def _code(terminology: Mapping[str, Any], key: str, where: str) -> str:
    code = terminology.get(key)
    if code is None:
        if key in ("category", "type"):
            raise ValueError(f"{where}: terminology '{key}' is required")
        return "^^"
    parts = [code.get(k) for k in _CODE_PARTS] if isinstance(code, Mapping) else []
    if len(parts) != 3 or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"{where}: terminology '{key}' needs non-empty scheme, code and meaning")
    if any(set(p) & _TERM_FORBIDDEN for p in parts):
        raise ValueError(f"{where}: terminology '{key}' contains one of ~ ^ | \\ or a control char")
    return "^".join(parts)


def terminology_tag(entry: Mapping[str, Any]) -> str:
    """The value of a segment's ``TerminologyEntry`` tag for one label entry, in the format of
    ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``: seven ``~``-separated parts
    (context, category, type, type modifier, region context, region, region modifier), each code
    ``scheme^code^meaning`` and ``^^`` where absent."""
    where = f"label {entry.get('value')!r} ({entry.get('name')!r})"
    term = entry.get("terminology")
    if not isinstance(term, Mapping):
        raise ValueError(f"{where}: 'terminology' must be an object")
    if term.get("region_modifier") is not None and term.get("region") is None:
        raise ValueError(f"{where}: terminology 'region_modifier' given without 'region'")
    cat, typ, typ_mod, region, region_mod = (_code(term, k, where) for k in _CODE_KEYS)
    return "~".join((SEGMENT_CONTEXT, cat, typ, typ_mod, REGION_CONTEXT, region, region_mod))


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) = (x, y, z) to LPS millimetres of a SimpleITK image."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)  # scales columns
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _num(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _checked_segments(segments: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    seen: set[int] = set()
    for n, seg in enumerate(segments):
        value, name, colour = seg.get("value"), seg.get("name"), seg.get("color")
        where = f"segments[{n}]"
        if (
            not isinstance(value, int | np.integer)
            or isinstance(value, bool)
            or not 1 <= value <= 255
            or value in seen
        ):
            raise ValueError(f"{where}: 'value' must be a unique int in 1..255, got {value!r}")
        seen.add(int(value))
        if not isinstance(name, str) or not name.strip() or set(name) & _TEXT_FORBIDDEN:
            raise ValueError(f"{where}: 'name' must be non-empty text without \\ or control chars")
        if (
            not isinstance(colour, Sequence)
            or len(colour) != 3
            or not all(isinstance(c, int | np.integer) and 0 <= c <= 255 for c in colour)
        ):
            raise ValueError(f"{where}: 'color' must be 3 ints in 0..255, got {colour!r}")
    return list(segments)


def _header(labels: sitk.Image, segments: Sequence[Mapping[str, Any]], compress: bool) -> bytes:
    size = labels.GetSize()
    lps = ijk_to_lps(labels)
    ras = _LPS_TO_RAS @ lps
    geometry = "".join(f"{_num(v)};" for v in ras.ravel())
    geometry += "".join(f"0;{n - 1};" for n in size)
    extent = " ".join(f"0 {n - 1}" for n in size)
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in size),
        "space directions: " + " ".join(f"({','.join(map(_num, lps[:3, i]))})" for i in range(3)),
        "kinds: domain domain domain",
        f"encoding: {'gzip' if compress else 'raw'}",
        f"space origin: ({','.join(map(_num, lps[:3, 3]))})",
    ]
    for i, seg in enumerate(segments):
        colour = " ".join(f"{c / 255:.6g}" for c in seg["color"])
        lines += [
            f"Segment{i}_Color:={colour}",
            f"Segment{i}_ColorAutoGenerated:=0",
            f"Segment{i}_Extent:={extent}",
            f"Segment{i}_ID:=Segment_{int(seg['value'])}",
            f"Segment{i}_LabelValue:={int(seg['value'])}",
            f"Segment{i}_Layer:=0",
            f"Segment{i}_Name:={seg['name']}",
            f"Segment{i}_NameAutoGenerated:=0",
            f"Segment{i}_Tags:={TERMINOLOGY_TAG}:{terminology_tag(seg)}|",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        f"Segmentation_ConversionParameters:=Reference image geometry|{geometry}|&",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _write_data(fh, array: np.ndarray, allowed: np.ndarray, compress: bool, path: Path) -> None:
    """Write (and gzip) the voxels slab by slab, checking every label value on the way."""
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if compress else None
    step = max(1, _SLAB_BYTES // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], step):
        slab = array[start : start + step]
        top = int(slab.max()) if slab.size else 0
        if not allowed[: top + 1].all():  # slow path only when a gap below the maximum exists
            unknown = np.flatnonzero((np.bincount(slab.ravel(), minlength=256) > 0) & ~allowed)
            if unknown.size:
                raise ValueError(f"{path}: label values {unknown.tolist()} have no segment entry")
        data = np.ascontiguousarray(slab).tobytes()
        fh.write(packer.compress(data) if packer else data)
    if packer:
        fh.write(packer.flush())


def write_seg_nrrd(
    labels: sitk.Image,
    segments: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    compress: bool = True,
) -> None:
    """Write a uint8 labelmap (SimpleITK image, LPS, any direction) as a Slicer segmentation.

    One segment per entry of ``segments`` (empty ones kept), all in one shared labelmap layer
    with label value ``entry["value"]``. A label value in the image without an entry raises
    ``ValueError``. The file is written under a temporary name in the same folder and renamed
    at the end, so an error never leaves a partial file at ``path``.
    """
    path = Path(path)
    if not isinstance(labels, sitk.Image) or labels.GetDimension() != 3:
        raise ValueError(f"{path}: labels must be a 3D SimpleITK image")
    if labels.GetPixelID() != sitk.sitkUInt8:
        raise ValueError(f"{path}: labels must be uint8, got {labels.GetPixelIDTypeAsString()}")
    segments = _checked_segments(segments)
    header = _header(labels, segments, compress)
    allowed = np.zeros(256, dtype=bool)
    allowed[[0, *(int(s["value"]) for s in segments)]] = True

    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x): C order is the NRRD (i, j, k) order
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fh.write(header)
        _write_data(fh, array, allowed, compress, path)
        fh.flush()
        os.fsync(fh.fileno())
