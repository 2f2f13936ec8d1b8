"""`hlfd-segment` end to end: outputs, reports, batches and every bad input (exit 1, one line,
no output file left behind)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from HLFDSegmentLib.cli import main
from HLFDSegmentLib.io import read_image, write_image

from conftest import block_ct, build_package, make_image


@pytest.fixture
def ct_file(tmp_path) -> Path:
    path = tmp_path / "case.nii.gz"
    write_image(make_image(block_ct()), path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, output: Path, message: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hlfd-segment: error: ") and message in lines[0], lines[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


def test_segments_to_seg_nrrd_with_report(tmp_path, capsys, ct_file, tiny_package):
    import slicerio

    out, report = tmp_path / "case.seg.nrrd", tmp_path / "case.json"
    code, _, err = run(
        capsys, ct_file, "-o", out, "--model", tiny_package, "--report", report, "--device", "cpu"
    )
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["Kidney", "Kidney tumor"]
    data = json.loads(report.read_text())
    assert data["model"]["name"] == "test-model" and data["device"] == "cpu"
    assert [s["name"] for s in data["segments"]] == ["Kidney", "Kidney tumor"]
    assert {"read", "preprocess", "infer", "postprocess", "resample", "write", "total"} <= set(
        data["seconds"]
    )
    for entry in data["segments"]:
        assert entry["voxels"] == np.count_nonzero(seg["voxels"] == entry["value"])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_labelmap_output_lands_on_the_input_grid(tmp_path, capsys, ct_file, tiny_package, suffix):
    out = tmp_path / f"labels{suffix}"
    code, _, err = run(capsys, ct_file, "-o", out, "-m", tiny_package)
    assert code == 0, err
    labels, image = read_image(out), read_image(ct_file)
    assert labels.GetSize() == image.GetSize()
    assert np.allclose(labels.GetDirection(), image.GetDirection())
    assert np.allclose(labels.GetOrigin(), image.GetOrigin())


def test_batch_continues_after_a_failure(tmp_path, capsys, ct_file, tiny_package):
    second = tmp_path / "second.nrrd"
    write_image(make_image(block_ct(seed=1)), second)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    out_dir, report = tmp_path / "out", tmp_path / "batch.json"
    code, out, err = run(
        capsys, ct_file, bad, second, "-o", out_dir, "-m", tiny_package, "--report", report
    )
    assert code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["case.seg.nrrd", "second.seg.nrrd"]
    assert "2 segmented, 1 failed" in out and "bad.nii.gz: cannot read image" in err
    assert "bad.nii.gz: bad.nii.gz" not in err  # the path once per line
    summary = json.loads(report.read_text())
    assert len(summary["cases"]) == 2 and len(summary["failures"]) == 1


def write_raw(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def write_4d(path: Path) -> Path:
    """A 4D NIfTI (3 time points), as a dynamic series would be stored."""
    frames = [sitk.GetImageFromArray(block_ct(seed=t)[:, :, :18]) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return path


def nan_ct() -> np.ndarray:
    arr = block_ct().astype(np.float32)
    arr[1, 2, 3] = np.nan
    return arr


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "missing.nii.gz", "missing.nii.gz: no such file"),
        (
            lambda d: (d / "c.nii.gz").write_bytes(b"\x1f\x8bjunk") and d / "c.nii.gz",
            "c.nii.gz: cannot read image",
        ),
        (
            lambda d: write_raw(
                d, "flat.nrrd", np.zeros((40, 30), np.int16) + np.arange(30, dtype=np.int16)
            ),
            "flat.nrrd: 2D image of size 30x40",
        ),
        (lambda d: write_4d(d / "t.nii.gz"), "t.nii.gz: 4D image of size 18x40x12x3"),
        (lambda d: write_raw(d, "nan.nrrd", nan_ct()), "1 voxels are NaN or infinite"),
        (lambda d: write_raw(d, "const.nrrd", np.full((5, 9, 9), 40, np.int16)), "constant image"),
        (
            lambda d: (
                (d / "zero.nhdr").write_text(
                    "NRRD0004\ntype: short\ndimension: 3\nsizes: 0 4 4\n"
                    "encoding: raw\ndata file: z.raw\n"
                )
                and d / "zero.nhdr"
            ),
            "zero.nhdr",
        ),
    ],
    ids=["missing", "corrupt", "2d", "4d", "nan", "constant", "zero-size"],
)
def test_bad_inputs_fail_cleanly(tmp_path, capsys, tiny_package, make_input, message):
    src = make_input(tmp_path)
    out = tmp_path / "out.seg.nrrd"
    code, _, err = run(capsys, src, "-o", out, "-m", tiny_package)
    assert_clean_failure(code, err, out, message)


def test_bad_models_fail_cleanly(tmp_path, capsys, ct_file, tiny_package):
    out = tmp_path / "out.seg.nrrd"
    tampered = Path(shutil.copytree(tiny_package, tmp_path / "tampered"))
    blob = bytearray((tampered / "model.safetensors").read_bytes())
    blob[-3] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(blob))
    code, _, err = run(capsys, ct_file, "-o", out, "-m", tampered)
    assert_clean_failure(code, err, out, "sha256/size mismatch")
    pickle = tmp_path / "model.pt"
    torch.save({"x": torch.ones(1)}, pickle)
    code, _, err = run(capsys, ct_file, "-o", out, "-m", pickle)
    assert_clean_failure(code, err, out, "refusing to unpickle")
    mismatch = Path(shutil.copytree(tiny_package, tmp_path / "mismatch"))
    card = json.loads((mismatch / "model.json").read_text())
    card["labels"] = card["labels"][:1]
    (mismatch / "model.json").write_text(json.dumps(card))
    code, _, err = run(capsys, ct_file, "-o", out, "-m", mismatch)
    assert_clean_failure(code, err, out, "'network/out_channels' is 3 but 1 labels")


def test_bad_outputs_fail_before_any_work(tmp_path, capsys, ct_file, tiny_package):
    code, _, err = run(capsys, ct_file, "-o", tmp_path / "x.png", "-m", tiny_package)
    assert code == 1 and "unknown output type" in err
    code, _, err = run(capsys, ct_file, "-o", tmp_path / "no" / "x.nii.gz", "-m", tiny_package)
    assert code == 1 and "does not exist" in err


def test_non_ct_input_warns_and_small_volume_is_padded(tmp_path, capsys, tiny_package):
    mr = write_raw(
        tmp_path, "mr.nrrd", np.random.default_rng(0).integers(0, 900, (3, 5, 7)).astype(np.int16)
    )
    out = tmp_path / "mr.nii.gz"
    code, _, err = run(capsys, mr, "-o", out, "-m", tiny_package)
    assert code == 0
    assert "warning" in err and "do not look like CT" in err
    assert read_image(out).GetSize() == (7, 5, 3)


def test_verbose_shows_the_traceback(tmp_path, capsys, tiny_package):
    code = main(
        [
            str(tmp_path / "nope.nii"),
            "-o",
            str(tmp_path / "o.nii.gz"),
            "-m",
            str(tiny_package),
            "--verbose",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err


@pytest.mark.slow
def test_console_script_runs_a_large_volume_within_bounded_memory(tmp_path):
    """512x512x1000 int16 (500 MB) through the installed console script, peak RSS measured.
    The model works on a 6 x 6 x 4 mm grid (64² slices, 250 of them): the arrays on the
    0.75 x 0.75 x 1 mm input grid, which hold most of the memory, are as large as with any
    model, and the network runs on 1/64 of the voxels (the test's time is not the network's)."""
    model = build_package(
        tmp_path / "model",
        preprocessing={
            "orientation": "LPS",
            "spacing": [6.0, 6.0, 4.0],
            "window": [-200.0, 300.0],
            "normalize": {"mode": "minmax"},
        },
    )
    arr = np.full((1000, 512, 512), -1000, dtype="<i2")
    arr[:, 100:400, 80:430] = 40
    big = tmp_path / "big.nrrd"
    with big.open("wb") as f:  # a raw NRRD written directly: no 500 MB copy into an image
        f.write(
            b"NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\n"
            b"sizes: 512 512 1000\nspace directions: (0.75,0,0) (0,0.75,0) (0,0,1)\n"
            b"kinds: domain domain domain\nendian: little\nencoding: raw\n"
            b"space origin: (0,0,0)\n\n"
        )
        arr.tofile(f)
    del arr
    out = tmp_path / "labels.nrrd"  # NRRD: 1.5 s less gzip than .nii.gz, same pipeline
    script = Path(sys.executable).with_name("hlfd-segment")
    # the CT is read while the model loads: a model error during that read is still one line
    # and exit 1 (the process waits for the read; exiting inside ITK's reader aborts it)
    proc = subprocess.run(
        [script, big, "-o", out, "-m", tmp_path / "no-such-model"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no-such-model" in proc.stderr and not out.exists()
    code = (
        "import resource, subprocess, sys;"
        f"r = subprocess.run([{str(script)!r}, {str(big)!r}, '-o', {str(out)!r}, '-m',"
        f" {str(model)!r}, '--quiet']);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024);"
        "sys.exit(r.returncode)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mb < 4096, f"peak RSS {peak_mb} MB"
    header = sitk.ImageFileReader()  # the header only: reading 250 MB back proves nothing more
    header.SetFileName(str(out))
    header.ReadImageInformation()
    assert header.GetSize() == (512, 512, 1000)
