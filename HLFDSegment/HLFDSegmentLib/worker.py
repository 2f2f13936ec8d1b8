"""Subprocess entry point that 3D Slicer (or any caller) launches to segment one CT volume.

    python -m HLFDSegmentLib.worker --input IN.nrrd --output OUT.nrrd --model MODEL
                                    [--device auto|cpu|cuda|mps] [--tta] [--threads N] [--offline]

Protocol: every line on stdout is one JSON object (an *event*); anything else goes to stderr.

- ``{"event": "start", "pid": 123, "version": "0.1.0"}`` as soon as the process runs
- ``{"event": "progress", "stage": S, "fraction": F}``: S in read, model, preprocess, infer,
  postprocess, resample, write; F in [0, 1] is the share of the whole run done (monotonic)
- ``{"event": "device", "device": "cpu", "precision": "bfloat16", "model": {...},
  "runtimes": [...the card's measured run times...]}``
- ``{"event": "warning", "message": M}``
- ``{"event": "done", "output": PATH, "labels": [...card labels...], "report": {...}}``
- ``{"event": "error", "kind": K, "message": M}``: K in input, model, output, memory, internal

Exit status: 0 done; 1 input, model or output error; 2 command-line usage; 3 out of memory;
4 unexpected internal error (traceback on stderr). Killed by the caller (cancel): the signal.
The output labelmap (uint8, exactly the input grid) is written under a temporary name and
renamed at the end, so a failure or a kill never leaves a partial file at ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from .progress import RUN_SPANS, within

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MEMORY = 3
EXIT_INTERNAL = 4

OOM_HINT = "try the CPU device (Device: CPU) or a smaller model"


class Emitter:
    """Writes protocol events as JSON lines; progress is throttled to 1% steps or stage changes."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._stage = ""
        self._fraction = -1.0

    def __call__(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float) -> None:
        fraction = min(1.0, max(self._fraction, float(fraction)))  # never goes back
        if stage == self._stage and fraction - self._fraction < 0.01 and fraction < 1.0:
            return
        self._stage, self._fraction = stage, fraction
        self(event="progress", stage=stage, fraction=round(fraction, 4))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m HLFDSegmentLib.worker",
        description="Segment one CT volume; JSON events on stdout (for 3D Slicer).",
    )
    p.add_argument("--input", required=True, help="CT image file (.nrrd, .nii.gz, ...)")
    p.add_argument("--output", required=True, help="labelmap to write (.nrrd, .nii.gz, .mha)")
    p.add_argument("--model", required=True, help="model package folder/.zip or registry id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--offline", action="store_true", help="never download a registry model")
    return p


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in OOM_PHRASES  # torch, the C library, ITK (MemoryAllocationError)
    )


OOM_PHRASES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "failed to allocate",
    "memoryallocationerror",
    "bad_alloc",
)


def run(args: argparse.Namespace, emit: Emitter) -> dict[str, Any]:
    """Read, segment and write; return the ``done`` event's fields."""
    from .atomic import atomic_path
    from .errors import InputError
    from .io import LABELMAP_SUFFIXES, check_image, full_suffix, read_image

    suffix = full_suffix(args.output, LABELMAP_SUFFIXES[1:])
    if not suffix:
        raise InputError(f"{args.output}: unknown output type; use .nrrd, .nii.gz, .nii or .mha")
    t0 = time.perf_counter()
    emit.progress("read", RUN_SPANS["read"][0])
    image = read_image(args.input)
    check_image(image, args.input)  # fail fast, before the model is loaded
    read_s = time.perf_counter() - t0

    emit.progress("model", RUN_SPANS["model"][0])
    from .model_registry import resolve_model

    model_path = resolve_model(args.model, offline=args.offline)  # before torch is imported
    import torch

    from .modelpackage import load_package
    from .pipeline import Segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    package = load_package(model_path)
    segmenter = Segmenter(package, device=args.device, tta=args.tta)
    emit(
        "device",
        device=str(segmenter.device),
        precision=segmenter.precision,
        model={"name": package.name, "version": package.version, "task": package.card["task"]},
        runtimes=package.card.get("runtimes", []),
    )

    progress = within(emit.progress, *RUN_SPANS["segment"])
    result = segmenter(image, where=str(args.input), progress=progress)
    del image
    for warning in result.warnings:
        emit("warning", message=warning)

    emit.progress("write", RUN_SPANS["write"][0])
    t = time.perf_counter()
    import SimpleITK as sitk

    with atomic_path(args.output, suffix) as tmp:
        sitk.WriteImage(result.labels, str(tmp), useCompression=suffix != ".nii")
    result.timings = {"read": read_s, **result.timings, "write": time.perf_counter() - t}
    result.timings["total"] = time.perf_counter() - t0
    emit.progress("write", 1.0)
    return {
        "output": os.path.abspath(args.output),
        "labels": package.labels,
        "report": result.report(package, str(args.input)),
    }


def main(
    argv: list[str] | None = None,
    stream: TextIO | None = None,
    runner: Callable[[argparse.Namespace, Emitter], dict[str, Any]] = run,
) -> int:
    emit = Emitter(stream)
    args = build_parser().parse_args(argv)  # exits with status 2 on a usage error
    emit("start", pid=os.getpid(), version=_version())
    from .errors import HLFDError, InputError

    saved, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    try:
        done = runner(args, emit)
    except Exception as exc:
        if _is_out_of_memory(exc):
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            emit("error", kind="memory", message=f"out of memory ({first}); {OOM_HINT}")
            return EXIT_MEMORY
        if isinstance(exc, HLFDError):
            kind = "input" if isinstance(exc, InputError) else "model"
            emit("error", kind=kind, message=str(exc))
            return EXIT_ERROR
        if isinstance(exc, OSError):  # disk full, permission denied, ...
            emit("error", kind="output", message=str(exc))
            return EXIT_ERROR
        traceback.print_exc()
        emit("error", kind="internal", message=f"{type(exc).__name__}: {exc}")
        return EXIT_INTERNAL
    finally:
        sys.stdout = saved
    emit("done", **done)
    return EXIT_OK


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
