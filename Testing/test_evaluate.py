"""Evaluation metrics: tumour-free cases, missed labels, lesion detection, composite organ Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hlfd_train.evaluate import (
    image_diagonal_mm,
    label_metrics,
    lesion_detection,
    markdown_table,
    mean_sd,
    score_labels,
    summarise,
)

LABELS = [
    {"value": 0, "name": "background"},
    {"value": 1, "name": "Kidney"},
    {"value": 2, "name": "Kidney tumor"},
]
SPACING = (3.0, 2.0, 2.0)  # z, y, x mm


def _case(tumour: bool) -> np.ndarray:
    ref = np.zeros((20, 60, 60), np.uint8)
    ref[5:15, 10:30, 10:30] = 1
    if tumour:
        ref[8:12, 14:20, 14:20] = 2
    return ref


def test_tumour_dice_only_over_tumour_bearing_cases_fp_volume_on_the_others():
    bearing, free = _case(True), _case(False)
    pred_free = free.copy()
    pred_free[6:8, 40:45, 40:45] = 2  # 50 voxels of 12 mm^3: 0.6 mL of false tumour
    rows = [
        score_labels(bearing, bearing, SPACING, LABELS),  # perfect
        score_labels(pred_free, free, SPACING, LABELS),
    ]
    tumour = rows[1]["labels"]["Kidney tumor"]
    assert tumour["dice"] is None and tumour["hd95"] is None
    assert tumour["fp_ml"] == pytest.approx(0.6)
    s = summarise(rows)["Kidney tumor"]
    assert s["dice"] == {"mean": 1.0, "std": None, "n": 1}  # not dragged to 0.5 by the free case
    assert s["fp_ml"]["mean"] == pytest.approx(0.6) and s["fp_ml"]["n"] == 1
    assert rows[0]["labels"]["Kidney tumor"]["fp_ml"] is None  # tumour-bearing: scored instead


def test_missed_label_gets_the_diagonal_and_empty_pairs_no_credit():
    ref = _case(True)
    pred = np.where(ref == 2, 1, ref)  # the tumour called kidney: missed
    row = score_labels(pred, ref, SPACING, LABELS)
    diag = image_diagonal_mm(ref.shape, SPACING)
    assert diag == pytest.approx((60**2 + 120**2 + 120**2) ** 0.5)
    t = row["labels"]["Kidney tumor"]
    assert t["missed"] and t["dice"] == 0.0 and t["hd95"] == t["assd"] == pytest.approx(diag)
    assert summarise([row])["Kidney tumor"]["hd95"]["mean"] == pytest.approx(diag)
    empty = np.zeros_like(ref, bool)
    assert label_metrics(empty, empty, SPACING)["hd95"] is None  # not 0 mm of credit


def test_lesion_wise_detection_counts_components():
    ref = np.zeros((10, 40, 40), bool)
    ref[2:5, 2:8, 2:8] = True  # lesion A: found
    ref[2:5, 20:26, 20:26] = True  # lesion B: missed
    pred = np.zeros_like(ref)
    pred[3:5, 3:6, 3:6] = True  # overlaps A
    pred[7:9, 30:35, 30:35] = True  # a stray blob: false positive
    assert lesion_detection(pred, ref) == {"tp": 1, "fn": 1, "fp": 1}
    row = score_labels(np.where(pred, 2, 0), np.where(ref, 2, 0), SPACING, LABELS)
    assert row["lesions"] == {"tp": 1, "fn": 1, "fp": 1}
    assert summarise([row, row])["lesions"] == {"tp": 2, "fn": 2, "fp": 2}


def test_composite_organ_dice_beside_organ_without_tumour():
    ref = _case(True)
    pred = ref.copy()
    pred[ref == 2] = 1  # the right kidney outline, the tumour called kidney
    row = score_labels(pred, ref, SPACING, LABELS)
    assert row["labels"]["Kidney incl. tumour"]["dice"] == 1.0  # KiTS/LiTS "kidney"
    assert row["labels"]["Kidney"]["dice"] < 0.99  # organ without its tumour
    text = markdown_table(
        {"model": "m", "cases": [row], "protocol_description": "full", "summary": summarise([row])}
    )
    assert "| Kidney incl. tumour | 1.000 |" in text and "0 detected, 1 missed" in text


def test_a_few_percent_stray_volume_far_away_sets_hd95():
    """Why kidney-tumour HD95 is ~100 mm for every model: a perfect tumour mask plus a small
    false positive in the other kidney. HD95 takes the 95th percentile of the surface
    distances of *both* surfaces, so a stray blob with over 5% of the surface points moves it
    to the blob's distance."""
    ref = np.zeros((40, 100, 100), bool)
    ref[15:25, 20:40, 20:40] = True  # the tumour: 4,000 voxels
    pred = ref.copy()
    pred[18:21, 80:85, 80:87] = True  # 105 voxels (2.6% of the volume) ~ 120 mm away
    m = label_metrics(pred, ref, (2.0, 2.0, 2.0))
    assert m["dice"] > 0.98 and m["hd95"] > 100.0


def test_mean_sd_is_the_sample_sd():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_sd([4.0]) == (4.0, None) and mean_sd([]) == (None, None)


def test_calibration_picks_the_best_tumour_dice_within_the_false_tumour_limit():
    from hlfd_train.calibrate import choose, why_chosen

    rows = [
        {"offset": -4.0, "tumour_dice": 0.50, "fp_ml_cases": [1.0, 0.0]},
        {"offset": -2.0, "tumour_dice": 0.70, "fp_ml_cases": [4.0, 1.0]},
        {"offset": -1.0, "tumour_dice": 0.70, "fp_ml_cases": [4.5, 2.0]},  # tie: smaller shift
        {"offset": 0.0, "tumour_dice": 0.72, "fp_ml_cases": [20.0, 3.0]},
    ]
    assert choose(rows, 5.0)["offset"] == -1.0
    assert choose(rows, 0.5)["offset"] == -4.0  # none within the limit: the least worst case
    assert why_chosen(choose(rows, 0.5), 0.5).startswith("no point keeps every tumour-free")
    assert "the least worst, 1.0 mL" in why_chosen(choose(rows, 0.5), 0.5)
    assert why_chosen(choose(rows, 5.0), 5.0).startswith("best tumour Dice with at most 5 mL")
    assert choose(rows, 50.0)["offset"] == 0.0
    no_free = [{**r, "fp_ml_cases": []} for r in rows]  # no tumour-free case: Dice decides
    assert choose(no_free, 0.0)["offset"] == 0.0


def test_calibration_keeps_the_limit_on_every_tumour_free_case_not_on_their_mean():
    """One healthy CT with 9.6 mL of false tumour breaks a 5 mL promise even though the mean
    over three healthy CTs is 3.2 mL (the kidney student's -2 offset on its calibration set)."""
    from hlfd_train.calibrate import choose

    rows = [
        {"offset": -3.0, "tumour_dice": 0.280, "fp_ml_cases": [4.2, 0.0, 0.0]},
        {"offset": -2.0, "tumour_dice": 0.293, "fp_ml_cases": [9.6, 0.0, 0.0]},
    ]
    assert choose(rows, 5.0)["offset"] == -3.0


def test_calibration_with_seeds_prefers_no_seed_rule_on_a_tie():
    """A seed rule that keeps the tumour Dice and removes the false tumour wins; where it
    changes nothing, the plain threshold is kept (the simpler card)."""
    from hlfd_train.calibrate import choose

    rows = [
        {"offset": -3.0, "seed_offset": None, "tumour_dice": 0.20, "fp_ml_cases": [23.8, 0.0]},
        {"offset": -3.0, "seed_offset": -8.0, "tumour_dice": 0.20, "fp_ml_cases": [3.0, 0.0]},
        {"offset": -3.0, "seed_offset": -9.0, "tumour_dice": 0.20, "fp_ml_cases": [0.0, 0.0]},
        {"offset": -6.0, "seed_offset": None, "tumour_dice": 0.10, "fp_ml_cases": [0.0, 0.0]},
    ]
    assert choose(rows, 5.0)["seed_offset"] == -8.0  # the least strict seed within the limit
    assert choose(rows, 50.0)["seed_offset"] is None  # all tie on Dice: no seed rule


@pytest.mark.slow
def test_calibrate_sweeps_through_the_runtime_and_writes_the_card(tmp_path):
    """The built-in kidney student on two small phantoms (one tumour-free): -20 removes every
    tumour voxel; the chosen offsets land in a card that loads and drives the pipeline."""
    import shutil

    import SimpleITK as sitk

    from hlfd_train.calibrate import choose, sweep, write_offsets
    from hlfd_train.evaluate import EvalCase
    from HLFDSegmentLib.model_registry import builtin_models
    from HLFDSegmentLib.modelpackage import load_package
    from HLFDSegmentLib.phantom import PhantomConfig, make_phantom
    from HLFDSegmentLib.pipeline import Segmenter

    cases = []
    for i, tumours in enumerate([(1, 1), (0, 0)]):
        cfg = PhantomConfig(shape=(16, 128, 128), spacing=(2.5, 2.5, 5.0), tumours=tumours)
        image, labels = make_phantom(cfg, seed=i).to_sitk()
        paths = tmp_path / f"ct{i}.nii.gz", tmp_path / f"seg{i}.nii.gz"
        sitk.WriteImage(image, str(paths[0]))
        sitk.WriteImage(labels, str(paths[1]))
        cases.append(EvalCase(f"case{i}", *paths))
    folder = Path(shutil.copytree(builtin_models()["kidney"], tmp_path / "kidney"))
    package = load_package(folder)
    rows = sweep(
        package, cases, np.arange(256), offsets=(-20.0, 0.0), device="cpu", seed_offsets=[-20.0]
    )
    assert [(r["offset"], r["seed_offset"]) for r in rows] == [
        (-20.0, None),
        (0.0, None),
        (0.0, -20.0),  # a seed must be stricter than the offset: none for -20
    ]
    assert rows[2]["tumour_dice"] == 0.0  # no voxel is tumour at -20: every lesion unseeded
    rows = rows[:2]
    assert rows[0]["tumour_dice"] == 0.0 and rows[0]["fp_ml"] == 0.0
    assert rows[0]["fp_ml_cases"] == [0.0]
    assert rows[0]["tumour_cases"] == 1 and rows[0]["tumour_free_cases"] == 1
    assert rows[1]["tumour_dice"] > 0.0  # the phantom's tumour is found without a shift
    chosen = choose(rows, max_fp_ml=0.0)
    card = write_offsets(package, chosen, 0.0, "two phantoms")
    assert card["inference"]["logit_offsets"] == [0.0, 0.0, chosen["offset"]]
    assert card["metrics"]["calibration"]["tumour logit offset"] == chosen["offset"]
    reloaded = load_package(folder)  # the card still validates and the checksums hold
    offsets = Segmenter(reloaded, device="cpu").logit_offsets
    assert offsets is not None and offsets.tolist() == [0.0, 0.0, chosen["offset"]]


def test_organ_crop_cuts_image_and_reference_alike_around_the_labels():
    """A 60 mm square around the labels' centroid, clipped at the image edge; the physical
    position of every kept voxel is unchanged; an unlabelled reference keeps all of it."""
    import SimpleITK as sitk

    from hlfd_train.evaluate import organ_crop

    ref = np.zeros((20, 60, 60), np.uint8)
    ref[5:15, 40:58, 44:60] = 1  # near the (y, x) corner: the square is clipped there
    image = sitk.GetImageFromArray(np.arange(ref.size, dtype=np.int16).reshape(ref.shape))
    image.SetSpacing((2.0, 2.0, 3.0))  # x, y, z
    cut_image, cut = organ_crop(image, ref, 60.0)
    assert cut == (slice(None), slice(33, 60), slice(36, 60))  # 15 voxels either side, clipped
    assert cut_image.GetSize() == (24, 27, 20)
    assert np.array_equal(sitk.GetArrayFromImage(cut_image), sitk.GetArrayFromImage(image)[cut])
    assert cut_image.TransformIndexToPhysicalPoint((0, 0, 0)) == (72.0, 66.0, 0.0)
    assert ref[cut].sum() == ref.sum()
    whole, everything = organ_crop(image, np.zeros_like(ref), 60.0)
    assert whole.GetSize() == image.GetSize() and everything == (slice(None),) * 3


def test_evaluate_refuses_a_crop_size_that_is_not_a_positive_number(capsys):
    from hlfd_train.cli import main as train_cli

    for bad in ("0", "-5", "nan", "wide"):
        with pytest.raises(SystemExit) as exit_:
            train_cli(["evaluate", "model", "--crop-mm", bad])
        assert exit_.value.code == 2
        assert f"expected a size in mm > 0, got {bad!r}" in capsys.readouterr().err
