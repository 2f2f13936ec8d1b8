"""The demo flow end to end, tiny: every output exists, is valid and says what it measured."""

from __future__ import annotations

import json

import pytest

from hlfd_train.demo import run
from HLFDSegmentLib.modelpackage import load_package

NAMES = {"kidney": ["Kidney", "Kidney tumor"], "liver": ["Liver", "Liver tumor"]}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["kidney", "liver"])
def test_demo_writes_a_loadable_model_and_valid_outputs(tmp_path, task):
    import slicerio

    summary = run(
        tmp_path,
        task=task,
        teacher_minutes=0.01,
        student_minutes=0.01,
        shape=(20, 96, 96),
        splits=(2, 1, 1),
    )
    package = load_package(tmp_path / "model")
    card = package.card
    assert card["provenance"]["method"] == "hlfd"
    assert card["provenance"]["teacher"].endswith("teacher")
    assert card["network"]["architecture"] == "mobilenetv2_unet2d"
    assert card["runtimes"][0]["seconds"] > 0
    seg = slicerio.read_segmentation(str(tmp_path / "case.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == NAMES[task]
    report = json.loads((tmp_path / "case.report.json").read_text())
    assert {s["name"] for s in report["segments"]} == set(NAMES[task])
    for png in ("overlay.png", "attention.png", "runs/demo/hlfd-seed0/curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["held_out"]) == {"teacher", "student (HLFD)", "untrained student"}
    for per_label in saved["held_out"].values():
        organ = NAMES[task][0]
        assert set(per_label) == {*NAMES[task], f"{organ} incl. tumour"}  # composite, as KiTS
        assert all(0.0 <= m["dice"] <= 1.0 for m in per_label.values())
    assert saved["student"]["method"] == "hlfd" and saved["teacher"]["role"] == "teacher"
    assert saved["teacher"]["steps"] >= 1 and saved["student"]["steps"] >= 1
    assert "| student (HLFD) |" in (tmp_path / "metrics.md").read_text(encoding="utf-8")
    assert not (tmp_path / "runs" / "untrained-model").exists()
