"""The built-in students: shipped in the extension, listed without extra packages, usable
offline by id, honest cards (synthetic CT only, not for diagnosis), small."""

from __future__ import annotations

import json

import pytest

from hlfd_train.synth import SynthConfig, synth_case
from HLFDSegmentLib import slicerjob
from HLFDSegmentLib.cli import main
from HLFDSegmentLib.io import write_image
from HLFDSegmentLib.model_registry import BUILTIN_DIR, builtin_models, resolve_model
from HLFDSegmentLib.modelpackage import load_package

TASKS = {"liver": ["Liver", "Liver tumor"], "kidney": ["Kidney", "Kidney tumor"]}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_built_in_package_is_small_checked_and_honest(task):
    folder = builtin_models()[task]
    assert folder == BUILTIN_DIR / task and resolve_model(task) == folder
    package = load_package(folder)  # validates the card and every file's sha256
    card = package.card
    assert card["task"] == task and [lab["name"] for lab in card["labels"]] == TASKS[task]
    assert (folder / card["weights"]).stat().st_size < 5 * 2**20
    assert "synthetic CT only" in card["description"] and "not for diagnosis" in card["description"]
    assert "no patient data" in card["provenance"]["data"]
    text = json.dumps(card)
    assert "/root" not in text and "/work" not in text and "/tmp" not in text
    assert card["network"]["architecture"] == "mobilenetv2_unet2d"
    package.build_network()  # float16 weights load into the float32 network
    # the Slicer panel's time estimate: measured on a CT of a scanner's 512 x 512 matrix
    assert card["runtimes"][0]["seconds"] > 0 and " 512x512x" in card["runtimes"][0]["input"]


def test_slicer_selector_lists_both_without_extra_packages():
    choices = slicerjob.model_choices([], [], [], builtin_models())
    specs = [spec for _, spec in choices]
    assert specs[:2] == ["kidney", "liver"]
    assert any("Liver + liver tumor" in title for title, _ in choices)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_segment_a_synthetic_ct_by_id(task, tmp_path):
    """Each shipped model by its id through the CLI (the kidney one is fed three slices): a
    loadable .seg.nrrd with the card's segments, and the organ found on a new synthetic case."""
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    case = synth_case(SynthConfig(task=task, inplane_mm=(2.0, 2.0), max_slices=24), 5)
    image, reference = case.to_sitk()
    ct = tmp_path / "ct.nii.gz"
    write_image(image, ct)
    out = tmp_path / "ct.seg.nrrd"
    assert main([str(ct), "-o", str(out), "-m", task, "--offline", "--quiet"]) == 0
    assert [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]] == TASKS[task]
    labels = tmp_path / "labels.nii.gz"
    assert main([str(ct), "-o", str(labels), "-m", task, "--offline", "--quiet"]) == 0
    got, want = (sitk.GetArrayFromImage(im) > 0 for im in (sitk.ReadImage(labels), reference))
    dice = 2 * np.logical_and(got, want).sum() / (got.sum() + want.sum())
    assert dice > 0.8, f"{task}: organ incl. tumour Dice {dice:.3f}"
