"""Export a synthetic-CT recipe's distilled student as a built-in model of the extension.

    python -m hlfd_train.ship liver|kidney [--recipe NAME] [--runs runs] [--dest DIR]

Reads ``training/configs/synth-<task>.yaml`` (or ``--recipe``), takes its student run
(``<method>-seed<seed>``) and its teacher's validation figures, and writes ``<dest>/<task>/``
as a float16 package with its ONNX graph, whose card says what the model is: trained on
synthetic CT only, not for diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from HLFDSegmentLib.model_registry import BUILTIN_DIR

from .config import load_config
from .export import export

ROOT = Path(__file__).resolve().parents[2]
TITLES = {"liver": "Liver + liver tumor", "kidney": "Kidney + kidney tumor"}
MIN_ISLAND_ML = {"liver": 0.1, "kidney": 0.5}  # KiTS tumours start near 1 mL; LiTS has tiny ones


def _validation(run: Path) -> str:
    best = json.loads((run / "best.json").read_text()) if (run / "best.json").is_file() else {}
    figures = [
        f"{k.removeprefix('val.')} {v:.2f}"
        for k, v in best.items()
        if k.startswith("val.") and k != "val.mean"
    ]
    return ", ".join(figures) or "not recorded"


def ship(
    task: str,
    runs: Path | None = None,
    dest: Path = BUILTIN_DIR,
    recipe: str | None = None,
    version: str = "0.2.0",
) -> Path:
    cfg = load_config(ROOT / "training" / "configs" / f"{recipe or f'synth-{task}'}.yaml")
    base = Path(runs or cfg["output"]) / cfg["name"]
    method = cfg["distill"]["method"]
    student = base / f"{method}-seed{cfg['seed']}"
    architecture = cfg["model"]["student"]["architecture"]
    if method == "none":  # a stage trained with the task loss alone
        what, teacher_figures = f"A {architecture} student, this stage without a teacher.", ""
    else:
        teacher = Path(cfg["distill"]["teacher"] or base / "teacher")  # run folder or weights
        teacher = teacher.parent if teacher.suffix == ".safetensors" else teacher
        what = (
            f"A {architecture} student distilled ({method}) from a "
            f"{cfg['model']['teacher']['architecture']} teacher."
        )
        teacher_figures = f"; teacher {_validation(teacher)}"
    description = (
        f"{TITLES[task]} on CT. {what} Trained on synthetic CT only (hlfd_train.synth, no "
        "patient data): its accuracy on real scans is not validated. Research use only; not "
        "for diagnosis. Dice on held-out synthetic validation cases: student "
        f"{_validation(student)}{teacher_figures}."
    )
    init = cfg["model"]["student"].get("init")
    if init:  # a second stage: say what it started from
        description += f" Fine-tuned ({cfg['name']}) from the weights of {init}."
    return export(
        student,
        Path(dest) / task,
        half=True,
        onnx=True,  # the CPU path without PyTorch (--backend onnx)
        card_fields={
            "name": f"synth-{task}-student",
            "version": version,
            "title": f"{TITLES[task]} (student, synthetic CT)",
            "description": description,
            "postprocessing": {"min_island_ml": MIN_ISLAND_ML[task]},
        },
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(TITLES))
    ap.add_argument("--runs", type=Path, help="runs folder (default: the recipe's output)")
    ap.add_argument("--dest", type=Path, default=BUILTIN_DIR)
    ap.add_argument("--recipe", help="config name in training/configs (default synth-TASK)")
    ap.add_argument("--version", default="0.2.0", help="the package's version (default 0.2.0)")
    args = ap.parse_args(argv)
    out = ship(args.task, args.runs, args.dest, args.recipe, args.version)
    print(f"built-in model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
