"""The benchmark's outputs: efficiency timings, CSV, plots and the markdown report."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from HLFDSegmentLib.modelpackage import load_package

from .presets import DIFFICULTY
from .stats import verdict


def efficiency(
    teacher: Path, student: Path, slices: int, others: bool = True
) -> list[dict[str, Any]]:
    """Parameters, MACs per 256² slice and CPU seconds per (slices, 512, 512) volume.

    The trained teacher and student are timed from their packages; every other 2D architecture
    the runtime knows is timed with the student's card and random weights (the speed of a
    network does not depend on its weights), so each student candidate is compared in one run.
    """
    from HLFDSegmentLib.nets import ARCHITECTURES, build_network

    from ..cards import package_from_state
    from ..export import export as export_run

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
    import torch

    from HLFDSegmentLib.nets import build_network, count_macs, count_parameters
    from HLFDSegmentLib.pipeline import Segmenter

    spec = package.card["network"]
    with torch.device("meta"):  # parameters and MACs need shapes only: no weights, no compute
        net = build_network(
            spec["architecture"],
            spec["spatial_dims"],
            spec["in_channels"],
            spec["out_channels"],
            **spec.get("kwargs", {}),
        )
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


def write_csv(path: Path, results: dict[str, Any]) -> None:
    """One row per task, run, seed, case and label."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            ["task", "run", "seed", "case", "label", "dice", "hd95", "rvd", "fp_ml", "missed"]
        )
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
                                    m.get("fp_ml"),
                                    m.get("missed"),
                                ]
                            )


def plot_task(out, task, result, teacher, folders, prepared) -> None:
    """Dice per method with error bars, validation curves, and the attention figure."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..explain import explain, tumour_slices

    summary, labels = result["summary"], result["labels"]
    names = [n for n in summary if n != "teacher"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        means = [summary[n][label]["dice"]["mean"] or 0 for n in names]
        sds = [summary[n][label]["dice"]["sd"] or 0 for n in names]
        ax.bar(names, means, yerr=sds, capsize=3, color="tab:blue")
        teacher_dice = summary["teacher"][label]["dice"]["mean"]
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
    if entry.get("sd") is None:  # one seed
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}"


def _vs_none(test: dict[str, Any] | None) -> list[str]:
    if not test:
        return ["—", "—", "—"]
    ci = test.get("ci95")
    ci_text = "n/a" if not ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    p = "n/a" if test["p"] is None else f"{test['p']:.3f}"
    holm = test.get("p_holm")
    p += "" if holm is None else f" ({holm:.3f})"
    return [f"{_pct(test['mean_diff'])} {ci_text}", p, f"{test['seeds_better']}/{test['seeds']}"]


PRIMARY_TEXT = (
    "**Pre-declared primary comparison** (fixed before any run of this preset): HLFD minus "
    "`none`, tumour Dice on the tumour-bearing test cases, seeds averaged per case; the "
    "bootstrap 95% CI over cases and seeds decides (success: it excludes 0 and is at most 4 "
    "points wide). Every other comparison is secondary: Wilcoxon signed-rank over cases, "
    "Holm-adjusted over the published methods; ablations are descriptive."
)

HD95_TEXT = (
    "Why tumour HD95 is large (90-170 mm on kidney) for every model, the teacher included: a "
    "phantom has two kidneys, and a small false-positive blob in the other kidney is 100+ mm "
    "from the true tumour. HD95 is the 95th percentile of the distances of *both* surfaces, "
    "so once the stray blob holds more than about 5% of the surface points it sets HD95: a "
    "perfect tumour mask plus 2.7% stray volume in the other kidney gives 124 mm "
    "(`Testing/test_evaluate.py` shows the effect). Dice barely moves; HD95 reports the stray "
    "blob, lesion-wise detection counts it (FP lesions)."
)


def preset_data(results: dict[str, Any]) -> str:
    """What the benchmark ran on: ``phantom`` or ``synth``."""
    return results["settings"].get("data", "phantom")


def markdown(results: dict[str, Any], out: Path, figures: str) -> str:
    """The report: the primary comparison first, then command, version, machine, settings,
    tuning, tables and plots (in ``figures/``)."""
    preset = results["preset"]
    rel = Path(figures)
    lines = [
        "# Distillation benchmark on "
        + (
            "synthetic CT (`hlfd_train.synth`)"
            if preset_data(results) == "synth"
            else "phantom CTs"
        ),
        "",
        PRIMARY_TEXT,
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
    extra = len(results["settings"].get("primary_seeds", ()))
    if extra:
        lines += [
            f"Seeds: {seeds} for every method; {seeds + extra} for the two runs of the primary "
            "comparison (its CI narrows with the square root of its seeds).",
            "",
        ]
    if seeds < 3:
        lines += [
            f"**{seeds} seed(s) on {results['settings']['splits'][2]} held-out cases with a short "
            "budget: this run checks the flow; it is not evidence for or against any method.**",
            "",
        ]
    for task, t in results["tasks"].items():
        labels = t["labels"]
        data = "Synthesis engine" if preset_data(results) == "synth" else "Phantom difficulty"
        lines += [f"## {task}", "", f"{data}: `{json.dumps(t['difficulty'])}`", ""]
        if t.get("tuning"):
            lines += [
                "Tuning (validation split, one seed, the same grid for every method; the "
                "chosen point is used for every seed):",
                "",
                "| method | grid point: validation tumour Dice | chosen |",
                "|---|---|---|",
            ]
            for name, entry in t["tuning"].items():
                cells = ", ".join(
                    f"{g['point']}: {_fmt({'mean': g['val_tumour_dice']})}" for g in entry["grid"]
                )
                lines.append(f"| {name} | {cells} | {entry['chosen']['point']} |")
            lines.append("")
        findings = verdict(t, results["settings"]["methods"])
        if findings:
            lines += ["Findings (computed from the tables below):", "", *findings, ""]
        for lab in sorted(labels, key=lambda lab: "tumo" not in lab.lower()):  # tumour first
            tumour = "tumo" in lab.lower() and "incl" not in lab
            lines += [
                f"### {lab}",
                "",
                "| run | Dice | HD95 (mm) | RVD | missed | FP mL (tumour-free cases) "
                + ("| lesions TP/FP/FN " if tumour else "")
                + "| Dice - none, points [95% CI] | p (Holm) | seeds better |",
                "|---|---|---|---|---|---|" + ("---|" if tumour else "") + "---|---|---|",
            ]
            for name, per_label in t["summary"].items():
                s = per_label[lab]
                missed = s["missed"]
                cells = [
                    _fmt(s["dice"]),
                    _fmt(s["hd95"], 1),
                    _fmt(s["rvd"]),
                    f"{missed['n']}/{missed['of']}",
                    _fmt(s["fp_ml"], 2) + f" ({s['fp_ml']['n_cases']})",
                ]
                if tumour:
                    d = s.get("lesions")
                    cells.append("n/a" if not d else f"{d['tp']}/{d['fp']}/{d['fn']}")
                lines.append(
                    f"| {name} | " + " | ".join([*cells, *_vs_none(s.get("vs_none"))]) + " |"
                )
            lines.append("")
        lines += [
            "Mean ± sd (sample sd, ddof 1) over seeds of the per-seed mean over the held-out "
            "cases where the metric is defined, through the runtime pipeline at original "
            "resolution. Tumour metrics are over tumour-bearing cases only; on tumour-free "
            "cases the false-positive volume (mL) is reported instead. A missed label scores "
            "Dice 0 and the image diagonal as HD95 (counted in 'missed' over case x seed); "
            "empty-vs-empty scores nothing. The organ label is the organ without its tumour "
            "(KiTS/LiTS label 1); 'incl. tumour' is the composite organ + tumour that KiTS and "
            "LiTS report. Lesions: connected components (26-connected), a reference lesion "
            "touched by any predicted voxel is found, summed over case x seed. Difference to "
            "`none`: mean over cases and seeds with a bootstrap 95% CI resampling cases and "
            "seeds; p: Wilcoxon signed-rank over cases of the seed-averaged values (same case, "
            "same seeds), Holm-adjusted over the published methods in brackets. Rows named "
            "`hlfd-*`, `at-p2-e1e5`, `fitnet-joint`, `deep-mse`, `flfd-*` are ablations. "
            "Teacher: one run.",
            "",
            HD95_TEXT,
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
