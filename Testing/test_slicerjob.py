"""Pure-Python helpers behind the Slicer panel: messages, estimates, tables, installs, samples."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk

from HLFDSegmentLib import deps, modelmenu, samples
from HLFDSegmentLib.background import BackgroundCommand
from HLFDSegmentLib.model_registry import RegistryEntry
from HLFDSegmentLib.modelpackage import standard_labels
from HLFDSegmentLib.slicerjob import (
    JobState,
    SegmentationJob,
    describe_event,
    describe_failure,
    device_argument,
    estimate_seconds,
    finished_status,
    model_choices,
    volume_rows,
    worker_env,
)


def test_failure_messages():
    oom = describe_failure({"kind": "memory", "message": "out of memory"}, 3, "")
    assert oom.startswith("Out of memory") and "CPU" in oom and "smaller model" in oom
    model = describe_failure({"kind": "model", "message": "m.zip: no such file"}, 1, "tail")
    assert model == "Segmentation failed: m.zip: no such file"
    assert "ran out of memory" in describe_failure(None, -9, "")
    assert "crashed (SIGSEGV)" in describe_failure(None, -11, "")
    crashed = describe_failure(None, 139, "Segmentation fault")
    assert "exit status 139" in crashed and "Segmentation fault" in crashed
    assert "without a result" in describe_failure(None, 0, "")
    internal = describe_failure({"kind": "internal", "message": "KeyError: 'x'"}, 4, "Traceback")
    assert "internal error" in internal and "Traceback" in internal


def test_estimate_seconds_picks_the_device_kind():
    runtimes = [
        {"device": "cpu", "seconds": 12.0, "input": "512x512x200"},
        {"device": "cpu", "seconds": 9.5},
        {"device": "cuda:0", "seconds": 1.5},
    ]
    assert estimate_seconds(runtimes, "cpu") == 9.5
    assert estimate_seconds(runtimes, "cuda") == 1.5
    assert estimate_seconds(runtimes, "mps") is None
    assert estimate_seconds(None, "cpu") is None
    # the form ``hlfd-train export`` / ``runtime`` write (the built-in cards)
    card = [{"device": "cpu (2 threads, x86_64)", "seconds": 0.85}]
    assert estimate_seconds(card, "cpu") == 0.85 and estimate_seconds(card, "cuda") is None
    assert estimate_seconds([{"device": "cuda (NVIDIA H200)", "seconds": 0.2}], "gpu") == 0.2


def test_volume_rows_and_tumour_burden():
    labels = standard_labels("liver")
    volumes = [
        {"value": 1, "name": "Liver", "voxels": 900, "volume_ml": 1500.0},
        {"value": 2, "name": "Liver tumor", "voxels": 100, "volume_ml": 100.0},
    ]
    rows = volume_rows(volumes, labels)
    assert [r["name"] for r in rows] == ["Liver", "Liver tumor"]
    assert rows[0]["burden_percent"] is None and rows[0]["organ"] is None
    assert rows[1]["organ"] == "Liver"
    assert rows[1]["burden_percent"] == pytest.approx(100 * 100 / 1600)
    empty = volume_rows([], labels)  # nothing found: zero volumes, burden undefined
    assert [r["volume_ml"] for r in empty] == [0.0, 0.0] and empty[1]["burden_percent"] is None


def test_model_choices_registry_cache_and_files(tmp_path):
    entry = RegistryEntry(
        id="kidney-student",
        title="Kidney student",
        task="kidney",
        version="1.0",
        url="https://example.org/k.zip",
        sha256="0" * 64,
        size=1,
        license="Apache-2.0",
    )
    cached = [tmp_path / "kidney-student-1.0.zip", tmp_path / "my-model"]
    choices = model_choices([entry], cached, [tmp_path / "other.zip"])
    assert [spec for _, spec in choices] == [
        "kidney-student@1.0",
        str(tmp_path / "my-model"),
        str(tmp_path / "other.zip"),
    ]
    assert "(download)" not in choices[0][0]
    assert "(download)" in model_choices([entry], [])[0][0]


def test_device_argument():
    assert device_argument("Auto") == "auto"
    assert device_argument("gpu", platform="linux") == "cuda"
    assert device_argument("gpu", platform="darwin") == "mps"
    assert device_argument("cpu") == "cpu"
    with pytest.raises(ValueError):
        device_argument("tpu")


def test_worker_env_makes_the_lib_importable():
    env = worker_env({"PYTHONPATH": "/elsewhere"})
    first, second = env["PYTHONPATH"].split(":")[:2]
    assert (Path(first) / "HLFDSegmentLib" / "worker.py").is_file() and second == "/elsewhere"
    assert env["PYTHONUNBUFFERED"] == "1"


# -- dependencies --------------------------------------------------------------------------------


def test_missing_requirements_and_constraints_pin_slicer_packages():
    present = {"monai", "jsonschema"}
    missing = deps.missing_requirements(find_spec=lambda m: object() if m in present else None)
    assert missing == [("safetensors", "safetensors>=0.4")]
    text = deps.constraints()
    assert f"numpy=={importlib.metadata.version('numpy')}\n" in text
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}\n" in text
    assert f"torch=={importlib.metadata.version('torch')}\n" in text  # PyTorch extension's build
    assert "monai" not in text


def test_detect_device_names_cpu_here():
    assert deps.detect_device().startswith(("CPU", "GPU"))


# -- sample data ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_ct_is_generated_once_and_cached(tmp_path):
    for task in ("kidney", "liver"):
        path = samples.sample_ct(task, tmp_path)
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == tuple(reversed(samples.SHAPE))
        assert sitk.GetArrayViewFromImage(image).min() < -500  # HU, air around the body
        mtime = path.stat().st_mtime_ns
        assert samples.sample_ct(task, tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "HLFDPhantomKidneyCT.nrrd",
        "HLFDPhantomLiverCT.nrrd",
    ]
    with pytest.raises(ValueError):
        samples.sample_ct("lung", tmp_path)


# -- what the panel shows of a run ---------------------------------------------------------------


def _scripted_job(tmp_path, lines: list[str], status: int = 0, **kwargs) -> SegmentationJob:
    """A job whose 'worker' prints ``lines`` on stdout, 'trace' on stderr and exits ``status``."""
    script = (
        "import sys\n"
        f"for line in {lines!r}:\n"
        "    print(line, flush=True)\n"
        "print('trace from the worker', file=sys.stderr)\n"
        f"sys.exit({status})\n"
    )
    job = SegmentationJob(
        "m", command=lambda argv: [sys.executable, "-c", script], workdir=tmp_path, **kwargs
    )
    job.input_path.write_bytes(b"")
    return job


def test_warnings_reach_the_status_line_and_the_kept_log(tmp_path):
    events = [
        {"event": "start", "pid": 1, "version": "0.1.0"},
        {"event": "progress", "stage": "read", "fraction": 0.0},
        {"event": "device", "device": "cpu", "description": "CPU (4 threads)",
         "precision": "float32", "model": {"name": "kid", "version": "1.0"}},
        {"event": "warning", "message": "GPU asked but not available; using the CPU"},
        {"event": "warning", "message": "the volume does not look like CT"},
    ]  # fmt: skip
    logs = tmp_path / "logs"
    job = _scripted_job(tmp_path, [json.dumps(e) for e in events], status=1, log_dir=logs)
    job.start()
    assert job.wait(60) is JobState.FAILED
    assert job.warnings == [events[3]["message"], events[4]["message"]]
    job.state = JobState.DONE  # the status line of the same run, had it succeeded
    assert finished_status(job).endswith("2 warnings: please read them.")
    job.state = JobState.FAILED
    job.cleanup()
    assert not job.workdir.exists() and job.kept_log is not None
    text = job.kept_log.read_text(encoding="utf-8")
    assert "WARNING: GPU asked but not available" in text
    assert "model kid 1.0 on CPU (4 threads) (float32)" in text
    assert "Reading the volume..." in text and "result: failed" in text
    assert "trace from the worker" in text  # stderr, kept after the work folder is gone


def test_a_log_written_across_a_second_boundary_is_the_newest(tmp_path, monkeypatch):
    """The last nanosecond of one second, then the first of the next: the second log must sort
    last and survive the pruning (a name whose parts came from two clock readings did not)."""
    from HLFDSegmentLib import slicerjob

    second = 1_780_000_000
    readings = iter([second * 10**9 + 999_999_999, (second + 1) * 10**9 + 1])
    monkeypatch.setattr(slicerjob.time, "time_ns", lambda: next(readings))
    slicerjob.keep_log("first", tmp_path, keep=1)
    newest = slicerjob.keep_log("second", tmp_path, keep=1)
    assert list(tmp_path.iterdir()) == [newest]
    assert newest.read_text(encoding="utf-8") == "second"


def test_only_the_newest_logs_are_kept(tmp_path):
    logs = tmp_path / "logs"
    kept = []
    for i in range(4):
        job = _scripted_job(tmp_path, [f"line {i}"], log_dir=logs, keep_logs=3)
        job.start()
        job.wait(60)
        job.cancel()  # a cancelled or finished job keeps its log the same way
        kept.append(job.kept_log)
    assert sorted(logs.iterdir()) == kept[1:]
    assert "line 3" in kept[-1].read_text(encoding="utf-8")
    plain = _scripted_job(tmp_path, ["x"])  # no log_dir: nothing kept (CLI, scripts)
    plain.start()
    plain.wait(60)
    plain.cleanup()
    assert plain.kept_log is None and sorted(logs.iterdir()) == kept[1:]


def test_describe_event_lines():
    assert describe_event({"event": "error", "kind": "memory", "message": "oom"}) == (
        "ERROR (memory): oom"
    )
    assert describe_event({"event": "progress", "stage": "infer"}) == "Running the network..."
    assert describe_event({"event": "log", "message": "plain text"}) == "plain text"
    assert describe_event({"event": "download", "done": 1, "total": 2}) is None


def test_install_question_says_the_real_download_size():
    cuda = deps.install_question(True, deps.REQUIREMENTS, build="torch-cuda")
    assert "torch, monai, safetensors, jsonschema" in cuda
    assert "about 3.0 GB" in cuda and "CUDA build" in cuda and "PyTorch extension" in cuda
    cpu = deps.install_question(True, [], build="torch-cpu")
    assert "about 200 MB" in cpu and "CPU build" in cpu
    assert "about 5 MB" in deps.install_question(False, deps.REQUIREMENTS)
    assert "torch" not in deps.install_question(False, deps.REQUIREMENTS)
    assert deps.torch_build("linux", nvidia=True) == "torch-cuda"
    assert deps.torch_build("win32", nvidia=False) == "torch-cpu"
    assert deps.torch_build("darwin") == "torch-macos"
    assert deps.has_nvidia_gpu(which=lambda name: "/usr/bin/" + name)
    assert not deps.has_nvidia_gpu(which=lambda name: None)


def test_cpu_users_need_no_torch_for_a_model_with_an_onnx_graph(tmp_path):
    def present(*modules: str):
        return lambda m: object() if m in modules else None

    none = present()
    assert deps.requirements_for("cpu", True, none) == (False, list(deps.ONNX_REQUIREMENTS))
    assert deps.requirements_for("auto", True, none, gpu=False)[0] is False
    for device, graph, gpu in [("cuda", True, False), ("mps", True, True), ("cpu", False, False)]:
        assert deps.requirements_for(device, graph, none, gpu=gpu) == (
            True,
            list(deps.REQUIREMENTS),
        )
    assert deps.requirements_for("auto", True, none, gpu=True)[0] is True  # the GPU is faster
    ready = present("onnxruntime", "safetensors", "jsonschema")
    assert deps.requirements_for("cpu", True, ready) == (False, [])
    assert "about 17 MB" in deps.install_question(False, deps.ONNX_REQUIREMENTS)
    assert deps.accelerator_possible(which=lambda name: None, system="linux") is False
    rocm = lambda name: "/opt/rocm/bin/rocm-smi" if name == "rocm-smi" else None  # noqa: E731
    assert deps.accelerator_possible(which=rocm, system="linux") is True
    assert deps.accelerator_possible(which=lambda n: None, system="darwin", machine="arm64")
    assert not deps.accelerator_possible(which=lambda n: None, system="darwin", machine="x86_64")
    # the panel asks the model's card whether it has a graph (no torch, no jsonschema)
    assert modelmenu.has_onnx_graph("liver") and modelmenu.has_onnx_graph("kidney")
    (tmp_path / "model.json").write_text('{"name": "m", "task": "liver"}')
    assert not modelmenu.has_onnx_graph(str(tmp_path))
    assert not modelmenu.has_onnx_graph(str(tmp_path / "absent"))


def _wheel(folder: Path, name: str) -> None:
    """A minimal pure-Python wheel ``name-0.1`` in ``folder`` (pip installs it offline)."""
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def _follow(argv: list[str]) -> BackgroundCommand:
    command = BackgroundCommand(argv).start()
    while not command.finished:
        command.poll()
        time.sleep(0.02)
    return command


@pytest.mark.slow
def test_install_runs_in_one_followed_process_with_slicer_packages_pinned(tmp_path):
    """The panel follows one background process (its lines in the Log panel, the GUI live):
    pip under the constraints file; a failure names the step and keeps pip's reason. Offline:
    ``--no-index`` and a local wheel."""
    _wheel(tmp_path, "hlfdtestpkg")
    site = tmp_path / "site"
    options = ["--no-index", f"--find-links={tmp_path}", f"--target={site}"]
    argv = deps.install_command(sys.executable, False, [("hlfdtestpkg", "hlfdtestpkg")], options)
    assert argv[1:4] == ["-m", "HLFDSegmentLib.deps", "install"] and "--torch" not in argv
    done = _follow(argv)
    assert done.ok, done.output
    assert done.output[0] == "[1/1] installing hlfdtestpkg"
    assert (site / "hlfdtestpkg" / "__init__.py").is_file()
    # the constraints pin Slicer's numpy: asking for another one fails, and says which step
    failed = _follow(
        deps.install_command(sys.executable, False, [("numpy", "numpy==1.0")], options)
    )
    assert not failed.ok and failed.returncode not in (0, None)
    assert failed.output[-1].startswith("installing numpy==1.0 failed (exit status")
    assert any("numpy" in line for line in failed.output[1:-1])  # pip's own reason


def test_torch_is_installed_first_through_light_the_torch():
    """With torch needed, light-the-torch (the PyTorch extension's way of choosing the CUDA or
    CPU build) comes first, before the other packages; offline it fails at that first step."""
    argv = deps.install_command(sys.executable, True, [("monai", "monai>=1.4,<1.7")], ["-q"])
    assert argv[4:] == ["--torch", "--pip-option=-q", "monai>=1.4,<1.7"]
    failed = _follow(deps.install_command(sys.executable, True, deps.REQUIREMENTS, ["--no-index"]))
    assert not failed.ok
    steps = [line for line in failed.output if line.startswith("[")]
    have_ltt = importlib.util.find_spec("light_the_torch") is not None
    first = f"torch{deps.TORCH_REQUIREMENT}" if have_ltt else "light-the-torch"
    assert len(steps) == 1 and steps[0].startswith(f"[1/{2 + (not have_ltt)}] installing {first}")
