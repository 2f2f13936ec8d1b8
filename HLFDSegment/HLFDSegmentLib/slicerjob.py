"""Run the segmentation worker in a subprocess and follow it: the engine behind Slicer's button.

Pure Python (no Qt, no Slicer): the Slicer widget calls :meth:`SegmentationJob.poll` from a
QTimer, scripts call :meth:`SegmentationJob.wait`. The process is started by an injectable
*launcher* (default: :func:`popen_launcher`, a new session / process group) so tests can wrap
or replace it. Cancel kills the whole process tree and deletes the job's work folder.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from .progress import STAGE_NAMES

LIB_PARENT = Path(__file__).resolve().parents[1]
"""The folder that holds ``HLFDSegmentLib`` (put on the worker's PYTHONPATH)."""

MEMORY_HINT = "Try Device: CPU, or a smaller model."


class Process(Protocol):
    """What a launcher returns (``subprocess.Popen`` fits)."""

    pid: int
    stdout: IO[str] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Launcher = Callable[[Sequence[str], Mapping[str, str], Path], Process]
"""``launcher(argv, env, log_path) -> process``: stdout a text pipe, stderr into ``log_path``."""


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


EOF_GRACE_S = 5.0  # a worker that closed stdout gets this long to exit before it is killed
KEEP_LOGS = 10  # worker logs kept in a job's ``log_dir`` (the newest ones)


def worker_command(
    python: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model: str | os.PathLike[str],
    device: str = "auto",
    tta: bool = False,
    threads: int | None = None,
    offline: bool = False,
) -> list[str]:
    """The worker's command line (see :mod:`HLFDSegmentLib.worker`)."""
    argv = [os.fspath(python), "-m", "HLFDSegmentLib.worker"]
    argv += ["--input", os.fspath(input_path), "--output", os.fspath(output_path)]
    argv += ["--model", os.fspath(model), "--device", device]
    if tta:
        argv.append("--tta")
    if threads:
        argv += ["--threads", str(threads)]
    if offline:
        argv.append("--offline")
    return argv


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with HLFDSegmentLib importable."""
    env = dict(os.environ if base is None else base)
    paths = [str(LIB_PARENT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_process_group() -> dict[str, Any]:
    """``Popen`` arguments that start a child in its own session (POSIX) / process group
    (Windows, without a console window), so :func:`kill_tree` can kill everything it starts."""
    if os.name == "nt":  # pragma: no cover - Windows only
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def popen_launcher(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, *, stdin: int = subprocess.DEVNULL
) -> Process:
    """Start ``argv`` in a new session (POSIX) / process group (Windows), so the whole tree
    can be killed at once; stdout is a line-buffered text pipe, stderr goes to ``log_path``
    (``stdin=subprocess.PIPE``: a text pipe too, for the persistent worker's requests)."""
    kwargs = new_process_group()
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )


def kill_tree(process: Process) -> None:
    """Kill ``process`` and every process it started (its session / process group).

    Never waits in the caller's thread: a background thread reaps the process, so one stuck in
    the kernel (e.g. inside a GPU driver call) cannot freeze Slicer's GUI."""
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False
        )
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # session leader: pgid == pid
    with contextlib.suppress(Exception):
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    threading.Thread(target=_reap, args=(process,), name="hlfd-reaper", daemon=True).start()


def _reap(process: Process) -> None:
    with contextlib.suppress(Exception):
        process.wait()


def parse_event(line: str) -> dict[str, Any]:
    """One stdout line as an event; a line that is not a JSON object becomes a ``log`` event."""
    line = line.strip()
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return {"event": "log", "message": line}
    if not isinstance(event, dict) or "event" not in event:
        return {"event": "log", "message": line}
    return event


def describe_failure(error: Mapping[str, Any] | None, returncode: int | None, log_tail: str) -> str:
    """A message for the user from the worker's error event, exit status and stderr tail."""
    if error is not None:
        message = str(error.get("message", "unknown error"))
        if error.get("kind") == "memory":
            return f"Out of memory: {message}. {MEMORY_HINT}"
        if error.get("kind") == "internal" and log_tail:
            return f"Segmentation failed with an internal error: {message}\n\n{log_tail}"
        return f"Segmentation failed: {message}"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == getattr(signal, "SIGKILL", 9):
            return (
                f"The segmentation process was killed ({name}). This usually means the "
                f"computer ran out of memory. {MEMORY_HINT}"
            )
        return f"The segmentation process crashed ({name}). {MEMORY_HINT}"
    detail = f"\n\n{log_tail}" if log_tail else ""
    if returncode in (None, 0):
        return f"The segmentation process ended without a result.{detail}"
    return f"The segmentation process crashed (exit status {returncode}).{detail}"


class SegmentationJob:
    """One segmentation in a worker subprocess.

    Usage: create; write the CT to :attr:`input_path`; :meth:`start`; call :meth:`poll` until
    :attr:`finished`; then read :attr:`output_path` (state DONE) or show :attr:`error`;
    finally :meth:`cleanup`. :meth:`cancel` can be called at any time.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        device: str = "auto",
        tta: bool = False,
        *,
        python: str | os.PathLike[str] | None = None,
        launcher: Launcher = popen_launcher,
        threads: int | None = None,
        offline: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        input_suffix: str = ".nrrd",
        command: Callable[[list[str]], list[str]] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        keep_logs: int = KEEP_LOGS,
    ):
        self.model = os.fspath(model)
        self.device = device
        self.tta = tta
        self.python = os.fspath(python or sys.executable)
        self.launcher = launcher
        self.threads = threads
        self.offline = offline
        self.command = command
        self.workdir = Path(tempfile.mkdtemp(prefix="hlfd-job-", dir=workdir))
        self.input_path = self.workdir / f"input{input_suffix}"
        self.output_path = self.workdir / "labels.nrrd"
        self.log_path = self.workdir / "worker.log"
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.keep_logs = keep_logs
        self.kept_log: Path | None = None
        """Where :meth:`cleanup` kept this run's log (events and stderr), if ``log_dir``."""
        self.state = JobState.PENDING
        self.stage = ""
        self.fraction = 0.0
        self.events: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.device_info: dict[str, Any] | None = None
        self.download: dict[str, Any] | None = None
        """The last ``download`` event (``done`` and ``total`` bytes) while a model downloads."""
        self.warnings: list[str] = []
        self.error: str | None = None
        self.returncode: int | None = None
        self._error_event: dict[str, Any] | None = None
        self._process: Process | None = None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._started = 0.0
        self._ended: float | None = None
        self._eof_at: float | None = None

    # -- life cycle ------------------------------------------------------------------------------
    @property
    def argv(self) -> list[str]:
        argv = worker_command(
            self.python,
            self.input_path,
            self.output_path,
            self.model,
            self.device,
            self.tta,
            self.threads,
            self.offline,
        )
        return self.command(argv) if self.command else argv

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start` (frozen once finished)."""
        if not self._started:
            return 0.0
        return (self._ended or time.monotonic()) - self._started

    def start(self) -> None:
        """Launch the worker (the input file must exist)."""
        if self.state is not JobState.PENDING:
            raise RuntimeError(f"job already {self.state.value}")
        if not self.input_path.is_file():
            raise FileNotFoundError(f"{self.input_path}: write the input volume before start()")
        self._started = time.monotonic()
        try:
            self._process = self.launcher(self.argv, worker_env(), self.log_path)
        except OSError as exc:
            self._finish(JobState.FAILED, f"Cannot start the segmentation process: {exc}")
            raise
        self.state = JobState.RUNNING
        self._reader = threading.Thread(
            target=self._read, args=(self._process.stdout,), name="hlfd-worker-reader", daemon=True
        )
        self._reader.start()

    def _read(self, stream: Iterable[str] | None) -> None:
        try:
            for line in stream or ():
                if line.strip():
                    self._queue.put(parse_event(line))
        except (OSError, ValueError):  # pipe closed by cancel
            pass
        finally:
            self._queue.put(None)

    def poll(self) -> list[dict[str, Any]]:
        """Handle what the worker reported since the last call; return those events.

        Never blocks; updates :attr:`stage`, :attr:`fraction`, :attr:`state` and, at the end,
        :attr:`result` or :attr:`error`."""
        if self.state is not JobState.RUNNING:
            return []
        new: list[dict[str, Any]] = []
        eof = False
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                eof = True
                break
            self._handle(event)
            new.append(event)
        if eof and self._eof_at is None:
            self._eof_at = time.monotonic()
        if self._eof_at is not None:  # stdout closed: never block, give the process a grace time
            assert self._process is not None
            self.returncode = self._process.poll()
            if self.returncode is None and time.monotonic() - self._eof_at > EOF_GRACE_S:
                kill_tree(self._process)
                self.returncode = self._process.poll()
                if self.returncode is None:
                    self.returncode = -9
            if self.returncode is not None:
                self._conclude()
        return new

    def _handle(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind == "progress":
            self.stage = str(event.get("stage", ""))
            try:  # a malformed event must not break the caller's timer
                fraction = float(event.get("fraction", self.fraction))
            except (TypeError, ValueError):
                fraction = self.fraction
            if math.isfinite(fraction):
                self.fraction = min(1.0, max(0.0, fraction))
        elif kind == "download":
            self.stage = "download"
            self.download = event
        elif kind == "device":
            self.device_info = event
        elif kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        elif kind == "done":
            self.result = event
        elif kind == "error":
            self._error_event = event

    def _conclude(self) -> None:
        if self.returncode == 0 and self.result is not None and self.output_path.is_file():
            self.fraction = 1.0
            self._finish(JobState.DONE, None)
        else:
            message = describe_failure(self._error_event, self.returncode, self.log_tail())
            self._finish(JobState.FAILED, message)

    def _finish(self, state: JobState, error: str | None) -> None:
        self.state = state
        self.error = error
        self._ended = time.monotonic()
        if state is not JobState.DONE:
            self.output_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 12) -> str:
        """The last lines the worker wrote on stderr."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait(
        self,
        timeout: float | None = None,
        interval: float = 0.05,
        on_events: Callable[[SegmentationJob, list[dict[str, Any]]], None] | None = None,
    ) -> JobState:
        """Poll until finished (for scripts and tests); cancel and raise on ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            events = self.poll()
            if on_events and events:
                on_events(self, events)
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"segmentation did not finish within {timeout} s")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Kill the worker and all its children; delete the work folder. Idempotent."""
        if self._process is not None and self.state is JobState.RUNNING:
            kill_tree(self._process)
            self.returncode = self._process.poll()
        if not self.finished:
            self._finish(JobState.CANCELLED, None)
        self.cleanup()

    def cleanup(self) -> None:
        """Keep the log in :attr:`log_dir` (if given), then delete the work folder."""
        if self.log_dir is not None and self.kept_log is None and self.workdir.exists():
            with contextlib.suppress(OSError):
                self.kept_log = keep_log(self.transcript(), self.log_dir, self.keep_logs)
        # a worker killed a moment ago may still create a file (its output's temporary name)
        # while the folder is being removed: try again briefly (at most 0.2 s)
        for _ in range(10):
            shutil.rmtree(self.workdir, ignore_errors=True)
            if not self.workdir.exists():
                break
            time.sleep(0.02)

    def transcript(self) -> str:
        """The run for a person to read: its events (one line each), then the worker's stderr."""
        lines = [f"command: {' '.join(self.argv)}"]
        stage = None
        for event in self.events:
            if event.get("event") == "progress" and event.get("stage") == stage:
                continue
            stage = event.get("stage", stage) if event.get("event") == "progress" else stage
            line = describe_event(event)
            if line:
                lines.append(line)
        outcome = self.state.value + (f": {self.error}" if self.error else "")
        lines.append(f"result: {outcome} ({self.elapsed:.1f} s)")
        try:
            stderr = self.log_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            stderr = ""
        if stderr:
            lines += ["", "--- worker output (stderr) ---", stderr]
        return "\n".join(lines) + "\n"

    def __del__(self) -> None:  # a forgotten job must not leave a worker running
        with contextlib.suppress(Exception):
            if self.state is JobState.RUNNING:
                self.cancel()


def describe_event(event: Mapping[str, Any]) -> str | None:
    """One line for the panel's log (None for events not worth a line)."""
    kind = event.get("event")
    if kind == "start":
        return f"worker started (pid {event.get('pid')}, version {event.get('version')})"
    if kind == "progress":
        stage = str(event.get("stage", ""))
        return f"{STAGE_NAMES.get(stage, stage)}..."
    if kind == "download":
        return None  # many per second: the panel shows them in the status line
    if kind == "device":
        model = event.get("model") or {}
        name = f"{model.get('name', '?')} {model.get('version', '')}".strip()
        where = event.get("description") or event.get("device")
        return f"model {name} on {where} ({event.get('precision', '?')})"
    if kind == "warning":
        return f"WARNING: {event.get('message', '')}"
    if kind == "error":
        return f"ERROR ({event.get('kind', '?')}): {event.get('message', '')}"
    if kind == "done":
        return f"result written: {event.get('output', '')}"
    if kind == "log":
        return str(event.get("message", ""))
    return json.dumps(dict(event))


def keep_log(text: str, folder: str | os.PathLike[str], keep: int = KEEP_LOGS) -> Path:
    """Write ``text`` as a new ``hlfd-run-*.log`` in ``folder``; delete all but the newest
    ``keep`` of them. Returns the new file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # one clock reading for both parts: nanoseconds read apart from the second could fall past
    # a second boundary, and the new log would sort before (and be deleted instead of) old ones
    now = time.time_ns()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now // 10**9))
    path = folder / f"hlfd-run-{stamp}-{now % 10**9:09d}.log"
    path.write_text(text, encoding="utf-8")
    logs = sorted(folder.glob("hlfd-run-*.log"))
    for old in logs[: max(0, len(logs) - keep)]:
        old.unlink(missing_ok=True)
    return path


def finished_status(job: SegmentationJob) -> str:
    """The panel's status line for a finished job (warnings counted: they are shown too)."""
    if job.state is JobState.DONE:
        text = f"Done in {job.elapsed:.1f} s."
        if job.warnings:
            n = len(job.warnings)
            text += f" {n} warning{'s' if n > 1 else ''}: please read {'them' if n > 1 else 'it'}."
        return text
    if job.state is JobState.CANCELLED:
        return "Cancelled; the scene is unchanged."
    return "Segmentation failed."


# -- what the Slicer layer shows ------------------------------------------------------------------

DEVICE_CHOICES = ("auto", "gpu", "cpu")


def device_argument(choice: str, platform: str = sys.platform) -> str:
    """The worker's ``--device`` for a UI choice: auto, gpu (CUDA; Apple MPS on macOS), cpu."""
    choice = choice.lower()
    if choice == "gpu":
        return "mps" if platform == "darwin" else "cuda"
    if choice in ("auto", "cpu") or choice.startswith(("cuda", "mps")):
        return choice
    raise ValueError(f"unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)}")


def estimate_seconds(runtimes: Iterable[Mapping[str, Any]] | None, device: str) -> float | None:
    """The measured run time (card or registry ``runtimes``) for a device like ``device``:
    the kind is the device's first word (a torch device string with its index, or
    ``cpu (2 threads, x86_64)`` as ``hlfd-train`` writes it)."""

    def kind(name: str) -> str:
        word = re.match(r"[a-z]*", name.strip().lower()).group()
        return "cuda" if word == "gpu" else word

    matches = [
        float(r["seconds"])
        for r in runtimes or ()
        if kind(str(r.get("device", ""))) == kind(device) and "seconds" in r
    ]
    return min(matches) if matches else None


def volume_rows(
    volumes: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per segment: name, volume (mL), voxels and, for a lesion, the tumour burden
    (lesion volume / volume of its organ *including* the lesion, in %; None without organ)."""
    by_value = {int(v["value"]): v for v in volumes}
    rows = []
    for lab in labels:
        vol = by_value.get(int(lab["value"]), {"volume_ml": 0.0, "voxels": 0})
        row = {
            "name": lab["name"],
            "volume_ml": float(vol["volume_ml"]),
            "voxels": int(vol["voxels"]),
            "burden_percent": None,
            "organ": None,
        }
        parent = lab.get("inside")
        if parent is not None:
            organ = next(o for o in labels if o["value"] == parent)
            organ_ml = float(by_value.get(int(parent), {"volume_ml": 0.0})["volume_ml"])
            lesions_ml = sum(
                float(by_value.get(int(o["value"]), {"volume_ml": 0.0})["volume_ml"])
                for o in labels
                if o.get("inside") == parent
            )
            total = organ_ml + lesions_ml
            row["organ"] = organ["name"]
            row["burden_percent"] = 100.0 * row["volume_ml"] / total if total > 0 else None
        rows.append(row)
    return rows


def model_choices(
    entries: Iterable[Any],
    cached: Iterable[Path],
    extra: Iterable[str | os.PathLike[str]] = (),
    builtin: Mapping[str, Path] | None = None,
) -> list[tuple[str, str]]:
    """(title, MODEL argument) for the model selector: built-in models (by id, titled from their
    card, read as plain JSON: no extra package needed), registry entries (``ID@VERSION``, marked
    when cached), then cached packages that are not registry downloads, then ``extra`` paths."""
    cached = list(cached)
    cached_names = {p.name for p in cached}
    out: list[tuple[str, str]] = []
    for model_id, folder in (builtin or {}).items():
        try:
            card = json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))
            title = f"{card.get('title') or card['name']} [{card['task']}, built in]"
        except (OSError, ValueError, KeyError, TypeError):
            title = f"{model_id} [built in, card unreadable]"
        out.append((title, model_id))
    seen: set[str] = set()
    for e in entries:
        mark = "" if e.filename in cached_names else " (download)"
        out.append((f"{e.title} [{e.task}, v{e.version}]{mark}", e.spec))
        seen.add(e.filename)
    for path in [*cached, *(Path(p) for p in extra)]:
        if path.name in seen or str(path) in {s for _, s in out}:
            continue
        out.append((f"{path.name} ({path.parent})", str(path)))
    return out
