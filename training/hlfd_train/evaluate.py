"""Evaluation of a model package per case, on full volumes at original resolution.

Each case goes through the runtime's own ``Segmenter`` (exactly what ``hlfd-segment`` and Slicer
run), then is compared with the reference labels on the original grid: Dice, IoU, VOE = 1 - IoU,
RVD, HD95 and ASSD in mm (MONAI metrics) per label, plus LiTS-style global Dice (all voxels of
all cases pooled). ``protocol="paper"`` restricts both volumes to the axial slices that contain
tumour in the reference, the slice-subset protocol of the HLFD paper's code, and is labelled so.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from HLFDSegmentLib.io import read_image
from HLFDSegmentLib.pipeline import Segmenter

METRICS = ("dice", "iou", "voe", "rvd", "hd95", "assd")
PROTOCOLS = {
    "full": "full 3D volumes at original resolution",
    "paper": "paper protocol: only axial slices that contain tumour in the reference",
}


@dataclass(frozen=True)
class EvalCase:
    """One case to evaluate: its id, CT file and reference label file."""

    case_id: str
    image: Path
    label: Path


def _box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + margin + 1) for i in idx)


def dice_of_counts(inter: int, pred: int, ref: int) -> float:
    """Dice from voxel counts |P & R|, |P|, |R|; 1.0 when both masks are empty."""
    return 1.0 if pred + ref == 0 else 2.0 * inter / (pred + ref)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    return dice_of_counts(int(np.logical_and(pred, ref).sum()), int(pred.sum()), int(ref.sum()))


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """Metrics of one binary mask pair (arrays z, y, x). Both empty: Dice 1, distances 0;
    one empty: Dice 0 and distances ``None`` (undefined); RVD ``None`` when ``ref`` is empty."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, r = int(pred.sum()), int(ref.sum())
    inter = int(np.logical_and(pred, ref).sum())
    union = p + r - inter
    iou = 1.0 if union == 0 else inter / union
    out: dict[str, Any] = {
        "dice": dice_of_counts(inter, p, r),
        "iou": iou,
        "voe": 1.0 - iou,
        "rvd": None if r == 0 else (p - r) / r,
        "hd95": 0.0 if p + r == 0 else None,
        "assd": 0.0 if p + r == 0 else None,
        "voxels_pred": p,
        "voxels_ref": r,
    }
    if p and r:
        warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
        box = _box(pred | ref)  # distances do not change when the empty margin is cut away
        pt = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
        rt = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
        spacing = [float(s) for s in spacing_zyx]
        out["hd95"] = float(
            compute_hausdorff_distance(pt, rt, percentile=95, spacing=spacing)[0, 0]
        )
        out["assd"] = float(
            compute_average_surface_distance(pt, rt, symmetric=True, spacing=spacing)[0, 0]
        )
    return out


def axial_axis(image: sitk.Image) -> int:
    """Array axis (z, y, x order) along which the patient's S-I direction runs most."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: i, j, k directions in LPS
    k_of_ijk = int(np.argmax(np.abs(d[2])))  # which of i, j, k points most along S
    return 2 - k_of_ijk


def tumour_slices(ref: np.ndarray, tumour_value: int, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` holding any tumour voxel."""
    other = tuple(a for a in range(3) if a != axis)
    return np.nonzero((ref == tumour_value).any(axis=other))[0]


def evaluate_case(
    seg: Segmenter,
    case: EvalCase,
    label_lut: np.ndarray,
    protocol: str = "full",
) -> dict[str, Any]:
    """Segment one case with the runtime pipeline and score every label of the card."""
    image = read_image(case.image)
    t0 = time.perf_counter()
    result = seg(image)
    seconds = time.perf_counter() - t0
    pred = sitk.GetArrayFromImage(result.labels)
    ref_img = read_image(case.label)
    ref = label_lut[sitk.GetArrayFromImage(ref_img).astype(np.int64)]
    labels = seg.card["labels"]
    tumour = next((lab["value"] for lab in labels if "tumor" in lab["name"]), None)
    if protocol == "paper":
        if tumour is None:
            raise ValueError("--protocol paper needs a tumour label in the model card")
        axis = axial_axis(image)
        keep = tumour_slices(ref, tumour, axis)
        pred, ref = np.take(pred, keep, axis=axis), np.take(ref, keep, axis=axis)
    spacing = image.GetSpacing()[::-1]
    row: dict[str, Any] = {"case": case.case_id, "seconds": round(seconds, 2), "labels": {}}
    for lab in labels:
        v = lab["value"]
        row["labels"][lab["name"]] = label_metrics(pred == v, ref == v, spacing)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of each metric per label, and global Dice (pooled)."""
    out: dict[str, Any] = {}
    names = list(rows[0]["labels"]) if rows else []
    for name in names:
        per = [r["labels"][name] for r in rows]
        entry: dict[str, Any] = {}
        for m in METRICS:
            vals = [x[m] for x in per if x[m] is not None and math.isfinite(x[m])]
            entry[m] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals)) if vals else None,
                "n": len(vals),
            }
        inter = sum(
            x["dice"] * (x["voxels_pred"] + x["voxels_ref"]) / 2 for x in per
        )  # = |P ∩ R| per case, recovered from Dice
        total = sum(x["voxels_pred"] + x["voxels_ref"] for x in per)
        entry["global_dice"] = 1.0 if total == 0 else 2 * inter / total
        out[name] = entry
    return out


def evaluate(
    package: Any,
    cases: Iterable[EvalCase],
    label_lut: np.ndarray,
    out_dir: Path | None = None,
    *,
    protocol: str = "full",
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``package`` on ``cases``; writes ``metrics.csv/.json/.md`` into ``out_dir``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: expected one of {sorted(PROTOCOLS)}")
    seg = Segmenter(package, device=device)
    rows = []
    for case in cases:
        rows.append(evaluate_case(seg, case, label_lut, protocol))
        if progress:
            dice = ", ".join(f"{n} {m['dice']:.3f}" for n, m in rows[-1]["labels"].items())
            progress(f"{case.case_id}: Dice {dice} ({rows[-1]['seconds']:.1f} s)")
    if not rows:
        raise ValueError("no cases to evaluate")
    report = {
        "model": package.card["name"],
        "protocol": protocol,
        "protocol_description": PROTOCOLS[protocol],
        "device": str(seg.device),
        "cases": rows,
        "summary": summarise(rows),
    }
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def write_report(report: Mapping[str, Any], out_dir: Path) -> None:
    """``metrics.json`` (everything), ``metrics.csv`` (one row per case and label) and
    ``metrics.md`` (mean ± sd table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case", "label", *METRICS, "voxels_pred", "voxels_ref", "seconds"])
        for row in report["cases"]:
            for name, m in row["labels"].items():
                w.writerow(
                    [
                        row["case"],
                        name,
                        *(_num(m[k]) for k in METRICS),
                        m["voxels_pred"],
                        m["voxels_ref"],
                        row["seconds"],
                    ]
                )
    (out_dir / "metrics.md").write_text(markdown_table(report), encoding="utf-8")


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.4f}"


def markdown_table(report: Mapping[str, Any]) -> str:
    """Mean ± standard deviation per label and metric, with global Dice."""
    head = (
        f"Model `{report['model']}`, {len(report['cases'])} cases, "
        f"{report['protocol_description']}.\n\n"
        "| label | Dice | IoU | VOE | RVD | HD95 (mm) | ASSD (mm) | global Dice |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, s in report["summary"].items():
        cells = []
        for m in METRICS:
            e = s[m]
            cells.append("n/a" if e["mean"] is None else f"{e['mean']:.3f} ± {e['std']:.3f}")
        lines.append(f"| {name} | {' | '.join(cells)} | {s['global_dice']:.3f} |")
    return head + "\n".join(lines) + "\n"
