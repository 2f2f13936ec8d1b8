"""Short helper processes the Slicer panel follows without blocking: device probe, pip installs.

:class:`BackgroundCommand` runs one command in its own session / process group, collects its
output lines (stdout and stderr merged) from a reader thread and is polled from a QTimer; it
never waits for the process in the caller's thread. Pure Python: no Qt, no Slicer.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .slicerjob import kill_tree, new_process_group, worker_env


class BackgroundCommand:
    """Run ``argv``; :meth:`poll` returns the new output lines and never blocks."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None):
        self.argv = [os.fspath(a) for a in argv]
        self.env = dict(env) if env is not None else worker_env()
        self.output: list[str] = []
        self.returncode: int | None = None
        self.cancelled = False
        self._process: subprocess.Popen[str] | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False

    def start(self) -> BackgroundCommand:
        self._process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **new_process_group(),
        )
        threading.Thread(
            target=self._read, args=(self._process.stdout,), name="hlfd-background", daemon=True
        ).start()
        return self

    def _read(self, stream: Any) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # pipe closed by cancel
            pass
        finally:
            self._queue.put(None)

    @property
    def finished(self) -> bool:
        return self.cancelled or self.returncode is not None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def poll(self) -> list[str]:
        """The output lines since the last call; sets :attr:`returncode` once the process ended
        and its output is read."""
        new: list[str] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                break
            new.append(line)
        self.output.extend(new)
        if self._eof and self._process is not None and self.returncode is None:
            self.returncode = self._process.poll()
        return new

    def cancel(self) -> None:
        """Kill the process tree (without waiting for it). Idempotent."""
        if self._process is not None and not self.finished:
            kill_tree(self._process)
        self.cancelled = True


def device_probe(python: str | os.PathLike[str] | None = None) -> BackgroundCommand:
    """Start ``python -m HLFDSegmentLib.deps``: it prints :func:`deps.detect_device`'s line.
    torch is imported in that process, never in Slicer's."""
    return BackgroundCommand([os.fspath(python or sys.executable), "-m", "HLFDSegmentLib.deps"])


def probe_result(probe: BackgroundCommand) -> str | None:
    """The detected device line of a finished probe (None while it runs)."""
    if not probe.finished:
        return None
    lines = [line for line in probe.output if line.strip()]
    if probe.ok and lines:
        return lines[-1].strip()
    detail = lines[-1].strip() if lines else f"exit status {probe.returncode}"
    return f"unknown ({detail})"
