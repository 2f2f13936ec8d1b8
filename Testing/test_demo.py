"""The demo flow end to end, tiny: every output exists and is valid."""

from __future__ import annotations

import json

from hlfd_train.demo import run
from HLFDSegmentLib.modelpackage import load_package


def test_demo_writes_a_loadable_model_and_valid_outputs(tmp_path):
    import slicerio

    metrics = run(tmp_path, cases=2, minutes=0.15, shape=(20, 96, 96))
    package = load_package(tmp_path / "model")
    assert package.card["provenance"]["method"] == "none (supervised)"
    assert package.card["metrics"]["steps"] > 0
    seg = slicerio.read_segmentation(str(tmp_path / "case.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["Kidney", "Kidney tumor"]
    report = json.loads((tmp_path / "case.report.json").read_text())
    assert {s["name"] for s in report["segments"]} == {"Kidney", "Kidney tumor"}
    assert (tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved["labels"]) == {"kidney", "kidney tumour"}
    assert all(0.0 <= m["dice"] <= 1.0 for m in saved["labels"].values())
    assert not (tmp_path / ".untrained").exists()
