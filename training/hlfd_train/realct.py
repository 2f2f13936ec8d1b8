"""The built-in students on real CTs that anyone can download: ``hlfd-train real-ct``.

No public liver or kidney dataset can be fetched on the machines this project is built on, but
the package registry can, and a few packages on PyPI carry real CTs for their tests or demos:

- TotalSegmentator's source release (Apache-2.0) with its own segmentations of them:
  ``ts-native-3mm``, an abdominal CT without contrast (its phase classifier: native), 3 mm
  voxels, 30 slices from the liver's lower half to the kidneys' lower poles; and
  ``ts-portal-venous``, an upper-abdominal CT in the portal-venous phase (aorta 151 HU, portal
  vein 133, liver 93, spleen 80), a 20-slice DICOM series at 0.98 x 0.98 x 2 mm: liver, spleen
  and stomach, no kidney. These references are TotalSegmentator's output, not a radiologist's
  (its liver and kidney Dice against manual masks is about 0.97 and 0.95, Wasserthal 2023), and
  have no tumour class: the tumour called there is reported, not scored.
- liver-ct-segmentation-package 1.6.0 (MIT; the data are LiTS's, CC BY-NC-SA 4.0): ``lits-117``,
  LiTS training case 117 with its manual liver and tumour labels (many metastases, portal
  venous), cropped around the liver and resampled to 128 x 128 x 128 by that package, which
  kept no voxel size. The size used here, 1.05 x 1.05 x 1.95 mm, is estimated from the anatomy
  in view (a thoraco-lumbar vertebral body 38 x 28 voxels, about 40 x 30 mm; a vertebra and disc
  every 16.5 voxels, about 32 mm); a 2D model's result does not depend on the slice distance,
  but it does on the in-plane size (0.9 mm: liver 0.74, tumour 0.35 for liver 0.6.0; 1.2 mm:
  0.82 / 0.47). The crop cuts through the body on every side, tighter than any CT's field.

Cases a user has on disk join with ``--ircadb DIR``: a patient folder of 3D-IRCADb-01 (IRCAD's
public set of 20 contrast-enhanced CTs, most with liver tumours, with manual masks; research
licence: nothing of it is fetched or copied here), ``PATIENT_DICOM/`` and
``MASKS_DICOM/<structure>/`` DICOM series. The liver (``liver``) includes its vessels, cysts
(``liverkyst``) and tumours (``livertumor*``, ``tumor*``), kidneys where labelled (``leftkidney``,
``rightkidney``), the body outline (``skin``) is background, and every other mask names the
false organ found.

The cases are a screen for failures (organ called in the spleen, tumour in a healthy-looking
liver, metastases missed), not an accuracy estimate. Releases are fetched with ``pip download``
and their sha256 checked; nothing of them is copied into this repository. Model files are never
unpickled: the LiTS arrays are read from the package's MRC copies (a fixed binary header).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from HLFDSegmentLib.errors import HLFDError

from .evaluate import dice


@dataclass(frozen=True)
class Release:
    """A file on the package registry and where its CTs lie inside it."""

    spec: str  # what pip downloads
    file: str
    sha256: str
    prefix: str  # of every member used


TOTALSEG = Release(
    "totalsegmentator==2.18.0",
    "totalsegmentator-2.18.0.tar.gz",
    "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    "totalsegmentator-2.18.0/tests/reference_files/",
)
LITS_PACKAGE = Release(
    "liver-ct-segmentation-package==1.6.0",
    "liver_ct_segmentation_package-1.6.0-py2.py3-none-any.whl",
    "67ffa526d8500ce5e3d9f2c96c1690543d811d352d93d531301d35791b9d6bba",
    "liver_ct_segmentation_package/data/",
)
# TotalSegmentator's "total" task labels this check names (its map_to_binary.py)
TS_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
    6: "stomach", 7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left",
    18: "small_bowel", 19: "duodenum", 20: "colon", 23: "kidney_cyst_left",
    24: "kidney_cyst_right", 31: "vertebrae_L1", 32: "vertebrae_T12", 51: "heart",
    52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
    79: "spinal_cord", 86: "autochthon_left",
    87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 117: "costal_cartilages",
}  # fmt: skip
TS_ORGANS = {"liver": (5,), "kidney": (2, 3, 23, 24)}


@dataclass(frozen=True)
class RealCase:
    name: str
    release: Release | None  # None: a folder on disk (``folder``)
    image: str  # a file or a DICOM folder under the release's prefix (or ``folder``)
    reference: str  # its labels
    note: str
    organs: dict[str, tuple[int, ...]] = field(default_factory=lambda: TS_ORGANS)
    tumours: dict[str, tuple[int, ...]] = field(default_factory=dict)  # scored where given
    names: dict[int, str] = field(default_factory=lambda: TS_NAMES)
    spacing: tuple[float, float, float] | None = None  # for arrays stored without one
    folder: Path | None = None  # a local case's folder (3D-IRCADb-01 layout)

    @property
    def source(self) -> str:
        return self.release.spec if self.release else "3D-IRCADb-01, a local copy"


CASES = (
    RealCase(
        "ts-native-3mm",
        TOTALSEG,
        "example_ct_sm.nii.gz",
        "example_seg.nii.gz",
        "no contrast, 3 mm voxels, 30 slices: lower liver, spleen, both kidneys "
        "(reference: TotalSegmentator)",
    ),
    RealCase(
        "ts-portal-venous",
        TOTALSEG,
        "example_ct_dicom",
        "example_seg_dicom.nii.gz",
        "portal venous, 0.98 x 0.98 x 2 mm DICOM, 20 slices: liver, spleen, no kidney "
        "(reference: TotalSegmentator)",
    ),
    RealCase(
        "lits-117",
        LITS_PACKAGE,
        "img_117.mrc",
        "lab_117.mrc",
        "LiTS case 117, portal venous, many metastases, a 128^3 crop around the liver at an "
        "estimated 1.05 x 1.05 x 1.95 mm (reference: LiTS's manual labels; the right kidney "
        "is in view, unlabelled)",
        organs={"liver": (1, 2), "kidney": ()},
        tumours={"liver": (2,)},
        names={1: "liver", 2: "liver_tumour"},
        spacing=(1.05, 1.05, 1.95),
    ),
)


IRCADB_TUMOURS = ("livertumor", "tumor")  # mask folder prefixes of liver tumours
IRCADB_LIVER = ("liver", "liverkyst")  # the liver, and its cysts (liver, not tumour)
IRCADB_KIDNEYS = ("leftkidney", "rightkidney", "kidney")
IRCADB_BODY = ("skin",)  # the body outline: background, as in the other references


def ircadb_case(folder: Path) -> RealCase:
    """A 3D-IRCADb-01 patient folder as a case; its masks become labels 1, 2, ... in sorted
    order of their folder names. One clear line if the layout is not there."""
    masks = sorted(
        p.name
        for p in (folder / "MASKS_DICOM").glob("*")
        if p.is_dir() and p.name.lower() not in IRCADB_BODY
    )
    if not (folder / "PATIENT_DICOM").is_dir() or not masks:
        raise HLFDError(f"{folder}: not a 3D-IRCADb-01 patient folder (PATIENT_DICOM/ and "
                        "MASKS_DICOM/<structure>/ expected)")  # fmt: skip
    ids = {name: i for i, name in enumerate(masks, 1)}
    tumours = tuple(i for n, i in ids.items() if n.lower().startswith(IRCADB_TUMOURS))
    kidneys = tuple(i for n, i in ids.items() if n.lower().startswith(IRCADB_KIDNEYS))
    liver = tuple(i for n, i in ids.items() if n.lower() in IRCADB_LIVER)
    labelled = ", ".join(masks)
    return RealCase(
        folder.name,
        None,
        "PATIENT_DICOM",
        "MASKS_DICOM",
        f"manual masks: {labelled}" + ("" if kidneys else " (kidneys unlabelled: kidney Dice n/a)"),
        organs={"liver": liver + tumours, "kidney": kidneys},
        tumours={"liver": tumours},
        names={i: n for n, i in ids.items()},
        folder=folder,
    )


def read_ircadb(case: RealCase) -> tuple[sitk.Image, sitk.Image]:
    """The CT and one label image of a 3D-IRCADb-01 case (:func:`ircadb_case`): other
    structures first (larger first), then the organs (IRCAD's liver holds its vessels), then
    the tumours."""
    from HLFDSegmentLib.io import read_image

    folder = case.folder
    image = read_image(folder / case.image)
    masks = []
    for value, name in case.names.items():
        mask = read_image(folder / case.reference / name)
        if mask.GetSize() != image.GetSize():
            raise HLFDError(f"{folder / case.reference / name}: {mask.GetSize()} voxels, the CT "
                            f"has {image.GetSize()}")  # fmt: skip
        masks.append((value, sitk.GetArrayViewFromImage(mask) > 0))
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    organs, tumours = set(case.organs["liver"] + case.organs["kidney"]), set(case.tumours["liver"])
    rank = lambda m: (m[0] in tumours, m[0] in organs, -int(m[1].sum()))  # noqa: E731
    for value, mask in sorted(masks, key=rank):
        labels[mask] = value
    reference = sitk.GetImageFromArray(labels)
    reference.CopyInformation(image)
    return image, reference


def fetch_cases(cache: Path, sources: dict[str, Path] | None = None) -> Path:
    """The cases' files under ``cache`` (each release downloaded once with pip, sha256
    checked); ``sources`` maps a release file name to a copy already downloaded."""
    for release in dict.fromkeys(c.release for c in CASES):
        members = [
            release.prefix + m
            for c in CASES
            if c.release == release
            for m in (c.image, c.reference)
        ]
        if all((cache / m).exists() for m in members):
            continue
        cache.mkdir(parents=True, exist_ok=True)
        given = (sources or {}).get(release.file)
        archive = given or _download(release, cache)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != release.sha256:
            if given is None:  # a bad download is not kept: the next run fetches it anew
                archive.unlink()
            raise HLFDError(f"{archive}: sha256 {digest}, expected {release.sha256}")
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as whl:
                for name in members:  # fixed names: no path from the archive is trusted
                    (cache / name).parent.mkdir(parents=True, exist_ok=True)
                    (cache / name).write_bytes(whl.read(name))
        else:
            with tarfile.open(archive) as tar:
                chosen = [m for m in tar.getmembers() if any(m.name.startswith(w) for w in members)]
                tar.extractall(cache, members=chosen, filter="data")
    return cache


def _download(release: Release, cache: Path) -> Path:
    archive = cache / release.file
    if archive.exists():
        return archive
    kind = ["--only-binary", ":all:"] if release.file.endswith(".whl") else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--no-build-isolation"]
    done = subprocess.run([*cmd, "-d", str(cache), release.spec], capture_output=True, text=True)
    if done.returncode or not archive.exists():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HLFDError(f"pip download {release.spec} failed: {last[0]}")
    return archive


def read_mrc(path: Path, spacing: tuple[float, float, float]) -> sitk.Image:
    """A 3D MRC file (1024-byte header, then the array, x fastest) as an LPS image: this
    package's arrays run (left-right, anterior-posterior, inferior-superior) along its axes."""
    raw = path.read_bytes()
    nx, ny, nz, mode = np.frombuffer(raw[:16], "<i4")
    extra = int(np.frombuffer(raw[92:96], "<i4")[0])  # extended header bytes
    dtype = {0: "<i1", 1: "<i2", 2: "<f4", 6: "<u2"}.get(int(mode))
    if dtype is None:
        raise HLFDError(f"{path}: MRC mode {mode} not read here")
    arr = np.frombuffer(raw[1024 + extra :], dtype, count=int(nx) * int(ny) * int(nz))
    arr = arr.reshape(int(nz), int(ny), int(nx)).transpose(2, 1, 0)  # -> (z: S, y: P, x: L)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr).astype(np.int16))
    image.SetSpacing(spacing)
    return image


def read_case(root: Path, case: RealCase) -> tuple[sitk.Image, sitk.Image]:
    from HLFDSegmentLib.io import read_image

    if case.folder is not None:
        return read_ircadb(case)
    folder = root / case.release.prefix
    if case.spacing is not None:
        return read_mrc(folder / case.image, case.spacing), read_mrc(
            folder / case.reference, case.spacing
        )
    return read_image(folder / case.image), sitk.ReadImage(str(folder / case.reference))


def case_metrics(pred: sitk.Image, reference: sitk.Image, case: RealCase, task: str) -> dict:
    """Organ Dice against the reference (resampled onto the prediction's grid in physical
    space), tumour Dice where the reference has a tumour class, organ volumes, tumour called,
    and false organ by reference structure (mL)."""
    ref = sitk.Resample(reference, pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    p, r = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref)
    ml = float(np.prod(pred.GetSpacing())) / 1000.0
    truth = np.isin(r, case.organs[task])
    ids, counts = np.unique(r[(p > 0) & ~truth], return_counts=True)
    false = {
        ("background" if i == 0 else case.names.get(int(i), f"label {int(i)}")): round(n * ml, 1)
        for i, n in sorted(zip(ids, counts), key=lambda t: -t[1])
        if n * ml >= 0.5
    }
    tumour = np.isin(r, case.tumours.get(task, ()))
    return lesions_found(p == 2, tumour, ml) | {
        "organ_dice": dice(p > 0, truth) if truth.any() else float("nan"),
        "tumour_dice": dice(p == 2, tumour) if tumour.any() else float("nan"),
        "reference_ml": round(float(truth.sum()) * ml, 1),
        "organ_ml": round(float((p > 0).sum()) * ml, 1),
        "tumour_ml": round(float((p == 2).sum()) * ml, 1),
        "reference_tumour_ml": round(float(tumour.sum()) * ml, 1),
        "false_organ_ml": false,
    }


def lesions_found(called: np.ndarray, tumour: np.ndarray, ml: float) -> dict[str, Any]:
    """Reference lesions (connected, 0.1 mL or more) that the called tumour touches, all and
    over 10 mL, and the reference tumour mL in lesions that reach the image's in-plane border
    (cut by the field of view); empty without a reference tumour."""
    if not tumour.any():
        return {}
    parts, n = ndimage.label(tumour)
    size = np.bincount(parts.ravel(), minlength=n + 1) * ml
    hit = np.zeros(n + 1, dtype=bool)
    hit[parts[called]] = True
    edge = np.zeros(n + 1, dtype=bool)
    for rim in (parts[:, 0], parts[:, -1], parts[:, :, 0], parts[:, :, -1]):
        edge[rim] = True
    kept, big = size >= 0.1, size > 10.0
    kept[0] = big[0] = edge[0] = False
    return {
        "lesions": int(kept.sum()),
        "lesions_found": int((kept & hit).sum()),
        "lesions_over_10ml": int(big.sum()),
        "lesions_over_10ml_found": int((big & hit).sum()),
        "tumour_ml_at_border": round(float(size[edge].sum()), 1),
    }


def check_models(
    root: Path, models: list[Path], out: Path | None = None, cases: tuple[RealCase, ...] = CASES
) -> list[dict[str, Any]]:
    """Every model on every case, through the runtime pipeline (what ``hlfd-segment`` runs);
    with ``out``, the first model of each task's slices go to ``out/real-ct-TASK.png``."""
    from HLFDSegmentLib.modelpackage import load_package
    from HLFDSegmentLib.pipeline import Segmenter

    packages = [load_package(path) for path in models]  # every bad path fails before any output
    for path, package in zip(models, packages):
        if package.card.get("task", "") not in TS_ORGANS:
            raise HLFDError(f"{path}: task {package.card.get('task')!r}, expected liver or kidney")
    rows = []
    images, refs = {}, {}
    for case in cases:
        images[case.name], refs[case.name] = read_case(root, case)
    shown: dict[str, tuple[str, dict]] = {}  # task -> its first model and its predictions
    for package in packages:
        task = package.card["task"]
        segmenter = Segmenter(package, "cpu")
        name = f"{package.name} {package.version}"
        preds = {}
        for case in cases:
            preds[case.name] = segmenter(images[case.name]).labels
            rows.append(
                {"model": name, "task": task, "case": case.name}
                | case_metrics(preds[case.name], refs[case.name], case, task)
            )
        shown.setdefault(task, (name, preds))
    for task, (name, preds) in shown.items() if out is not None else ():
        write_montage(images, refs, preds, task, name, out / f"real-ct-{task}.png", cases)
    return rows


def write_montage(
    images, refs, preds, task: str, model: str, path: Path, cases: tuple[RealCase, ...] = CASES
) -> Path:
    """Four axial slices per case in the radiological view: reference organ green, the model's
    organ blue and tumour red (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .synth.robustness import draw_slice

    fig, axes = plt.subplots(len(cases), 4, figsize=(16, 4.3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        pred = sitk.DICOMOrient(preds[case.name], "LPS")  # rows anterior->posterior
        near = sitk.sitkNearestNeighbor
        img = sitk.Resample(images[case.name], pred, sitk.Transform(), sitk.sitkLinear, -1024)
        ref = sitk.Resample(refs[case.name], pred, sitk.Transform(), near, 0)
        a, r, p = (sitk.GetArrayFromImage(x) for x in (img, ref, pred))
        truth = np.isin(r, case.organs[task])
        tumour = np.isin(r, case.tumours.get(task, ()))
        for ax, z in zip(row, (np.linspace(0.1, 0.9, 4) * (len(a) - 1)).round().astype(int)):
            draw_slice(ax, a[z], truth[z], tumour[z], p[z])
            ax.set_title(f"{case.name}, slice {z} of {len(a)}", fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"{model} on real CTs (reference: organ green, tumour yellow; model dashed: organ blue, "
        "tumour red)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def write_report(
    rows: list[dict[str, Any]], out: Path, cases: tuple[RealCase, ...] = CASES
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-ct.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    fmt = lambda v: "n/a" if not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = [
        "| model | case | organ Dice | tumour Dice | organ mL (reference) | tumour mL called"
        " (reference) | lesions found (over 10 mL) | false organ, mL (where) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = ", ".join(f"{k} {v:g}" for k, v in list(r["false_organ_ml"].items())[:4])
        found = (
            f"{r['lesions_found']} of {r['lesions']} ({r['lesions_over_10ml_found']} of "
            f"{r['lesions_over_10ml']})"
            if "lesions" in r
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['case']} | {fmt(r['organ_dice'])} | {fmt(r['tumour_dice'])} "
            f"| {r['organ_ml']:g} ({r['reference_ml']:g}) | {r['tumour_ml']:g} "
            f"({r['reference_tumour_ml']:g}) | {found} | {where or '-'} |"
        )
    listed = "\n".join(f"- `{c.name}` ({c.source}): {c.note}" for c in cases)
    cut = {r["case"]: r for r in rows if "tumour_ml_at_border" in r}  # one row per case
    lines += [""] + [
        f"`{name}`: {r['tumour_ml_at_border']:g} of {r['reference_tumour_ml']:g} mL of the "
        "reference tumour lies in lesions that reach the image's side borders."
        for name, r in cut.items()
    ]
    shown = [f"![{p.stem}]({p.name})" for p in sorted(out.glob("real-ct-*.png"))]
    path = out / "real-ct.md"
    path.write_text(
        "### Real CTs (`hlfd-train real-ct`)\n\n"
        f"{listed}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(shown) + "\n",
        encoding="utf-8",
    )
    return path
