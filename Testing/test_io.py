"""Image input (every format, geometry kept) and atomic outputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.io import (
    check_image,
    full_suffix,
    label_counts,
    read_image,
    write_image,
    write_labelmap,
)

from conftest import block_ct, make_image, oblique_direction


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_files_round_trip_with_oblique_geometry(tmp_path, ct_image, suffix):
    path = tmp_path / f"ct{suffix}"
    if suffix in (".nhdr", ".mhd"):  # detached headers: written by ITK directly
        sitk.WriteImage(ct_image, str(path))
    else:
        write_image(ct_image, path)
    back = read_image(path)
    assert same_geometry(back, ct_image)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct_image)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def write_dicom_series(
    image: sitk.Image, folder, uid: str = "1.2.826.0.1.3680043.2.1125.1"
) -> None:
    """A CT DICOM series, one file per slice, the way scanners store it."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = uid
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".0",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(
                f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
            ),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_keeps_geometry(tmp_path):
    # DICOM frames are right-handed (slice normal = row x column), so no flipped axis here
    image = make_image(
        block_ct((6, 20, 18)),
        spacing=(0.7, 0.7, 2.5),
        direction=oblique_direction(20, flip_x=False),
    )
    write_dicom_series(image, tmp_path / "dicom")
    back = read_image(tmp_path / "dicom")
    assert same_geometry(back, image, tol=1e-4)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
    )


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream")
    with pytest.raises(InputError, match=r"corrupt\.nii\.gz: cannot read image"):
        read_image(corrupt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "empty")


def test_check_image_refusals():
    where = "x.nrrd"
    with pytest.raises(InputError, match="2D image of size 30x20"):
        check_image(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), where)
    with pytest.raises(InputError, match="2D image of size 30x20x1"):
        check_image(sitk.GetImageFromArray(np.zeros((1, 20, 30), np.int16)), where)
    with pytest.raises(InputError, match="4D image"):
        check_image(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), where)
    with pytest.raises(InputError, match="3 components per voxel"):
        check_image(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), where)
    nan = block_ct().astype(np.float32)
    nan[2, 3, 4] = np.nan
    nan[3, 3, 4] = np.inf
    with pytest.raises(InputError, match="2 voxels are NaN or infinite"):
        check_image(sitk.GetImageFromArray(nan), where)
    with pytest.raises(InputError, match="constant image"):
        check_image(sitk.GetImageFromArray(np.full((4, 8, 8), -1000, np.int16)), where)


def test_non_ct_intensities_warn_but_pass():
    mr = sitk.GetImageFromArray(
        np.random.default_rng(0).integers(0, 800, (8, 16, 16)).astype(np.int16)
    )
    assert "do not look like CT" in check_image(mr, "mr.nii")[0]
    assert check_image(make_image(block_ct()), "ct.nii") == []


def test_labelmap_outputs_by_extension_and_atomicity(tmp_path):
    labels = make_image(np.zeros((4, 8, 8), np.uint8))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        write_labelmap(labels, tmp_path / f"l{suffix}")
        assert same_geometry(read_image(tmp_path / f"l{suffix}"), labels)
    with pytest.raises(InputError, match="unknown output type"):
        write_labelmap(labels, tmp_path / "l.png")
    with pytest.raises(InputError, match="does not exist"):
        write_labelmap(labels, tmp_path / "nowhere" / "l.nii.gz")
    with pytest.raises(ValueError):  # a label value without a segment entry
        write_labelmap(
            make_image(np.full((4, 8, 8), 3, np.uint8)),
            tmp_path / "s.seg.nrrd",
            [
                {
                    "value": 1,
                    "name": "Kidney",
                    "color": [1, 2, 3],
                    "terminology": {"category": {}, "type": {}},
                }
            ],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.mha", "l.nii.gz", "l.nrrd"]


def test_full_suffix_prefers_the_longest():
    assert full_suffix("a/b.seg.nrrd", (".nrrd", ".seg.nrrd")) == ".seg.nrrd"
    assert full_suffix("CASE.NII.GZ", (".nii", ".nii.gz")) == ".nii.gz"
    assert full_suffix("x.png", (".nii",)) == ""


def test_label_counts_equal_a_bincount_of_the_whole_labelmap():
    """Counted in the box around the labels; labels at every face of the volume, empty and
    full volumes included."""
    rng = np.random.default_rng(5)
    volumes = [np.zeros((3, 4, 5), np.uint8), np.full((2, 3, 4), 7, np.uint8)]
    for _ in range(30):
        a = np.zeros(tuple(rng.integers(1, 25, 3)), np.uint8)
        for _ in range(rng.integers(0, 5)):
            z, y, x = (rng.integers(0, d) for d in a.shape)
            a[z : z + 3, y : y + 4, x : x + 2] = rng.integers(1, 256)
        volumes.append(a)
    for a in volumes:
        counts = label_counts(sitk.GetImageFromArray(a))
        assert np.array_equal(counts, np.bincount(a.ravel(), minlength=256)), a.shape
