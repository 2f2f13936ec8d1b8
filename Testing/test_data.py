"""Training data layer: dataset layouts, label sets, validation, the prepared cache, datasets."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hlfd_train.data import (
    DataError,
    PreparedData,
    SliceDataset,
    VolumeDataset,
    context_crop,
    detect_layout,
    discover,
    label_map,
    load_case,
    make_splits,
    prepare,
)
from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset
from HLFDSegmentLib.pipeline import model_grid, normalise

SHAPE = (24, 96, 96)
SPACING = (2.0, 2.0, 3.0)
AUG = {
    "flip": 0.5,
    "rotate_deg": 15,
    "rotate_prob": 0.5,
    "scale_intensity": 0.1,
    "shift_intensity": 0.1,
    "noise_std": 0.02,
}


def phantoms(out: Path, layout: str, task: str = "kidney", cases: int = 3, **cfg) -> Path:
    config = PhantomConfig(task=task, shape=SHAPE, spacing=SPACING, **cfg)
    write_dataset(out, layout, config, cases)
    return out


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    return phantoms(tmp_path_factory.mktemp("kits") / "kits19", "kits19", cases=5)


@pytest.fixture(scope="module")
def cyst_set(tmp_path_factory) -> Path:
    return phantoms(
        tmp_path_factory.mktemp("kits23") / "kits23", "kits19", cysts=(2, 2), cyst_label=3
    )


@pytest.fixture(scope="module")
def prepared(kits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "cache"
    return prepare(kits, out, splits=(3, 1, 1), progress=None)


@pytest.fixture(scope="module")
def data(prepared) -> PreparedData:
    return PreparedData(prepared)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- layouts -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layout", "task", "first", "names"),
    [
        ("kits19", "kidney", "case_00000", {1: "kidney", 2: "tumor"}),
        ("lits", "liver", "volume-0", {1: "liver", 2: "tumor"}),
        ("msd", "liver", "liver_0", {1: "liver", 2: "cancer"}),
        ("nnunet", "kidney", "case_0000", {1: "kidney", 2: "tumour"}),
    ],
)
def test_each_layout_is_detected_and_loaded(tmp_path, layout, task, first, names):
    root = phantoms(tmp_path / layout, layout, task)
    assert detect_layout(root) == layout
    cases = discover(root)
    assert cases[0].case_id == first and len(cases) == 3
    assert {k: v for k, v in cases[0].labels.items() if k} == names
    image, label = load_case(cases[0])
    assert label.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) <= {0, 1, 2}


def test_lits_in_batch_subfolders_with_gz(tmp_path):
    root = phantoms(tmp_path / "lits", "lits", "liver")
    batch = root / "Training Batch 1"
    batch.mkdir()
    for name in ("volume-0.nii", "segmentation-0.nii", "volume-1.nii", "segmentation-1.nii"):
        shutil.move(root / name, batch / name)
    for name in ("volume-2", "segmentation-2"):
        sitk.WriteImage(sitk.ReadImage(str(root / f"{name}.nii")), str(root / f"{name}.nii.gz"))
        (root / f"{name}.nii").unlink()
    cases = discover(root, "auto")
    assert [c.case_id for c in cases] == ["volume-0", "volume-1", "volume-2"]
    assert cases[2].label.name == "segmentation-2.nii.gz"


def test_kits21_and_kits23_cysts(tmp_path, cyst_set):
    assert detect_layout(cyst_set) == "kits19"  # plain folders: the user names kits21/23
    with pytest.raises(DataError, match=r"case_0000\d.*unexpected label values 3.*kits23"):
        for case in discover(cyst_set):
            load_case(case)
    cases = discover(cyst_set, "kits23")
    assert cases[0].labels[3] == "cyst"
    values = set()
    for case in cases:
        values |= set(np.unique(sitk.GetArrayFromImage(load_case(case)[1])).tolist())
    assert values == {0, 1, 2, 3}
    # KiTS21 (aggregated_MAJ_seg.nii.gz) and KiTS23 (instances/) are recognised
    k21 = copy_of(cyst_set, tmp_path / "kits21")
    for case in k21.glob("case_*"):
        (case / "segmentation.nii.gz").rename(case / "aggregated_MAJ_seg.nii.gz")
    assert detect_layout(k21) == "kits21"
    assert discover(k21)[0].label.name == "aggregated_MAJ_seg.nii.gz"
    k23 = copy_of(cyst_set, tmp_path / "kits23" / "dataset")
    (k23 / "case_00000" / "instances").mkdir()
    assert detect_layout(k23.parent) == "kits23"
    assert len(discover(k23.parent)) == 3


def test_folder_layouts(tmp_path, kits):
    paired = tmp_path / "paired"
    split = tmp_path / "split"
    for d in (paired, split / "images", split / "labels"):
        d.mkdir(parents=True)
    for i, case in enumerate(sorted(kits.glob("case_*"))[:2]):
        shutil.copy(case / "imaging.nii.gz", paired / f"ct{i}.nii.gz")
        shutil.copy(case / "segmentation.nii.gz", paired / f"ct{i}_seg.nii.gz")
        shutil.copy(case / "imaging.nii.gz", split / "images" / f"p{i}.nii.gz")
        shutil.copy(case / "segmentation.nii.gz", split / "labels" / f"p{i}.nii.gz")
    assert detect_layout(paired) == detect_layout(split) == "folder"
    assert [c.case_id for c in discover(paired)] == ["ct0", "ct1"]
    assert [c.case_id for c in discover(split)] == ["p0", "p1"]
    (split / "labels.json").write_text(json.dumps({"0": "background", "1": "kidney", "2": "mass"}))
    cases = discover(split)
    assert cases[0].labels == {0: "background", 1: "kidney", 2: "mass"}
    assert label_map(cases[0].labels, "tumour") == {0: 0, 1: 0, 2: 1}


# -- bad data ----------------------------------------------------------------------------------
def test_empty_missing_and_unknown_folders(tmp_path):
    assert issubclass(DataError, InputError)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        discover(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        discover(tmp_path / "junk")


def test_missing_label_file_names_the_case(tmp_path, kits):
    root = copy_of(kits, tmp_path / "k")
    (root / "case_00002" / "segmentation.nii.gz").unlink()
    with pytest.raises(DataError, match="case_00002: missing label file"):
        discover(root)
    assert [c.case_id for c in discover(root, unlabelled="skip")] == [
        "case_00000",
        "case_00001",
        "case_00003",
        "case_00004",
    ]


def test_unreadable_dataset_json(tmp_path):
    root = phantoms(tmp_path / "msd", "msd", "liver")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json.*unreadable"):
        discover(root)
    with pytest.raises(DataError, match=r"unreadable dataset\.json"):
        discover(root, "msd")


def test_mismatched_grid_and_unexpected_labels(tmp_path, kits):
    root = copy_of(kits, tmp_path / "k")
    seg = root / "case_00001" / "segmentation.nii.gz"
    label = sitk.ReadImage(str(seg))
    label.SetSpacing((2.0, 2.0, 2.5))
    sitk.WriteImage(label, str(seg))
    with pytest.raises(DataError, match=r"case_00001: label grid does not match.*spacing"):
        load_case(discover(root)[1])
    label.SetSpacing(SPACING)
    label.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(label, str(seg))
    with pytest.raises(DataError, match=r"case_00001: label grid.*origin"):
        load_case(discover(root)[1])
    seg = root / "case_00003" / "segmentation.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    arr[0, 0, :2] = (7, 9)
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(label)
    bad.SetOrigin(sitk.ReadImage(str(seg)).GetOrigin())
    sitk.WriteImage(bad, str(seg))
    with pytest.raises(DataError, match=r"case_00003: unexpected label values 7, 9"):
        load_case(discover(root)[3])
    with pytest.raises(DataError, match="case_00001"):
        prepare(root, tmp_path / "out", progress=None)


# -- label sets --------------------------------------------------------------------------------
def test_label_sets_and_cyst_options():
    assert label_map("kits19") == {0: 0, 1: 1, 2: 2}
    assert label_map("kits19", "tumour") == {0: 0, 1: 0, 2: 1}
    assert label_map("kits19", "organ") == {0: 0, 1: 1, 2: 1}
    assert label_map("kits23")[3] == 1
    assert label_map("kits23", cyst="background")[3] == 0
    assert label_map("kits23", cyst="tumour")[3] == 2
    assert label_map("kits21", "tumour", "tumour")[3] == 1
    assert label_map("kits21", "organ", "background") == {0: 0, 1: 1, 2: 1, 3: 0}
    assert label_map({0: "background", 1: "liver", 2: "cancer"}, "tumour") == {0: 0, 1: 0, 2: 1}
    with pytest.raises(DataError, match="labelset"):
        label_map("kits19", "kidney")


def test_prepare_applies_the_label_set(tmp_path, cyst_set):
    counts = {}
    for labelset, cyst in [("organ+tumour", "organ"), ("tumour", "organ"), ("organ", "tumour")]:
        out = prepare(
            cyst_set,
            tmp_path / labelset,
            layout="kits23",
            labelset=labelset,
            cyst=cyst,
            progress=None,
        )
        info = json.loads((out / "prepared.json").read_text())
        d = PreparedData(out)
        lab = np.concatenate([d.arrays(c)[1].ravel() for c in d.cases("all")])
        counts[labelset] = np.bincount(lab, minlength=3)
        assert len(info["labels"]) == d.num_classes
    full, tumour, organ = counts["organ+tumour"], counts["tumour"], counts["organ"]
    assert tumour[2] == organ[2] == 0 and full[2] > 0
    assert tumour[1] == full[2]  # tumour only; cysts -> background
    assert organ[1] == full[1] + full[2]  # everything in the kidney (cysts counted as organ)


# -- prepare -----------------------------------------------------------------------------------
def test_prepared_cache_layout(prepared, data):
    info = json.loads((prepared / "prepared.json").read_text())
    assert info["layout"] == "kits19" and info["task"] == "kidney"
    assert info["labels"] == {"0": "background", "1": "Kidney", "2": "Kidney tumor"}
    assert info["cases"] == [f"case_{i:05d}" for i in range(5)]
    splits = json.loads((prepared / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert sorted(data.cases("train") + data.cases("val") + data.cases("test")) == info["cases"]
    for case in info["cases"]:
        image, label = data.arrays(case)
        meta = data.meta(case)
        assert image.dtype == np.float16 and label.dtype == np.uint8
        assert image.shape == label.shape == tuple(meta["shape"])
        assert sum(meta["counts"].values()) == label.size
        for value, zs in meta["slices"].items():
            assert zs == np.flatnonzero((label == int(value)).any(axis=(1, 2))).tolist()
            z, y, x = meta["points"][value][0]
            assert label[z, y, x] == int(value)
    assert data.eval_cases("test")[0].label.name == "segmentation.nii.gz"
    assert data.label_lut()[:3].tolist() == [0, 1, 2]


def test_prepared_arrays_are_what_the_runtime_sees(tmp_path, kits, data):
    pre = data.preprocessing
    for case in discover(kits)[:2]:
        image, label = load_case(case)
        grid = model_grid(image, pre)
        want = normalise(image, grid, pre)
        want_lab = sitk.GetArrayFromImage(
            grid.resample(label, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
        )
        meta = data.meta(case.case_id)
        assert meta["model_grid"]["size"] == list(grid.size)
        box = tuple(slice(a, b) for a, b in meta["crop"])
        got, got_lab = data.arrays(case.case_id)
        np.testing.assert_allclose(got.astype(np.float32), want[box], atol=1e-3, rtol=1e-3)
        np.testing.assert_array_equal(got_lab, want_lab[box])


def test_crop_to_body_saves_space(tmp_path, kits):
    pre = {"spacing": [4.0, 4.0, None]}  # coarse grid: fast; the body box is still inside
    small = prepare(kits, tmp_path / "crop", preprocessing=pre, progress=None)
    full = prepare(kits, tmp_path / "full", preprocessing=pre, crop_body=False, progress=None)
    a, b = PreparedData(small), PreparedData(full)
    for case in a.cases("all"):
        assert a.meta(case)["counts"].get("2") == b.meta(case)["counts"].get("2")
        assert np.prod(a.meta(case)["shape"]) <= np.prod(b.meta(case)["shape"])


def test_rerun_skips_and_conflicting_settings_are_refused(tmp_path, prepared, kits):
    stamp = {p: p.stat().st_mtime_ns for p in prepared.glob("cases/*/image.npy")}
    before = (prepared / "splits.json").read_text()
    said = []
    prepare(kits, prepared, splits=(3, 1, 1), progress=said.append)
    assert not any(line.startswith("preparing") for line in said)  # nothing to do, nothing said
    assert {p: p.stat().st_mtime_ns for p in prepared.glob("cases/*/image.npy")} == stamp
    assert (prepared / "splits.json").read_text() == before
    with pytest.raises(DataError, match=r"other settings.*labelset"):
        prepare(kits, prepared, labelset="tumour", progress=None)
    out = copy_of(prepared, tmp_path / "copy")
    prepare(kits, out, labelset="tumour", overwrite=True, splits=(3, 1, 1), progress=None)
    assert PreparedData(out).num_classes == 2
    # an interrupted run resumes: only the missing case is prepared again
    shutil.rmtree(out / "cases" / "case_00002")
    said = []
    prepare(kits, out, labelset="tumour", splits=(3, 1, 1), progress=said.append)
    assert said[0].startswith("preparing 1 of 5")
    assert not list((out / "cases").glob(".*"))  # no temporary folders left


def test_splits_are_seeded_and_stable():
    ids = [f"case_{i:05d}" for i in range(40)]
    a = make_splits(ids, (0.7, 0.15, 0.15), seed=0)
    assert a == make_splits(list(reversed(ids)), (0.7, 0.15, 0.15), seed=0)
    assert [len(a[k]) for k in ("train", "val", "test")] == [28, 6, 6]
    assert a != make_splits(ids, (0.7, 0.15, 0.15), seed=1)
    grown = make_splits([*ids, "case_00040"], (0.7, 0.15, 0.15), seed=0)
    moved = sum(len(set(a[k]) - set(grown[k])) for k in ("train", "val", "test"))
    assert moved <= 2
    counts = make_splits(ids, (10, 5, 5), seed=3)
    assert [len(counts[k]) for k in ("train", "val", "test", "unused")] == [10, 5, 5, 20]
    with pytest.raises(DataError, match="sum to 1"):
        make_splits(ids, (0.5, 0.2, 0.2))


# -- datasets ----------------------------------------------------------------------------------
def test_slice_dataset_items(data):
    ds = SliceDataset(data, "train", crop=(64, 80), samples_per_epoch=40, seed=1)
    item = ds[0]
    assert item["image"].shape == item["label"].shape == (1, 64, 80)
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert item["case"] in data.cases("train") and isinstance(item["slice"], int)
    assert len(ds) == 40
    assert torch.equal(ds[5]["image"], ds[5]["image"])  # a pure function of the index
    other = SliceDataset(data, "train", crop=(64, 80), samples_per_epoch=40, seed=2)
    assert not all(torch.equal(ds[i]["image"], other[i]["image"]) for i in range(4))
    big = SliceDataset(data, "train", crop=(200, 200), samples_per_epoch=4)[0]  # padded
    assert big["image"].shape == (1, 200, 200) and float(big["image"][0, 0, 0]) == 0.0


def test_context_crop_stacks_neighbour_slices_with_padding():
    vol = np.arange(3, dtype=np.float32)[:, None, None] + np.zeros((3, 4, 5), dtype=np.float32)
    crop = context_crop(vol, 0, (-2, 1), (4, 3), 1, fill=-1.0)
    assert crop.shape == (3, 4, 3)
    assert (crop[:, :2] == -1).all()  # above the slice: padding
    np.testing.assert_array_equal(crop[:, 2:, :].mean(axis=(1, 2)), [0, 0, 1])  # z-1 -> z = 0


def test_slice_dataset_with_context_slices(kits, data, tmp_path):
    """context_slices = 1 in the preprocessing: 3-slice crops whose centre is the one-slice
    crop of the same draw, with that slice's label."""
    pre = {"context_slices": 1}
    wide = PreparedData(prepare(kits, tmp_path / "c", splits=(3, 1, 1), preprocessing=pre))
    one = SliceDataset(data, "train", crop=(64, 64), samples_per_epoch=12, seed=3)
    three = SliceDataset(wide, "train", crop=(64, 64), samples_per_epoch=12, seed=3)
    for i in range(12):
        a, b = one[i], three[i]
        assert b["image"].shape == (3, 64, 64) and b["label"].shape == (1, 64, 64)
        assert b["slice"] == a["slice"] and torch.equal(b["label"], a["label"])
        assert torch.equal(b["image"][1:2], a["image"])
    assert any(not torch.equal(three[i]["image"][0], three[i]["image"][1]) for i in range(12))


def test_foreground_fraction_is_honoured(data):
    def share(fraction: float, value: int = 0) -> float:
        ds = SliceDataset(
            data, "train", crop=(48, 48), foreground_fraction=fraction, samples_per_epoch=120
        )
        hits = [bool((ds[i]["label"] > value).any()) for i in range(len(ds))]
        return float(np.mean(hits))

    assert share(1.0) == 1.0
    assert share(0.5) >= 0.45
    assert share(1.0, value=1) >= 0.4  # half of the foreground samples are centred on tumour
    assert share(0.0, value=1) < share(1.0, value=1)


def test_augmentation_changes_images_but_keeps_labels(data):
    plain = SliceDataset(data, "train", crop=(64, 64), samples_per_epoch=16, seed=2)
    aug = SliceDataset(data, "train", crop=(64, 64), augment=AUG, samples_per_epoch=16, seed=2)
    changed = 0
    for i in range(16):
        a, b = plain[i], aug[i]
        changed += not torch.equal(a["image"], b["image"])
        assert set(b["label"].unique().tolist()) <= {0, 1, 2}
    assert changed >= 8
    assert torch.equal(aug[3]["image"], aug[3]["image"])  # augmentation is seeded too


def test_volume_dataset_on_isotropic_grid(tmp_path, kits):
    out = prepare(kits, tmp_path / "iso", preprocessing={"spacing": [3.0, 3.0, 3.0]}, progress=None)
    data = PreparedData(out)
    assert data.meta(data.cases("all")[0])["model_grid"]["spacing"] == [3.0, 3.0, 3.0]
    ds = VolumeDataset(
        data,
        "train",
        patch=(16, 32, 32),
        augment=AUG,
        foreground_fraction=1.0,
        samples_per_epoch=12,
    )
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == item["label"].shape == (1, 16, 32, 32)
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert (item["label"] > 0).any()
    big = VolumeDataset(data, "train", patch=(40, 80, 80), samples_per_epoch=2)[0]
    assert big["image"].shape == (1, 40, 80, 80)


def test_dataloader_with_workers(data):
    from torch.utils.data import DataLoader, DistributedSampler

    ds = SliceDataset(data, "train", crop=(48, 48), augment=AUG, samples_per_epoch=16, seed=4)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 1, 48, 48)
    again = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0))
    assert torch.equal(batches[1]["image"], again[1]["image"])
    clone = copy.deepcopy(ds)  # same __getstate__ as what spawn/forkserver workers receive
    assert torch.equal(clone[7]["image"], ds[7]["image"])


def test_memory_mapped_when_large(prepared, data):
    mapped = PreparedData(prepared, cache_bytes=0)
    assert not mapped.in_memory and data.in_memory
    case = mapped.cases("train")[0]
    assert isinstance(mapped.arrays(case)[0], np.memmap)
    a = SliceDataset(mapped, "train", crop=(48, 48), samples_per_epoch=4)
    b = SliceDataset(data, "train", crop=(48, 48), samples_per_epoch=4)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(4))
    assert not copy.deepcopy(mapped)._arrays  # maps are reopened, not copied
