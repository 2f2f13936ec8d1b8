"""Images in (NIfTI, NRRD/NHDR, MHA/MHD, DICOM series folder), labelmaps and reports out.

Images stay SimpleITK images (LPS physical space, any direction) so the original geometry is
kept exactly. Every output is written under a temporary name in the target folder and renamed
at the end: a failure never leaves a partial file under the final name.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path, atomic_write
from .errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def full_suffix(path: str | os.PathLike[str], known: Sequence[str]) -> str:
    """The longest suffix of ``path`` among ``known`` (".seg.nrrd" before ".nrrd"), or ""."""
    name = Path(path).name.lower()
    return max((s for s in known if name.endswith(s)), key=len, default="")


def read_image(path: str | os.PathLike[str], series: str | None = None) -> sitk.Image:
    """Read an image file or DICOM series folder (content is checked by :func:`check_image`).

    A DICOM folder gives the series ``series`` (a SeriesInstanceUID), else its largest; the
    image then carries ``hlfd.series_*`` metadata (UID, description, slice count) and
    ``hlfd.warnings`` (several series, non-uniform slice spacing), see :func:`read_notes`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        check_nifti_complete(path)
    try:
        image = _read_dicom_series(path, series) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image ({_itk_reason(exc)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    return image


def check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI-1 file holding less voxel data than its header declares (ITK would
    zero-fill the rest and segment a half-empty volume): the size of a ``.nii``, the gzip
    trailer's uncompressed size of a ``.nii.gz``; checked before any voxel is read. Float files
    are also scanned for NaN/Inf, which ITK's NIfTI reader silently turns into 0."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    gz = name.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            header = f.read(348)
    except (OSError, EOFError):
        return  # not gzip / unreadable: ITK's own error names the problem
    if len(header) < 348:
        raise InputError(f"{path}: truncated NIfTI file ({len(header)} of 348 header bytes)")
    endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)
    if endian is None:
        return  # NIfTI-2 or not NIfTI: left to ITK
    dim = struct.unpack(endian + "8h", header[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
    pixdim = struct.unpack(endian + "3f", header[80:92])
    if not all(math.isfinite(v) and v > 0 for v in pixdim):  # ITK would make them 1 mm
        raise InputError(f"{path}: voxel spacing (pixdim) {pixdim} mm is not positive and finite")
    offset = struct.unpack(endian + "f", header[108:112])[0]
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or not math.isfinite(offset):
        return
    expected = (
        max(352, int(offset)) + math.prod(max(1, d) for d in dim[1 : dim[0] + 1]) * bitpix // 8
    )
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", f.read(4))[0]  # ISIZE: uncompressed size mod 2**32
        held = expected if trailer == expected % 2**32 else _gzip_length(path)  # else count
        if held is None or held < expected:
            where = "the gzip stream is cut short" if held is None else f"it holds {held}"
            raise InputError(
                f"{path}: truncated NIfTI: the header declares {expected} bytes, {where}"
            )
    elif path.stat().st_size < expected:
        raise InputError(
            f"{path}: truncated NIfTI: the header declares {expected} bytes, the file holds "
            f"{path.stat().st_size}"
        )
    if datatype in NIFTI_FLOATS:  # ITK reads NaN/Inf as 0 HU: look at the raw values first
        dtype = np.dtype(NIFTI_FLOATS[datatype]).newbyteorder(endian)
        start = max(352, int(offset))
        bad, left = 0, expected - start
        step = (1 << 26) // dtype.itemsize * dtype.itemsize  # 64 MiB at a time: bounded memory
        with (gzip.open if gz else open)(path, "rb") as f:
            f.seek(start)
            while left > 0 and (chunk := f.read(min(step, left))):
                left -= len(chunk)
                values = np.frombuffer(
                    chunk[: len(chunk) // dtype.itemsize * dtype.itemsize], dtype
                )
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise InputError(f"{path}: {bad} voxels are NaN or infinite")


NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _gzip_length(path: Path) -> int | None:
    """Uncompressed length of a gzip file, or None when the stream is truncated or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError):
        return None
    return total


def _read_dicom_series(folder: Path, uid: str | None = None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder}: folder holds no DICOM series")
    files = {s: reader.GetGDCMSeriesFileNames(str(folder), s) for s in ids}
    listed = ", ".join(f"{s} ({len(f)} files)" for s, f in files.items())
    if uid is not None and uid not in files:
        raise InputError(f"{folder}: no DICOM series {uid}; series here: {listed}")
    chosen = uid or max(ids, key=lambda s: len(files[s]))
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    n = len(files[chosen])

    def tag(i: int, key: str) -> str:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else ""

    description = tag(0, "0008|103e")
    notes = []
    if len(ids) > 1 and uid is None:
        notes.append(
            f"{folder}: {len(ids)} DICOM series ({listed}); using the largest, {chosen} "
            f"'{description}' ({n} slices); choose another with --series UID"
        )
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    try:
        where = sorted(
            float(np.dot(normal, [float(v) for v in tag(i, "0020|0032").split("\\")]))
            for i in range(n)
        )
    except ValueError:
        where = []
    gaps = np.diff(where)
    if gaps.size and gaps.max() - gaps.min() > 0.1 * max(float(np.median(gaps)), 1e-6):
        notes.append(
            f"{folder}: non-uniform slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): "
            "missing slices? the geometry and the volumes in mL may be wrong"
        )
    for key, value in (
        ("hlfd.series_uid", chosen),
        ("hlfd.series_description", description),
        ("hlfd.series_slices", str(n)),
        ("hlfd.warnings", "\n".join(notes)),
    ):
        image.SetMetaData(key, value)
    return image


def read_notes(image: sitk.Image) -> tuple[dict[str, Any], list[str]]:
    """(series record for a report, warnings) that :func:`read_image` attached to ``image``."""
    if not image.HasMetaDataKey("hlfd.series_uid"):
        return {}, []
    series = {
        "uid": image.GetMetaData("hlfd.series_uid"),
        "description": image.GetMetaData("hlfd.series_description"),
        "slices": int(image.GetMetaData("hlfd.series_slices")),
    }
    notes = image.GetMetaData("hlfd.warnings")
    return series, [line for line in notes.split("\n") if line]


def _itk_reason(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else "unknown ITK error"


def check_image(image: sitk.Image, where: str) -> list[str]:
    """Raise :class:`InputError` for images that cannot be CT volumes; return soft warnings."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{where}: {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar CT volume is needed"
        )
    size = image.GetSize()
    shown = "x".join(map(str, size))
    if 0 in size:
        raise InputError(f"{where}: image has a zero-size axis ({shown})")
    if len(size) != 3 or 1 in size:
        kind = "4D" if len(size) > 3 else "2D"
        raise InputError(f"{where}: {kind} image of size {shown}; a 3D CT volume is needed")
    warnings = check_geometry(image, where)
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"{where}: {bad} voxels are NaN or infinite")
    lo, hi = (float(v) for v in (arr.min(), arr.max()))
    if lo == hi:
        raise InputError(f"{where}: constant image (every voxel is {lo:g}); nothing to segment")
    sample = arr[:: max(1, arr.shape[0] // 16), ::4, ::4]
    p1, p99 = np.percentile(sample, [1, 99])
    if p1 > -500 or p99 < 0 or hi > 10000:
        warnings.append(
            f"{where}: intensities (1st-99th percentile {p1:.0f}..{p99:.0f}) do not look "
            "like CT in Hounsfield units; results may be meaningless"
        )
    return warnings


PLAUSIBLE_SPACING_MM = (0.2, 20.0)


def check_geometry(image: sitk.Image, where: str) -> list[str]:
    """Refuse non-finite or non-positive spacing and non-finite origin or direction (volumes in
    mL and the output geometry would be wrong); warn on spacing outside 0.2-20 mm."""
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    direction = np.asarray(image.GetDirection(), dtype=float)
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"{where}: voxel spacing {tuple(spacing)} mm is not positive and finite")
    if not all(math.isfinite(v) for v in origin) or not np.isfinite(direction).all():
        raise InputError(f"{where}: origin or direction holds NaN or infinite values")
    n = round(math.sqrt(direction.size))
    if abs(abs(np.linalg.det(direction.reshape(n, n))) - 1) > 1e-3:
        raise InputError(f"{where}: direction matrix is not a rotation (determinant not +-1)")
    lo, hi = PLAUSIBLE_SPACING_MM
    if not all(lo <= v <= hi for v in spacing):
        shown = ", ".join(f"{v:g}" for v in spacing)
        return [
            f"{where}: voxel spacing ({shown}) mm is outside {lo:g}-{hi:g} mm; check the header"
        ]
    return []


def _write_itk(image: sitk.Image, tmp: Path, final: Path, suffix: str) -> None:
    """``sitk.WriteImage`` to ``tmp``, then verified: ITK's NIfTI writer does not report a full
    disk, so a NIfTI is checked to hold all the data its header declares."""
    try:
        sitk.WriteImage(image, str(tmp), useCompression=suffix != ".nii")
    except RuntimeError as exc:
        raise InputError(f"{final}: cannot write the image ({_itk_reason(exc)})") from None
    if suffix in (".nii", ".nii.gz"):
        try:
            check_nifti_complete(tmp)
        except InputError:
            raise InputError(
                f"{final}: the written file is incomplete (disk full?); nothing was kept"
            ) from None


def mask_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the box around a boolean mask's True voxels (+ ``margin``, clipped to the
    array), or None when it has none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + 1 + margin)))
    return tuple(box)


def label_counts(labels: sitk.Image) -> np.ndarray:
    """Voxels per label value 0..255 of a uint8 labelmap: counted in the box around the
    non-zero voxels (in slabs: bincount copies to int64), the rest is background."""
    array = sitk.GetArrayViewFromImage(labels)
    counts = np.zeros(256, dtype=np.int64)
    box = mask_box(array != 0)
    inside = array[box] if box is not None else array[:0]
    for start in range(0, inside.shape[0], 16):
        counts += np.bincount(inside[start : start + 16].ravel(), minlength=256)
    counts[0] += array.size - inside.size
    return counts


def write_labelmap(
    labels: sitk.Image, path: str | os.PathLike[str], segments: Sequence[Mapping[str, Any]] = ()
) -> None:
    """Write a uint8 labelmap by extension: ``.seg.nrrd`` (Slicer segmentation with ``segments``),
    or ``.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha`` labelmap."""
    suffix = full_suffix(path, LABELMAP_SUFFIXES)
    if not suffix:
        raise InputError(f"{path}: unknown output type; use one of {', '.join(LABELMAP_SUFFIXES)}")
    if suffix == ".seg.nrrd":  # the writer is atomic itself (temporary name, then rename)
        from .segfile import write_seg_nrrd

        if not Path(path).parent.is_dir():
            raise InputError(f"{path}: output folder {Path(path).parent} does not exist")
        write_seg_nrrd(labels, segments, path)
        return
    with atomic_path(path, suffix) as tmp:
        _write_itk(labels, tmp, Path(path), suffix)


def write_image(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Write a single-file image (.nii.gz, .nii, .nrrd, .mha; type by extension), atomically."""
    suffix = full_suffix(path, LABELMAP_SUFFIXES[1:])
    if not suffix:
        raise InputError(
            f"{path}: unknown image type; use one of {', '.join(LABELMAP_SUFFIXES[1:])}"
        )
    with atomic_path(path, suffix) as tmp:
        _write_itk(image, tmp, Path(path), suffix)


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")
