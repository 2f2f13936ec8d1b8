"""Robustness of trained models on held-out synthetic conditions the training stream rarely uses.

``hlfd-train synth robustness --task liver --models TEACHER STUDENT --out DIR`` segments a few
cases per condition through the runtime pipeline (exactly what ``hlfd-segment`` runs) and writes
``DIR/robustness-TASK.json`` and ``robustness-TASK.md``: organ and tumour Dice (tumour Dice over
tumour-bearing cases only), tumour volume called in tumour-free cases, and tumour called within
10 mm of a cut field-of-view border (where the real-CT failure was seen); and
``robustness-TASK-worst.png``, the last model's worst case per condition at its worst slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..evaluate import dice
from .generator import SynthConfig, SynthError, synth_case

# held-out conditions: each is a set of generator keys over the task's default stream
CONDITIONS: dict[str, dict[str, Any]] = {
    "standard": {},
    "FOV cut through the body": {"fov_cut": 1.0, "fov_mm": [260.0, 330.0]},
    "5 mm slices": {"slice_mm": [5.0], "slice_weights": [1.0]},
    "arterial phase": {"phases": {"arterial": 1.0}},
    "non-contrast": {"phases": {"non_contrast": 1.0}},
    "twice the noise": {"noise_hu": [30.0, 50.0]},
    "metal streaks": {"metal": 1.0},
    # the scored real CT's case: a portal-venous CT whose organ has no tumour
    "tumour-free, portal venous": {"tumour_free": 1.0, "phases": {"portal_venous": 1.0}},
    # ... and, for the kidney model, the liver tumours of that liver CT (the liver model: renal
    # tumours and cysts): lesions of the other organ, which must not be called tumour
    "tumour-free, other organ's lesions": {
        "tumour_free": 1.0,
        "other_organ_lesions": 1.0,
        "phases": {"portal_venous": 1.0},
    },
    # the patients of liver-tumour CTs: a fatty liver (tumours lose contrast) and free fluid
    "fatty liver, ascites": {"steatosis": 1.0, "ascites": 1.0},
    # a volume cropped to a box around the organ (Slicer's Crop Volume, a small reconstruction
    # field): organ and tumours run into the image border on every side
    "cropped to the organ, 134 mm": {"organ_crop": 1.0, "organ_crop_mm": [134.0, 134.0]},
}
SEED_BASE = 900_000  # far from the training datasets' case seeds


def evaluate_conditions(
    task: str, models: dict[str, Any], cases: int = 3, seed: int = 0, worst: dict | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """{condition: {model: metrics}} for loaded ``Segmenter`` objects ``models``; ``worst``,
    when given, gets {condition: the last model's worst case} (see :func:`worst_slice`)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    last = list(models)[-1]
    for k, (name, keys) in enumerate(CONDITIONS.items()):
        cfg = SynthConfig.from_dict(task, {"tumour_free": 0.25, **keys})
        per_model: dict[str, list[dict[str, float]]] = {m: [] for m in models}
        for i in range(cases):
            case = synth_case(cfg, SEED_BASE + 1000 * seed + 100 * k + i)
            image, _ = case.to_sitk()
            for m, segmenter in models.items():
                pred = sitk.GetArrayFromImage(segmenter(image).labels)
                per_model[m].append(case_metrics(pred, case.labels, case.spacing))
            row = per_model[last][-1]  # the loop ends on the last model: pred is its too
            if worst is not None and badness(row) > worst.get(name, {}).get("badness", -1):
                worst[name] = worst_slice(case, pred, row)
        out[name] = {m: summarise(rows) for m, rows in per_model.items()}
    return out


def badness(row: dict[str, float]) -> float:
    """How wrong a case went: missed organ plus missed tumour, or false tumour (10 mL counts
    as a whole miss) where there is none."""
    tumour = row["tumour_dice"]
    miss = 1.0 - tumour if np.isfinite(tumour) else min(row["tumour_free_fp_ml"] / 10.0, 1.0)
    return (1.0 - row["organ_dice"]) + miss


def worst_slice(case, pred: np.ndarray, row: dict[str, float]) -> dict[str, Any]:
    """The axial slice of ``case`` with the most wrongly labelled voxels, for the montage."""
    z = int(np.argmax((pred != case.labels).sum(axis=(1, 2))))
    return {
        "badness": badness(row),
        "row": row,
        "seed": case.meta["seed"],
        "phase": case.meta["phase"],
        "z": z,
        "image": case.image[z],
        "truth": case.labels[z],
        "pred": pred[z],
    }


def draw_slice(ax, image, organ, tumour, pred) -> None:
    """One axial slice in the CT window with the truth outlined (organ green, tumour yellow)
    and the prediction's labels dashed (organ blue, tumour red)."""
    ax.imshow(image, cmap="gray", vmin=-160, vmax=240)
    for mask, colour, style in (
        (organ, "lime", "solid"),
        (tumour, "yellow", "solid"),
        (pred > 0, "deepskyblue", "dashed"),
        (pred == 2, "red", "dashed"),
    ):
        if mask.any() and not mask.all():
            ax.contour(mask, [0.5], colors=colour, linewidths=0.8, linestyles=style)


def write_worst_montage(worst: dict[str, dict[str, Any]], model: str, path: Path) -> Path:
    """One panel per condition: the worst case's worst slice, truth and prediction outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(worst) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    fmt = lambda v: "-" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
    for ax, (cond, w) in zip(axes.flat, worst.items()):
        draw_slice(ax, w["image"], w["truth"] > 0, w["truth"] == 2, w["pred"])
        r = w["row"]
        fp = r["tumour_free_fp_ml"]
        extra = f", false tumour {fp:.1f} mL" if np.isfinite(fp) else ""
        ax.set_title(
            f"{cond}\nseed {w['seed']}, {w['phase']}, slice {w['z']}\n"
            f"organ {fmt(r['organ_dice'])}, tumour {fmt(r['tumour_dice'])}{extra}",
            fontsize=8,
        )
    fig.suptitle(
        f"{model}: worst case per condition (truth: organ green, tumour yellow; "
        "prediction dashed: organ blue, tumour red)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.0)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """Organ Dice (organ + tumour, as KiTS/LiTS report it), tumour Dice (NaN when the case has
    no tumour), tumour mL called in a tumour-free case, tumour mL within 10 mm of the border."""
    ml = float(np.prod(spacing)) / 1000.0

    has_tumour = bool((truth == 2).any())
    border = np.zeros(pred.shape[1:], dtype=bool)
    m = max(1, round(10.0 / spacing[0]))
    border[:m], border[-m:], border[:, :m], border[:, -m:] = True, True, True, True
    fp_border = (pred == 2) & (truth != 2) & border[None]
    return {
        "organ_dice": dice(pred > 0, truth > 0),
        "tumour_dice": dice(pred == 2, truth == 2) if has_tumour else float("nan"),
        "tumour_free_fp_ml": float((pred == 2).sum()) * ml if not has_tumour else float("nan"),
        "border_fp_ml": float(fp_border.sum()) * ml,
    }


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        k: float(np.nanmean([r[k] for r in rows]))
        if any(np.isfinite(r[k]) for r in rows)
        else float("nan")
        for k in rows[0]
    }


def write_robustness(
    out: str | Path, task: str, model_paths: list[Path], cases: int, seed: int
) -> Path:
    from HLFDSegmentLib.modelpackage import load_package
    from HLFDSegmentLib.pipeline import Segmenter

    models = {}
    for path in model_paths:
        package = load_package(path)
        arch = package.card["network"]["architecture"]
        name = f"{package.name} {package.version} ({arch})"
        if name in models:
            raise SynthError(f"{path}: the same model as another of --models ({name})")
        models[name] = Segmenter(package, "cpu")
    worst: dict[str, dict[str, Any]] = {}
    results = evaluate_conditions(task, models, cases, seed, worst)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    montage = write_worst_montage(worst, name, out / f"robustness-{task}-worst.png")
    (out / f"robustness-{task}.json").write_text(
        json.dumps({"task": task, "cases": cases, "results": results}, indent=2)
    )
    fmt = lambda v: "n/a" if not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = [
        f"### {task}: {cases} held-out synthetic cases per condition",
        "",
        "| condition | model | organ Dice | tumour Dice | tumour mL, tumour-free cases"
        " | tumour mL at a cut border |",
        "|---|---|---|---|---|---|",
    ]
    for cond, per_model in results.items():
        for m, r in per_model.items():
            lines.append(
                f"| {cond} | {m} | {fmt(r['organ_dice'])} | {fmt(r['tumour_dice'])} | "
                f"{fmt(r['tumour_free_fp_ml'])} | {fmt(r['border_fp_ml'])} |"
            )
    lines += ["", f"Worst case per condition ({name}): ![worst cases]({montage.name})"]
    path = out / f"robustness-{task}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
