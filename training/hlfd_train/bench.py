"""The distillation benchmark: every method against ``none`` on phantom tasks, several seeds.

    hlfd-train bench [--preset quick|full] [--out runs/kd-bench] [--report docs/results/...]

For each task: one phantom dataset (difficulty settings recorded in the report), one teacher,
then each method x seed distills the same student for the same number of steps from the same
teacher on the same data. Every run is evaluated per case on the held-out phantoms through the
runtime pipeline. Finished runs and evaluations are kept, so an interrupted benchmark resumes
where it stopped. The report gives mean ± sd over seeds, a paired Wilcoxon signed-rank test of
each method against ``none`` over (case, seed) pairs, efficiency (parameters, MACs, CPU seconds
per volume), ablations of HLFD, and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset

from .cards import code_version
from .config import CPU_PHANTOM_RECIPE, load_config, merge
from .data import PreparedData
from .engine import prepare_data, run_folder, train
from .evaluate import evaluate
from .export import export

METHODS = ("none", "kd", "at", "fitnet", "deep", "cwd", "ifd", "hifd", "hlfd")
ABLATIONS: dict[str, dict[str, Any]] = {
    "hlfd-feature-only": {"pixel_level": False},
    "hlfd-pixel-only": {"feature_level": False},
    "hlfd-unified-only": {"individual": False},
    "hlfd-individual-only": {"unified": False},
    "hlfd-p2": {"p": 2.0},
    "hlfd-T1": {"temperature": 1.0},
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """How much the benchmark runs (the full preset is sized for ~90 min on 2 CPU cores)."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    splits: tuple[int, int, int]  # train, val, test cases
    shape: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    ablations: tuple[str, ...] = ()
    timing_slices: int = 200  # CPU seconds are measured on a (timing_slices, 512, 512) CT
    overrides: tuple[str, ...] = ()  # config overrides, e.g. other networks


PRESETS = {
    "smoke": Preset(  # seconds: proves the whole flow in the tests
        tasks=("kidney",),
        methods=("none", "hlfd"),
        seeds=(0,),
        splits=(2, 1, 1),
        shape=(16, 96, 96),
        teacher_steps=4,
        student_steps=4,
        ablations=("hlfd-pixel-only",),
        timing_slices=8,
        overrides=(
            "model.teacher.architecture=tiny_unet2d",
            "model.teacher.kwargs.base=8",
            "model.student.architecture=tiny_unet2d",
            "model.student.kwargs.base=4",
            "data.crop=[64, 64]",
            "train.batch_size=2",
        ),
    ),
    "quick": Preset(
        tasks=("kidney",),
        methods=("none", "kd", "hlfd"),
        seeds=(0,),
        splits=(4, 1, 2),
        shape=(32, 192, 192),
        teacher_steps=150,
        student_steps=120,
        timing_slices=48,
    ),
    "full": Preset(
        tasks=("kidney", "liver"),
        methods=METHODS,
        seeds=(0, 1, 2),
        splits=(10, 2, 6),
        shape=(48, 224, 224),
        teacher_steps=600,
        student_steps=150,
        ablations=tuple(ABLATIONS),
    ),
}

# Phantom difficulty: tumours large and distinct enough that a teacher can learn them, with
# look-alike cysts and noise so that a small student does not get them for free.
DIFFICULTY = {
    "kidney": PhantomConfig(
        task="kidney",
        spacing=(1.5, 1.5, 2.5),
        tumours=(1, 2),
        tumour_radius_mm=(12.0, 24.0),
        tumour_contrast_hu=(-80.0, -35.0),
        cysts=(0, 2),
        noise_hu=18.0,
    ),
    "liver": PhantomConfig(
        task="liver",
        spacing=(1.5, 1.5, 2.5),
        tumours=(1, 3),
        tumour_radius_mm=(10.0, 22.0),
        tumour_contrast_hu=(-70.0, -30.0),
        cysts=(0, 2),
        noise_hu=18.0,
    ),
}

BASE = merge(CPU_PHANTOM_RECIPE, {"train": {"tensorboard": False}})


def task_config(out: Path, task: str, preset: Preset, **train: Any) -> dict[str, Any]:
    """The resolved config of one task's runs (methods and seeds are set per run)."""
    steps = train.pop("steps", preset.student_steps)
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
    ]
    return load_config(None, overrides, base=BASE)


def write_phantoms(out: Path, task: str, preset: Preset) -> Path:
    root = out / task / "data"
    if not (root / ".complete").is_file():
        cfg = dataclasses.replace(DIFFICULTY[task], shape=preset.shape)
        layout = "kits19" if task == "kidney" else "lits"
        write_dataset(root, layout, cfg, sum(preset.splits), seed=1000)
        (root / ".complete").write_text("done\n")
    return root


def run_one(cfg: dict[str, Any], role: str, log) -> tuple[Path, float]:
    """Train (or find finished) one run; returns its folder and its training seconds."""
    folder = run_folder(cfg, role)
    if not (folder / "summary.json").is_file():
        log(f"  training {folder.relative_to(Path(cfg['output']).parent)}")
        train(cfg, role, progress=False)
    summary = json.loads((folder / "summary.json").read_text())
    return folder, float(summary["seconds"])


def evaluate_run(folder: Path, prepared: PreparedData) -> dict[str, Any]:
    """Per-case metrics of a run on the test split (cached in ``<run>/bench-eval.json``)."""
    cached = folder / "bench-eval.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    package = export(folder, folder / "package", timing=False)
    report = evaluate(load_package(package), prepared.eval_cases("test"), prepared.label_lut())
    cached.write_text(json.dumps(report, indent=2) + "\n")
    return report


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank test of ``a - b`` (two-sided); ``p`` is None when all pairs tie."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, float) - np.asarray(b, float)
    out: dict[str, Any] = {"n": int(diff.size), "median_diff": float(np.median(diff))}
    if diff.size == 0 or np.allclose(diff, 0):
        out["p"] = None
    else:
        out["p"] = float(wilcoxon(diff, zero_method="wilcox").pvalue)
    return out


def collect(report: dict[str, Any], label: str, metric: str) -> list[float | None]:
    return [row["labels"][label][metric] for row in report["cases"]]


def summarise_task(runs: dict[str, dict[int, dict]], labels: list[str]) -> dict[str, Any]:
    """Mean ± sd over seeds of the per-seed case means, and the paired test against none."""
    out: dict[str, Any] = {}
    base = runs.get("none", {})
    for method, per_seed in runs.items():
        entry: dict[str, Any] = {}
        for label in labels:
            for metric in ("dice", "hd95", "rvd"):
                seed_means = []
                for report in per_seed.values():
                    vals = [v for v in collect(report, label, metric) if v is not None]
                    if vals:
                        seed_means.append(float(np.mean(vals)))
                entry[f"{label}.{metric}"] = {
                    "mean": float(np.mean(seed_means)) if seed_means else None,
                    "sd": float(np.std(seed_means)) if seed_means else None,
                }
            if method != "none" and base:
                pairs_a, pairs_b = [], []
                for seed, report in per_seed.items():
                    if seed in base:
                        pairs_a += collect(report, label, "dice")
                        pairs_b += collect(base[seed], label, "dice")
                entry[f"{label}.vs_none"] = paired_test(pairs_a, pairs_b)
        out[method] = entry
    return out


def efficiency(cfg: dict[str, Any], teacher: Path, student: Path, slices: int) -> list[dict]:
    """Parameters, MACs per 256² slice and CPU seconds per (slices, 512, 512) volume."""
    import SimpleITK as sitk

    from HLFDSegmentLib.nets import count_macs, count_parameters
    from HLFDSegmentLib.pipeline import Segmenter

    from .export import export as export_run

    ct = _timing_ct(slices)
    rows = []
    for role, folder in (("teacher", teacher), ("student", student)):
        package = load_package(export_run(folder, folder / "package-timing", timing=False))
        net = package.build_network()
        seg = Segmenter(package, device="cpu")
        seg(sitk.Image(ct))  # warm-up
        t0 = time.perf_counter()
        seg(ct)
        rows.append(
            {
                "role": role,
                "architecture": package.card["network"]["architecture"],
                "parameters_m": count_parameters(net) / 1e6,
                "gmacs_per_256_slice": count_macs(net, (1, 1, 256, 256)) / 1e9,
                "cpu_seconds": time.perf_counter() - t0,
                "volume": f"{slices}x512x512",
            }
        )
    return rows


def _timing_ct(slices: int):
    from HLFDSegmentLib.phantom import make_phantom

    cfg = dataclasses.replace(DIFFICULTY["kidney"], shape=(slices, 512, 512), spacing=None)
    image, _ = make_phantom(cfg, seed=7).to_sitk()
    return image


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_bench(
    preset_name: str = "quick", out: Path = Path("runs/kd-bench"), report: Path | None = None
) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes ``results.json``, plots and the markdown report."""
    preset = PRESETS[preset_name]
    out = Path(out)
    report = Path(report or out / "kd-benchmark.md")
    figures = report.parent / report.stem  # PNGs beside the report: a committed report shows them
    figures.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "preset": preset_name,
        "settings": dataclasses.asdict(preset),
        "code_version": code_version(),
        "machine": machine(),
        "tasks": {},
    }
    for task in preset.tasks:
        print(f"[{task}] phantoms, teacher", flush=True)
        write_phantoms(out, task, preset)
        teacher_cfg = task_config(out, task, preset, steps=preset.teacher_steps)
        prepared = PreparedData(prepare_data(teacher_cfg, 0))
        teacher, teacher_seconds = run_one(teacher_cfg, "teacher", print)
        labels = [lab for lab in prepared.labels.values() if lab != "background"]
        evals = {"teacher": {0: evaluate_run(teacher, prepared)}}
        seconds = {"teacher": teacher_seconds}
        folders: dict[str, Path] = {}
        variants = [(m, {}) for m in preset.methods]
        variants += [(a, ABLATIONS[a]) for a in preset.ablations]
        for name, options in variants:
            method = "hlfd" if name in ABLATIONS else name
            for seed in preset.seeds:
                cfg = task_config(out, task, preset)
                cfg = load_config(
                    None,
                    [
                        f"seed={seed}",
                        f"run={name}-seed{seed}",
                        f"distill.method={method}",
                        f"distill.teacher={teacher}",
                    ],
                    base={**cfg, "distill": {**cfg["distill"], "options": options}},
                )
                folder, secs = run_one(cfg, "student", print)
                evals.setdefault(name, {})[seed] = evaluate_run(folder, prepared)
                seconds.setdefault(name, 0.0)
                seconds[name] += secs
                folders.setdefault(name, folder)
        summary = summarise_task({k: v for k, v in evals.items() if k != "teacher"}, labels)
        summary["teacher"] = summarise_task({"teacher": evals["teacher"]}, labels)["teacher"]
        first = preset.methods[0]
        results["tasks"][task] = {
            "difficulty": _difficulty(task, preset),
            "labels": labels,
            "summary": summary,
            "train_seconds": seconds,
            "efficiency": efficiency(teacher_cfg, teacher, folders[first], preset.timing_slices),
            "evaluations": {k: {str(s): r for s, r in v.items()} for k, v in evals.items()},
        }
        plot_task(figures, task, results["tasks"][task], teacher, folders, prepared)
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(out / "results.csv", results)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(results, out, figures.name), encoding="utf-8")
    print(f"report: {report}; every run's numbers: {out / 'results.json'}", flush=True)
    return results


def _difficulty(task: str, preset: Preset) -> dict[str, Any]:
    cfg = dataclasses.asdict(dataclasses.replace(DIFFICULTY[task], shape=preset.shape))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def write_csv(path: Path, results: dict[str, Any]) -> None:
    """One row per task, run, seed, case and label."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "run", "seed", "case", "label", "dice", "hd95", "rvd"])
        for task, t in results["tasks"].items():
            for run, per_seed in t["evaluations"].items():
                for seed, rep in per_seed.items():
                    for row in rep["cases"]:
                        for label, m in row["labels"].items():
                            w.writerow(
                                [
                                    task,
                                    run,
                                    seed,
                                    row["case"],
                                    label,
                                    m["dice"],
                                    m["hd95"],
                                    m["rvd"],
                                ]
                            )


def plot_task(out, task, result, teacher, folders, prepared) -> None:
    """Dice per method with error bars, validation curves, and the attention figure."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .explain import explain, tumour_slices

    summary, labels = result["summary"], result["labels"]
    names = [n for n in summary if n != "teacher"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        means = [summary[n][f"{label}.dice"]["mean"] or 0 for n in names]
        sds = [summary[n][f"{label}.dice"]["sd"] or 0 for n in names]
        ax.bar(names, means, yerr=sds, capsize=3, color="tab:blue")
        teacher_dice = summary["teacher"][f"{label}.dice"]["mean"]
        if teacher_dice is not None:
            ax.axhline(teacher_dice, color="tab:red", ls="--", label="teacher")
            ax.legend()
        ax.set_title(f"{task}: {label} Dice (mean ± sd over seeds)")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(out / f"{task}-dice.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, folder in folders.items():
        with (folder / "log.csv").open(newline="", encoding="utf-8") as f:
            pts = [
                (float(r["step"]), float(r["val.mean"]))
                for r in csv.DictReader(f)
                if r.get("val.mean")
            ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation mean Dice (seed of the first run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{task}-curves.png", dpi=90)
    plt.close(fig)

    case = prepared.cases("test")[0]
    image, label = prepared.arrays(case)
    models = [teacher] + [folders[n] for n in ("none", "hlfd") if n in folders]
    explain(
        models,
        image,
        label,
        tumour_slices(np.asarray(label), 1),
        out / f"{task}-attention.png",
        names=["teacher"] + [f"student {n}" for n in ("none", "hlfd") if n in folders],
    )


def _train_minutes(results: dict[str, Any]) -> float:
    return sum(sum(t["train_seconds"].values()) for t in results["tasks"].values()) / 60


def _fmt(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def markdown(results: dict[str, Any], out: Path, figures: str) -> str:
    """The report: command, version, machine, settings, tables, plots (in ``figures/``)."""
    preset = results["preset"]
    rel = Path(figures)
    lines = [
        "# Distillation benchmark on phantom CTs",
        "",
        f"Command: `hlfd-train bench --preset {preset} --out {out}`  ",
        f"Code: `{results['code_version']}`  ",
        f"Machine: {results['machine']}  ",
        f"Training time of all runs: {_train_minutes(results):.1f} min; this invocation "
        f"(finished runs are reused): {results['seconds_total'] / 60:.1f} min",
        "",
        f"Settings: `{json.dumps(results['settings'])}`",
        "",
    ]
    seeds = len(results["settings"]["seeds"])
    if seeds < 3:
        lines += [
            f"**{seeds} seed(s) on {results['settings']['splits'][2]} held-out cases with a short "
            "budget: this run checks the flow; it is not evidence for or against any method "
            "(the paired test cannot reach significance with so few pairs).**",
            "",
        ]
    for task, t in results["tasks"].items():
        labels = t["labels"]
        lines += [f"## {task}", "", f"Phantom difficulty: `{json.dumps(t['difficulty'])}`", ""]
        head = "| run | " + " | ".join(
            f"{lab} Dice | {lab} HD95 (mm) | {lab} Dice vs none: median diff, p" for lab in labels
        )
        lines += [head + " |", "|---" * (1 + 3 * len(labels)) + "|"]
        for name, s in t["summary"].items():
            cells = []
            for lab in labels:
                test = s.get(f"{lab}.vs_none")
                tested = (
                    "—"
                    if not test
                    else f"{test['median_diff']:+.3f}, "
                    + ("n/a" if test["p"] is None else f"{test['p']:.3f}")
                )
                cells += [_fmt(s[f"{lab}.dice"]), _fmt(s[f"{lab}.hd95"], 1), tested]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean ± sd over seeds of the per-seed mean over held-out cases, runtime pipeline at "
            "original resolution. Paired test: Wilcoxon signed-rank, two-sided, on the Dice of "
            "each (case, seed) pair against `none`. Teacher: one run.",
            "",
            "| role | architecture | params (M) | GMACs / 256² slice | CPU s / volume |",
            "|---|---|---|---|---|",
        ]
        for e in t["efficiency"]:
            lines.append(
                f"| {e['role']} | {e['architecture']} | {e['parameters_m']:.2f} | "
                f"{e['gmacs_per_256_slice']:.2f} | {e['cpu_seconds']:.1f} ({e['volume']}) |"
            )
        lines += [
            "",
            f"![Dice]({rel / f'{task}-dice.png'}) ![curves]({rel / f'{task}-curves.png'})",
            "",
            f"![attention]({rel / f'{task}-attention.png'})",
            "",
        ]
    return "\n".join(lines) + "\n"
