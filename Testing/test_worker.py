"""The Slicer worker subprocess protocol, end to end with plain ``subprocess`` (no Slicer)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HLFDSegmentLib import worker
from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.pipeline import Segmenter
from HLFDSegmentLib.slicerjob import JobState, SegmentationJob, worker_command, worker_env

from conftest import block_ct, make_image

posix_only = pytest.mark.skipif(os.name == "nt", reason="process-group test uses POSIX tools")


def run_worker(*args: str, timeout: float = 120) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "HLFDSegmentLib.worker", *args],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, events, proc.stderr


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_image(block_ct()), str(path))
    return path


@pytest.mark.slow
def test_progress_events_and_result_file(tmp_path, ct_file, tiny_package):
    out = tmp_path / "out" / "labels.nrrd"
    out.parent.mkdir()
    rc, events, stderr = run_worker(
        "--input", str(ct_file), "--output", str(out), "--model", str(tiny_package),
        "--device", "cpu",
    )  # fmt: skip
    assert rc == worker.EXIT_OK, stderr
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert "error" not in kinds and kinds.count("device") == 1
    device = next(e for e in events if e["event"] == "device")
    assert device["description"].startswith("CPU (")  # named in the worker, not in Slicer
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    stages = list(dict.fromkeys(e["stage"] for e in progress))
    assert stages[:2] == ["read", "model"] and stages[-1] == "write"
    assert {"preprocess", "infer", "postprocess", "resample"} <= set(stages)

    done = events[-1]
    assert Path(done["output"]) == out.resolve()
    assert [lab["name"] for lab in done["labels"]] == ["Kidney", "Kidney tumor"]
    assert done["report"]["model"]["name"] == "test-model"
    # exactly what the in-process runtime gives, on exactly the input grid
    image = sitk.ReadImage(str(ct_file))
    expected = Segmenter(load_package(tiny_package), device="cpu")(image).labels
    labels = sitk.ReadImage(str(out))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == image.GetSize()
    assert np.allclose(labels.GetDirection(), image.GetDirection())
    assert np.allclose(labels.GetOrigin(), image.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))
    volumes = {s["name"]: s["voxels"] for s in done["report"]["segments"]}
    assert volumes["Kidney"] == int((sitk.GetArrayFromImage(labels) == 1).sum())
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.nrrd"]  # no temp files


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting to be reaped is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


@posix_only
def test_cancel_kills_the_whole_process_tree(tmp_path, tiny_package):
    pid_file = tmp_path / "child.pid"
    # the worker runs under a shell that first starts a long-lived grandchild in the same group
    wrap = ["sh", "-c", f'sleep 120 & echo $! > "{pid_file}"; exec "$@"', "sh"]
    job = SegmentationJob(tiny_package, "cpu", python=sys.executable, command=lambda a: wrap + a)
    sitk.WriteImage(make_image(block_ct()), str(job.input_path))
    job.start()
    deadline = time.monotonic() + 30
    while not any(e["event"] == "progress" for e in job.events):  # mid-run: model not loaded
        assert time.monotonic() < deadline, job.log_tail()
        job.poll()
        time.sleep(0.02)
    assert not job.finished
    child = int(pid_file.read_text())
    worker_pid = job.pid
    assert _alive(child) and _alive(worker_pid)
    job.cancel()
    assert job.state is JobState.CANCELLED and job.error is None
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(worker_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(worker_pid)
    assert not job.workdir.exists()  # input, partial output and log are gone
    assert job.poll() == [] and job.result is None
    job.cancel()  # idempotent


def test_bad_model_path_is_one_error_event(tmp_path, ct_file):
    out = tmp_path / "labels.nrrd"
    rc, events, _ = run_worker(
        "--input", str(ct_file), "--output", str(out), "--model", str(tmp_path / "nope.zip")
    )
    assert rc == worker.EXIT_ERROR
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "model"
    assert "nope.zip" in errors[0]["message"]
    assert events[-1]["event"] == "error" and not any(e["event"] == "done" for e in events)
    assert list(tmp_path.iterdir()) == [ct_file]


def test_corrupt_model_is_refused(tmp_path, ct_file, tiny_package):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_package, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "labels.nrrd"
    stream = io.StringIO()  # worker.main in this process: the protocol runs above as a process
    rc = worker.main(["--input", str(ct_file), "--output", str(out), "--model", str(bad)], stream)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert rc == worker.EXIT_ERROR
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "model"
    assert "sha256" in errors[0]["message"] and "model.safetensors" in errors[0]["message"]
    assert not out.exists()


def _bad_image(kind: str) -> sitk.Image:
    if kind == "constant":
        return make_image(np.full((8, 20, 20), -1000, dtype=np.int16))
    if kind == "2d":
        image = sitk.GetImageFromArray(block_ct()[5])
        image.SetSpacing((0.7, 0.8))
        return image
    vectors = [sitk.GetImageFromArray(block_ct(seed=s)) for s in range(3)]
    return sitk.JoinSeries(vectors)  # 4D: x, y, z, t=3


@pytest.mark.parametrize(("kind", "words"), [("constant", "constant"), ("2d", "2D"), ("4d", "4D")])
def test_bad_input_is_one_error_event(tmp_path, tiny_package, kind, words):
    src = tmp_path / f"{kind}.nrrd"
    sitk.WriteImage(_bad_image(kind), str(src))
    out = tmp_path / "labels.nrrd"
    t = time.perf_counter()
    rc, events, _ = run_worker(
        "--input", str(src), "--output", str(out), "--model", str(tiny_package)
    )
    assert rc == worker.EXIT_ERROR
    assert [e["event"] for e in events if e["event"] != "progress"] == ["start", "error"]
    assert events[-1]["kind"] == "input" and words in events[-1]["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    assert time.perf_counter() - t < 20  # refused before the model (and torch) are loaded


def test_usage_error_exit_status(tmp_path):
    rc, events, stderr = run_worker("--input", "x.nrrd")
    assert rc == worker.EXIT_USAGE and events == [] and "--output" in stderr


def test_unknown_output_type(tmp_path, ct_file, tiny_package):
    rc, events, _ = run_worker(
        "--input", str(ct_file), "--output", str(tmp_path / "x.png"), "--model", str(tiny_package)
    )
    assert rc == worker.EXIT_ERROR and events[-1]["kind"] == "input"


# -- in-process: the error mapping of main() ------------------------------------------------------


def _main_with(exc: BaseException) -> tuple[int, list[dict]]:
    def runner(args, emit):
        emit.progress("read", 0.0)
        raise exc

    stream = io.StringIO()
    rc = worker.main(["--input", "a", "--output", "b.nrrd", "--model", "m"], stream, runner)
    return rc, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_out_of_memory_maps_to_exit_3_with_hint():
    for exc in (MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")):
        rc, events = _main_with(exc)
        assert rc == worker.EXIT_MEMORY
        assert events[-1]["kind"] == "memory" and "CPU" in events[-1]["message"]


def test_unexpected_exception_maps_to_exit_4(capsys):
    rc, events = _main_with(ValueError("boom"))
    assert rc == worker.EXIT_INTERNAL
    assert events[-1] == {"event": "error", "kind": "internal", "message": "ValueError: boom"}
    assert "Traceback" in capsys.readouterr().err


def test_progress_is_throttled_and_monotonic():
    stream = io.StringIO()
    emit = worker.Emitter(stream)
    for i in range(1000):
        emit.progress("infer", i / 1000)
    emit.progress("infer", 0.5)  # never goes back
    emit.progress("write", 0.2)
    fractions = [json.loads(line)["fraction"] for line in stream.getvalue().splitlines()]
    assert 90 <= len(fractions) <= 102
    assert fractions == sorted(fractions) and fractions[-1] == fractions[-2]  # stage change kept


def test_worker_crash_is_reported_not_raised(tmp_path):
    crash = [sys.executable, "-c", "import os, sys; print('not json', flush=True); os.abort()"]
    job = SegmentationJob("m", python=sys.executable, command=lambda argv: crash)
    job.input_path.write_bytes(b"")
    job.start()
    assert job.wait(30) is JobState.FAILED
    assert "crashed (SIGABRT)" in job.error and "CPU" in job.error
    assert {"event": "log", "message": "not json"} in job.events
    job.cleanup()


def test_worker_killed_reads_as_out_of_memory(tmp_path):
    kill = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    job = SegmentationJob("m", command=lambda argv: kill)
    job.input_path.write_bytes(b"")
    job.start()
    assert job.wait(30) is JobState.FAILED
    assert "ran out of memory" in job.error and not job.output_path.exists()
    job.cleanup()


def test_worker_command_line():
    argv = worker_command("py", "in.nrrd", "out.nrrd", "m.zip", "cuda", tta=True, threads=2)
    assert argv == [
        "py", "-m", "HLFDSegmentLib.worker", "--input", "in.nrrd", "--output", "out.nrrd",
        "--model", "m.zip", "--device", "cuda", "--tta", "--threads", "2",
    ]  # fmt: skip
    assert worker.build_parser().parse_args(argv[3:]).tta


@pytest.mark.slow
def test_run_warnings_reach_the_job_and_the_kept_log(tmp_path, tiny_package):
    """A real run that asks for a GPU this machine lacks: the warning is an event the panel
    shows (status line and warnings label), and the run's log is kept after the work folder
    is deleted."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: no fallback warning to see")
    from HLFDSegmentLib.slicerjob import finished_status

    job = SegmentationJob(tiny_package, "cuda", python=sys.executable, log_dir=tmp_path / "logs")
    sitk.WriteImage(make_image(block_ct()), str(job.input_path))
    job.start()
    assert job.wait(120) is JobState.DONE, job.error
    assert any("no CUDA GPU is available" in w for w in job.warnings)
    assert finished_status(job).endswith("1 warning: please read it.")
    job.cleanup()
    assert not job.workdir.exists()
    text = job.kept_log.read_text(encoding="utf-8")
    assert "WARNING: device 'cuda' asked but no CUDA GPU is available" in text
    assert "result: done" in text and "Running the network..." in text


@pytest.mark.slow
def test_model_download_progress_reaches_the_job(tmp_path, monkeypatch, onnx_package):
    """A registry model fetched by the worker: its bytes arrive as download events, which the
    job turns into the panel's "Downloading the model: x of y MB" state (before: stuck at 3%)."""
    import hashlib

    zipped = Path(shutil.make_archive(str(tmp_path / "served"), "zip", onnx_package))
    payload = zipped.read_bytes()
    listing = {
        "id": "kidney-web", "title": "Kidney", "task": "kidney", "version": "1.0",
        "url": zipped.as_uri(), "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload), "license": "Apache-2.0",
    }  # fmt: skip
    registry_file = tmp_path / "models.json"
    registry_file.write_text(json.dumps({"format_version": 1, "models": [listing]}))
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(registry_file))
    monkeypatch.setenv("HLFD_CACHE_DIR", str(tmp_path / "cache"))
    job = SegmentationJob("kidney-web@1.0", "cpu", python=sys.executable)
    sitk.WriteImage(make_image(block_ct()), str(job.input_path))
    job.start()
    stages = []
    while not job.finished:
        job.poll()
        stages.append(job.stage)
        time.sleep(0.02)
    assert job.state is JobState.DONE, job.error
    downloads = [e for e in job.events if e["event"] == "download"]
    assert downloads[0] == {"event": "download", "done": 0, "total": len(payload)}
    assert downloads[-1] == {"event": "download", "done": len(payload), "total": len(payload)}
    assert job.download == downloads[-1]
    kinds = [e["event"] for e in job.events]
    assert kinds.index("download") < kinds.index("device")  # fetched before the model loads
    assert (tmp_path / "cache" / "kidney-web-1.0.zip").read_bytes() == payload
    job.cleanup()


def test_download_events_are_throttled():
    stream = io.StringIO()
    emit = worker.Emitter(stream)
    total = 50 << 20
    for done in range(0, total + 1, 1 << 16):  # 64 KiB chunks
        emit.download(done, total)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert 90 <= len(events) <= 102 and events[-1]["done"] == total
    unknown = io.StringIO()
    emit = worker.Emitter(unknown)
    for done in range(0, 5 << 20, 1 << 16):
        emit.download(done, 0)
    assert len(unknown.getvalue().splitlines()) == 5  # every MiB when the size is unknown
    emit.download(0, 0)  # a download that starts over is shown from 0 again
    assert json.loads(unknown.getvalue().splitlines()[-1])["done"] == 0
