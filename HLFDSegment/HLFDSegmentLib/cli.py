"""``hlfd-segment``: segment kidney/liver and tumours in CT files with a model package.

Exit status: 0 success; 1 an input, model or output error (one line on stderr, no output file
left behind); 2 command-line usage error. In a batch, one failure does not stop the others and
the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import SimpleITK as sitk

from .backends import BACKENDS
from .errors import HLFDError, InputError
from .io import (
    IMAGE_SUFFIXES,
    LABELMAP_SUFFIXES,
    full_suffix,
    read_image,
    read_notes,
    write_json,
    write_labelmap,
)

DEFAULT_SUFFIX = ".seg.nrrd"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hlfd-segment",
        description="Segment kidney + kidney tumour or liver + liver tumour in CT volumes.",
        epilog="Inputs: " + ", ".join(IMAGE_SUFFIXES) + " files or a DICOM series folder. "
        "Outputs by extension: " + ", ".join(LABELMAP_SUFFIXES) + ".",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="CT file(s) or DICOM folder(s)")
    p.add_argument("-o", "--output", help="output file; a folder when several inputs are given")
    p.add_argument("-m", "--model", help="model package folder or .zip, or a registry id")
    p.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"
    )
    p.add_argument("--report", help="write a JSON report (volumes in mL, timings, model, device)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower)")
    p.add_argument("--series", metavar="UID", help="DICOM folder: the series to segment")
    p.add_argument(
        "--format",
        default=DEFAULT_SUFFIX,
        choices=LABELMAP_SUFFIXES,
        help="output type in batch mode (default %(default)s)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="network runner: torch, onnx (the package's model.onnx in ONNX Runtime, CPU, no "
        "PyTorch needed) or auto (torch when installed, else onnx; default)",
    )
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads for inference (default: all cores)"
    )
    p.add_argument("--offline", action="store_true", help="never download; use the cache only")
    p.add_argument(
        "--list-models", action="store_true", help="list built-in, registry and cached models"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (thread, case and worker counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _one_line(exc: BaseException) -> str:
    """A foreign exception as one line: its type and the first line of its message."""
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller volume, fewer --threads or another device"
    text = str(exc).strip().splitlines()
    return f"unexpected {type(exc).__name__}: {text[0] if text else ''} (-v shows the traceback)"


def _list_models() -> None:
    from .model_registry import builtin_models, cached_models, load_registry
    from .modelpackage import load_package

    builtin = builtin_models()
    print(f"{len(builtin)} built-in model(s)")
    for model_id, path in builtin.items():
        card = load_package(path).card
        print(f"  {model_id:8s} {card['task']:7s} {card['name']} {card['version']}")
    entries = load_registry()
    print(f"{len(entries)} registry model(s)")
    for e in entries:
        print(f"  {e.id}@{e.version}  {e.task:7s} {e.title}")
    cached = cached_models()
    print(f"{len(cached)} cached package(s)")
    for path in cached:
        print(f"  {path}")


def _output_path(src: Path, out_dir: Path, suffix: str) -> Path:
    stem = src.name[: -len(full_suffix(src, IMAGE_SUFFIXES)) or None]
    return out_dir / f"{stem}{suffix}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_models:
            _list_models()
            return 0
        if not args.inputs or not args.output or not args.model:
            parser.error("INPUT, -o/--output and -m/--model are required")
        return _run(args)
    except (HLFDError, OSError) as exc:  # OSError: disk full, permission denied, ...
        if args.verbose:
            traceback.print_exc()
        print(f"hlfd-segment: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hlfd-segment: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not ours (ITK, torch, zlib, ...): still one line, exit 1
        if args.verbose:
            traceback.print_exc()
        print(f"hlfd-segment: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    inputs = [Path(p) for p in args.inputs]
    output = Path(args.output)
    batch = len(inputs) > 1 or output.is_dir()
    if batch:
        if output.exists() and not output.is_dir():
            raise InputError(f"{output}: several inputs need -o to be a folder")
        output.mkdir(parents=True, exist_ok=True)
        targets = [_output_path(src, output, args.format) for src in inputs]
    else:
        if not full_suffix(output, LABELMAP_SUFFIXES):
            raise InputError(
                f"{output}: unknown output type; use one of {', '.join(LABELMAP_SUFFIXES)}"
            )
        targets = [output]
    for path in [*targets, *([Path(args.report)] if args.report else [])]:
        if not path.parent.is_dir():
            raise InputError(f"{path}: output folder {path.parent} does not exist")
    check_output_paths(inputs, targets, Path(args.report) if args.report else None)

    show = not args.quiet
    with ReadAhead(inputs[0], args.series) as first:  # read while the model loads
        from tqdm import tqdm

        from .model_registry import resolve_model, tqdm_progress
        from .modelpackage import load_package
        from .pipeline import Segmenter

        model = resolve_model(
            args.model, offline=args.offline, progress=tqdm_progress("download") if show else None
        )
        segmenter = Segmenter(
            load_package(model),
            device=args.device,
            tta=args.tta,
            backend=args.backend,
            threads=args.threads,
        )
    failures: list[str] = []
    reports = []
    cases = tqdm(
        list(zip(inputs, targets)), desc="cases", unit="case", disable=not (show and batch)
    )
    for k, (src, dst) in enumerate(cases):
        read = first.take if k == 0 else partial(read_image, src, args.series)
        try:
            report = _segment_one(segmenter, read, src, dst, show and not batch)
            if not batch and args.report:
                _write_or_undo(report, Path(args.report), dst)
            reports.append(report)
        except Exception as exc:  # one case's failure, whatever raised it, ends that case only
            if not batch:
                raise
            if args.verbose:
                traceback.print_exc()
            text = str(exc) if isinstance(exc, (HLFDError, OSError)) else _one_line(exc)
            line = text if text.startswith(f"{src}: ") else f"{src}: {text}"
            failures.append(line)
            tqdm.write(f"hlfd-segment: failed: {line}", file=sys.stderr)
    if batch:
        if args.report:
            write_json({"cases": reports, "failures": failures}, args.report)
        print(f"{len(reports)} segmented, {len(failures)} failed; outputs in {output}")
        for line in failures:
            print(f"  FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: equal resolved paths, a symlink, a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_output_paths(inputs: list[Path], targets: list[Path], report: Path | None) -> None:
    """Refuse, before any work, outputs that would overwrite an input (same path, symlink or
    hard link), a report written over an output or an input, and two cases of a batch that would
    write one output file."""
    for out in [*targets, *([report] if report else [])]:
        for src in inputs:
            if _same_file(out, src):
                raise InputError(f"{out}: is the input {src}; refusing to overwrite an input")
    if report is not None:
        for out in targets:
            if _same_file(report, out):
                raise InputError(f"{report}: --report names the segmentation output {out}")
    seen: dict[Path, Path] = {}
    for src, out in zip(inputs, targets):
        key = out.resolve()
        if key in seen:
            raise InputError(
                f"{out}: inputs {seen[key]} and {src} would both be written there; "
                "rename one or segment them separately"
            )
        seen[key] = src


def _write_or_undo(report: dict, path: Path, output: Path) -> None:
    """Write the report; if that fails, remove the fresh output so nothing partial remains."""
    try:
        write_json(report, path)
    except OSError as exc:
        output.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write report ({exc.strerror})") from None


class ReadAhead:
    """Reads one CT in a background thread, so that reading overlaps other work (ITK and ONNX
    Runtime release the GIL): the first case's read overlaps the model load. Only the first:
    later cases are read in turn, so that a batch never holds two CTs. Leaving the ``with``
    block waits for the read (an exit during a read inside ITK would abort the process)."""

    def __init__(self, path: Path, series: str | None) -> None:
        self._image: sitk.Image | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(path, series), name="read")
        self._thread.start()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # the model did not load: the CT is not needed
            self._thread.join()
            self._image = None

    def _read(self, path: Path, series: str | None) -> None:
        try:
            self._image = read_image(path, series)
        except BaseException as exc:  # re-raised in the caller's thread by take()
            self._error = exc

    def take(self) -> sitk.Image:
        """The CT (waits for the read), handing over the only reference to it."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        image, self._image = self._image, None
        assert image is not None
        return image


def _segment_one(
    segmenter, read: Callable[[], sitk.Image], src: Path, dst: Path, progress_bar: bool
) -> dict:
    """Read (``read()``), segment and write one case; return its report. Its ``read`` time is
    the time spent waiting for the CT."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(
        total=100,
        desc=src.name,
        unit="%",
        disable=not progress_bar,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]",
    )

    def progress(stage: str, fraction: float) -> None:
        bar.set_postfix_str(stage, refresh=False)
        bar.update(round(100 * fraction) - bar.n)

    try:
        t = time.perf_counter()
        ct = read()
        series_info, read_warnings = read_notes(ct)
        read_s = time.perf_counter() - t
        result = segmenter(ct, where=str(src), progress=progress)
        del ct
        t = time.perf_counter()
        write_labelmap(result.labels, dst, segmenter.package.labels)
        result.timings = {"read": read_s, **result.timings, "write": time.perf_counter() - t}
    finally:
        bar.close()
    result.timings["total"] = time.perf_counter() - t0
    result.warnings[:0] = read_warnings
    for warning in result.warnings:
        print(f"hlfd-segment: warning: {warning}", file=sys.stderr)
    if progress_bar:
        vols = ", ".join(f"{v['name']} {v['volume_ml']:.1f} mL" for v in result.volumes)
        took = (
            f"{result.timings['total']:.1f} s on {result.device}, {result.precision}, "
            f"{result.backend}"
        )
        print(f"{dst}: {vols} ({took})")
    report = {**result.report(segmenter.package, str(src)), "output": str(dst)}
    if series_info:
        report["series"] = series_info
    return report


if __name__ == "__main__":
    sys.exit(main())
