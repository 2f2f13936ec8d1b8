"""Persistent workers (``worker --serve`` + workerpool) with real processes and real packages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_worker import _alive, posix_only

from hlfd_train.export import add_onnx
from HLFDSegmentLib import worker, workerpool
from HLFDSegmentLib.slicerjob import JobState, SegmentationJob, worker_command, worker_env
from HLFDSegmentLib.workerpool import WorkerPool, split_worker_command

from conftest import block_ct, build_package, make_image


@pytest.fixture
def pool():
    pool = WorkerPool()
    yield pool
    pool.stop()


def segment(pool: WorkerPool | None, model: Path, device: str = "cpu", seed: int = 0, **kw):
    """One finished job (through ``pool``, or a one-shot worker without it) and its labels."""
    launcher = {"launcher": pool.launch} if pool is not None else {}
    job = SegmentationJob(model, device, python=sys.executable, **launcher, **kw)
    sitk.WriteImage(make_image(block_ct(seed=seed)), str(job.input_path))
    job.start()
    assert job.wait(180) is JobState.DONE, job.error
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(job.output_path)))
    job.cleanup()
    return job, labels


def wait_dead(*pids: int) -> bool:
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_second_request_reuses_the_worker_and_a_killed_worker_is_restarted(pool, onnx_package):
    first, labels1 = segment(pool, onnx_package, seed=0)
    second, labels2 = segment(pool, onnx_package, seed=1)
    assert first.pid == second.pid and _alive(first.pid)
    assert len(pool.workers) == 1
    _, one_shot = segment(None, onnx_package, seed=1)
    assert np.array_equal(labels2, one_shot) and (labels2 == 1).any()
    assert not np.array_equal(labels1, labels2)  # a new answer, not the first one again
    # the job sees the one-shot protocol, each event tagged with its request, then the end
    kinds = [e["event"] for e in second.events]
    assert kinds[0] == "start" and kinds[-2:] == ["done", "end"] and kinds.count("device") == 1
    assert {e["request"] for e in second.events} == {"r2"}
    assert second.events[-1]["status"] == worker.EXIT_OK and second.returncode == worker.EXIT_OK
    assert [lab["name"] for lab in second.result["labels"]] == ["Kidney", "Kidney tumor"]

    # a worker killed between requests is replaced on the next one
    os.kill(first.pid, signal.SIGKILL)
    # reaped, not only a zombie leader: its other threads may still be exiting, and until they
    # are, the pool rightly sees it running (a request sent then fails like a killed run)
    (dead,) = pool.workers.values()
    assert dead.process.wait(15) == -signal.SIGKILL
    third, labels3 = segment(pool, onnx_package, seed=1)
    assert third.pid != first.pid and np.array_equal(labels3, labels2)
    assert len(pool.workers) == 1


@pytest.mark.slow
@posix_only
def test_cancel_kills_the_work_leaves_the_scene_and_the_next_request_works(
    tmp_path, pool, tiny_package
):
    slicer = pytest.importorskip("slicer")
    from HLFDSegmentLib import mrml

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    with mrml.converters():
        volume = mrml.image_to_volume_node(make_image(block_ct()), scene, "Patient CT")
        nodes = scene.GetNumberOfNodes()
        pid_file = tmp_path / "child.pid"
        # the worker runs under a shell that first starts a long-lived grandchild in its group
        wrap = ["sh", "-c", f'sleep 120 & echo $! > "{pid_file}"; exec "$@"', "sh"]
        run = mrml.SegmentationRun(
            volume, tiny_package, "cpu", python=sys.executable, launcher=pool.launch,
            command=lambda argv: wrap + argv,
        )  # fmt: skip
        run.start()
        deadline = time.monotonic() + 60
        while not any(e["event"] == "progress" for e in run.job.events):  # model not loaded yet
            assert time.monotonic() < deadline and not run.finished, run.job.log_tail()
            run.poll()
            time.sleep(0.02)
        worker_pid, child = run.job.pid, int(pid_file.read_text())
        assert _alive(worker_pid) and _alive(child)
        run.cancel()
        assert run.job.state is JobState.CANCELLED and run.job.error is None
        assert wait_dead(worker_pid, child)
        assert not run.job.workdir.exists()
        assert scene.GetNumberOfNodes() == nodes  # the scene is unchanged

        again = mrml.SegmentationRun(
            volume, tiny_package, "cpu", python=sys.executable, launcher=pool.launch,
            command=lambda argv: wrap + argv,
        )  # fmt: skip
        again.start()
        assert again.wait(180) is JobState.DONE, again.job.error
        assert again.job.pid != worker_pid
        node = again.apply()
        assert [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)] == [
            "Kidney",
            "Kidney tumor",
        ]
        scene.Clear(1)
    # the second run's long-lived grandchild holds the worker's stdout open: end it, or the
    # pool's stop waits out its grace period for an end of file that never comes
    os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_bad_requests_get_one_error_each_and_the_server_stays_alive(tmp_path, onnx_package):
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_image(block_ct()), str(ct))
    good = {"id": "ok", "input": str(ct), "output": str(tmp_path / "labels.nrrd")}
    lines = [
        "this is not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "no-input", "output": "x.nrrd"}),
        json.dumps({**good, "id": "typo", "tta ": True}),
        json.dumps({**good, "id": "bad-tta", "tta": "yes"}),
        json.dumps({**good, "id": "missing-file", "input": str(tmp_path / "nope.nrrd")}),
        json.dumps(good),
    ]
    argv = [sys.executable, "-m", "HLFDSegmentLib.worker", "--serve", "--model", str(onnx_package)]
    proc = subprocess.run(
        [*argv, "--device", "cpu"],
        input="\n".join(lines) + "\n",
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == worker.EXIT_OK, proc.stderr  # stdin closed: the server ends
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    ends = [e for e in events if e["event"] == "end"]
    ids = [None, None, "no-input", "typo", "bad-tta", "missing-file", "ok"]
    assert [e["request"] for e in ends] == ids
    assert [e["status"] for e in ends] == [2, 2, 2, 2, 2, worker.EXIT_ERROR, worker.EXIT_OK]
    errors = [e for e in events if e["event"] == "error"]
    assert [e["kind"] for e in errors] == ["request"] * 5 + ["input"]
    messages = [e["message"] for e in errors]
    assert "not valid JSON" in messages[0] and "JSON object" in messages[1]
    assert "'input' is missing" in messages[2] and "'tta ' is unknown" in messages[3]
    assert "'tta' must be a boolean" in messages[4] and "nope.nrrd" in messages[5]
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1 and done[0]["request"] == "ok"
    assert (tmp_path / "labels.nrrd").is_file()


def test_usage_of_the_serve_mode():
    with pytest.raises(SystemExit):
        worker.parse_args(["--serve", "--model", "m", "--input", "a.nrrd"])
    with pytest.raises(SystemExit):
        worker.parse_args(["--model", "m", "--input", "a.nrrd"])
    assert worker.parse_args(["--serve", "--model", "m"]).serve


@pytest.mark.slow
def test_one_worker_per_model_and_device_lru_eviction_and_stop_leaves_no_process(
    tmp_path, onnx_package
):
    other = add_onnx(build_package(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="max_workers"):
        WorkerPool(max_workers=0)
    pool = WorkerPool(max_workers=2)
    try:
        a, _ = segment(pool, onnx_package, "cpu")
        b, _ = segment(pool, other, "cpu")
        again, _ = segment(pool, other, "cpu")
        assert a.pid != b.pid and again.pid == b.pid  # one worker per model, reused
        assert all(_alive(p) for p in (a.pid, b.pid)) and len(pool.workers) == 2
        segment(pool, onnx_package, "cpu")  # a is now the most recently used
        c, _ = segment(pool, onnx_package, "auto")  # a third (another device): b makes room
        assert c.pid != a.pid
        assert wait_dead(b.pid) and _alive(a.pid) and _alive(c.pid)
        assert [key[1:3] for key in pool.workers] == [
            (str(onnx_package), "cpu"),
            (str(onnx_package), "auto"),
        ]
        log_dir = pool.log_dir
    finally:
        pool.stop()
    assert wait_dead(a.pid, c.pid)
    assert pool.workers == {} and not log_dir.exists()


def test_model_stays_loaded_until_its_files_change(tmp_path, tiny_package):
    package = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    args = worker.parse_args(["--model", str(package), "--input", "a", "--output", "b.nrrd"])
    models = worker.LoadedModel()
    _, first = models.get(args)
    args.tta = True
    _, second = models.get(args)
    assert second is first and second.tta  # same network, per-request TTA
    weights = package / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _, third = models.get(args)
    assert third is not first  # the package was rewritten: loaded again


def test_split_worker_command_keeps_the_wrapper_and_refuses_others():
    argv = worker_command("py", "in.nrrd", "out.nrrd", "m.zip", "cuda", threads=2, offline=True)
    prefix, args = split_worker_command(["nice", *argv])
    assert prefix == ["nice", "py"] and args.model == "m.zip" and args.threads == 2
    key = workerpool.worker_key(prefix, args)
    assert workerpool.serve_command(prefix, key) == [
        "nice", "py", "-m", "HLFDSegmentLib.worker", "--serve", "--model", "m.zip",
        "--device", "cuda", "--backend", "auto", "--threads", "2", "--offline",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a worker command"):
        split_worker_command(["py", "-c", "pass"])
    with pytest.raises(ValueError, match="not a valid worker command"):
        split_worker_command(["py", "-m", "HLFDSegmentLib.worker", "--model", "m"])
