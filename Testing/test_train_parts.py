"""Training package parts that need no dataset: config, metrics, logs, sampler, schedule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hlfd_train.config import ConfigError, load_config, parse_override
from hlfd_train.engine import StepSampler, device_name, lr_factor
from hlfd_train.evaluate import (
    axial_axis,
    dice,
    label_metrics,
    summarise,
    surface_distances,
    tumour_slices,
)
from hlfd_train.logs import RunLog, plot_curves


def test_config_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\ntrain:\n  lr: 1e-3\n  steps: 7\nmodel:\n  student: {taps: {d5: a.b}}\n"
    )
    cfg = load_config(path, ["train.steps=9", "data.augment.flip=0", "distill.options.p=3"])
    assert cfg["name"] == "x"
    assert cfg["train"]["lr"] == pytest.approx(1e-3)  # YAML 1.1 would leave "1e-3" a string
    assert cfg["train"]["steps"] == 9
    assert cfg["data"]["augment"]["flip"] == 0
    assert cfg["data"]["augment"]["rotate_deg"] == 15.0  # other defaults kept
    assert cfg["model"]["student"]["taps"] == {"d5": "a.b"}
    assert cfg["model"]["student"]["architecture"] == "resnet18_unet2d"
    assert cfg["distill"]["options"] == {"p": 3}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train=3", "config key 'train' must be a mapping"),
        ("data.labelset=liver", "'data.labelset' = 'liver'"),
        ("train.steps=0", "'train.steps' = 0"),
        ("train.optimizer=rmsprop", "'train.optimizer'"),
        ("train.curves=2", "'train.curves' = 2: expected true or false"),
        ("nokey", "must look like key.sub=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)
    bad.write_text("trian: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trian'"):
        load_config(bad)


def test_parse_override_types():
    assert parse_override("a.b=3e-4") == {"a": {"b": 3e-4}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=text") == {"a": "text"}


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(path)
        assert cfg["model"]["spatial_dims"] in (2, 3)


def test_label_metrics_on_hand_made_masks():
    ref = np.zeros((10, 20, 20), bool)
    ref[2:6, 5:15, 5:15] = True  # 400 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 5:15, 5:10] = True  # the half of it: 200 voxels
    m = label_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 200 / 600)
    assert m["iou"] == pytest.approx(0.5)
    assert m["voe"] == pytest.approx(0.5)
    assert m["rvd"] == pytest.approx(-0.5)
    assert m["hd95"] == pytest.approx(5.0)  # the far half of ref lies up to 5 voxels (x, 1 mm)
    assert 0 < m["assd"] < 5.0
    same = label_metrics(ref, ref, (2.0, 1.0, 1.0))
    assert (same["dice"], same["hd95"], same["assd"], same["rvd"]) == (1.0, 0.0, 0.0, 0.0)
    shifted = np.roll(ref, 1, axis=0)  # one slice along z = 2 mm
    assert label_metrics(shifted, ref, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(2.0)


def test_surface_distances_equal_monais_two_metrics():
    """HD95 and ASSD from one set of edge distances are exactly MONAI's HD95 and symmetric
    ASSD (each of which computes those distances itself), in 2D and 3D, anisotropic."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(17, 23), (9, 21, 14), (12, 16, 25), (6, 30, 8)]:
        pred, ref = (
            ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=2) for _ in range(2)
        )
        spacing = [float(v) for v in rng.uniform(0.5, 4.0, len(shape))]
        p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)
            assd = compute_average_surface_distance(p, r, symmetric=True, spacing=spacing)
        assert surface_distances(pred, ref, spacing) == (float(hd95[0, 0]), float(assd[0, 0]))


def test_label_metrics_empty_cases():
    empty = np.zeros((4, 4, 4), bool)
    some = empty.copy()
    some[1, 1, 1] = True
    both = label_metrics(empty, empty, (1, 1, 1))  # nothing to score: no free credit
    assert both["dice"] is None and both["rvd"] is None and both["hd95"] is None
    assert both["fp_ml"] == 0.0
    missed = label_metrics(empty, some, (1, 1, 1))  # penalised with the image diagonal
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(48**0.5)
    assert missed["rvd"] == -1.0 and missed["missed"]
    false_alarm = label_metrics(some, empty, (1, 1, 1))
    assert false_alarm["dice"] is None and false_alarm["rvd"] is None
    assert false_alarm["fp_ml"] == pytest.approx(0.001)


def test_one_dice_for_validation_and_evaluation():
    """The Dice that training validation uses is the evaluation's, on the same masks."""
    rng = np.random.default_rng(0)
    pred, ref = rng.random((2, 6, 16, 16)) > 0.6
    want = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice(pred, ref) == pytest.approx(want)
    assert dice(pred, ref) == label_metrics(pred, ref, (1, 1, 1))["dice"]
    assert dice(pred[:0], ref[:0]) == 1.0 and dice(pred, np.zeros_like(ref)) == 0.0


def test_summary_and_global_dice():
    a = {
        "dice": 1.0,
        "iou": 1.0,
        "voe": 0.0,
        "rvd": 0.0,
        "hd95": 0.0,
        "assd": 0.0,
        "voxels_pred": 100,
        "voxels_ref": 100,
    }
    b = {
        "dice": 0.0,
        "iou": 0.0,
        "voe": 1.0,
        "rvd": None,
        "hd95": 90.0,
        "assd": 90.0,
        "voxels_pred": 0,
        "voxels_ref": 300,
        "missed": True,
    }
    s = summarise([{"labels": {"t": a}}, {"labels": {"t": b}}])["t"]
    assert s["dice"]["mean"] == 0.5 and s["dice"]["n"] == 2
    assert s["hd95"]["mean"] == 45.0  # a missed label's penalty counts, it is not left out
    assert s["missed"] == 1 and s["dice"]["std"] == pytest.approx(0.5**0.5)  # sample sd
    assert s["global_dice"] == pytest.approx(2 * 100 / 500)


def test_axial_axis_and_tumour_slices():
    img = sitk.Image(8, 9, 10, sitk.sitkUInt8)
    assert axial_axis(img) == 0  # identity direction: array axis 0 is k = S
    img.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # i along S -> array axis 2
    assert axial_axis(img) == 2
    ref = np.zeros((5, 4, 4), np.uint8)
    ref[1, 0, 0] = ref[3, 2, 2] = 2
    ref[4, 1, 1] = 1
    assert tumour_slices(ref, 2, 0).tolist() == [1, 3]


def test_device_name_gives_cuda_an_index():
    # torch.cuda.set_device refuses a bare "cuda" (a single-GPU run stopped at its first line)
    assert device_name("auto", cuda=True) == "cuda:0"
    assert device_name("cuda", cuda=True) == "cuda:0"
    assert device_name("auto", cuda=True, local_rank=3) == "cuda:3"
    assert device_name("cuda:1", cuda=True, local_rank=3) == "cuda:1"
    assert device_name("auto", cuda=False) == "cpu"
    assert device_name("cpu", cuda=True) == "cpu"
    assert torch.device(device_name("cuda", cuda=False)).index == 0  # then refused: no CUDA


def test_step_sampler_depends_only_on_step():
    full = iter(StepSampler(1000, 4, 0, rank=0, world=2))
    first = [next(full) for _ in range(4 * 5)]
    resumed = iter(StepSampler(1000, 4, 3, rank=0, world=2))
    assert [next(resumed) for _ in range(8)] == first[12:20]
    other = iter(StepSampler(1000, 4, 0, rank=1, world=2))
    assert set(next(other) for _ in range(4)).isdisjoint(first[:4])


def test_warmup_cosine_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, 10, 100) >= lr_factor(s + 1, 10, 100) for s in range(10, 100))


def test_run_log_resume_drops_later_rows(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        log.log(step, {"loss": 1.0 / step})
    log.log(20 + 10, {"val.mean": 0.5})
    log.close()
    resumed = RunLog(tmp_path, resume_step=20, tensorboard=False)
    assert [r["step"] for r in resumed.rows] == [10, 20]
    resumed.log(30, {"loss": 0.1})
    resumed.close()
    text = (tmp_path / "log.csv").read_text().splitlines()
    assert text[0] == "step,loss" and len(text) == 4
    plot_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert math.isclose(float(text[-1].split(",")[1]), 0.1)


def test_runtime_command_times_a_package_and_writes_only_the_card(tmp_path, capsys):
    """``hlfd-train runtime PKG IMAGE --write``: the median seconds land in the card's
    runtimes; the weights and their checksums stay; a missing image or a folder that is not a
    package is one line, exit 1, nothing written."""
    import json

    from hlfd_train.cli import main as train_cli
    from HLFDSegmentLib.modelpackage import load_package

    from conftest import block_ct, build_package, make_image

    package = build_package(tmp_path / "pkg")
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_image(block_ct()), str(image))
    weights = (package / "model.safetensors").read_bytes()
    assert train_cli(["runtime", str(package), str(image), "--runs", "2"]) == 0
    assert "median of 2" in capsys.readouterr().out
    assert "runtimes" not in json.loads((package / "model.json").read_text())
    assert train_cli(["runtime", str(package), str(image), "--runs", "2", "--write"]) == 0
    runtime = load_package(package).card["runtimes"]  # checksums still hold
    assert len(runtime) == 1 and runtime[0]["seconds"] > 0
    where = f"{tmp_path.name}/ct.nii.gz 36x40x12 voxels of 0.7x0.8x2.5"
    assert runtime[0]["input"].startswith(where)
    assert (package / "model.safetensors").read_bytes() == weights
    capsys.readouterr()
    card = (package / "model.json").read_text()
    for args in ([str(package), str(tmp_path / "none.nii.gz")], [str(tmp_path), str(image)]):
        assert train_cli(["runtime", *args, "--write"]) == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (package / "model.json").read_text() == card


def test_card_command_sets_checked_fields_and_nothing_else(tmp_path, capsys):
    """``hlfd-train card PKG --set``: dotted fields land in the card (YAML values), the
    package still loads; an unknown field, a checksum field or a bad value is one line,
    exit 1, card unchanged."""
    from hlfd_train.cli import main as train_cli
    from HLFDSegmentLib.modelpackage import load_package

    from conftest import build_package

    package = build_package(tmp_path / "pkg")
    args = ["card", str(package), "--set", "postprocessing.cyst_max_hu=20", "version=0.5.1"]
    assert train_cli(args) == 0
    card = load_package(package).card
    assert card["postprocessing"]["cyst_max_hu"] == 20 and card["version"] == "0.5.1"
    assert card["postprocessing"]["min_island_ml"] == 0.1  # the rest of the mapping stays
    capsys.readouterr()
    before = (package / "model.json").read_text()
    bad_sets = ("postprocessing.cyst_max=20", "files.model.safetensors.size=1", "version=[1]")
    for bad in (*bad_sets, "network.in_channels=3", "weights=x.safetensors"):
        assert train_cli(["card", str(package), "--set", bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad.split("=")[0].split(".")[-1] in err[0], err
    assert train_cli(["card", str(tmp_path), "--set", "version=1"]) == 1
    assert (package / "model.json").read_text() == before
