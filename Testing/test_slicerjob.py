"""Pure-Python helpers behind the Slicer panel: messages, estimates, tables, installs, samples."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import SimpleITK as sitk

from HLFDSegmentLib import deps, samples
from HLFDSegmentLib.model_registry import RegistryEntry
from HLFDSegmentLib.modelpackage import standard_labels
from HLFDSegmentLib.slicerjob import (
    describe_failure,
    device_argument,
    estimate_seconds,
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
    args = deps.pip_arguments(["monai>=1.4,<1.7", "safetensors"], "/tmp/c.txt")
    assert args == ["monai>=1.4,<1.7", "safetensors", "-c", "/tmp/c.txt"]


def test_install_passes_constraints_and_reports_failures(tmp_path):
    calls = []
    installed: set[str] = set()

    def pip_ok(args: list[str]) -> None:
        calls.append((args, Path(args[args.index("-c") + 1]).read_text()))
        installed.add("safetensors")

    def spec(module: str):
        return object() if module in installed else None

    deps.install([("safetensors", "safetensors>=0.4")], pip_ok, tmp_path, find_spec=spec)
    assert calls[0][0][:2] == ["safetensors>=0.4", "-c"] and "numpy==" in calls[0][1]
    assert list(tmp_path.iterdir()) == []  # constraints file removed

    def pip_fails(args: list[str]) -> None:
        raise RuntimeError("network unreachable")

    with pytest.raises(RuntimeError, match=r"network unreachable.*pip_install"):
        deps.install([("monai", "monai")], pip_fails, tmp_path, find_spec=spec)
    with pytest.raises(RuntimeError, match="still cannot be imported"):
        deps.install([("monai", "monai")], lambda args: None, tmp_path, find_spec=spec)
    deps.install([], pip_fails, tmp_path)  # nothing to do, nothing called


def test_detect_device_names_cpu_here():
    assert deps.detect_device().startswith(("CPU", "GPU"))


# -- sample data ---------------------------------------------------------------------------------


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
