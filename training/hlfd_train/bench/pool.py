"""Training and evaluating benchmark runs on a pool of worker processes (resumable)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from HLFDSegmentLib.atomic import atomic_write
from HLFDSegmentLib.modelpackage import load_package

from ..config import ConfigError
from ..data import PreparedData
from ..engine import comparable, prepared_folder, run_folder, train
from ..evaluate import evaluate
from ..export import export


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


def evaluate_run(folder: Path, prepared: PreparedData, split: str = "test") -> dict[str, Any]:
    """Per-case metrics of a run on a split (cached in ``<run>/bench-eval[-split].json``)."""
    cached = folder / ("bench-eval.json" if split == "test" else f"bench-eval-{split}.json")
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    package = export(folder, folder / "package", timing=False)
    report = evaluate(load_package(package), prepared.eval_cases(split), prepared.label_lut())
    atomic_write(cached, json.dumps(report, indent=2) + "\n")  # never half a file
    return report


@dataclasses.dataclass(frozen=True, eq=False)  # identity: a job is one run
class Job:
    """One training run of the benchmark, evaluated on a held-out split."""

    task: str
    name: str  # "teacher", a method, an ablation or a tuning point
    seed: int
    role: str
    cfg: dict[str, Any]
    split: str = "test"  # "val" for tuning runs


def do_job(job: Job) -> tuple[Path, float, dict[str, Any]]:
    """Train (unless finished) and evaluate one run; what a worker process executes."""
    folder, seconds = run_one(job.cfg, job.role)
    prepared = PreparedData(prepared_folder(job.cfg))
    return folder, seconds, evaluate_run(folder, prepared, job.split)


def _done(job: Job) -> bool:
    name = "bench-eval.json" if job.split == "test" else f"bench-eval-{job.split}.json"
    return (run_folder(job.cfg, job.role) / name).is_file()


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[Job], workers: int, log) -> dict[Job, tuple[Path, float, dict]]:
    """Run jobs on ``workers`` single-purpose processes, each with its share of the CPU threads.

    Several narrow processes train faster than one wide one on a few cores (two 1-thread runs
    made about 1.5x the steps of one 2-thread run on this project's 2-core machine).
    """
    import concurrent.futures as cf

    todo = [j for j in jobs if not _done(j)]
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
        workers, _context(), initializer=_set_threads, initargs=(threads,)
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


def _context():
    """Fresh processes that start in a fraction of a second where POSIX allows: forked from a
    server that imported torch, MONAI and this module once (none of them start threads on
    import), not each interpreter importing them again (~4-6 s of CPU a process); ``spawn``
    elsewhere."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__, "torch._dynamo"])
    return context


def cores() -> int:
    """CPU cores this process may use (affinity and container limits, not the host's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress(job: Job, result: tuple, i: int, n: int, t0: float) -> str:
    _, seconds, report = result
    dice = ", ".join(
        f"{k} {'n/a' if v['dice']['mean'] is None else format(v['dice']['mean'], '.3f')}"
        for k, v in report["summary"].items()
        if k != "lesions"
    )
    elapsed = time.perf_counter() - t0
    eta = elapsed / i * (n - i)
    return (
        f"  [{i}/{n}] {job.task} {job.name} seed {job.seed}: {seconds:.0f} s, {job.split} Dice "
        f"{dice} (elapsed {elapsed / 60:.1f} min, about {eta / 60:.0f} min left)"
    )
