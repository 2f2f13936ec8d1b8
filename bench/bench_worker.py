"""Slicer's Segment click: persistent worker (first and later requests) vs a one-shot worker.

Every segmentation goes through :class:`HLFDSegmentLib.slicerjob.SegmentationJob`, as the Slicer
module runs it: the CT is an uncompressed .nrrd in the job folder, the worker writes the labelmap
and the job is polled until done. Timed from ``start()`` to DONE:

- one-shot: a new worker process per segmentation (the default launcher);
- persistent, first: a new pool, its first request (process start, imports, model load);
- persistent, later: further requests on a warm worker (the model stays loaded).

Input: a 200x512x512 int16 liver phantom CT written with SimpleITK; model: the built-in liver
student (``HLFDSegment/Resources/Models/liver``). Medians of ``--repeats`` runs, ratios to the
one-shot median measured in the same run. Usage:

    python bench/bench_worker.py [--repeats 3] [--slices 200] [--device cpu]
                                 [--backend auto|torch|onnx] [--out FILE.md]

``--backend auto`` is what Slicer runs: ONNX Runtime on the CPU for the built-in models.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from HLFDSegmentLib import __version__
from HLFDSegmentLib.model_registry import builtin_models
from HLFDSegmentLib.phantom import PhantomConfig, make_phantom
from HLFDSegmentLib.slicerjob import JobState, SegmentationJob
from HLFDSegmentLib.workerpool import WorkerPool

HEADING = "## Persistent worker (Slicer)"
GOALS = {"first": 4.0, "later": 1.5}  # seconds, issue 14, on 2 cores


def timed_job(
    ct: Path, model: Path, device: str, pool: WorkerPool | None, backend: str = "auto"
) -> tuple[float, dict]:
    """Seconds from start to DONE of one job, and the worker's stage timings."""
    launcher = {"launcher": pool.launch} if pool is not None else {}
    job = SegmentationJob(
        model,
        device,
        python=sys.executable,
        input_suffix=".nrrd",
        command=lambda argv: [*argv, "--backend", backend],
        **launcher,
    )
    try:
        shutil.copyfile(ct, job.input_path)  # the bytes Slicer would have written
        t = time.perf_counter()
        job.start()
        state = job.wait(600, interval=0.01)
        wall = time.perf_counter() - t
        if state is not JobState.DONE:
            sys.exit(f"segmentation {state.value}: {job.error}")
        return wall, job.result["report"]["seconds"]
    finally:
        job.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--model", type=Path, default=builtin_models()["liver"])
    ap.add_argument("--out", type=Path, default=Path("docs/results/bench-pipeline.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ct = Path(tmp) / "ct.nrrd"
        t = time.perf_counter()
        config = PhantomConfig(
            task="liver", shape=(args.slices, 512, 512), spacing=(0.78, 0.78, 2.5)
        )
        image = make_phantom(config, seed=0).to_sitk()[0]
        sitk.WriteImage(image, str(ct), False)  # as mrml.SegmentationRun writes it
        write_s = time.perf_counter() - t
        print(f"phantom {args.slices}x512x512 int16 made and written in {write_s:.1f} s")

        runs: dict[str, list[float]] = {"one-shot": [], "first": [], "later": []}
        fixed: dict[str, list[float]] = {k: [] for k in runs}  # wall - the pipeline's stages
        stages: list[dict] = []

        def measure(key: str, pool: WorkerPool | None) -> None:
            wall, seconds = timed_job(ct, args.model, args.device, pool, args.backend)
            runs[key].append(wall)
            fixed[key].append(wall - sum(v for k, v in seconds.items() if k != "total"))
            if key == "later":
                stages.append(seconds)

        for i in range(args.repeats):  # interleaved, so that load changes hit all three alike
            measure("one-shot", None)
            pool = WorkerPool()
            try:
                measure("first", pool)
                measure("later", pool)
                measure("later", pool)
            finally:
                pool.stop()
            print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()))
    median = {k: statistics.median(v) for k, v in runs.items()}
    fixed_median = {k: statistics.median(v) for k, v in fixed.items()}
    stage_median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    text = report(args, median, runs, fixed_median, stage_median)
    print(text)
    write_section(args.out, text)


def report(args, median: dict, runs: dict, fixed: dict, stages: dict) -> str:
    base = median["one-shot"]
    rows = [
        ("one-shot worker (a new process per click)", "one-shot", None),
        ("persistent worker, first request", "first", GOALS["first"]),
        ("persistent worker, second and later", "later", GOALS["later"]),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        HEADING,
        "",
        f"Command: `python bench/bench_worker.py --repeats {args.repeats} --slices {args.slices} "
        f"--device {args.device} --backend {args.backend}`  ",
        f"Code {__version__}, Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the end of the run.  ",
        f"{args.slices}x512x512 int16 liver phantom (.nrrd), built-in liver student; time from "
        "the job's start to its result on disk (what a Segment click waits for, before the "
        "segmentation node is filled); medians, ratios measured in this same run. *Outside the "
        "pipeline*: that time minus the worker's own stage times (read, preprocess, infer, "
        "postprocess, resample, write), i.e. process start, imports, model load and protocol: "
        "the part the persistent worker removes.",
        "",
        "| path | runs | median (s) | min-max (s) | outside the pipeline (s) | one-shot / this "
        "| goal (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for title, key, goal in rows:
        values = runs[key]
        verdict = "" if goal is None else f"{goal:.1f} {'met' if median[key] <= goal else 'missed'}"
        lines.append(
            f"| {title} | {len(values)} | {median[key]:.2f} | {min(values):.2f}-{max(values):.2f} "
            f"| {fixed[key]:.2f} | {base / median[key]:.2f} | {verdict} |"
        )
    lines += [
        "",
        "Warm request, worker's own stage times (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in ``path`` under its heading, replacing an earlier one, keeping the rest."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start = text.find(HEADING)
    if start < 0:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
