"""Helper processes the panel follows without blocking Slicer's GUI: device probe, kill, EOF."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from HLFDSegmentLib import slicerjob
from HLFDSegmentLib.background import BackgroundCommand, device_probe, probe_result
from HLFDSegmentLib.slicerjob import JobState, SegmentationJob, popen_launcher

from conftest import block_ct, make_image

MODULE = Path(__file__).resolve().parents[1] / "HLFDSegment"
posix_only = pytest.mark.skipif(os.name == "nt", reason="uses POSIX shell tools")


@pytest.mark.slow
def test_device_probe_runs_torch_in_another_process_only():
    """The panel learns the device without importing torch in Slicer's own process."""
    code = (
        "import sys, time\n"
        "sys.modules['torch'] = None  # importing torch here would raise\n"
        "from HLFDSegmentLib.background import device_probe, probe_result\n"
        "probe = device_probe(sys.executable)\n"
        "assert probe_result(probe) is None\n"
        "probe.start()\n"
        "while not probe.finished:\n"
        "    probe.poll()\n"
        "    time.sleep(0.05)\n"
        "print(probe_result(probe))\n"
    )
    env = slicerjob.worker_env()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=MODULE, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(("CPU only", "GPU:")), done.stdout


def test_failed_probe_says_why():
    probe = BackgroundCommand([sys.executable, "-c", "import sys; sys.exit('no torch here')"])
    probe.start()
    while not probe.finished:
        probe.poll()
        time.sleep(0.02)
    assert probe_result(probe) == "unknown (no torch here)"
    assert device_probe().argv[1:] == ["-m", "HLFDSegmentLib.deps"]


class StuckProcess:
    """A real worker process whose ``wait`` behaves like one stuck in the kernel after SIGKILL
    (e.g. inside a GPU driver call): it records who waits, and blocks any wait in the test's
    thread with a timeout for that whole timeout (here: raises at once, recorded)."""

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self.pid = process.pid
        self.stdout = process.stdout
        self.waits_in_caller: list[float | None] = []
        self._caller = threading.get_ident()

    def poll(self):
        return self._process.poll()

    def wait(self, timeout=None):
        if threading.get_ident() == self._caller:
            self.waits_in_caller.append(timeout)
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self._process.wait()


def _job_with(tmp_path: Path, script: str) -> tuple[SegmentationJob, list[StuckProcess]]:
    started: list[StuckProcess] = []

    def launcher(argv, env, log_path):
        process = StuckProcess(popen_launcher(argv, env, log_path))
        started.append(process)
        return process

    job = SegmentationJob(
        "m", launcher=launcher, command=lambda argv: [sys.executable, "-c", script]
    )
    sitk.WriteImage(make_image(block_ct()), str(job.input_path))
    return job, started


@posix_only
def test_cancel_never_waits_for_the_process_in_the_callers_thread(tmp_path):
    script = 'import time; print(\'{"event": "start"}\', flush=True); time.sleep(60)'
    job, started = _job_with(tmp_path, script)
    job.start()
    while not job.events:
        job.poll()
        time.sleep(0.02)
    job.cancel()
    assert job.state is JobState.CANCELLED
    assert started[0].waits_in_caller == []  # before: wait(timeout=10) in the GUI thread


@posix_only
def test_closed_output_never_waits_for_the_process_in_the_callers_thread(tmp_path, monkeypatch):
    """A worker that closes stdout but keeps running is killed after the grace time from
    poll(), which returns at once (before: a 10 s wait inside the timer callback)."""
    monkeypatch.setattr(slicerjob, "EOF_GRACE_S", 0.0)
    script = "import os, sys, time; sys.stdout.close(); os.close(1); time.sleep(60)"
    job, started = _job_with(tmp_path, script)
    job.start()
    while not job.finished:
        job.poll()
        time.sleep(0.02)
    assert job.state is JobState.FAILED and "without a result" not in (job.error or "x")
    assert started[0].waits_in_caller == []
    job.cleanup()
