"""Adversarial cases: ordinary mistakes must not destroy an input or leave a partial result.

Each case is small and fast; the file shows at a glance what is tried against the CLI."""

from __future__ import annotations

import os
from pathlib import Path

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
