"""Subprocess entry point that 3D Slicer (or any caller) launches to segment one CT volume.

    python -m HLFDSegmentLib.worker --input IN.nrrd --output OUT.nrrd --model MODEL
                                    [--device auto|cpu|cuda|mps] [--backend auto|torch|onnx]
                                    [--tta] [--threads N] [--offline]

Protocol: every line on stdout is one JSON object (an *event*); anything else goes to stderr.

- ``{"event": "start", "pid": 123, "version": "0.1.0"}`` as soon as the process runs
- ``{"event": "progress", "stage": S, "fraction": F}``: S in read, model, preprocess, infer,
  postprocess, resample, write; F in [0, 1] is the share of the whole run done (monotonic)
- ``{"event": "device", "device": "cpu", "description": "CPU (8 threads, ONNX Runtime)",
  "precision": "float32", "backend": "onnx", "model": {...}, "runtimes": [...the card's
  measured run times...]}``
- ``{"event": "download", "done": BYTES, "total": BYTES}`` while a registry model downloads
  (every 1% or 1 MiB; total 0 when the server does not say)
- ``{"event": "warning", "message": M}``
- ``{"event": "done", "output": PATH, "labels": [...card labels...], "report": {...}}``
- ``{"event": "error", "kind": K, "message": M}``: K in input, model, output, memory, internal

Exit status: 0 done; 1 input, model or output error; 2 command-line usage; 3 out of memory;
4 unexpected internal error (traceback on stderr). Killed by the caller (cancel): the signal.
The output labelmap (uint8, exactly the input grid) is written under a temporary name and
renamed at the end, so a failure or a kill never leaves a partial file at ``--output``.

Persistent mode (one process, many segmentations, the model stays loaded):

    python -m HLFDSegmentLib.worker --serve --model MODEL [--device D] [--threads N] [--offline]

reads one JSON request per stdin line, ``{"id": "r1", "input": IN, "output": OUT, "tta": false}``
(``tta`` optional), handles them one after the other and answers each with the events above,
every one carrying ``"request": ID``, then ``{"event": "end", "request": ID, "status": S}`` where
S is the exit status a one-shot run would have had (2 for a malformed request, answered by one
``error`` event of kind ``request``). The model is loaded on the first request and reloaded only
when its files change. The server exits 0 when stdin closes (its parent is gone); cancel = kill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .backends import BACKENDS
from .progress import RUN_SPANS, within

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MEMORY = 3
EXIT_INTERNAL = 4

OOM_HINT = "try the CPU device (Device: CPU) or a smaller model"


class Emitter:
    """Writes protocol events as JSON lines; progress is throttled to 1% steps or stage changes."""

    def __init__(self, stream: TextIO | None = None, **context: Any):
        self.stream = stream or sys.stdout
        self.context = context  # fields every event carries (the serve mode's request id)
        self._stage = ""
        self._fraction = -1.0
        self._downloaded = -1

    def __call__(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **self.context, **fields}) + "\n")
        self.stream.flush()

    def download(self, done: int, total: int) -> None:
        """A model download's bytes so far (``total`` 0 when unknown), every 1% or 1 MiB."""
        step = max(total // 100, 1 << 18) if total else 1 << 20
        restarted = done < self._downloaded  # a resumed part failed its check: from 0 again
        if (
            restarted
            or self._downloaded < 0
            or done - self._downloaded >= step
            or done >= total > 0
        ):
            self._downloaded = done
            self(event="download", done=int(done), total=int(total))

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
    p.add_argument("--input", help="CT image file (.nrrd, .nii.gz, ...)")
    p.add_argument("--output", help="labelmap to write (.nrrd, .nii.gz, .mha)")
    p.add_argument("--model", required=True, help="model package folder/.zip or registry id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="network runtime; auto: ONNX Runtime on the CPU when the package has a graph, "
        "else PyTorch",
    )
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--threads", type=int, help="CPU threads for the network")
    p.add_argument("--offline", action="store_true", help="never download a registry model")
    p.add_argument(
        "--serve",
        action="store_true",
        help="persistent mode: one JSON request per stdin line (instead of --input/--output)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits with status 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve and (args.input or args.output):
        parser.error("--serve takes the input and output from each request, not --input/--output")
    if not args.serve and not (args.input and args.output):
        parser.error("the following arguments are required: --input, --output (or --serve)")
    return args


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


class LoadedModel:
    """The model package and its :class:`Segmenter`, kept between requests of the serve mode and
    loaded again only when the model argument, the device, the backend or the package's files
    change. torch is imported only if the package runs on the torch backend."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._loaded: tuple[Any, Any] | None = None

    def get(
        self, args: argparse.Namespace, progress: Callable[[int, int], None] | None = None
    ) -> tuple[Any, Any]:
        """``(package, segmenter)`` for ``args.model`` on ``args.device``, TTA per ``args.tta``;
        ``progress(done, total)`` follows a registry download."""
        from .model_registry import resolve_model

        # before torch is imported
        model_path = resolve_model(args.model, offline=args.offline, progress=progress)
        key = (str(model_path), args.device, args.backend, files_signature(model_path))
        if key != self._key or self._loaded is None:
            self._key, self._loaded = None, None  # free the previous model before loading
            from .modelpackage import load_package
            from .pipeline import Segmenter

            package = load_package(model_path)
            segmenter = Segmenter(
                package, device=args.device, backend=args.backend, threads=args.threads
            )
            self._loaded = (package, segmenter)
            self._key = key
        package, segmenter = self._loaded
        segmenter.tta = bool(args.tta)
        return package, segmenter


def files_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of a package file or of the files in a package folder."""
    paths = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    signature = []
    for p in paths:
        st = p.stat()
        signature.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(signature)


def run(
    args: argparse.Namespace, emit: Emitter, models: LoadedModel | None = None
) -> dict[str, Any]:
    """Read, segment and write; return the ``done`` event's fields. ``models`` keeps the model
    loaded across calls (serve mode); without it the model is loaded for this run only."""
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
    # a registry download reports its bytes
    package, segmenter = (models or LoadedModel()).get(args, progress=emit.download)
    emit(
        "device",
        device=str(segmenter.device),
        description=segmenter.description,
        precision=segmenter.precision,
        backend=segmenter.backend,
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
    args = parse_args(argv)  # exits with status 2 on a usage error
    if args.serve:
        return serve(args, sys.stdin, stream or sys.stdout)
    emit = Emitter(stream)
    emit("start", pid=os.getpid(), version=_version())
    saved, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    try:
        return segment_once(args, emit, runner)
    finally:
        sys.stdout = saved


def segment_once(
    args: argparse.Namespace,
    emit: Emitter,
    runner: Callable[[argparse.Namespace, Emitter], dict[str, Any]] = run,
) -> int:
    """Run one segmentation; emit ``done`` or one ``error`` event; return the exit status."""
    from .errors import HLFDError, InputError

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
    emit("done", **done)
    return EXIT_OK


class RequestError(ValueError):
    """A serve-mode request line that is not a valid request."""

    def __init__(self, message: str, request_id: str | int | None = None):
        super().__init__(message)
        self.request_id = request_id


REQUEST_FIELDS = {"id": (str, int), "input": (str,), "output": (str,), "tta": (bool,)}


def parse_request(line: str) -> dict[str, Any]:
    """One stdin line as a request ``{"id", "input", "output"[, "tta"]}``; RequestError if not."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"request is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise RequestError("request must be a JSON object")
    rid = request.get("id")
    rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    for name in ("id", "input", "output"):
        if name not in request:
            raise RequestError(f"request field {name!r} is missing", rid)
    for name, value in request.items():
        if name not in REQUEST_FIELDS:
            raise RequestError(f"request field {name!r} is unknown", rid)
        types = REQUEST_FIELDS[name]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            kinds = " or ".join("boolean" if t is bool else t.__name__ for t in types)
            raise RequestError(f"request field {name!r} must be a {kinds}", rid)
    return request


def serve(args: argparse.Namespace, requests: TextIO, stream: TextIO) -> int:
    """The persistent mode: answer each request line of ``requests`` until it closes."""
    models = LoadedModel()
    saved, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    try:
        for line in iter(requests.readline, ""):
            if not line.strip():
                continue
            try:
                request = parse_request(line)
            except RequestError as exc:
                emit = Emitter(stream, request=exc.request_id)
                emit("error", kind="request", message=str(exc))
                emit("end", status=EXIT_USAGE)
                continue
            emit = Emitter(stream, request=request["id"])
            emit("start", pid=os.getpid(), version=_version())
            one = argparse.Namespace(**vars(args))
            one.input, one.output = request["input"], request["output"]
            one.tta = request.get("tta", args.tta)
            status = segment_once(one, emit, lambda a, e: run(a, e, models))
            emit("end", status=status)
    finally:
        sys.stdout = saved
    return EXIT_OK


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
