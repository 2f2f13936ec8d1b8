"""The real-CT check: scoring in physical space, and a tampered download refused."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hlfd_train.cli import main
from hlfd_train.realct import case_metrics


def _image(arr: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def test_reference_is_scored_where_it_lies_not_by_array_order():
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 4:10, 3:9] = 5  # liver
    ref[2:8, 12:18, 12:18] = 1  # spleen
    # the prediction's grid runs the other way along x and y (as TotalSegmentator's
    # DICOM conversion does): the same voxels in physical space, mirrored arrays
    flipped = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    pred = np.zeros_like(ref)
    pred[ref == 5] = 1
    pred[ref == 1] = 1  # spleen called liver: 6*6*6 voxels of 12 mm3
    pred[4, 5, 5] = 2
    pred = pred[:, ::-1, ::-1].copy()
    out = case_metrics(_image(pred, flipped, (38.0, 38.0, 0.0)), _image(ref), "liver")
    assert out["organ_dice"] == pytest.approx(2 * 216 / (432 + 216))
    assert out["false_organ_ml"] == {"spleen": pytest.approx(216 * 12 / 1000, abs=0.05)}
    assert out["tumour_ml"] == pytest.approx(0.012, abs=0.05)
    assert out["reference_ml"] == pytest.approx(216 * 12 / 1000, abs=0.05)


def test_a_tampered_release_is_refused_with_one_line(tmp_path, capsys):
    fake = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    fake.write_bytes(b"not the release")
    code = main(
        ["real-ct", str(tmp_path / "out"), "--models", str(tmp_path), "--source", str(fake),
         "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "sha256" in err[0], err
    assert not (tmp_path / "out").exists()
