"""Phantom CTs: reproducible, plausible HU, labels in place, physical geometry, dataset layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from HLFDSegmentLib.phantom import PhantomConfig, make_phantom, write_dataset

SMALL = (24, 96, 96)


def test_same_seed_same_phantom_other_seed_differs():
    cfg = PhantomConfig(shape=SMALL)
    a, b, c = make_phantom(cfg, 3), make_phantom(cfg, 3), make_phantom(cfg, 4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("task", ["kidney", "liver"])
def test_labels_and_hounsfield_units(task):
    cfg = PhantomConfig(task=task, shape=(32, 128, 128), tumours=(2, 2), hyper_fraction=0.0)
    ph = make_phantom(cfg, seed=1)
    assert ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert set(np.unique(ph.labels)) == {0, 1, 2}
    organ = ph.image[ph.labels == 1].mean()
    assert (150 < organ < 200) if task == "kidney" else (80 < organ < 140)
    assert ph.image[ph.labels == 2].mean() < organ - 15  # hypodense by default
    assert ph.image.min() <= -900 and ph.image.max() >= 600  # air and bone present
    tumour = ph.labels == 2
    grown = tumour.copy()
    for axis in range(3):
        grown |= np.roll(tumour, 1, axis) | np.roll(tumour, -1, axis)
    assert (ph.labels[grown & ~tumour] == 1).any()  # tumours touch their organ


def test_kidney_task_has_two_kidneys():
    ph = make_phantom(PhantomConfig(shape=(40, 128, 128), tumours=(0, 0)), seed=2)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray((ph.labels == 1).astype(np.uint8)))
    assert sitk.GetArrayViewFromImage(cc).max() == 2


def test_same_patient_on_two_grids_agrees_in_physical_space():
    base = dict(task="liver", tumours=(0, 0))  # same 384 x 384 x 160 mm field of view
    a = make_phantom(PhantomConfig(**base, shape=(32, 128, 128), spacing=(3.0, 3.0, 5.0)), seed=5)
    b = make_phantom(
        PhantomConfig(
            **base,
            shape=(40, 148, 148),
            spacing=(2.6, 2.6, 4.0),
            oblique_deg=25,
            random_orientation=True,
        ),
        seed=5,
    )

    def centroid(ph):
        img = ph.to_sitk()[1]
        idx = np.argwhere(ph.labels == 1)[:, ::-1].astype(float)  # (x, y, z) indices
        d = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
        return np.asarray(img.GetOrigin()) + d @ idx.mean(0)

    assert np.linalg.norm(centroid(a) - centroid(b)) < 4.0


@pytest.mark.parametrize(
    ("layout", "image", "label"),
    [
        ("kits19", "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz"),
        ("lits", "volume-1.nii", "segmentation-1.nii"),
        ("msd", "imagesTr/liver_1.nii.gz", "labelsTr/liver_1.nii.gz"),
        ("nnunet", "imagesTr/case_0001_0000.nii.gz", "labelsTr/case_0001.nii.gz"),
    ],
)
def test_dataset_layouts(tmp_path, layout, image, label):
    cfg = PhantomConfig(task="liver", shape=(16, 64, 64))
    paths = write_dataset(tmp_path, layout, cfg, cases=2, seed=0)
    assert paths[1] == tmp_path / image
    img, lab = sitk.ReadImage(str(tmp_path / image)), sitk.ReadImage(str(tmp_path / label))
    assert img.GetSize() == lab.GetSize() == (64, 64, 16)
    assert np.allclose(img.GetDirection(), lab.GetDirection())
    assert np.allclose(img.GetOrigin(), lab.GetOrigin())
    if layout in ("msd", "nnunet"):
        meta = json.loads((tmp_path / "dataset.json").read_text())
        assert meta["numTraining"] == 2
    if layout == "msd":
        assert meta["training"][1] == {"image": f"./{image}", "label": f"./{label}"}
    again = write_dataset(tmp_path / "more", layout, cfg, cases=3, seed=0)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(again[1]))), sitk.GetArrayFromImage(img)
    )


def test_unknown_task_and_layout():
    with pytest.raises(ValueError, match="task"):
        PhantomConfig(task="brain")
    with pytest.raises(ValueError, match="unknown layout"):
        write_dataset("/tmp/never", "kits99", PhantomConfig(shape=SMALL), 1)
