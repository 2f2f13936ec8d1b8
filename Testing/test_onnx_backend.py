"""The ONNX Runtime backend: packages carry a checksummed ONNX graph that shares the weights
file, the whole ONNX path runs with torch unimportable, and its labels match the torch path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hlfd_train.export import add_onnx
from HLFDSegmentLib.backends import resolve_backend
from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.io import write_image
from HLFDSegmentLib.model_registry import builtin_models
from HLFDSegmentLib.modelpackage import ONNX_NAME, load_package
from HLFDSegmentLib.phantom import PhantomConfig, make_phantom
from HLFDSegmentLib.pipeline import Segmenter, window_starts

from conftest import build_package

ROOT = Path(__file__).resolve().parents[1]
MAX_DISAGREEMENT = 0.001  # fraction of voxels (the bound)
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
"""Prepended to a ``python -c`` script: any ``import torch`` / ``import monai`` then fails."""


def _env() -> dict[str, str]:
    paths = [str(ROOT / "HLFDSegment"), str(ROOT / "training")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=_env(), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory) -> Path:
    """A small liver phantom CT (int16, 3 mm in-plane: the 1.5 mm model grid is 192x192)."""
    phantom = make_phantom(
        PhantomConfig(task="liver", shape=(20, 96, 96), spacing=(3.0, 3.0, 5.0)), seed=1
    )
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    write_image(phantom.to_sitk()[0], path)
    return path


def _labels(package, backend: str, image: sitk.Image) -> np.ndarray:
    result = Segmenter(package, device="cpu", backend=backend)(image)
    assert result.backend == backend
    return sitk.GetArrayFromImage(result.labels)


@pytest.mark.parametrize("model", ["kidney", "liver"])
def test_builtin_packages_carry_a_checksummed_onnx_graph_sharing_the_weights(model):
    path = builtin_models()[model]
    package = load_package(path)
    card = package.card
    assert card["onnx"] == ONNX_NAME
    assert card["files"][ONNX_NAME]["size"] == len(package.onnx) < 500_000  # graph only
    total = sum(f.stat().st_size for f in Path(path).iterdir())
    assert total <= 5_000_000, f"package is {total} B"
    assert card["metrics"]["onnx_max_probability_error"] < 1e-4


def test_an_altered_onnx_graph_is_refused(tmp_path):
    pkg = tmp_path / "liver"
    shutil.copytree(builtin_models()["liver"], pkg)
    data = bytearray((pkg / ONNX_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkg / ONNX_NAME).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.onnx: sha256/size mismatch"):
        load_package(pkg)


@pytest.mark.slow
def test_builtin_student_labels_agree_between_onnx_and_torch(phantom_ct):
    """Float32 torch (the suite pins HLFD_CPU_BF16=0) against ONNX Runtime, same weights."""
    image = sitk.ReadImage(str(phantom_ct))
    package = load_package(builtin_models()["liver"])
    torch_labels = _labels(package, "torch", image)
    onnx_labels = _labels(package, "onnx", image)
    assert np.count_nonzero(torch_labels) > 0
    assert np.mean(torch_labels != onnx_labels) < MAX_DISAGREEMENT


@pytest.mark.parametrize(
    ("arch", "dims", "kwargs", "inference"),
    [
        ("tiny_unet2d", 2, {"base": 4}, {}),
        ("monai_unet3d", 3, {"channels": [4, 8, 16], "strides": [2, 2]}, {"roi_size": [32, 32, 8]}),
    ],
)
def test_exported_float32_packages_agree_in_2d_and_3d(
    tmp_path, arch, dims, kwargs, inference, phantom_ct
):
    """add_onnx on a float32 package (random weights: the exporter merges the identical fresh
    BatchNorm tensors, so the graph keeps its own copy); the sliding window (3D) and the slice
    batches (2D) give the torch path's labels through ONNX Runtime."""
    pkg = build_package(
        tmp_path / arch,
        arch,
        dims,
        seed=2,
        network_kwargs=kwargs,
        inference=inference,
        preprocessing={"spacing": [3.0, 3.0, None if dims == 2 else 5.0]},
    )
    add_onnx(pkg)
    package = load_package(pkg)
    image = sitk.ReadImage(str(phantom_ct))
    torch_labels = _labels(package, "torch", image)
    assert np.mean(torch_labels != _labels(package, "onnx", image)) < MAX_DISAGREEMENT


@pytest.mark.slow
def test_onnx_path_segments_with_torch_unimportable(tmp_path, phantom_ct):
    """The CLI's default backend falls back to ONNX when torch cannot be imported, and nothing
    on that path imports torch or MONAI."""
    out, report = tmp_path / "seg.seg.nrrd", tmp_path / "r.json"
    script = NO_TORCH + textwrap.dedent(
        """
        from HLFDSegmentLib.cli import main
        code = main(sys.argv[1:])
        loaded = [m for m in ("torch", "monai") if sys.modules.get(m) is not None]
        print("loaded:", loaded)
        sys.exit(code)
        """
    )
    args = [str(phantom_ct), "-o", str(out), "-m", "liver", "--report", str(report), "-q"]
    res = _python(script, *args)
    assert res.returncode == 0, res.stderr
    assert "loaded: []" in res.stdout
    assert json.loads(report.read_text())["backend"] == "onnx"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert labels.shape[1:] == (96, 96) and labels.any()


@pytest.mark.slow
def test_slicer_worker_on_the_cpu_runs_onnx_and_never_imports_torch(tmp_path, phantom_ct):
    """The persistent Slicer worker with torch installed: a built-in model on the CPU runs in
    ONNX Runtime, and torch (2 s to import) is never loaded, for the first request or later."""
    script = textwrap.dedent(
        """
        import sys
        from HLFDSegmentLib import worker
        code = worker.main(sys.argv[1:])
        print("torch loaded:", "torch" in sys.modules, file=sys.stderr)
        sys.exit(code)
        """
    )
    requests = "".join(
        json.dumps({"id": i, "input": str(phantom_ct), "output": str(tmp_path / f"{i}.nrrd")})
        + "\n"
        for i in (1, 2)
    )
    res = subprocess.run(
        [sys.executable, "-c", script, "--serve", "--model", "liver", "--device", "cpu"],
        input=requests,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "torch loaded: False" in res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    device = [e for e in events if e["event"] == "device"]
    assert [e["backend"] for e in device] == ["onnx", "onnx"]
    assert "ONNX Runtime" in device[0]["description"] and device[0]["precision"] == "float32"
    assert [e["status"] for e in events if e["event"] == "end"] == [0, 0]
    first, second = (sitk.ReadImage(str(tmp_path / f"{i}.nrrd")) for i in (1, 2))
    assert sitk.GetArrayFromImage(first).any()
    assert (sitk.GetArrayFromImage(first) == sitk.GetArrayFromImage(second)).all()


def test_help_and_model_listing_import_no_torch():
    script = textwrap.dedent(
        """
        import contextlib, io, sys
        from HLFDSegmentLib.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--list-models"]) == 0
            with contextlib.suppress(SystemExit):
                main(["--help"])
        print(sorted(m for m in ("torch", "monai", "onnxruntime") if m in sys.modules))
        """
    )
    res = _python(script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_onnx_backend_on_a_package_without_onnx_is_one_clear_line(tiny_package, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    write_image(sitk.Image(8, 8, 8, sitk.sitkInt16), ct)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "HLFDSegmentLib.cli",
            str(ct),
            "-o",
            str(tmp_path / "s.nii.gz"),
            "-m",
            str(tiny_package),
            "--backend",
            "onnx",
            "-q",
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no ONNX graph (card field 'onnx')" in lines[0]
    assert str(tiny_package) in lines[0]
    assert not (tmp_path / "s.nii.gz").exists()


def test_auto_backend_is_onnx_on_the_cpu_and_torch_for_a_gpu(tiny_package, monkeypatch):
    from HLFDSegmentLib import deps

    package = load_package(builtin_models()["kidney"])
    assert resolve_backend("auto", package, "cpu") == "onnx"  # faster there, no torch import
    assert resolve_backend("auto", package, "cuda") == "torch"
    assert resolve_backend("auto", package, "mps") == "torch"
    assert resolve_backend("torch", package, "cpu") == "torch"  # asked for: kept
    assert resolve_backend("auto", load_package(tiny_package), "cpu") == "torch"  # no graph
    # device auto: the CPU path unless a GPU driver is found (decided without importing torch)
    monkeypatch.setattr(deps, "accelerator_possible", lambda: False)
    assert resolve_backend("auto", package) == "onnx"
    monkeypatch.setattr(deps, "accelerator_possible", lambda: True)
    assert resolve_backend("auto", package) == "torch"
    res = _python(  # no torch at all: ONNX Runtime even where a GPU is asked for
        NO_TORCH
        + "from HLFDSegmentLib.backends import resolve_backend\n"
        + "from HLFDSegmentLib.modelpackage import load_package\n"
        + "from HLFDSegmentLib.model_registry import builtin_models\n"
        + "print(resolve_backend('auto', load_package(builtin_models()['kidney']), 'cuda'))\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "onnx"
    with pytest.raises(Exception, match="unknown backend 'tf'"):
        resolve_backend("tf", package)


def test_window_starts_cover_the_axis_and_end_flush():
    assert window_starts(10, 10, 5) == [0]
    assert window_starts(23, 8, 6) == [0, 6, 12, 15]
    for n, roi, stride in [(97, 32, 24), (33, 32, 1), (64, 16, 16)]:
        starts = window_starts(n, roi, stride)
        covered = np.zeros(n, bool)
        for s in starts:
            covered[s : s + roi] = True
        assert covered.all() and starts[-1] == n - roi


def test_architecture_names_match_the_registry():
    from HLFDSegmentLib.nets import ARCHITECTURE_NAMES, ARCHITECTURES

    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES
