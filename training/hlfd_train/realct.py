"""The built-in students on real CTs that anyone can download: ``hlfd-train real-ct``.

No public liver or kidney dataset can be fetched on the machines this project is built on, but
the package registry can, and TotalSegmentator's source release (Apache-2.0, on PyPI) carries
real CTs for its tests with its own segmentations of them. Two of them show livers and kidneys:

- ``ts-native-3mm``: an abdominal CT without contrast (TotalSegmentator's phase classifier:
  native), 3 mm voxels, 30 slices from the liver's lower half to the kidneys' lower poles.
- ``ts-portal-venous``: an upper-abdominal CT in the portal-venous phase (aorta 151 HU, portal
  vein 133, liver 93, spleen 80), a 20-slice DICOM series at 0.98 x 0.98 x 2 mm: liver, spleen
  and stomach, no kidney.

The references are TotalSegmentator's output, not a radiologist's (its liver and kidney Dice
against manual masks is about 0.97 and 0.95, Wasserthal 2023), and carry no tumour class, so
the check reports organ Dice, where false organ went (by TotalSegmentator's structure names)
and how much tumour was called; whether that tumour is real is not known. Two cases are a
screen for failures (organ called in the spleen, tumour in a healthy-looking liver), not an
accuracy estimate. The release is fetched with ``pip download`` and its sha256 checked; nothing
of it is copied into this repository.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from HLFDSegmentLib.errors import HLFDError

from .evaluate import dice

SOURCE = "totalsegmentator==2.18.0"
SOURCE_FILE = "totalsegmentator-2.18.0.tar.gz"
SOURCE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
# TotalSegmentator's "total" task labels this check uses (its map_to_binary.py)
TS_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
    6: "stomach", 7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left",
    18: "small_bowel", 19: "duodenum", 20: "colon", 23: "kidney_cyst_left",
    24: "kidney_cyst_right", 31: "vertebrae_L1", 32: "vertebrae_T12", 51: "heart",
    52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
    79: "spinal_cord", 86: "autochthon_left",
    87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 117: "costal_cartilages",
}  # fmt: skip
ORGAN_IDS = {"liver": (5,), "kidney": (2, 3, 23, 24)}


@dataclass(frozen=True)
class RealCase:
    name: str
    image: str  # a file or a DICOM folder under PREFIX
    reference: str  # TotalSegmentator's multi-label segmentation of it
    note: str


CASES = (
    RealCase(
        "ts-native-3mm",
        "example_ct_sm.nii.gz",
        "example_seg.nii.gz",
        "no contrast, 3 mm voxels, 30 slices: lower liver, spleen, both kidneys",
    ),
    RealCase(
        "ts-portal-venous",
        "example_ct_dicom",
        "example_seg_dicom.nii.gz",
        "portal venous, 0.98 x 0.98 x 2 mm DICOM, 20 slices: liver, spleen, no kidney",
    ),
)


def fetch_cases(cache: Path, source: Path | None = None) -> Path:
    """The reference files under ``cache`` (downloaded once with pip, sha256 checked)."""
    root = cache / PREFIX
    if all((root / c.reference).exists() and (root / c.image).exists() for c in CASES):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tarball = source or cache / SOURCE_FILE
    if source is None and not tarball.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--no-build-isolation", "-d", str(cache), SOURCE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not tarball.exists():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise HLFDError(f"pip download {SOURCE} failed: {last[0]}")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise HLFDError(f"{tarball}: sha256 {digest}, expected {SOURCE_SHA256}")
    wanted = [PREFIX + c.reference for c in CASES] + [PREFIX + c.image for c in CASES]
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if any(m.name.startswith(w) for w in wanted)]
        tar.extractall(cache, members=members, filter="data")
    return root


def case_metrics(pred: sitk.Image, reference: sitk.Image, task: str) -> dict[str, Any]:
    """Organ Dice against the reference (resampled onto the prediction's grid in physical
    space), organ volumes, tumour called, and false organ by reference structure (mL)."""
    ref = sitk.Resample(reference, pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    p, r = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref)
    ml = float(np.prod(pred.GetSpacing())) / 1000.0
    truth = np.isin(r, ORGAN_IDS[task])
    ids, counts = np.unique(r[(p > 0) & ~truth], return_counts=True)
    false = {
        ("background" if i == 0 else TS_NAMES.get(int(i), f"label {int(i)}")): round(n * ml, 1)
        for i, n in sorted(zip(ids, counts), key=lambda t: -t[1])
        if n * ml >= 0.5
    }
    return {
        "organ_dice": dice(p > 0, truth) if truth.any() else float("nan"),
        "reference_ml": round(float(truth.sum()) * ml, 1),
        "organ_ml": round(float((p > 0).sum()) * ml, 1),
        "tumour_ml": round(float((p == 2).sum()) * ml, 1),
        "false_organ_ml": false,
    }


def check_models(root: Path, models: list[Path], out: Path | None = None) -> list[dict[str, Any]]:
    """Every model on every case, through the runtime pipeline (what ``hlfd-segment`` runs);
    with ``out``, the first model of each task's slices go to ``out/real-ct-TASK.png``."""
    from HLFDSegmentLib.io import read_image
    from HLFDSegmentLib.modelpackage import load_package
    from HLFDSegmentLib.pipeline import Segmenter

    rows = []
    images = {c.name: read_image(root / c.image) for c in CASES}
    refs = {c.name: sitk.ReadImage(str(root / c.reference)) for c in CASES}
    shown: set[str] = set()
    for path in models:
        package = load_package(path)
        task = package.card.get("task", "")
        if task not in ORGAN_IDS:
            raise HLFDError(f"{path}: task {task!r}, expected liver or kidney")
        segmenter = Segmenter(package, "cpu")
        name = f"{package.name} {package.version}"
        preds = {}
        for case in CASES:
            preds[case.name] = segmenter(images[case.name]).labels
            rows.append(
                {"model": name, "task": task, "case": case.name}
                | case_metrics(preds[case.name], refs[case.name], task)
            )
        if out is not None and task not in shown:
            shown.add(task)
            write_montage(images, refs, preds, task, name, out / f"real-ct-{task}.png")
    return rows


def write_montage(images, refs, preds, task: str, model: str, path: Path) -> Path:
    """Four axial slices per case in the radiological view: reference organ green, the model's
    organ blue and tumour red (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(CASES), 4, figsize=(16, 4.3 * len(CASES)), squeeze=False)
    for row, case in zip(axes, CASES):
        pred = sitk.DICOMOrient(preds[case.name], "LPS")  # rows anterior->posterior
        near = sitk.sitkNearestNeighbor
        img = sitk.Resample(images[case.name], pred, sitk.Transform(), sitk.sitkLinear, -1024)
        ref = sitk.Resample(refs[case.name], pred, sitk.Transform(), near, 0)
        a, r, p = (sitk.GetArrayFromImage(x) for x in (img, ref, pred))
        truth = np.isin(r, ORGAN_IDS[task])
        for ax, z in zip(row, (np.linspace(0.1, 0.9, 4) * (len(a) - 1)).round().astype(int)):
            ax.imshow(a[z], cmap="gray", vmin=-160, vmax=240)
            for mask, colour, style in (
                (truth[z], "lime", "solid"),
                (p[z] > 0, "deepskyblue", "dashed"),
                (p[z] == 2, "red", "dashed"),
            ):
                if mask.any():
                    ax.contour(mask, [0.5], colors=colour, linewidths=0.8, linestyles=style)
            ax.set_title(f"{case.name}, slice {z} of {len(a)}", fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"{model} on real CTs (reference: TotalSegmentator, green; model dashed: organ blue, "
        "tumour red)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-ct.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    fmt = lambda v: "n/a" if not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = [
        "| model | case | organ Dice | organ mL (reference) | tumour mL called"
        " | false organ, mL (where) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = ", ".join(f"{k} {v:g}" for k, v in list(r["false_organ_ml"].items())[:4])
        lines.append(
            f"| {r['model']} | {r['case']} | {fmt(r['organ_dice'])} | {r['organ_ml']:g} "
            f"({r['reference_ml']:g}) | {r['tumour_ml']:g} | {where or '-'} |"
        )
    cases = "\n".join(f"- `{c.name}`: {c.note}" for c in CASES)
    shown = [f"![{p.stem}]({p.name})" for p in sorted(out.glob("real-ct-*.png"))]
    path = out / "real-ct.md"
    path.write_text(
        f"### Real CTs of {SOURCE} (references: TotalSegmentator's own masks)\n\n"
        f"{cases}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(shown) + "\n",
        encoding="utf-8",
    )
    return path
