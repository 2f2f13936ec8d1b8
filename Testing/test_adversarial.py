"""Adversarial cases: ordinary mistakes must not destroy an input or leave a partial result.

Each case is small and fast; the file shows at a glance what is tried against the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk

from HLFDSegmentLib.cli import main

from conftest import block_ct, make_image


def _ct(path: Path) -> Path:
    sitk.WriteImage(make_image(block_ct()), str(path))
    return path


def _run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    return code, capsys.readouterr().err


def _unchanged(path: Path, before: bytes) -> bool:
    return path.read_bytes() == before


def test_output_over_the_input_is_refused(tmp_path, capsys, tiny_package):
    ct = _ct(tmp_path / "ct.nii.gz")
    before = ct.read_bytes()
    code, err = _run(capsys, ct, "-o", ct, "-m", tiny_package)
    assert code == 1 and "refusing to overwrite an input" in err and len(err.splitlines()) == 1
    assert _unchanged(ct, before)


def test_links_to_the_input_are_refused(tmp_path, capsys, tiny_package):
    ct = _ct(tmp_path / "ct.nii.gz")
    before = ct.read_bytes()
    (tmp_path / "soft.nii.gz").symlink_to(ct)
    os.link(ct, tmp_path / "hard.nii.gz")
    for out in ("soft.nii.gz", "hard.nii.gz"):
        code, err = _run(capsys, ct, "-o", tmp_path / out, "-m", tiny_package)
        assert code == 1 and "refusing to overwrite an input" in err, out
    assert _unchanged(ct, before)


def test_report_over_the_input_or_the_output_is_refused(tmp_path, capsys, tiny_package):
    ct = _ct(tmp_path / "ct.nii.gz")
    before = ct.read_bytes()
    out = tmp_path / "seg.nii.gz"
    code, err = _run(capsys, ct, "-o", out, "-m", tiny_package, "--report", ct)
    assert code == 1 and "refusing to overwrite an input" in err
    code, err = _run(capsys, ct, "-o", out, "-m", tiny_package, "--report", out)
    assert code == 1 and "--report names the segmentation output" in err
    assert _unchanged(ct, before) and not out.exists()


def test_batch_into_its_own_input_folder_is_refused(tmp_path, capsys, tiny_package):
    cts = [_ct(tmp_path / f"{n}.nii.gz") for n in ("a", "b")]
    before = [p.read_bytes() for p in cts]
    code, err = _run(capsys, *cts, "-o", tmp_path, "-m", tiny_package, "--format", ".nii.gz")
    assert code == 1 and "refusing to overwrite an input" in err
    assert all(_unchanged(p, b) for p, b in zip(cts, before))


def test_batch_inputs_of_one_name_are_refused_before_any_work(tmp_path, capsys, tiny_package):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = _ct(tmp_path / "x" / "ct.nii.gz"), _ct(tmp_path / "y" / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    code, err = _run(capsys, a, b, "-o", out, "-m", tiny_package)
    assert code == 1 and "would both be written there" in err
    assert list(out.iterdir()) == []


def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, capsys, tiny_package):
    """ITK zero-fills a short NIfTI; the CLI refuses it in one line and writes nothing."""
    for name in ("ct.nii.gz", "ct.nii"):
        whole = _ct(tmp_path / name).read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(whole[: len(whole) * 2 // 3])
        out = tmp_path / f"seg-{name}"
        code, err = _run(capsys, cut, "-o", out, "-m", tiny_package)
        assert code == 1 and "truncated" in err and len(err.splitlines()) == 1, (name, err)
        assert not out.exists()


def test_header_declaring_a_huge_volume_is_refused_before_reading(tmp_path, capsys, tiny_package):
    """A small .nii whose header declares 1024x1024x512 voxels is refused, not allocated."""
    import struct

    data = bytearray(_ct(tmp_path / "ct.nii").read_bytes())
    data[40:56] = struct.pack("<8h", 3, 1024, 1024, 512, 1, 1, 1, 1)
    big = tmp_path / "big.nii"
    big.write_bytes(bytes(data))
    code, err = _run(capsys, big, "-o", tmp_path / "seg.nii.gz", "-m", tiny_package)
    assert code == 1 and "declares" in err


def test_complete_multi_member_gzip_nifti_is_accepted(tmp_path, capsys, tiny_package):
    """A whole .nii.gz written as two gzip members (block-gzip tools do this) passes the check:
    its trailer holds only the last member's size, so the stream is counted instead."""
    import gzip

    raw = gzip.decompress(_ct(tmp_path / "ct.nii.gz").read_bytes())
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    code, err = _run(capsys, two, "-o", tmp_path / "seg.nii.gz", "-m", tiny_package)
    assert code == 0, err


def test_nan_in_a_float_nifti_is_refused(tmp_path, capsys, tiny_package):
    """ITK's NIfTI reader turns NaN into 0 HU; the CLI finds them in the raw data first."""
    import numpy as np

    arr = block_ct().astype(np.float32)
    arr[2, 5, 5] = np.nan
    arr[3, 6, 6] = np.inf
    for name in ("nan.nii.gz", "nan.nii"):
        sitk.WriteImage(make_image(arr), str(tmp_path / name))
        code, err = _run(capsys, tmp_path / name, "-o", tmp_path / "seg.nii.gz", "-m", tiny_package)
        assert code == 1 and "2 voxels are NaN or infinite" in err, err


def test_impossible_geometry_is_refused_and_implausible_spacing_warned(
    tmp_path, capsys, tiny_package
):
    """NaN origin: refused; NIfTI pixdim 0 or NaN (ITK would read 1 mm): refused in one line;
    1e-3 mm spacing: a warning."""
    import struct

    from HLFDSegmentLib.errors import InputError
    from HLFDSegmentLib.io import check_image

    image = make_image(block_ct())
    broken = sitk.Image(image)
    broken.SetOrigin((float("nan"), 0.0, 0.0))
    try:
        check_image(broken, "ct")
        raise AssertionError("NaN origin accepted")
    except InputError as exc:
        assert "origin" in str(exc)
    tiny = sitk.Image(image)
    tiny.SetSpacing((1e-3, 1e-3, 1e-3))
    assert any("outside 0.2-20 mm" in w for w in check_image(tiny, "ct"))
    for value in (float("nan"), 0.0):
        path = _ct(tmp_path / "ct.nii")
        data = bytearray(path.read_bytes())
        data[80:84] = struct.pack("<f", value)  # pixdim[1]
        path.write_bytes(bytes(data))
        code, err = _run(capsys, path, "-o", tmp_path / "seg.nii.gz", "-m", tiny_package)
        assert code == 1 and "pixdim" in err and len(err.splitlines()) == 1, err


def test_full_disk_leaves_no_truncated_output(tmp_path, capsys, tiny_package, monkeypatch):
    """ITK's NIfTI writer ignores ENOSPC: a short file is written with no error. The written
    file is checked before the rename: exit 1, one line, no output and no temporary file."""
    from HLFDSegmentLib import io

    real = io.sitk.WriteImage

    def full_disk(image, name, *args, **kwargs):  # what a full disk leaves: a cut file
        real(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    ct = _ct(tmp_path / "ct.nrrd")
    monkeypatch.setattr(io.sitk, "WriteImage", full_disk)
    for out in ("seg.nii.gz", "seg.nii"):
        code, err = _run(capsys, ct, "-o", tmp_path / out, "-m", tiny_package)
        assert code == 1 and "incomplete (disk full?)" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_outputs_get_the_mode_of_a_normal_write(tmp_path, capsys, tiny_package):
    """Not mkstemp's 0600: the umask's mode for a new file, the old mode for a replaced one."""
    import stat

    ct = _ct(tmp_path / "ct.nrrd")
    out = tmp_path / "seg.nii.gz"
    old = os.umask(0o022)
    try:
        assert _run(capsys, ct, "-o", out, "-m", tiny_package)[0] == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        out.chmod(0o664)
        assert _run(capsys, ct, "-o", out, "-m", tiny_package)[0] == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_a_folder_named_like_a_model_id_does_not_shadow_it(tmp_path, monkeypatch, tiny_package):
    """Ids and paths are unambiguous: ``-m liver`` is the built-in model even when the working
    directory holds a folder 'liver'; ``./liver`` is that folder."""
    import shutil

    from HLFDSegmentLib.errors import ModelError
    from HLFDSegmentLib.model_registry import BUILTIN_DIR, builtin_models, resolve_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_package, tmp_path / "liver")
    shutil.copytree(tiny_package, tmp_path / "no-such-id")
    if "liver" in builtin_models():
        assert resolve_model("liver") == BUILTIN_DIR / "liver"
    assert resolve_model("./liver") == Path("./liver")
    try:
        resolve_model("no-such-id")
        raise AssertionError("a bare name resolved to a folder")
    except ModelError as exc:
        assert "write ./no-such-id" in str(exc)


def test_card_values_without_sense_are_refused_at_load(tmp_path):
    """Types the schema allows, values no model can mean: one line naming the field."""
    import json

    import pytest

    from HLFDSegmentLib.errors import ModelError
    from HLFDSegmentLib.modelpackage import load_package

    from conftest import build_package

    cases = [
        (("preprocessing", "window"), [300.0, -200.0], "preprocessing/window"),
        (("preprocessing", "normalize"), {"mode": "zscore", "mean": 0, "std": 1e-300}, "std"),
        (("postprocessing", "min_island_ml"), 1e9, "min_island_ml"),
        (("inference", "tta_flips"), [["x"]] * 200, "tta_flips"),
        (("inference", "logit_offsets"), [0.0, -3.0], "logit_offsets.*2 numbers for 3"),
        (("inference", "logit_offsets"), [0.0, 0.0, -1e6], "logit_offsets.*within"),
        (("inference", "seed_offsets"), [0.0, -3.0], "seed_offsets.*2 numbers for 3"),
        (("inference", "seed_offsets"), [0.0, 0.0, float("nan")], "seed_offsets.*finite"),
        (("labels", 0, "name"), "Kidney\nrm -rf", "labels/0/name"),
    ]
    for i, (keys, value, field) in enumerate(cases):
        folder = build_package(tmp_path / f"m{i}")
        card = json.loads((folder / "model.json").read_text())
        node = card
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        (folder / "model.json").write_text(json.dumps(card))
        with pytest.raises(ModelError, match=field):
            load_package(folder)


def test_export_of_a_run_with_pickled_weights_is_one_line(tmp_path, capsys):
    """A pickle in best.safetensors is never unpickled: export ends in one line, exit 1."""
    from hlfd_train.cli import main as train_cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"name: x\ndata:\n  root: {tmp_path}\n")
    # the bytes of a pickled {"w": 1} (protocol 4), written as they are: nothing here unpickles
    (run / "best.safetensors").write_bytes(
        b"\x80\x04\x95\t\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94K\x01s."
    )
    code = train_cli(["export", str(run), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "not a safetensors weight file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("limit", ["-1", "abc", "inf", "nan"])
def test_calibrate_refuses_a_false_tumour_limit_that_is_not_a_volume(limit, capsys):
    """A negative or non-finite --max-fp-ml would silently pick the most negative offset: a
    usage error (exit 2) naming the value, before any data is read."""
    from hlfd_train.cli import main as train_cli

    with pytest.raises(SystemExit) as exit_info:
        train_cli(["calibrate", "model", "-c", "c.yaml", f"--max-fp-ml={limit}"])
    assert exit_info.value.code == 2
    assert f"expected a volume in mL >= 0, got '{limit}'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--offsets", "--seed-offsets"])
@pytest.mark.parametrize("value", ["abc", "1,nan", ","])
def test_calibrate_refuses_offsets_that_are_not_numbers(flag, value, capsys):
    from hlfd_train.cli import main as train_cli

    with pytest.raises(SystemExit) as exit_info:
        train_cli(["calibrate", "model", "-c", "c.yaml", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert f"{flag}: expected comma-separated numbers, got '{value}'" in capsys.readouterr().err


def test_foreign_errors_are_one_line_and_a_batch_goes_on(
    tmp_path, capsys, tiny_package, monkeypatch
):
    """An exception that is not the project's own (here a RuntimeError from inside the network)
    is one stderr line; in a batch the other cases are still segmented and the summary lists
    the failure; exit 1. --threads -3 is a usage error (exit 2)."""
    import pytest

    from HLFDSegmentLib import pipeline

    cts = [_ct(tmp_path / f"{n}.nii.gz") for n in ("a", "b")]
    real = pipeline.Segmenter.__call__

    def flaky(self, image, where="input image", progress=None):
        if where.endswith("a.nii.gz"):
            raise RuntimeError("CRC check failed\nsecond line")
        return real(self, image, where, progress)

    monkeypatch.setattr(pipeline.Segmenter, "__call__", flaky)
    out = tmp_path / "out"
    out.mkdir()
    code, err = _run(capsys, *cts, "-o", out, "-m", tiny_package, "--report", out / "summary.json")
    assert code == 1 and "unexpected RuntimeError: CRC check failed" in err
    assert "second line" not in err
    assert (out / "b.seg.nrrd").is_file() and not (out / "a.seg.nrrd").exists()
    code, err = _run(capsys, cts[0], "-o", tmp_path / "one.nii.gz", "-m", tiny_package)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "RuntimeError" in err
    with pytest.raises(SystemExit) as stop:
        main(
            [
                str(cts[1]),
                "-o",
                str(tmp_path / "x.nii.gz"),
                "-m",
                str(tiny_package),
                "--threads",
                "-3",
            ]
        )
    assert stop.value.code == 2


def test_a_model_grid_that_cannot_fit_is_refused_before_allocation(tmp_path, capsys, tiny_package):
    """A 64x64x32 CT whose header says 100 mm voxels would become a ~4000^3 grid at the
    model's 1.5 mm: refused in one line, nothing allocated, no output."""
    import numpy as np

    image = make_image(np.full((32, 64, 64), -1000, np.int16) + block_ct((32, 64, 64)) % 3)
    image.SetSpacing((100.0, 100.0, 100.0))
    path = tmp_path / "huge.nrrd"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "seg.nii.gz"
    code, err = _run(capsys, path, "-o", out, "-m", tiny_package)
    assert code == 1 and "model grid would be" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_oversized_network_zip_bomb_and_member_flood_are_refused_cheaply(tmp_path):
    """kwargs asking for a huge network, a zip member inflating past its card size, a zip of
    thousands of members: each refused in one line before the memory or time is spent."""
    import json
    import zipfile

    import pytest

    from HLFDSegmentLib.errors import ModelError
    from HLFDSegmentLib.modelpackage import load_package

    from conftest import build_package

    folder = build_package(tmp_path / "big")
    card = json.loads((folder / "model.json").read_text())
    card["network"]["kwargs"]["base"] = 2048  # ~5 GB of float32 if it were built
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit"):
        load_package(folder).build_network()
    good = build_package(tmp_path / "good")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(good / "model.json", "model.json")
        zf.writestr("model.safetensors", b"\0" * (64 << 20))  # 64 MiB of zeros, tiny on disk
    with pytest.raises(ModelError, match="refusing to read it"):
        load_package(bomb)
    flood = tmp_path / "flood.zip"
    with zipfile.ZipFile(flood, "w") as zf:
        for i in range(500):
            zf.writestr(f"f{i}.txt", b"x")
    with pytest.raises(ModelError, match="members"):
        load_package(flood)


def test_dicom_series_choice_is_named_and_selectable_and_gaps_are_warned(
    tmp_path, capsys, tiny_package
):
    """Two series in one folder: the largest is used and named (report + warning), --series
    picks the other, an unknown UID lists what is there; a missing slice is warned about."""
    import json
    import shutil

    from test_io import write_dicom_series

    big = make_image(
        block_ct((8, 40, 36)), spacing=(0.7, 0.7, 2.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    small = make_image(
        block_ct((4, 40, 36), seed=1),
        spacing=(0.7, 0.7, 2.5),
        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    write_dicom_series(big, tmp_path / "a", uid="1.2.3.1")
    write_dicom_series(small, tmp_path / "b", uid="1.2.3.2")
    folder = tmp_path / "study"
    folder.mkdir()
    for f in [*(tmp_path / "a").iterdir(), *(tmp_path / "b").iterdir()]:
        shutil.copy(f, folder / f"{f.parent.name}-{f.name}")
    report = tmp_path / "r.json"
    code, err = _run(
        capsys, folder, "-o", tmp_path / "s.nii.gz", "-m", tiny_package, "--report", report
    )
    assert code == 0 and "2 DICOM series" in err and "--series" in err
    assert json.loads(report.read_text())["series"] == {
        "uid": "1.2.3.1",
        "description": "",
        "slices": 8,
    }
    code, err = _run(
        capsys,
        folder,
        "-o",
        tmp_path / "s2.nii.gz",
        "-m",
        tiny_package,
        "--series",
        "1.2.3.2",
        "--report",
        report,
    )
    assert code == 0 and json.loads(report.read_text())["series"]["slices"] == 4
    code, err = _run(
        capsys, folder, "-o", tmp_path / "s3.nii.gz", "-m", tiny_package, "--series", "9.9"
    )
    assert code == 1 and "no DICOM series 9.9" in err and "1.2.3.1 (8 files)" in err
    (tmp_path / "a" / "slice003.dcm").unlink()  # a missing slice
    code, err = _run(capsys, tmp_path / "a", "-o", tmp_path / "s4.nii.gz", "-m", tiny_package)
    assert code == 0 and "non-uniform slice spacing" in err


@pytest.mark.slow
def test_worker_malformed_events_and_closed_stdout_never_block_poll(tmp_path, monkeypatch):
    """A worker printing malformed progress events, then closing stdout while it keeps
    running: poll() never raises and never blocks; the job fails after the grace time."""
    import sys
    import time

    from HLFDSegmentLib import slicerjob
    from HLFDSegmentLib.slicerjob import JobState, SegmentationJob

    monkeypatch.setattr(slicerjob, "EOF_GRACE_S", 1.0)
    code = (
        "import os, sys, time; "
        'print(\'{"event": "progress", "fraction": "half"}\'); '
        'print(\'{"event": "progress", "fraction": null, "stage": 3}\'); '
        "print('[1, 2]'); sys.stdout.flush(); os.close(1); time.sleep(60)"
    )
    job = SegmentationJob(
        "m", python=sys.executable, command=lambda argv: [sys.executable, "-c", code]
    )
    job.input_path.write_bytes(b"")
    job.start()
    slowest = 0.0
    t0 = time.monotonic()
    while not job.finished and time.monotonic() - t0 < 20:
        t = time.monotonic()
        job.poll()
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.05)
    assert job.state is JobState.FAILED and slowest < 0.5, slowest
    assert time.monotonic() - t0 < 10
    job.cleanup()


def test_itk_allocation_failure_reads_as_out_of_memory():
    """ITK's allocation error (not a MemoryError) gets the worker's out-of-memory exit code."""
    import io
    import json

    from HLFDSegmentLib import worker

    def itk_fails(args, emit):
        raise RuntimeError(
            "Exception thrown in SimpleITK Resample: itkImportImageContainer.hxx:182:\n"
            "ITK ERROR: Failed to allocate memory for image. (itk::MemoryAllocationError)"
        )

    out = io.StringIO()
    argv = ["--input", "i.nrrd", "--output", "o.nrrd", "--model", "m"]
    assert worker.main(argv, out, runner=itk_fails) == worker.EXIT_MEMORY
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["kind"] == "memory" and "\n" not in last["message"]


def test_wrong_checkpoint_and_corrupt_zip_member_are_one_line(tmp_path):
    """A state.pt of another structure (resume) and a zip member with a bad CRC (model load)
    end in the project's one-line errors, not a KeyError or BadZipFile traceback."""
    import zipfile

    import pytest
    import torch

    from hlfd_train.config import ConfigError
    from hlfd_train.engine import load_state
    from HLFDSegmentLib.errors import ModelError
    from HLFDSegmentLib.modelpackage import load_package

    from conftest import build_package

    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        load_state(tmp_path / "state.pt")
    good = build_package(tmp_path / "good")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(good.iterdir()):
            zf.write(f, f.name)
    data = bytearray(bad.read_bytes())
    at = data.find(b"model.safetensors") + len("model.safetensors") + 200  # inside its data
    data[at] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"corrupt|mismatch"):
        load_package(bad)


def test_saved_package_folder_gets_a_plain_mkdir_mode(tmp_path):
    import stat

    from conftest import build_package

    old = os.umask(0o022)
    try:
        folder = build_package(tmp_path / "pkg")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
