"""The panel's model selector: sources and their failures, remembered models, model cards."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from HLFDSegmentLib import model_registry as registry
from HLFDSegmentLib import modelmenu
from HLFDSegmentLib.slicerjob import worker_env

MODULE = Path(__file__).resolve().parents[1] / "HLFDSegment"


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HLFD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HLFD_MODEL_REGISTRY", raising=False)


def _registry(path: Path, **overrides) -> Path:
    item = {
        "id": "kidney-web",
        "title": "Kidney model from the web",
        "task": "kidney",
        "version": "2.0",
        "url": "https://example.org/k.zip",
        "sha256": hashlib.sha256(b"x").hexdigest(),
        "size": 1,
        "license": "CC-BY-4.0",
        "description": "a listed model",
        "runtimes": [
            {"device": "cpu", "seconds": 3.5, "input": "512x512x200", "machine": "laptop"}
        ],
        **overrides,
    }
    path.write_text(json.dumps({"format_version": 1, "models": [item]}), encoding="utf-8")
    return path


def test_first_start_lists_the_built_in_models_and_says_why_the_registry_waits(tmp_path):
    """Slicer without the dependencies (no jsonschema): built-in models first, and one line
    instead of a silently empty registry section."""
    code = (
        "import sys, json\n"
        "for name in ('torch', 'monai', 'safetensors', 'jsonschema'):\n"
        "    sys.modules[name] = None\n"
        "from HLFDSegmentLib import modelmenu\n"
        "found = modelmenu.list_models()\n"
        "print(json.dumps([found.choices, found.problems]))\n"
    )
    env = {**worker_env(), "HLFD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HLFD_MODEL_REGISTRY", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=MODULE, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    choices, problems = json.loads(done.stdout)
    assert [spec for _, spec in choices] == ["kidney", "liver"]
    assert choices[1][0] == "Liver + liver tumor (student, synthetic CT) [liver, built in]"
    assert problems == [
        "Registry models are listed once the dependencies are installed (jsonschema missing)."
    ]


def test_a_broken_registry_is_named_and_the_rest_still_listed(tmp_path, monkeypatch, no_cache):
    bad = tmp_path / "models.json"
    bad.write_text("{not json", encoding="utf-8")
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(bad))
    found = modelmenu.list_models([tmp_path / "gone.zip"])
    assert [spec for _, spec in found.choices] == ["kidney", "liver"]
    assert found.problems[0].startswith(f"Model registry not readable: {bad}: not valid JSON")
    assert found.problems[1] == f"{tmp_path / 'gone.zip'}: no longer there; removed from the list."
    good = _registry(tmp_path / "good.json")
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(good))
    found = modelmenu.list_models()
    assert found.problems == []
    assert found.choices[-1] == (
        "Kidney model from the web [kidney, v2.0] (download)",
        "kidney-web@2.0",
    )


def test_remembered_models_survive_as_settings_values(tmp_path, tiny_package):
    zipped = Path(shutil.make_archive(str(tmp_path / "pkg"), "zip", tiny_package))
    gone = str(tmp_path / "deleted.zip")
    # what QSettings hands back: nothing, one string, or a list
    assert modelmenu.remembered_models(None) == [] and modelmenu.remembered_models("") == []
    assert modelmenu.remembered_models(str(zipped)) == [str(zipped)]
    value = [str(zipped), gone, str(tiny_package), str(zipped)]
    assert modelmenu.remembered_models(value) == [str(zipped), str(tiny_package)]
    again = modelmenu.remember_model([str(zipped), str(tiny_package)], zipped)
    assert again == [str(tiny_package), str(zipped)]
    many = [str(tmp_path / f"m{i}") for i in range(30)]
    assert modelmenu.remember_model(many, "new")[-1] == "new"
    assert len(modelmenu.remember_model(many, "new")) == modelmenu.REMEMBERED_LIMIT
    assert modelmenu.check_model_path(zipped) is None
    assert modelmenu.check_model_path(tiny_package) is None
    assert modelmenu.check_model_path(tmp_path) == f"{tmp_path} holds no model.json."
    assert "no such file" in modelmenu.check_model_path(gone)
    (tmp_path / "notes.txt").write_text("x")
    assert "not a .zip" in modelmenu.check_model_path(tmp_path / "notes.txt")


def test_built_in_card_summary_says_data_accuracy_licence_and_not_for_diagnosis():
    card = modelmenu.read_card("liver")
    text = modelmenu.card_summary(card)
    assert "<b>Liver + liver tumor (student, synthetic CT)</b>" in text
    assert "Task: liver CT segmentation: Liver, Liver tumor" in text
    assert "Training data: synthetic CT only" in text
    dice = card["metrics"]["synthetic_test_dice"]  # the shipped card's own figures
    liver, tumour = dice["Liver"], dice["Liver tumor"]
    accuracy = f"synthetic test Dice: Liver {liver:.2f}, Liver tumor {tumour:.2f}"
    assert f"Measured accuracy: {accuracy}" in text
    # 0.6.3: 0.6.1 and a fine-tune of it, averaged 1:3
    weighted = "the weighted mean (0.25, 0.75) of the weights of 2 fine-tuned students"
    assert f"Training: {weighted} (model soup)" in text
    assert "none distillation" not in text
    tuned = {**card, "provenance": {"method": "none", "init": {"name": "m", "version": "1.0"}}}
    assert "Training: fine-tuned from m 1.0, the task loss alone" in modelmenu.card_summary(tuned)
    assert "fatty liver test Dice: Liver" in text
    seconds = card["runtimes"][0]["seconds"]
    assert f"Measured time: {seconds:.2f} s on cpu" in text
    assert "Licence: Apache-2.0" in text
    assert text.endswith("<b>Research use only; not for diagnosis.</b>")
    assert "not for diagnosis" in modelmenu.card_summary(None)
    assert "Input:" not in text  # one slice at a time


def test_built_in_kidney_card_summary_says_it_reads_three_slices_and_keeps_cysts():
    text = modelmenu.card_summary(modelmenu.read_card("kidney"))
    assert (
        "Input: each axial slice with 1 neighbouring slice(s) on each side (3 slices, 2.5D)" in text
    )
    assert "Training: fine-tuned from synth-kidney-student 0.5.1, the task loss alone" in text
    assert "also learnt, counted as background: spleen; liver" in text  # 0.6.0's extra classes
    assert "Cyst rule: a lesion whose median is at most 20 HU" in text
    liver = modelmenu.read_card("liver")  # 0.6.3 has the rule too; a card without it says nothing
    assert "Cyst rule: a lesion whose median is at most 20 HU" in modelmenu.card_summary(liver)
    ruleless = {**liver, "postprocessing": {"enabled": True, "min_island_ml": 0.1}}
    assert "Cyst rule" not in modelmenu.card_summary(ruleless)


def test_cards_of_a_zip_a_folder_and_a_registry_listing(tmp_path, monkeypatch, tiny_package):
    zipped = Path(shutil.make_archive(str(tmp_path / "pkg"), "zip", tiny_package))
    assert modelmenu.read_card(zipped)["name"] == "test-model"
    assert modelmenu.read_card(tiny_package)["name"] == "test-model"
    assert modelmenu.read_card(tmp_path / "absent.zip") is None
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not a zip")
    assert modelmenu.read_card(tmp_path / "broken.zip") is None
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(_registry(tmp_path / "models.json")))
    listing = modelmenu.read_card("kidney-web@2.0")
    text = modelmenu.card_summary(listing)
    assert "Kidney model from the web" in text and "Licence: CC-BY-4.0" in text
    assert "Measured accuracy: not reported" in text and "a listed model" in text
    assert modelmenu.read_card("unknown-id") is None


def test_metric_lines_round_and_skip_bookkeeping():
    metrics = {"validation_dice": {"val.Kidney": 0.8745, "step": 3, "val.mean": 0.5}, "hd95": 4}
    assert modelmenu.metric_lines(metrics) == ["validation Dice: Kidney 0.87", "hd95: 4"]
    assert registry.builtin_models()  # the shipped students are there to describe
