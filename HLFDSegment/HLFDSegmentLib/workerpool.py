"""Persistent segmentation workers: one ``worker --serve`` process per (model, device), kept alive
between segmentations so that only the first one pays the imports and the model load.

:meth:`WorkerPool.launch` is a :mod:`slicerjob` *launcher*: give it to a
:class:`~HLFDSegmentLib.slicerjob.SegmentationJob` (or ``mrml.SegmentationRun``) and the job runs
as one request on a persistent worker instead of in a new process. The job sees the request's
events as if they were a one-shot worker's whole stdout, ending at the request's ``end`` event
with the one-shot exit status; its ``pid`` is the worker's, so the job's cancel kills the worker
and the work in progress, and the next request starts a fresh worker. A worker that died (killed,
crashed, out of memory) is replaced on the next request. Pool-less use is unchanged: the default
launcher still starts one process per segmentation.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import worker
from .slicerjob import kill_tree, parse_event, popen_launcher

WORKER_MODULE = "HLFDSegmentLib.worker"
STOP_GRACE_S = 2.0  # a stopped worker gets this long to exit on its own before it is killed
CANCEL_GRACE_S = 2.0  # longest wait for a cancelled (killed) worker to be gone before reuse

WorkerKey = tuple[tuple[str, ...], str, str, str, int | None, bool]
"""(command prefix: python and any wrapper, model, device, backend, threads, offline)."""


def split_worker_command(argv: Sequence[str]) -> tuple[list[str], Any]:
    """``(prefix, args)`` of a one-shot worker command line (:func:`slicerjob.worker_command`,
    possibly wrapped): ``prefix`` runs Python, ``args`` are the worker's parsed options."""
    argv = list(argv)
    try:
        at = next(i for i in range(1, len(argv)) if argv[i - 1 : i + 1] == ["-m", WORKER_MODULE])
    except StopIteration:
        raise ValueError(f"not a worker command line (no -m {WORKER_MODULE}): {argv}") from None
    try:
        args = worker.parse_args(argv[at + 1 :])
    except SystemExit:
        raise ValueError(f"not a valid worker command line: {argv}") from None
    if args.serve:
        raise ValueError(f"already a serve command line: {argv}")
    return argv[: at - 1], args


def worker_key(prefix: Sequence[str], args: Any) -> WorkerKey:
    """The pool key of a one-shot command's parsed ``args`` (see :func:`split_worker_command`):
    requests that differ only in input, output and TTA share a worker."""
    return (tuple(prefix), args.model, args.device, args.backend, args.threads, args.offline)


def serve_command(prefix: Sequence[str], key: WorkerKey) -> list[str]:
    """The command line of the persistent worker for ``key``."""
    _, model, device, backend, threads, offline = key
    argv = [*prefix, "-m", WORKER_MODULE, "--serve", "--model", model, "--device", device]
    argv += ["--backend", backend]
    if threads:
        argv += ["--threads", str(threads)]
    if offline:
        argv.append("--offline")
    return argv


class RequestProcess:
    """One request on a :class:`PersistentWorker`, seen as a process (the slicerjob ``Process``
    protocol): ``stdout`` yields the request's event lines up to its ``end`` event; ``poll`` and
    ``wait`` give its one-shot exit status, or the worker's if the worker died first."""

    def __init__(self, owner: PersistentWorker, request_id: str, log_path: Path):
        self.owner = owner
        self.request_id = request_id
        self.log_path = log_path
        self.status: int | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log_offset = owner.log_size()

    @property
    def pid(self) -> int:
        return self.owner.process.pid

    @property
    def stdout(self) -> Iterator[str]:
        return self._read()

    def _read(self) -> Iterator[str]:
        while (line := self._lines.get()) is not None:
            yield line
        self._copy_log()

    def _copy_log(self) -> None:
        """The worker's stderr written since this request was sent, into the job's log."""
        with (
            contextlib.suppress(OSError),
            open(self.owner.log_path, "rb") as src,
            open(self.log_path, "ab") as dst,
        ):
            src.seek(self._log_offset)
            shutil.copyfileobj(src, dst)

    def poll(self) -> int | None:
        return self.status if self.status is not None else self.owner.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.status if self.status is not None else self.owner.process.wait(timeout)

    # called by the owner's reader thread
    def _deliver(self, line: str, event: Mapping[str, Any]) -> None:
        self._lines.put(line)
        if event.get("event") == "end":  # the status is set before the job can see the end
            status = event.get("status")
            self.status = status if isinstance(status, int) else worker.EXIT_INTERNAL
            self._lines.put(None)

    def _close(self) -> None:
        self._lines.put(None)


class PersistentWorker:
    """One ``worker --serve`` process and the thread that routes its events to requests."""

    def __init__(self, key: WorkerKey, env: Mapping[str, str], log_dir: Path):
        self.key = key
        fd, log_name = tempfile.mkstemp(prefix="worker-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log_path = Path(log_name)
        self.process = popen_launcher(
            serve_command(key[0], key), env, self.log_path, stdin=subprocess.PIPE
        )
        self._pending: dict[str, RequestProcess] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._route, name="hlfd-worker-router", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def busy(self) -> bool:
        """A request was sent and its end has not come back yet."""
        return bool(self._pending)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def submit(self, args: Any, log_path: Path) -> RequestProcess:
        """Send one request (``args``: parsed one-shot worker options); raises OSError if the
        worker cannot take it (it died)."""
        request_id = f"r{next(self._ids)}"
        handle = RequestProcess(self, request_id, log_path)
        line = json.dumps(
            {"id": request_id, "input": args.input, "output": args.output, "tta": bool(args.tta)}
        )
        with self._lock:
            if not self.alive or self.process.stdin is None:
                raise BrokenPipeError(f"worker {self.pid} is not running")
            self._pending[request_id] = handle
            try:
                self.process.stdin.write(line + "\n")
                self.process.stdin.flush()
            except (OSError, ValueError) as exc:
                del self._pending[request_id]
                raise BrokenPipeError(f"worker {self.pid} is not running ({exc})") from None
        return handle

    def _route(self) -> None:
        try:
            for line in self.process.stdout or ():
                if not line.strip():
                    continue
                event = parse_event(line)
                with self._lock:
                    rid = event.get("request")
                    handle = self._pending.get(rid) if isinstance(rid, str) else None
                    if handle is None and event.get("event") == "log" and self._pending:
                        handle = next(iter(self._pending.values()))  # stray output: oldest request
                    if handle is not None and event.get("event") == "end":
                        del self._pending[handle.request_id]
                if handle is not None:
                    handle._deliver(line, event)
        except (OSError, ValueError):  # pipe closed by a kill
            pass
        finally:
            with self._lock:
                pending, self._pending = list(self._pending.values()), {}
            for handle in pending:
                handle._close()

    def stop(self) -> None:
        """Close the request pipe (the worker exits), kill it if it does not; no process stays."""
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # busy with a request: kill it (a reaped pid is
            kill_tree(self.process)  # never signalled: it may belong to another process now)
        self._reader.join(timeout=STOP_GRACE_S)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class WorkerPool:
    """Persistent workers by (python, model, device, threads, offline), started on first use.

    At most ``max_workers`` are kept (each holds its runtime and model in memory, some hundred
    MB): starting another stops the least recently used idle one first. A busy worker is never
    stopped for that; the pool then holds one more until it is idle."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, max_workers: int = 2):
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self.max_workers = max_workers
        self.log_dir = Path(tempfile.mkdtemp(prefix="hlfd-workers-", dir=log_dir))
        self._workers: dict[WorkerKey, PersistentWorker] = {}
        self._lock = threading.Lock()

    @property
    def workers(self) -> dict[WorkerKey, PersistentWorker]:
        """The pool's workers, least recently used first (a dead one stays until replaced)."""
        return dict(self._workers)

    def worker_for(self, key: WorkerKey, env: Mapping[str, str]) -> PersistentWorker:
        """The live worker for ``key``: the running one, or a new one if none runs."""
        with self._lock:
            current = self._workers.pop(key, None)  # re-inserted last: most recently used
            if current is not None and current.busy:
                # a request still open: its job was cancelled (the panel runs one at a time) and
                # the kill is reaped in the background; let it land before reusing the worker
                with contextlib.suppress(subprocess.TimeoutExpired):
                    current.process.wait(CANCEL_GRACE_S)
            if current is not None and current.alive:
                self._workers[key] = current
                return current
            if current is not None:  # died: killed by a cancel, crashed, out of memory
                current.stop()
            for other in [k for k, w in self._workers.items() if not w.alive]:
                self._workers.pop(other).stop()
            idle = [k for k, w in self._workers.items() if not w.busy]  # least recent first
            while idle and len(self._workers) >= self.max_workers:
                self._workers.pop(idle.pop(0)).stop()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._workers[key] = PersistentWorker(key, env, self.log_dir)
            return self._workers[key]

    def launch(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> RequestProcess:
        """A slicerjob launcher: run the one-shot command ``argv`` as a request on the persistent
        worker for its model and device (started, or restarted, as needed)."""
        prefix, args = split_worker_command(argv)
        key = worker_key(prefix, args)
        try:
            return self.worker_for(key, env).submit(args, Path(log_path))
        except BrokenPipeError:  # it died between the check and the request: once more
            return self.worker_for(key, env).submit(args, Path(log_path))

    def stop(self) -> None:
        """Stop every worker and remove the pool's logs; the pool can be used again after."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for w in workers:
            w.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)


_shared: WorkerPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> WorkerPool:
    """The process-wide pool (the Slicer module's); stopped at interpreter exit at the latest."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WorkerPool()
            atexit.register(stop_shared_pool)
        return _shared


def stop_shared_pool() -> None:
    """Stop the process-wide pool's workers, if it was ever started."""
    with _shared_lock:
        pool = _shared
    if pool is not None:
        pool.stop()
