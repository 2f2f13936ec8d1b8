"""The end-to-end demo: phantom CTs -> teacher -> HLFD student -> model package -> ``hlfd-segment``.

    python -m hlfd_train.demo OUTDIR [--task kidney] [--teacher-minutes 5] [--student-minutes 4]

No dataset or pretrained weights can be downloaded, so the demo makes its own: a small phantom
dataset in the KiTS19 layout (kidney) or the LiTS layout (liver). It trains a teacher, distills
a compact student from it with HLFD (both on a wall-clock budget), exports the student, segments
the held-out phantom with the command-line tool exactly as a user would, and evaluates teacher,
student and an untrained student on it through the runtime pipeline. OUTDIR gets ``data/``,
``runs/`` (logs, curves, checkpoints), ``model/`` (the student package), ``case.seg.nrrd``,
``case.report.json``, ``overlay.png``, ``attention.png`` and ``metrics.json`` / ``metrics.md``
(teacher vs student).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from HLFDSegmentLib.cli import main as segment_cli
from HLFDSegmentLib.io import read_image
from HLFDSegmentLib.modelpackage import load_package, save_package
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset

from .cards import N_CLASSES, card_for
from .config import CPU_PHANTOM_RECIPE, load_config, merge
from .data import PreparedData
from .engine import make_network, prepare_data, train
from .evaluate import evaluate
from .explain import explain, tumour_slices
from .export import export

DEMO_LAYOUT = {"kidney": "kits19", "liver": "lits"}  # the public layout of each task's dataset

DEMO_CONFIG = merge(
    CPU_PHANTOM_RECIPE,
    {
        "name": "demo",
        "data": {
            "splits": [8, 1, 2],
            "augment": {"rotate_prob": 0.2, "scale_intensity": 0.1, "shift_intensity": 0.05},
        },
        "train": {"steps": 600, "val_every": 100, "checkpoint_every": 100},
        "distill": {"method": "hlfd"},
    },
)


def overlay(image: sitk.Image, labels: sitk.Image, path: Path) -> None:
    """Axial, coronal and sagittal slices through the tumour with the labels on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    zs, ys, xs = np.nonzero(lab == 2) if (lab == 2).any() else np.nonzero(lab >= 0)
    z, y, x = int(np.median(zs)), int(np.median(ys)), int(np.median(xs))
    sx, sy, sz = image.GetSpacing()
    views = [
        (ct[z], lab[z], sy / sx, "axial"),
        (ct[:, y][::-1], lab[:, y][::-1], sz / sx, "coronal"),
        (ct[:, :, x][::-1], lab[:, :, x][::-1], sz / sy, "sagittal"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (c, lb, aspect, title) in zip(axes, views):
        ax.imshow(c, cmap="gray", vmin=-200, vmax=300, aspect=aspect)
        ax.imshow(
            np.ma.masked_equal(lb, 0), cmap="autumn", alpha=0.45, aspect=aspect, vmin=1, vmax=2
        )
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def untrained_package(cfg: dict, out: Path, seed: int) -> Path:
    """The student architecture with its random initial weights (the floor to beat)."""
    torch.manual_seed(seed)
    net = make_network(cfg["model"]["student"], 2, N_CLASSES[cfg["data"]["labelset"]])
    return save_package(out, card_for(cfg, "student"), net.state_dict())


def run(
    out: Path,
    task: str = "kidney",
    teacher_minutes: float = 5.0,
    student_minutes: float = 4.0,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 256, 256),
    splits: tuple[int, int, int] = (8, 1, 2),
) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = DEMO_LAYOUT[task]
    print(f"[1/7] phantom dataset: {sum(splits)} {task} CTs ({layout} layout), split {splits}")
    phantom = PhantomConfig(
        task=task, shape=tuple(shape), spacing=(1.5, 1.5, 2.5), tumour_radius_mm=(10.0, 22.0)
    )
    write_dataset(out / "data", layout, phantom, sum(splits), seed)
    base = {**DEMO_CONFIG, "output": str(out / "runs"), "seed": seed}
    cfg = load_config(
        None,
        [
            f"data.root={out / 'data'}",
            f"data.task={task}",
            f"data.layout={layout}",
            f"data.splits={list(splits)}",
            f"train.minutes={teacher_minutes}",
        ],
        base=base,
    )
    prepared = PreparedData(prepare_data(cfg, 0))

    print(f"[2/7] teacher {cfg['model']['teacher']['architecture']} ({teacher_minutes:g} min)")
    teacher_run = train(cfg, "teacher")
    student_cfg = load_config(
        None, [f"train.minutes={student_minutes}", f"distill.teacher={teacher_run}"], base=cfg
    )
    print(f"[3/7] HLFD student {cfg['model']['student']['architecture']} ({student_minutes:g} min)")
    student_run = train(student_cfg, "student")

    print("[4/7] export: model packages of student and teacher")
    model_dir = export(student_run, out / "model")
    teacher_dir = export(teacher_run, out / "runs" / "teacher-model", timing=False)
    untrained_dir = untrained_package(cfg, out / "runs" / "untrained-model", seed)

    print("[5/7] hlfd-segment on a held-out case")
    test_cases = prepared.eval_cases("test")
    test_case = test_cases[0]
    seg, report = out / "case.seg.nrrd", out / "case.report.json"
    code = segment_cli(
        [str(test_case.image), "-o", str(seg), "-m", str(model_dir), "--report", str(report)]
    )
    if code:
        raise SystemExit(f"hlfd-segment failed with exit code {code}")

    print(f"[6/7] evaluation through the runtime pipeline ({len(test_cases)} held-out cases)")
    results = {}
    for name, package in (
        ("teacher", teacher_dir),
        ("student (HLFD)", model_dir),
        ("untrained student", untrained_dir),
    ):
        rep = evaluate(load_package(package), test_cases, prepared.label_lut(), device="cpu")
        results[name] = {
            label: {k: s[k]["mean"] for k in ("dice", "hd95", "rvd")}
            for label, s in rep["summary"].items()
            if label != "lesions"  # the summed lesion-detection counts, not a label
        }

    print("[7/7] overlay and attention maps")
    import slicerio

    voxels = slicerio.read_segmentation(str(seg))["voxels"].transpose(2, 1, 0)
    pred = sitk.GetImageFromArray(voxels.astype(np.uint8))
    pred.CopyInformation(read_image(test_case.image))
    overlay(read_image(test_case.image), pred, out / "overlay.png")
    image, label = prepared.arrays(test_case.case_id)
    explain(
        [teacher_run, student_run],
        image,
        label,
        tumour_slices(np.asarray(label)),
        out / "attention.png",
        names=["teacher", "HLFD student"],
    )
    summary = {
        "task": task,
        "held_out_cases": [c.case_id for c in test_cases],
        "teacher": json.loads((teacher_run / "summary.json").read_text()),
        "student": json.loads((student_run / "summary.json").read_text()),
        "held_out": results,
        "segment_seconds": json.loads(report.read_text())["seconds"]["total"],
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = metrics_table(results, [c.case_id for c in test_cases])
    (out / "metrics.md").write_text(table, encoding="utf-8")
    shutil.rmtree(untrained_dir)
    print(table)
    print(
        f"outputs in {out}: model/, case.seg.nrrd, case.report.json, overlay.png, "
        f"attention.png, metrics.json ({summary['seconds_total']:.0f} s)"
    )
    return summary


def metrics_table(results: dict[str, dict], cases: list[str]) -> str:
    """Mean Dice and HD95 per label and model over the held-out cases, as markdown."""
    labels = list(next(iter(results.values())))
    head = (
        f"Held-out phantoms {', '.join(cases)}: mean over cases, runtime pipeline at original "
        "resolution.\n\n"
    )
    head += "| model | " + " | ".join(f"{lab} Dice" for lab in labels) + " | "
    head += " | ".join(f"{lab} HD95 (mm)" for lab in labels) + " |\n"
    head += "|---" * (1 + 2 * len(labels)) + "|\n"
    rows = []
    for name, per in results.items():
        dice = [f"{per[lab]['dice']:.3f}" for lab in labels]
        hd = ["n/a" if per[lab]["hd95"] is None else f"{per[lab]['hd95']:.1f}" for lab in labels]
        rows.append(f"| {name} | " + " | ".join(dice + hd) + " |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="kidney", choices=["kidney", "liver"])
    ap.add_argument("--teacher-minutes", type=float, default=5.0)
    ap.add_argument("--student-minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(args.out, args.task, args.teacher_minutes, args.student_minutes, args.seed)


if __name__ == "__main__":
    main()
