"""Evaluation of a model package per case, on full volumes at original resolution.

Each case goes through the runtime's own ``Segmenter`` (exactly what ``hlfd-segment`` and Slicer
run), then is compared with the reference labels on the original grid: Dice, IoU, VOE = 1 - IoU,
RVD, HD95 and ASSD in mm (MONAI metrics) per label, plus LiTS-style global Dice (all voxels of
all cases pooled). Overlap and distance metrics are scored only where the reference holds the
label (a tumour-free case reports its false-positive volume in mL instead); a missed label
scores Dice 0 and the image diagonal as HD95/ASSD (a fixed penalty, not a dropped value).
The tumour label also gets lesion-wise detection (connected components), and the organ the
composite Dice of organ + tumour (KiTS/LiTS), beside organ-without-tumour. Spreads are sample
standard deviations (ddof 1; :func:`mean_sd`), the one convention of the training package.
``protocol="paper"`` restricts both volumes to the axial slices that contain
tumour in the reference, the slice-subset protocol of the HLFD paper's code, and is labelled so.
``crop_mm`` crops every case in-plane to a square of that size around the reference's labelled
voxels before segmenting (a CT cut to the organ, as Slicer's Crop Volume does, or as LiTS-117 is
in ``hlfd-train real-ct``): organ and tumours run into the image border.
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

from HLFDSegmentLib.io import mask_box, read_image
from HLFDSegmentLib.pipeline import Segmenter

METRICS = ("dice", "iou", "voe", "rvd", "hd95", "assd")
COMPOSITE_SUFFIX = " incl. tumour"  # the organ label with its tumour (KiTS/LiTS "kidney")
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


def dice_of_counts(inter: int, pred: int, ref: int) -> float:
    """Dice from voxel counts |P & R|, |P|, |R|; 1.0 when both masks are empty (training's
    validation; :func:`label_metrics` scores no empty reference)."""
    return 1.0 if pred + ref == 0 else 2.0 * inter / (pred + ref)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    return dice_of_counts(int(np.logical_and(pred, ref).sum()), int(pred.sum()), int(ref.sum()))


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the diagonal of the volume (the HD95/ASSD penalty of a missed label)."""
    return float(np.sqrt(sum((n * float(sp)) ** 2 for n, sp in zip(shape, spacing, strict=True))))


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_zyx: Sequence[float],
    penalty_mm: float | None = None,
) -> dict:
    """Metrics of one binary mask pair (arrays z, y, x).

    Reference empty: nothing is scored (Dice, distances, RVD ``None``: empty-vs-empty is not
    a perfect score, and a tumour-free case has no tumour Dice) and ``fp_ml`` is the predicted
    volume in mL. Prediction empty, reference not: Dice 0, ``missed`` and HD95 = ASSD =
    ``penalty_mm`` (default: the image diagonal, :func:`image_diagonal_mm`).
    """
    p, r = int(pred.sum()), int(ref.sum())
    inter = int(np.logical_and(pred, ref).sum())
    union = p + r - inter
    voxel_ml = float(np.prod([float(v) for v in spacing_zyx])) / 1000.0
    penalty = image_diagonal_mm(ref.shape, spacing_zyx) if penalty_mm is None else penalty_mm
    out: dict[str, Any] = {m: None for m in METRICS}
    out.update(
        voxels_pred=p,
        voxels_ref=r,
        missed=bool(r and not p),
        fp_ml=None if r else p * voxel_ml,
    )
    if r == 0:
        return out
    iou = inter / union
    out.update(
        dice=dice_of_counts(inter, p, r),
        iou=iou,
        voe=1.0 - iou,
        rvd=(p - r) / r,
        hd95=penalty,
        assd=penalty,
    )
    if p:
        box = mask_box(pred | ref, margin=2)  # the distances do not need the empty margin
        out["hd95"], out["assd"] = surface_distances(pred[box], ref[box], spacing_zyx)
    return out


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float]:
    """(HD95, ASSD) in mm of two non-empty binary masks, from one set of MONAI edge-to-edge
    distances in both directions: MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)``, each of which computes that set."""
    from monai.metrics.utils import get_edge_surface_distance

    warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
    _, distances, _ = get_edge_surface_distance(
        torch.from_numpy(np.ascontiguousarray(pred)).float(),
        torch.from_numpy(np.ascontiguousarray(ref)).float(),
        spacing=[float(s) for s in spacing],
        symmetric=True,
    )
    hd95 = torch.max(torch.stack([torch.quantile(d, 0.95) for d in distances]))
    # float32 as MONAI's result tensors hold them
    return float(hd95.float()), float(torch.cat(distances).mean().float())


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Lesion-wise detection by connected components (26-connected, 3D).

    A reference lesion touched by any predicted voxel is a true positive, else a false
    negative; a predicted component touching no reference voxel is a false positive.
    """
    from scipy import ndimage

    full = np.ones((3, 3, 3), bool)
    ref_cc, n_ref = ndimage.label(ref, structure=full)
    pred_cc, n_pred = ndimage.label(pred, structure=full)
    hit_ref = np.unique(ref_cc[pred & (ref_cc > 0)])
    hit_pred = np.unique(pred_cc[ref & (pred_cc > 0)])
    return {
        "tp": int(hit_ref.size),
        "fn": n_ref - int(hit_ref.size),
        "fp": n_pred - int(hit_pred.size),
    }


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and *sample* standard deviation (ddof 1; ``None`` below two values)."""
    if not len(values):
        return None, None
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None


def axial_axis(image: sitk.Image) -> int:
    """Array axis (z, y, x order) along which the patient's S-I direction runs most."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: i, j, k directions in LPS
    k_of_ijk = int(np.argmax(np.abs(d[2])))  # which of i, j, k points most along S
    return 2 - k_of_ijk


def organ_crop(
    image: sitk.Image, ref: np.ndarray, crop_mm: float
) -> tuple[sitk.Image, tuple[slice, ...]]:
    """``image`` cut in-plane (the two axes across the axial one) to a square of ``crop_mm``
    centred on the centroid of ``ref``'s labelled voxels (clipped at the image's edges; all of it
    when nothing is labelled), and the (z, y, x) slices that cut ``ref`` the same way."""
    axis = axial_axis(image)
    cut = [slice(None)] * 3
    labelled = np.nonzero(ref)
    if labelled[0].size:
        spacing = image.GetSpacing()[::-1]  # (z, y, x) like the array
        for a in (a for a in range(3) if a != axis):
            half = int(crop_mm / spacing[a] / 2)
            start = max(0, int(labelled[a].mean()) - half)
            cut[a] = slice(start, min(ref.shape[a], start + 2 * half))
    sitk_cut = tuple(cut[::-1])  # SimpleITK indexes (x, y, z)
    return image[sitk_cut], tuple(cut)


def tumour_slices(ref: np.ndarray, tumour_value: int, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` holding any tumour voxel."""
    other = tuple(a for a in range(3) if a != axis)
    return np.nonzero((ref == tumour_value).any(axis=other))[0]


def evaluate_case(
    seg: Segmenter,
    case: EvalCase,
    label_lut: np.ndarray,
    protocol: str = "full",
    crop_mm: float | None = None,
) -> dict[str, Any]:
    """Segment one case with the runtime pipeline and score every label of the card
    (``crop_mm``: the case cut in-plane around its reference labels first)."""
    image = read_image(case.image)
    ref = label_lut[sitk.GetArrayFromImage(read_image(case.label)).astype(np.int64)]
    if crop_mm is not None:
        image, cut = organ_crop(image, ref, crop_mm)
        ref = ref[cut]
    t0 = time.perf_counter()
    result = seg(image)
    seconds = time.perf_counter() - t0
    pred = sitk.GetArrayFromImage(result.labels)
    labels = seg.card["labels"]
    tumour = next((lab["value"] for lab in labels if "tumor" in lab["name"]), None)
    if protocol == "paper":
        if tumour is None:
            raise ValueError("--protocol paper needs a tumour label in the model card")
        axis = axial_axis(image)
        keep = tumour_slices(ref, tumour, axis)
        pred, ref = np.take(pred, keep, axis=axis), np.take(ref, keep, axis=axis)
    spacing = image.GetSpacing()[::-1]
    return {
        "case": case.case_id,
        "seconds": round(seconds, 2),
        **score_labels(pred, ref, spacing, labels),
    }


def score_labels(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], labels: Sequence[Mapping]
) -> dict[str, Any]:
    """Per-label metrics (``labels``), tumour lesion detection (``lesions``) and, when the card
    has an organ and a tumour label, the composite organ + tumour metrics."""
    penalty = image_diagonal_mm(ref.shape, spacing_zyx)
    out: dict[str, Any] = {"labels": {}}
    for lab in labels:
        v = lab["value"]
        out["labels"][lab["name"]] = label_metrics(pred == v, ref == v, spacing_zyx, penalty)
    tumour = next((lab for lab in labels if "tumo" in lab["name"].lower()), None)
    organs = [lab for lab in labels if lab is not tumour and lab["value"] != 0]
    if tumour is not None:
        out["lesions"] = lesion_detection(pred == tumour["value"], ref == tumour["value"])
        if len(organs) == 1:
            both = [organs[0]["value"], tumour["value"]]
            name = organs[0]["name"] + COMPOSITE_SUFFIX
            out["labels"][name] = label_metrics(
                np.isin(pred, both), np.isin(ref, both), spacing_zyx, penalty
            )
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label: mean and sample sd of each metric over the cases where it is defined (the
    reference holds the label), global Dice (pooled), missed labels, false-positive volume on
    cases without the label, and summed lesion detection counts (key ``lesions``)."""
    out: dict[str, Any] = {}
    names = list(rows[0]["labels"]) if rows else []
    for name in names:
        per = [r["labels"][name] for r in rows]
        entry: dict[str, Any] = {}
        for m in METRICS:
            vals = [x[m] for x in per if x[m] is not None and math.isfinite(x[m])]
            mean, sd = mean_sd(vals)
            entry[m] = {"mean": mean, "std": sd, "n": len(vals)}
        inter = sum(
            (x["dice"] or 0.0) * (x["voxels_pred"] + x["voxels_ref"]) / 2 for x in per
        )  # = |P ∩ R| per case, recovered from Dice (0 where the reference is empty)
        total = sum(x["voxels_pred"] + x["voxels_ref"] for x in per)
        entry["global_dice"] = None if total == 0 else 2 * inter / total
        entry["missed"] = sum(bool(x.get("missed")) for x in per)
        fp = [x["fp_ml"] for x in per if x.get("fp_ml") is not None]
        mean, sd = mean_sd(fp)
        entry["fp_ml"] = {"mean": mean, "std": sd, "n": len(fp)}
        out[name] = entry
    found = [r["lesions"] for r in rows if "lesions" in r]
    if found:
        out["lesions"] = {k: sum(f[k] for f in found) for k in ("tp", "fp", "fn")}
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
    crop_mm: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``package`` on ``cases`` (each cut in-plane to ``crop_mm`` around its
    reference labels where given); writes ``metrics.csv/.json/.md`` into ``out_dir``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: expected one of {sorted(PROTOCOLS)}")
    if crop_mm is not None and not (math.isfinite(crop_mm) and crop_mm > 0):
        raise ValueError(f"crop: a size in mm above 0, got {crop_mm}")
    seg = Segmenter(package, device=device)
    rows = []
    for case in cases:
        rows.append(evaluate_case(seg, case, label_lut, protocol, crop_mm))
        if progress:
            dice = ", ".join(
                f"{n} {_num(m['dice'], 3) or 'n/a'}" for n, m in rows[-1]["labels"].items()
            )
            progress(f"{case.case_id}: Dice {dice} ({rows[-1]['seconds']:.1f} s)")
    if not rows:
        raise ValueError("no cases to evaluate")
    report = {
        "model": package.card["name"],
        "protocol": protocol,
        "protocol_description": PROTOCOLS[protocol]
        + ("" if crop_mm is None else f"; cut in-plane to {crop_mm:g} mm around the reference"),
        "crop_mm": crop_mm,
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
        w.writerow(["case", "label", *METRICS, "voxels_pred", "voxels_ref", "fp_ml", "seconds"])
        for row in report["cases"]:
            for name, m in row["labels"].items():
                w.writerow(
                    [
                        row["case"],
                        name,
                        *(_num(m[k]) for k in METRICS),
                        m["voxels_pred"],
                        m["voxels_ref"],
                        _num(m.get("fp_ml")),
                        row["seconds"],
                    ]
                )
    (out_dir / "metrics.md").write_text(markdown_table(report), encoding="utf-8")


def _num(v: Any, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _mean_sd(e: Mapping[str, Any]) -> str:
    if e["mean"] is None:
        return "n/a"
    return f"{e['mean']:.3f}" + ("" if e["std"] is None else f" ± {e['std']:.3f}")


def markdown_table(report: Mapping[str, Any]) -> str:
    """Mean ± sample sd per label and metric, global Dice, missed labels, false-positive volume
    on cases without the label, and lesion detection counts."""
    head = (
        f"Model `{report['model']}`, {len(report['cases'])} cases, "
        f"{report['protocol_description']}. Metrics over the cases whose reference holds the "
        "label; a missed label scores the image diagonal as HD95/ASSD; FP mL: predicted volume "
        "on cases without the label.\n\n"
        "| label | Dice | IoU | VOE | RVD | HD95 (mm) | ASSD (mm) | global Dice | missed "
        "| FP mL (cases) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    summary = report["summary"]
    for name, s in summary.items():
        if name == "lesions":
            continue
        cells = [_mean_sd(s[m]) for m in METRICS]
        g = "n/a" if s["global_dice"] is None else f"{s['global_dice']:.3f}"
        fp = f"{_mean_sd(s['fp_ml'])} ({s['fp_ml']['n']})"
        lines.append(f"| {name} | {' | '.join(cells)} | {g} | {s['missed']} | {fp} |")
    if "lesions" in summary:
        d = summary["lesions"]
        lines.append(
            f"\nTumour lesions (connected components, any overlap): {d['tp']} detected, "
            f"{d['fn']} missed, {d['fp']} false positive."
        )
    return head + "\n".join(lines) + "\n"
