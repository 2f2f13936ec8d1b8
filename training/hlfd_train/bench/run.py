"""The distillation benchmark: every method against ``none`` on phantom or synthetic-CT tasks,
several seeds.

    hlfd-train bench [--preset smoke|quick|cpu|gpu|full] [--toy] [--out DIR] [--report R.md]

For each task: one dataset (phantoms or the synthesis engine's CT, the settings recorded in the
report), one teacher;
then, if the preset tunes, every method gets the same small grid (weights x temperatures) on
the validation split with one seed, and its best point is used for every seed (at the tuning
seed the best point's run is that seed's run: the same configuration is not trained twice);
then each method x seed distills the same student for the same number of steps from the same
teacher on the same data, evaluated per case on the test split through the runtime pipeline.
Finished runs and evaluations are kept, so an interrupted benchmark resumes where it stopped. The
report (``report.py``) states the primary comparison before any number, then per label mean
± sd over seeds, differences to ``none`` with bootstrap 95% CIs over cases and seeds, Wilcoxon
tests over cases (seeds averaged per case) with Holm's correction (``stats.py``), efficiency,
ablations and plots.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from HLFDSegmentLib.phantom import write_dataset

from ..cards import code_version
from ..config import CPU_PHANTOM_RECIPE, ConfigError, load_config, merge
from ..data import PreparedData
from ..engine import prepare_data, prepared_folder
from ..evaluate import COMPOSITE_SUFFIX
from ..synth.write import write_synth
from .pool import Job, cores, run_jobs
from .presets import (
    DIFFICULTY,
    PRESETS,
    Preset,
    difficulty,
    grid,
    grid_label,
    method_of,
    synth_config,
    toy,
)
from .report import efficiency, machine, markdown, plot_task, write_csv
from .stats import summarise_task, tumour_label

# no TensorBoard events and no curves.png per run: the report plots every run's validation
# curve from its log.csv (a figure per run cost more than a toy run's training)
BASE = merge(CPU_PHANTOM_RECIPE, {"train": {"tensorboard": False, "curves": False}})
PHANTOM_GENERATION = 2  # 2: tumour sites kept inside the field of view


def task_config(out: Path, task: str, preset: Preset, role: str) -> dict[str, Any]:
    """The resolved config of one task's teacher or students (methods and seeds set per run)."""
    steps = preset.teacher_steps if role == "teacher" else preset.student_steps
    extra = preset.teacher_overrides if role == "teacher" else ()
    every = max(1, min(steps, max(10, steps // 4)))
    overrides = [
        f"name={task}",
        f"output={out / 'runs'}",
        f"data.root={out / task / 'data'}",
        f"data.task={task}",
        f"data.layout={'kits19' if task == 'kidney' else 'lits'}",
        f"data.splits={list(preset.splits)}",
        f"train.steps={steps}",
        f"train.val_every={every}",
        f"train.checkpoint_every={every}",
        *preset.overrides,
        *extra,
    ]
    return load_config(None, overrides, base=BASE)


def write_data(out: Path, task: str, preset: Preset) -> Path:
    """The task's dataset, phantoms or synthetic CT (written once; ``.complete`` records what
    was written)."""
    root = out / task / "data"
    made = json.dumps(
        {
            "difficulty": difficulty(task, preset),
            "cases": sum(preset.splits),
            "generation": PHANTOM_GENERATION,
        }
    )
    marker = root / ".complete"
    if marker.is_file():
        if marker.read_text(encoding="utf-8").strip() != made:
            raise ConfigError(f"{root}: data of other settings; use another --out")
        return root
    layout = "kits19" if task == "kidney" else "lits"
    if preset.data == "synth":
        write_synth(root, synth_config(task, preset), sum(preset.splits), seed=1000, layout=layout)
    else:
        cfg = dataclasses.replace(DIFFICULTY[task], shape=preset.shape)
        write_dataset(root, layout, cfg, sum(preset.splits), seed=1000)
    marker.write_text(made + "\n", encoding="utf-8")
    return root


def run_options(name: str, preset: Preset, tuned: dict[str, Any] | None = None) -> dict:
    """Method options of a run: the ablation's, the tuned point, and FitNet's stage length
    (hint stage = the first half of the student budget)."""
    method, options = method_of(name)
    options = {**options, **(tuned or {})}
    if method == "fitnet" and options.get("schedule", "two-stage") == "two-stage":
        options["hint_steps"] = preset.student_steps // 2
    return options


def student_config(
    out: Path,
    task: str,
    preset: Preset,
    name: str,
    seed: int,
    teacher: Path,
    options: dict[str, Any] | None = None,
    run: str | None = None,
) -> dict[str, Any]:
    """The config of one student run: a method (or an ablation), its options and a seed."""
    cfg = task_config(out, task, preset, "student")
    method, _ = method_of(name)
    opts = run_options(name, preset) if options is None else options
    return load_config(
        None,
        [
            f"seed={seed}",
            f"run={run or f'{name}-seed{seed}'}",
            f"distill.method={method}",
            f"distill.teacher={teacher}",
        ],
        base={**cfg, "distill": {**cfg["distill"], "options": opts}},
    )


def tuning_run(name: str, point: str) -> str:
    """The run folder name of a method's tuning grid point."""
    return f"tune-{name}-{point}"


def tune(out: Path, preset: Preset, teachers: dict[str, Job], done: dict, workers: int) -> dict:
    """The tuning grid of every method on the validation split; returns, per task and method,
    every grid point's validation tumour Dice and the chosen options."""
    if preset.tuning is None:
        return {}
    seed = preset.tuning.seed
    jobs: dict[tuple[str, str, str], tuple[Job, dict]] = {}
    for task, t in teachers.items():
        for name in preset.methods_of(task):
            if name == "none":
                continue
            base = run_options(name, preset)
            for point in grid(name, preset.tuning):
                options = run_options(name, preset, point)
                label = grid_label(name, point)
                cfg = student_config(
                    out, task, preset, name, seed, done[t][0], options, tuning_run(name, label)
                )
                job = Job(task, f"{name} {label}", seed, "student", cfg, split="val")
                jobs[(task, name, label)] = (
                    job,
                    {k: v for k, v in options.items() if k not in base or base[k] != v},
                )
    print(f"tuning: {len(jobs)} runs on the validation split", flush=True)
    results = run_jobs([j for j, _ in jobs.values()], workers, print)
    tuned: dict[str, dict[str, Any]] = {}
    for (task, name, label), (job, changed) in jobs.items():
        labels = list(results[job][2]["summary"])
        tumour = tumour_label(labels) or labels[0]
        score = results[job][2]["summary"][tumour]["dice"]["mean"]
        entry = tuned.setdefault(task, {}).setdefault(name, {"grid": [], "chosen": None})
        entry["grid"].append({"point": label, "options": changed, "val_tumour_dice": score})
    for per_task in tuned.values():
        for entry in per_task.values():
            best = max(
                entry["grid"],
                key=lambda g: -1.0 if g["val_tumour_dice"] is None else g["val_tumour_dice"],
            )
            entry["chosen"] = best
    return tuned


def run_bench(
    preset_name: str = "full",
    out: Path | None = None,
    report: Path | None = None,
    workers: int | None = None,
    toy_size: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes ``results.json``, plots and the markdown report.

    ``workers``: training processes side by side (default: the preset's, else one per two
    cores, at least two). ``toy_size``: the preset's tasks, methods and grid at toy size on the
    CPU (checks a GPU preset's flow; see ``toy``).
    """
    preset = PRESETS[preset_name]
    if toy_size:
        preset = toy(preset)
    workers = workers or preset.workers or max(2, cores() // 2)
    out = Path(out or f"runs/kd-bench-{preset_name}{'-toy' if toy_size else ''}")
    report = Path(report or out / "kd-benchmark.md")
    figures = report.parent / report.stem  # PNGs beside the report: a committed report shows them
    figures.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "preset": preset_name + (" (toy size)" if toy_size else ""),
        "settings": dataclasses.asdict(preset),
        "code_version": code_version(),
        "machine": machine(),
        "workers": f"{workers} training processes x {max(1, cores() // workers)} thread(s)",
        "tasks": {},
    }
    teachers = {}
    for task in preset.tasks:
        write_data(out, task, preset)
        cfg = task_config(out, task, preset, "teacher")
        prepare_data(cfg, 0)
        teachers[task] = Job(task, "teacher", 0, "teacher", cfg)
    print(f"teachers of {', '.join(preset.tasks)}", flush=True)
    done = run_jobs(list(teachers.values()), workers, print)
    tuned = tune(out, preset, teachers, done, workers)
    students = []
    runs = [(seed, task, name) for task in teachers for seed, name in preset.student_runs(task)]
    order = {s: i for i, s in enumerate((*preset.seeds, *preset.primary_seeds))}
    for seed, task, name in sorted(runs, key=lambda r: order[r[0]]):  # seed by seed
        chosen = tuned.get(task, {}).get(name, {}).get("chosen")
        options = run_options(name, preset, chosen and chosen["options"])
        # at the tuning seed the chosen grid point is this very run: trained once
        shared = chosen and seed == preset.tuning.seed
        run = tuning_run(name, chosen["point"]) if shared else None
        teacher = done[teachers[task]][0]
        cfg = student_config(out, task, preset, name, seed, teacher, options, run)
        students.append(Job(task, name, seed, "student", cfg))
    print(f"students: {len(students)} runs", flush=True)
    done.update(run_jobs(students, workers, print))

    for task, teacher_job in teachers.items():
        prepared = PreparedData(prepared_folder(teacher_job.cfg))
        labels = [lab for lab in prepared.labels.values() if lab != "background"]
        organs = [lab for lab in labels if tumour_label([lab]) is None]
        if len(organs) == 1 and tumour_label(labels):
            labels.append(organs[0] + COMPOSITE_SUFFIX)
        mine = [j for j in (teacher_job, *students) if j.task == task]
        evals: dict[str, dict[int, dict]] = {}
        seconds: dict[str, float] = {}
        folders: dict[str, Path] = {}
        for job in mine:
            folder, secs, evaluation = done[job]
            evals.setdefault(job.name, {})[job.seed] = evaluation
            seconds[job.name] = seconds.get(job.name, 0.0) + secs
            folders.setdefault(job.name, folder)
        teacher = folders.pop("teacher")
        family = [m for m in preset.methods_of(task) if m != "none"]
        summary = summarise_task(evals, labels, family, preset.bootstrap)
        print(f"[{task}] efficiency on a {preset.timing_slices}x512x512 CT", flush=True)
        results["tasks"][task] = {
            "difficulty": difficulty(task, preset),
            "labels": labels,
            "summary": summary,
            "tuning": tuned.get(task, {}),
            "train_seconds": seconds,
            "efficiency": efficiency(
                teacher,
                folders[preset.methods_of(task)[0]],
                preset.timing_slices,
                # other networks' speed is the same in each task
                others=preset.time_others and task == preset.tasks[0],
            ),
            "evaluations": {k: {str(s): r for s, r in v.items()} for k, v in evals.items()},
        }
        plot_task(figures, task, results["tasks"][task], teacher, folders, prepared)
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    for folder in (out, figures):  # the run folder, and beside the report for committing
        (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n", "utf-8")
        write_csv(folder / "results.csv", results)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(results, out, figures.name), encoding="utf-8")
    print(f"report: {report}; every run's numbers: {out / 'results.json'}", flush=True)
    return results
