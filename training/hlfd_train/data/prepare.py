"""Validate a dataset once and cache it on the runtime's model grid.

``prepare(root, out, ...)`` reads every case, checks it (:func:`load_case`), and resamples it
exactly as the runtime does (``pipeline.model_grid`` + ``pipeline.normalise`` for the CT,
nearest-neighbour ``Grid.resample`` for the labels), so training sees what inference sees.
The cache (read by 2D slice and 3D patch datasets alike)::

    out/prepared.json                 settings, labels, preprocessing, case list, format version
    out/splits.json                   seeded case-level train / val / test split
    out/cases/<case_id>/image.npy     float16 (z, y, x) normalised CT on the model grid, cropped
    out/cases/<case_id>/label.npy     uint8 (z, y, x) target labels (label set applied)
    out/cases/<case_id>/meta.json     source files and geometry, model grid, crop box, voxel
                                      counts, slices and sample points per label value

Each case is written under a temporary name and renamed, so an interrupted run resumes: cases
already prepared with the same settings (hash) are skipped. A cache made with other settings
is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from HLFDSegmentLib.atomic import atomic_folder
from HLFDSegmentLib.io import write_json
from HLFDSegmentLib.modelpackage import make_card
from HLFDSegmentLib.pipeline import background_value, body_box, model_grid, normalise

from .labels import LAYOUT_TASK, DataError, label_map, lookup_table, role_of, target_labels
from .layouts import Case, discover, load_case

FORMAT_VERSION = 1
POINTS_PER_LABEL = 1000


def default_preprocessing(task: str = "kidney", spatial_dims: int = 2) -> dict[str, Any]:
    """The runtime card's default preprocessing (``make_card``) for ``spatial_dims``."""
    card = make_card(name="x", version="0", task=task, architecture="x", spatial_dims=spatial_dims)
    return card["preprocessing"]


def make_splits(
    case_ids: Sequence[str], splits: Sequence[float | int], seed: int = 0
) -> dict[str, list[str]]:
    """Case-level train / val / test split. Cases are ordered by a hash of (seed, id), so the
    split depends only on the seed and the ids (adding a case moves at most a few others).
    ``splits`` are fractions (floats summing to 1) or counts (ints; leftover cases -> "unused")."""
    if len(splits) != 3:
        raise DataError(f"splits must be (train, val, test), got {list(splits)}")
    ids = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n = len(ids)
    if all(isinstance(s, int) and not isinstance(s, bool) for s in splits):
        n_train, n_val, n_test = (int(s) for s in splits)
        if min(splits) < 0 or n_train + n_val + n_test > n:
            raise DataError(f"split counts {list(splits)} do not fit {n} cases")
    else:
        f = [float(s) for s in splits]
        if min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
            raise DataError(f"split fractions {f} must be >= 0 and sum to 1")
        n_val, n_test = (round(x * n) for x in f[1:])
        if n >= 3:
            n_val, n_test = (max(1, k) if x > 0 else k for k, x in zip((n_val, n_test), f[1:]))
        n_train = max(0, n - n_val - n_test)
    key = {c: i for i, c in enumerate(sorted(case_ids, key=_natural_key))}
    test, val = ids[:n_test], ids[n_test : n_test + n_val]
    train = ids[n_test + n_val : n_test + n_val + n_train]
    rest = ids[n_test + n_val + n_train :]
    out = {
        name: sorted(part, key=key.get)
        for name, part in zip(("train", "val", "test"), (train, val, test))
    }
    if rest:
        out["unused"] = sorted(rest, key=key.get)
    return out


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str = "auto",
    task: str = "kidney",
    labelset: str = "organ+tumour",
    cyst: str = "organ",
    preprocessing: Mapping[str, Any] | None = None,
    splits: Sequence[float | int] = (0.7, 0.15, 0.15),
    seed: int = 0,
    workers: int = 1,
    crop_body: bool = True,
    margin: int = 8,
    unlabelled: str = "error",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Validate and cache the dataset at ``root`` in ``out`` (see the module docstring)."""
    root, out = Path(root), Path(out)
    cases = discover(root, layout, unlabelled=unlabelled)
    layout = cases[0].layout
    labels = dict(cases[0].labels)
    _check_task(root, layout, task, labels)
    pre = {**default_preprocessing(task), **dict(preprocessing or {})}
    mapping = label_map(labels, labelset, cyst)
    settings = {
        "format_version": FORMAT_VERSION,
        "root": str(root.resolve()),
        "layout": layout,
        "task": task,
        "labelset": labelset,
        "cyst": cyst,
        "source_labels": {str(k): v for k, v in labels.items()},
        "preprocessing": pre,
        "crop_body": bool(crop_body),
        "margin": int(margin),
    }
    digest = settings_hash(settings)
    info_path = out / "prepared.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("settings_hash") != digest:
            if not overwrite:
                fresh = json.loads(json.dumps(settings))
                changed = ", ".join(k for k in settings if old.get(k) != fresh[k]) or "version"
                raise DataError(
                    f"{out}: holds a prepared set with other settings ({changed}); "
                    "use another folder or overwrite=True"
                )
            shutil.rmtree(out / "cases", ignore_errors=True)
            info_path.unlink()
    (out / "cases").mkdir(parents=True, exist_ok=True)

    todo = [c for c in cases if not _is_prepared(out / "cases" / c.case_id, digest)]
    job = {
        "pre": pre,
        "lut": lookup_table(mapping),
        "digest": digest,
        "crop_body": crop_body,
        "margin": margin,
        "out": str(out / "cases"),
    }
    if progress and todo:
        progress(f"preparing {len(todo)} of {len(cases)} {layout} cases in {out}")
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for case, _ in zip(todo, pool.map(prepare_case, todo, [job] * len(todo))):
                if progress:
                    progress(f"  {case.case_id}")
    else:
        for case in todo:
            prepare_case(case, job)
            if progress:
                progress(f"  {case.case_id}")

    ids = [c.case_id for c in cases]
    write_json(
        {
            "splits": list(splits),
            "seed": seed,
            **make_splits(ids, list(splits), seed),
        },
        out / "splits.json",
    )
    write_json(
        {
            **settings,
            "settings_hash": digest,
            "labels": {str(k): v for k, v in target_labels(task, labelset).items()},
            "label_map": {str(k): v for k, v in mapping.items()},
            "cases": ids,
        },
        info_path,
    )
    return out


def _check_task(root: Path, layout: str, task: str, labels: Mapping[int, str]) -> None:
    if task not in ("kidney", "liver"):
        raise DataError(f"unknown task {task!r}: expected kidney or liver")
    organs = {n.lower() for n in labels.values() if role_of(n) == "organ"}
    other = "liver" if task == "kidney" else "kidney"
    if LAYOUT_TASK.get(layout, task) != task or (other in organs and task not in organs):
        raise DataError(f"{root}: a {layout} dataset labels {sorted(organs)}, not task {task!r}")


def _is_prepared(folder: Path, digest: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    ok = meta.get("settings_hash") == digest
    return ok and (folder / "image.npy").is_file() and (folder / "label.npy").is_file()


def prepare_case(case: Case, job: Mapping[str, Any]) -> dict[str, Any]:
    """Validate, resample, crop and write one case (atomically); returns its meta."""
    pre = job["pre"]
    image, label = load_case(case)
    grid = model_grid(image, pre)
    arr = normalise(image, grid, pre)
    source = sitk.GetArrayFromImage(grid.resample(label, sitk.sitkNearestNeighbor, sitk.sitkUInt8))
    target = job["lut"][source]
    box = tuple(slice(0, n) for n in arr.shape)
    if job["crop_body"]:
        box = _union(body_box(arr, background_value(pre), int(job["margin"])), target, arr.shape)
    img16 = arr[box].astype(np.float16)
    lab8 = np.ascontiguousarray(target[box])
    meta = {
        "case_id": case.case_id,
        "settings_hash": job["digest"],
        "image_path": str(case.image),
        "label_path": str(case.label),
        "original": {
            "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()),
            "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()),
        },
        "model_grid": {
            "size": list(grid.size),
            "spacing": list(grid.spacing),
            "origin": list(grid.origin),
            "direction": list(grid.direction),
        },
        "crop": [[s.start, s.stop] for s in box],  # (z, y, x) of the full model-grid array
        "shape": list(img16.shape),
        "source_counts": _counts(source),
        **_label_index(lab8, case.case_id),
    }
    folder = Path(job["out"]) / case.case_id
    with atomic_folder(folder) as tmp:
        np.save(tmp / "image.npy", img16)
        np.save(tmp / "label.npy", lab8)
        (tmp / "meta.json").write_text(json.dumps(meta, default=_plain) + "\n")
    return meta


def _counts(arr: np.ndarray) -> dict[str, int]:
    counts = np.bincount(arr.ravel(), minlength=1)
    return {str(v): int(c) for v, c in enumerate(counts) if c}


def _union(box: tuple[slice, ...] | None, labels: np.ndarray, shape) -> tuple[slice, ...]:
    """The body box grown to hold every labelled voxel (the whole array when no body)."""
    if box is None:
        return tuple(slice(0, n) for n in shape)
    hits = np.nonzero(labels)
    if not hits[0].size:
        return box
    return tuple(
        slice(min(b.start, int(h.min())), max(b.stop, int(h.max()) + 1)) for b, h in zip(box, hits)
    )


def _label_index(labels: np.ndarray, case_id: str) -> dict[str, Any]:
    """Voxel counts, slice lists and up to POINTS_PER_LABEL seeded sample points per value."""
    counts = _counts(labels)
    rng = np.random.default_rng(int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16))
    slices, points = {}, {}
    for key in counts:
        value = int(key)
        if value == 0:
            continue
        mask = labels == value
        slices[key] = np.flatnonzero(mask.any(axis=(1, 2))).tolist()
        idx = np.flatnonzero(mask)
        pick = rng.choice(idx, size=min(len(idx), POINTS_PER_LABEL), replace=False)
        points[key] = np.stack(np.unravel_index(np.sort(pick), labels.shape), 1).tolist()
    return {"counts": counts, "slices": slices, "points": points}


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays (grid sizes and crop boxes may come as numpy ints)."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
