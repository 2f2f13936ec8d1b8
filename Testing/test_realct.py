"""The real-CT check: scoring in physical space, and a tampered download refused."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from hlfd_train.cli import main
from hlfd_train.realct import CASES, case_metrics, read_mrc


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
    out = case_metrics(_image(pred, flipped, (38.0, 38.0, 0.0)), _image(ref), CASES[0], "liver")
    assert out["organ_dice"] == pytest.approx(2 * 216 / (432 + 216))
    assert out["false_organ_ml"] == {"spleen": pytest.approx(216 * 12 / 1000, abs=0.05)}
    assert out["tumour_ml"] == pytest.approx(0.012, abs=0.05)
    assert out["reference_ml"] == pytest.approx(216 * 12 / 1000, abs=0.05)
    assert np.isnan(out["tumour_dice"])  # TotalSegmentator has no tumour class


def test_lits_labels_score_tumour_and_an_mrc_file_reads_as_lps(tmp_path):
    """The LiTS case's MRC arrays (x fastest; axes left-right, anterior-posterior,
    inferior-superior) become an LPS image, and its tumour label is scored."""
    lits = next(c for c in CASES if c.name == "lits-117")
    vol = np.zeros((6, 5, 4), np.float32)  # MRC order: (z=axis 2, y=axis 1, x=axis 0) in file
    vol[1, 2, 3] = 2.0
    header = np.zeros(256, "<i4")
    header[:4] = (4, 5, 6, 2)  # nx, ny, nz, mode 2 (float32)
    path = tmp_path / "a.mrc"
    path.write_bytes(header.tobytes() + vol.tobytes())
    image = read_mrc(path, (1.0, 1.0, 2.0))
    arr = sitk.GetArrayFromImage(image)
    assert image.GetSpacing() == (1.0, 1.0, 2.0) and arr.shape == (4, 5, 6)
    assert arr[3, 2, 1] == 2  # file axis 0 (x) is the image's x, file axis 2 its z
    truth = np.zeros((4, 5, 6), np.uint8)
    truth[1:3, 1:4, 1:5] = 1
    truth[2, 2, 2:4] = 2
    pred = truth.copy()
    pred[2, 2, 3] = 1  # half the tumour called liver
    out = case_metrics(_image(pred), _image(truth), lits, "liver")
    assert out["organ_dice"] == 1.0 and out["tumour_dice"] == pytest.approx(2 / 3)


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
    # a bad download in the cache is removed, so that the next run fetches it anew
    cache = tmp_path / "cache2"
    cache.mkdir()
    (cache / fake.name).write_bytes(b"a truncated download")
    out = str(tmp_path / "out")
    code = main(["real-ct", out, "--models", str(tmp_path), "--cache", str(cache)])
    assert code == 1 and not (cache / fake.name).exists()
    assert "sha256" in capsys.readouterr().err


def test_a_bad_model_among_good_ones_fails_before_any_output(tmp_path):
    from hlfd_train.realct import check_models
    from HLFDSegmentLib.errors import HLFDError
    from HLFDSegmentLib.model_registry import BUILTIN_DIR

    with pytest.raises(HLFDError, match="nope"):
        check_models(tmp_path, [BUILTIN_DIR / "liver", tmp_path / "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lesions_are_counted_found_by_size_and_cut_by_the_border():
    from hlfd_train.realct import lesions_found

    tumour = np.zeros((4, 30, 30), bool)
    tumour[1:3, 0:10, 5:15] = True  # 200 voxels, reaches the border
    tumour[1:3, 20:22, 20:22] = True  # 8 voxels
    tumour[0, 25, 25] = True  # below 0.1 mL: not counted
    called = np.zeros_like(tumour)
    called[2, 5, 8] = True  # touches the big one only
    out = lesions_found(called, tumour, 0.06)
    assert out == {
        "lesions": 2,
        "lesions_found": 1,
        "lesions_over_10ml": 1,
        "lesions_over_10ml_found": 1,
        "tumour_ml_at_border": 12.0,
    }
    assert lesions_found(called, np.zeros_like(tumour), 0.1) == {}


def _ircadb_folder(root, masks: dict[str, np.ndarray], ct: np.ndarray):
    """A 3D-IRCADb-01 patient folder: the CT and each mask (0/255) as its own DICOM series."""
    from test_io import write_dicom_series

    def image(arr):
        img = sitk.GetImageFromArray(arr.astype(np.int16))
        img.SetSpacing((4.0, 4.0, 5.0))
        return img

    (root / "MASKS_DICOM").mkdir(parents=True)
    write_dicom_series(image(ct), root / "PATIENT_DICOM", uid="1.2.3.9")
    for i, (name, mask) in enumerate(masks.items()):
        write_dicom_series(image(mask * 255), root / "MASKS_DICOM" / name, uid=f"1.2.3.{i}")
    return root


def test_an_ircadb_folder_scores_liver_with_its_tumours_and_vessels(tmp_path, capsys):
    """IRCAD's liver mask holds its vessels and tumours: the reference liver is all of it,
    the tumour label stays, the body outline (skin) is background and the other masks name
    the false organ."""
    from hlfd_train.realct import ircadb_case, read_case

    shape = (4, 24, 24)
    skin, liver, tumour, vein, bone = (np.zeros(shape, np.uint8) for _ in range(5))
    skin[:, 1:23, 1:23] = 1
    liver[:, 4:14, 4:14] = 1
    tumour[1:3, 6:9, 6:9] = 1
    vein[:, 10:12, 2:20] = 1  # runs through the liver and beyond it
    bone[:, 18:21, 10:13] = 1
    folder = _ircadb_folder(
        tmp_path / "3Dircadb1.5",
        {"skin": skin, "liver": liver, "livertumor01": tumour, "venoussystem": vein, "bone": bone},
        np.full(shape, 40),
    )
    case = ircadb_case(folder)
    assert case.name == "3Dircadb1.5" and "kidneys unlabelled" in case.note
    _, ref = read_case(tmp_path, case)
    r = sitk.GetArrayFromImage(ref)
    names = {v: k for k, v in case.names.items()}
    assert set(np.unique(r)) == {0, names["liver"], names["livertumor01"], names["venoussystem"],
                                 names["bone"]}  # fmt: skip
    assert (r[tumour > 0] == names["livertumor01"]).all()
    assert (r[(liver > 0) & (tumour == 0)] == names["liver"]).all()  # vessels inside: liver
    pred = np.zeros(shape, np.uint8)
    pred[liver > 0] = 1
    pred[tumour > 0] = 2
    pred[:, 18:21, 10:13] = 1  # bone called liver
    pred[:, 16, 16] = 1  # body called liver
    called = sitk.GetImageFromArray(pred)
    called.CopyInformation(ref)
    out = case_metrics(called, ref, case, "liver")
    assert out["tumour_dice"] == 1.0 and out["lesions_found"] == 1
    assert out["organ_dice"] == pytest.approx(2 * 400 / (400 + 436 + 4))
    assert out["false_organ_ml"] == {"bone": 2.9}  # 36 voxels of 80 mm3; the body's 4: < 0.5 mL
    kidney = case_metrics(called, ref, case, "kidney")
    assert np.isnan(kidney["organ_dice"]) and kidney["organ_ml"] > 0


def test_a_folder_that_is_not_ircadb_is_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "case" / "PATIENT_DICOM").mkdir(parents=True)
    code = main(["real-ct", str(tmp_path / "out"), "--models", str(tmp_path),
                 "--ircadb", str(tmp_path / "case")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "not a 3D-IRCADb-01 patient folder" in err[0], err
    assert not (tmp_path / "out").exists()
