"""The distillation benchmark: every method against ``none`` on phantom tasks, several seeds.

    hlfd-train bench [--preset quick|full | --quick] [--out runs/kd-bench-full] [--report R.md]

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
import yaml

from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset

from .cards import code_version
from .config import CPU_PHANTOM_RECIPE, ConfigError, load_config, merge
from .data import PreparedData
from .engine import comparable, prepare_data, prepared_folder, run_folder, train
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
    teacher_overrides: tuple[str, ...] = ()  # applied after ``overrides`` to the teacher only


# 3 mm in-plane grid and 96² crops: what 2 CPU cores can train in the benchmark's time
CPU_BENCH = ("data.crop=[96, 96]", "data.preprocessing.spacing=[3.0, 3.0, null]")

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
    "quick": Preset(  # ~10 min: checks the flow on one task; not evidence
        tasks=("kidney",),
        methods=("none", "kd", "hlfd"),
        seeds=(0,),
        splits=(6, 1, 2),
        shape=(40, 160, 160),
        teacher_steps=150,
        student_steps=100,
        timing_slices=48,
        overrides=CPU_BENCH,
        teacher_overrides=("train.batch_size=16",),
    ),
    "full": Preset(  # ~90 min on 2 cores
        tasks=("kidney", "liver"),
        methods=METHODS,
        seeds=(0, 1, 2),
        splits=(8, 2, 6),
        shape=(40, 160, 160),
        teacher_steps=300,
        student_steps=150,
        ablations=tuple(ABLATIONS),
        overrides=CPU_BENCH,
        teacher_overrides=("train.batch_size=16",),
    ),
}

# Phantom difficulty, calibrated so that the teacher learns the tumours within the budget
# (validation tumour Dice 0.84 for kidney and 0.92 for liver after 200 teacher steps of 16
# crops; smaller, fainter liver tumours left the teacher at 0.73 on held-out cases) while a
# student trained for a fraction of that does not: large, clearly hypodense tumours, with
# look-alike cysts and noise; no hyperdense or necrotic tumours.
_COMMON = dict(
    spacing=(2.5, 2.5, 3.0),
    hyper_fraction=0.0,
    necrosis=0.0,
    texture_hu=6.0,
    noise_hu=12.0,
    cysts=(0, 2),
)
DIFFICULTY = {
    "kidney": PhantomConfig(
        task="kidney",
        tumours=(1, 2),
        tumour_radius_mm=(18.0, 32.0),
        tumour_contrast_hu=(-130.0, -90.0),
        **_COMMON,
    ),
    "liver": PhantomConfig(
        task="liver",
        tumours=(1, 2),
        tumour_radius_mm=(16.0, 30.0),
        tumour_contrast_hu=(-120.0, -80.0),
        **_COMMON,
    ),
}

BASE = merge(CPU_PHANTOM_RECIPE, {"train": {"tensorboard": False}})


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


def write_phantoms(out: Path, task: str, preset: Preset) -> Path:
    """The task's phantom dataset (written once; ``.complete`` records what was written)."""
    root = out / task / "data"
    made = json.dumps({"difficulty": _difficulty(task, preset), "cases": sum(preset.splits)})
    marker = root / ".complete"
    if marker.is_file():
        if marker.read_text(encoding="utf-8").strip() != made:
            raise ConfigError(f"{root}: phantoms of other settings; use another --out")
        return root
    cfg = dataclasses.replace(DIFFICULTY[task], shape=preset.shape)
    layout = "kits19" if task == "kidney" else "lits"
    write_dataset(root, layout, cfg, sum(preset.splits), seed=1000)
    marker.write_text(made + "\n", encoding="utf-8")
    return root


def run_one(cfg: dict[str, Any], role: str) -> tuple[Path, float]:
    """Train (or find finished) one run; returns its folder and its training seconds."""
    folder = run_folder(cfg, role)
    if (folder / "summary.json").is_file():
        ran = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        if comparable(ran) != comparable(cfg):
            raise ConfigError(f"{folder}: a run of another configuration; use another --out")
    else:
        train(cfg, role, progress=False)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return folder, float(summary["seconds"])


def evaluate_run(folder: Path, prepared: PreparedData) -> dict[str, Any]:
    """Per-case metrics of a run on the test split (cached in ``<run>/bench-eval.json``)."""
    cached = folder / "bench-eval.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    package = export(folder, folder / "package", timing=False)
    report = evaluate(load_package(package), prepared.eval_cases("test"), prepared.label_lut())
    partial = cached.with_suffix(".part")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(cached)  # atomic: a killed benchmark never leaves half a file
    return report


@dataclasses.dataclass(frozen=True, eq=False)  # identity: a job is one run
class Job:
    """One training run of the benchmark, evaluated on the held-out phantoms."""

    task: str
    name: str  # "teacher", a method or an ablation
    seed: int
    role: str
    cfg: dict[str, Any]


def do_job(job: Job) -> tuple[Path, float, dict[str, Any]]:
    """Train (unless finished) and evaluate one run; what a worker process executes."""
    folder, seconds = run_one(job.cfg, job.role)
    return folder, seconds, evaluate_run(folder, PreparedData(prepared_folder(job.cfg)))


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[Job], workers: int, log) -> dict[Job, tuple[Path, float, dict]]:
    """Run jobs on ``workers`` single-purpose processes, each with its share of the CPU threads.

    Several narrow processes train faster than one wide one on a few cores (two 1-thread runs
    made about 1.5x the steps of one 2-thread run on this project's 2-core machine).
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = [j for j in jobs if not (run_folder(j.cfg, j.role) / "bench-eval.json").is_file()]
    done = {j: do_job(j) for j in jobs if j not in todo}
    if not todo:
        return done
    t0 = time.perf_counter()
    workers = min(workers, len(todo))
    log(f"  training {len(todo)} run(s) on {workers} process(es)")
    if workers <= 1:
        for i, job in enumerate(todo, 1):
            done[job] = do_job(job)
            log(_progress(job, done[job], i, len(todo), t0))
        return done
    threads = max(1, cores() // workers)
    with cf.ProcessPoolExecutor(
        workers, mp.get_context("spawn"), initializer=_set_threads, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(do_job, job): job for job in todo}
        for i, future in enumerate(cf.as_completed(futures), 1):
            job = futures[future]
            try:
                done[job] = future.result()
            except Exception:
                pool.shutdown(wait=False, cancel_futures=True)  # fail now, not after the queue
                log(f"  {job.task} {job.name} seed {job.seed} failed; finished runs are kept")
                raise
            log(_progress(job, done[job], i, len(todo), t0))
    return done


def cores() -> int:
    """CPU cores this process may use (affinity and container limits, not the host's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress(job: Job, result: tuple, i: int, n: int, t0: float) -> str:
    _, seconds, report = result
    dice = ", ".join(f"{k} {v['dice']['mean']:.3f}" for k, v in report["summary"].items())
    elapsed = time.perf_counter() - t0
    eta = elapsed / i * (n - i)
    return (
        f"  [{i}/{n}] {job.task} {job.name} seed {job.seed}: {seconds:.0f} s, Dice {dice} "
        f"(elapsed {elapsed / 60:.1f} min, about {eta / 60:.0f} min left)"
    )


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
                    "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                }
            rows = [r["labels"][label] for rep in per_seed.values() for r in rep["cases"]]
            present = [r for r in rows if r["voxels_ref"] > 0]
            entry[f"{label}.missed"] = {
                "n": sum(r["voxels_pred"] == 0 for r in present),
                "of": len(present),
            }
            if method != "none" and base:
                pairs_a, pairs_b, better = [], [], []
                for seed, report in per_seed.items():
                    if seed in base:
                        mine, theirs = (
                            collect(report, label, "dice"),
                            collect(base[seed], label, "dice"),
                        )
                        pairs_a += mine
                        pairs_b += theirs
                        better.append(float(np.mean(mine)) > float(np.mean(theirs)))
                test = paired_test(pairs_a, pairs_b)
                entry[f"{label}.vs_none"] = {
                    **test,
                    "seeds_better": sum(better),
                    "seeds": len(better),
                }
        out[method] = entry
    return out


def efficiency(
    teacher: Path, student: Path, slices: int, others: bool = True
) -> list[dict[str, Any]]:
    """Parameters, MACs per 256² slice and CPU seconds per (slices, 512, 512) volume.

    The trained teacher and student are timed from their packages; every other 2D architecture
    the runtime knows is timed with the student's card and random weights (the speed of a
    network does not depend on its weights), so each student candidate is compared in one run.
    """
    from HLFDSegmentLib.nets import ARCHITECTURES, build_network

    from .cards import package_from_state
    from .export import export as export_run

    timed = [
        (role, load_package(export_run(folder, folder / "package-timing", timing=False)))
        for role, folder in (("teacher", teacher), ("student", student))
    ]
    card = timed[1][1].card
    io = card["network"]["in_channels"], card["network"]["out_channels"]
    seen = {package.card["network"]["architecture"] for _, package in timed}
    for arch in (a for a, spec in ARCHITECTURES.items() if spec.spatial_dims[0] == 2):
        if others and arch not in seen:
            net = build_network(arch, 2, *io)
            other = {**card, "network": {**card["network"], "architecture": arch, "kwargs": {}}}
            timed.append(
                (
                    "other 2D network, untrained",
                    package_from_state(other, net.state_dict(), student),
                )
            )
    ct = _timing_ct(slices)
    return [_time_package(role, package, ct, slices) for role, package in timed]


def _time_package(role: str, package: Any, ct: Any, slices: int) -> dict[str, Any]:

    from HLFDSegmentLib.nets import count_macs, count_parameters
    from HLFDSegmentLib.pipeline import Segmenter

    net = package.build_network()
    seg = Segmenter(package, device="cpu")
    seg(ct[:, :, :16])  # warm-up
    t0 = time.perf_counter()
    seg(ct)
    return {
        "role": role,
        "architecture": package.card["network"]["architecture"],
        "parameters_m": count_parameters(net) / 1e6,
        "gmacs_per_256_slice": count_macs(net, (1, 1, 256, 256)) / 1e9,
        "cpu_seconds": time.perf_counter() - t0,
        "volume": f"{slices}x512x512",
    }


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
    preset_name: str = "full",
    out: Path | None = None,
    report: Path | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes ``results.json``, plots and the markdown report.

    ``workers``: training processes side by side (default: one per two cores, at least two).
    """
    preset = PRESETS[preset_name]
    workers = workers or max(2, cores() // 2)
    out = Path(out or f"runs/kd-bench-{preset_name}")
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
        "workers": f"{workers} training processes x {max(1, cores() // workers)} thread(s)",
        "tasks": {},
    }
    teachers = {}
    for task in preset.tasks:
        write_phantoms(out, task, preset)
        cfg = task_config(out, task, preset, "teacher")
        prepare_data(cfg, 0)
        teachers[task] = Job(task, "teacher", 0, "teacher", cfg)
    print(f"teachers of {', '.join(preset.tasks)}", flush=True)
    done = run_jobs(list(teachers.values()), workers, print)
    students = [
        Job(task, name, seed, "student", student_config(out, task, preset, name, seed, done[t][0]))
        for seed in preset.seeds
        for task, t in teachers.items()
        for name in (*preset.methods, *(preset.ablations if task == preset.tasks[0] else ()))
    ]
    print(f"students: {len(students)} runs", flush=True)
    done.update(run_jobs(students, workers, print))

    for task, teacher_job in teachers.items():
        prepared = PreparedData(prepared_folder(teacher_job.cfg))
        labels = [lab for lab in prepared.labels.values() if lab != "background"]
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
        summary = {
            **summarise_task({"teacher": evals["teacher"]}, labels),
            **summarise_task({k: v for k, v in evals.items() if k != "teacher"}, labels),
        }
        print(f"[{task}] efficiency on a {preset.timing_slices}x512x512 CT", flush=True)
        results["tasks"][task] = {
            "difficulty": _difficulty(task, preset),
            "labels": labels,
            "summary": summary,
            "train_seconds": seconds,
            "efficiency": efficiency(
                teacher,
                folders[preset.methods[0]],
                preset.timing_slices,
                others=task == preset.tasks[0],  # other networks' speed is the same in each task
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


def student_config(
    out: Path, task: str, preset: Preset, name: str, seed: int, teacher: Path
) -> dict[str, Any]:
    """The config of one student run: a method (or an HLFD ablation) and a seed."""
    cfg = task_config(out, task, preset, "student")
    method = "hlfd" if name in ABLATIONS else name
    options = ABLATIONS.get(name, {})
    return load_config(
        None,
        [
            f"seed={seed}",
            f"run={name}-seed{seed}",
            f"distill.method={method}",
            f"distill.teacher={teacher}",
        ],
        base={**cfg, "distill": {**cfg["distill"], "options": options}},
    )


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


def verdict(result: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """Plain-language findings on the tumour label: the calibration targets and the ranking."""
    summary = result["summary"]
    tumour = next((lab for lab in result["labels"] if "tumo" in lab.lower()), None)
    if tumour is None or "none" not in summary:
        return []

    def dice(name: str) -> float:
        mean = summary[name][f"{tumour}.dice"]["mean"]
        return float("nan") if mean is None else mean

    teacher, none = dice("teacher"), dice("none")
    compared = [m for m in methods if m != "none" and m in summary]
    alpha = 0.05 / max(1, len(compared))
    lines = [
        f"- Calibration: teacher {tumour} Dice {teacher:.3f} "
        f"({'meets' if teacher >= 0.75 else 'misses'} the 0.75 target); student without KD "
        f"{none:.3f}, {100 * (teacher - none):.1f} points below the teacher "
        f"({'meets' if teacher - none >= 0.05 else 'misses'} the 5-point target).",
    ]
    ranked = sorted(
        (m for m in methods if m in summary and dice(m) == dice(m)), key=dice, reverse=True
    )
    lines.append(
        f"- Ranking by mean {tumour} Dice: " + ", ".join(f"{m} {dice(m):.3f}" for m in ranked) + "."
    )
    significant = [
        m
        for m in compared
        if (t := summary[m][f"{tumour}.vs_none"])["p"] is not None and t["p"] < alpha
    ]
    lines.append(
        f"- Against `none` ({len(compared)} comparisons, Bonferroni: p < {alpha:.4f}): "
        + (
            "significantly different: "
            + ", ".join(
                f"{m} ({summary[m][f'{tumour}.vs_none']['median_diff']:+.3f})" for m in significant
            )
            if significant
            else "no method differs significantly"
        )
        + "."
    )
    if "hlfd" in summary:
        best_other = next((m for m in ranked if m not in ("hlfd", "none")), None)
        t = summary["hlfd"][f"{tumour}.vs_none"]
        gain = 100 * (dice("hlfd") - none)
        line = (
            f"- HLFD: {gain:+.1f} points of {tumour} Dice over `none` (paper: over +10), "
            f"better than `none` in {t['seeds_better']} of {t['seeds']} seeds"
        )
        if best_other:
            line += (
                f"; {100 * (dice('hlfd') - dice(best_other)):+.1f} points against the best other "
                f"method ({best_other})"
            )
        lines.append(line + ".")
    return lines


def _train_minutes(results: dict[str, Any]) -> float:
    return sum(sum(t["train_seconds"].values()) for t in results["tasks"].values()) / 60


def _fmt(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    if entry.get("sd") is None:  # one seed
        return f"{entry['mean']:.{digits}f}"
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
        f"Machine: {results['machine']}; training: {results['workers']}  ",
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
        findings = verdict(t, results["settings"]["methods"])
        if findings:
            lines += ["Findings (computed from the table below):", "", *findings, ""]
        for lab in sorted(labels, key=lambda lab: "tumo" not in lab.lower()):  # tumour first
            lines += [
                f"### {lab}",
                "",
                "| run | Dice | HD95 (mm) | RVD | missed "
                "| vs none: median Dice diff, p, seeds better |",
                "|---|---|---|---|---|---|",
            ]
            for name, s in t["summary"].items():
                test = s.get(f"{lab}.vs_none")
                tested = (
                    "—"
                    if not test
                    else f"{test['median_diff']:+.3f}, "
                    + ("n/a" if test["p"] is None else f"{test['p']:.3f}")
                    + f", {test['seeds_better']}/{test['seeds']}"
                )
                missed = s[f"{lab}.missed"]
                cells = [
                    _fmt(s[f"{lab}.dice"]),
                    _fmt(s[f"{lab}.hd95"], 1),
                    _fmt(s[f"{lab}.rvd"]),
                    f"{missed['n']}/{missed['of']}",
                ]
                lines.append(f"| {name} | " + " | ".join([*cells, tested]) + " |")
            lines.append("")
        lines += [
            "Mean ± sd (sample sd) over seeds of the per-seed mean over held-out cases, through "
            "the runtime pipeline at original resolution. The organ label is the organ without "
            "its tumour (KiTS/LiTS label 1). HD95 is left out of the mean where a label is missed "
            "(nothing predicted; counted in 'missed' over case x seed); RVD is the signed "
            "relative volume difference. Paired test: Wilcoxon signed-rank, two-sided, on the "
            "Dice of each (case, seed) pair against `none` (same case, same seed); p is "
            "uncorrected, and optimistic because the same cases recur in every seed (the "
            "findings apply Bonferroni over the methods; ablations are outside that family). "
            "'seeds better': in how many seeds the method's case-mean Dice is above that of "
            "`none`. `hlfd-*` rows are ablations of HLFD. Teacher: one run.",
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
            "CPU s / volume: one `Segmenter` call after a warm-up (preprocessing to the "
            "package's grid, inference, post-processing, resampling back), in the main process "
            "with all its threads, on a phantom CT; the benchmark's packages work on a 3 mm "
            "in-plane grid, so these times are lower than the 1.5 mm figures of "
            "`docs/results/bench-pipeline.md`. Untrained networks are timed with the student's "
            "card and random weights.",
            "",
            f"![Dice]({rel / f'{task}-dice.png'}) ![curves]({rel / f'{task}-curves.png'})",
            "",
            f"![attention]({rel / f'{task}-attention.png'})",
            "",
        ]
    return "\n".join(lines) + "\n"
