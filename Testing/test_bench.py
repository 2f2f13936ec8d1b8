"""The distillation benchmark's whole flow on the smoke preset, and that it resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hlfd_train.bench import (
    PRESETS,
    paired_test,
    run_bench,
    run_one,
    task_config,
    verdict,
    write_phantoms,
)
from hlfd_train.config import ConfigError


@pytest.mark.slow
def test_smoke_benchmark_runs_reports_and_resumes(tmp_path, capsys):
    report = tmp_path / "docs" / "kd.md"
    results = run_bench("smoke", tmp_path / "bench", report)
    task = results["tasks"]["kidney"]
    assert set(task["summary"]) == {"none", "hlfd", "hlfd-pixel-only", "teacher"}
    assert task["summary"]["hlfd"]["Kidney tumor.vs_none"]["n"] == 1  # one case x one seed
    timed = [(e["role"], e["architecture"]) for e in task["efficiency"]]
    assert timed[:2] == [("teacher", "tiny_unet2d"), ("student", "tiny_unet2d")]
    others = {arch for role, arch in timed[2:] if role == "other 2D network, untrained"}
    assert others == {"unetpp2d", "resnet18_unet2d", "mobilenetv2_unet2d"}
    text = report.read_text(encoding="utf-8")
    assert "| hlfd |" in text and "Wilcoxon" in text and "Phantom difficulty" in text
    assert "- Calibration: teacher Kidney tumor Dice" in text and "### Kidney tumor" in text
    assert task["summary"]["hlfd"]["Kidney tumor.vs_none"]["seeds"] == 1
    for png in ("kidney-dice.png", "kidney-curves.png", "kidney-attention.png"):
        assert (report.parent / "kd" / png).stat().st_size > 5000
        assert f"](kd/{png})" in text
    rows = (tmp_path / "bench" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 1 * 2  # teacher + 3 students, one case, two labels
    capsys.readouterr()
    again = run_bench("smoke", tmp_path / "bench", report)
    assert "training" not in capsys.readouterr().out  # finished runs are not redone
    assert json.dumps(again["tasks"]["kidney"]["summary"]) == json.dumps(task["summary"])
    assert (report.parent / "kd" / "results.csv").read_text() == "\n".join(rows) + "\n"

    # a benchmark folder of other settings is refused, not silently reused
    other = dataclasses.replace(PRESETS["smoke"], splits=(3, 1, 1))
    with pytest.raises(ConfigError, match="phantoms of other settings"):
        write_phantoms(tmp_path / "bench", "kidney", other)
    cfg = task_config(tmp_path / "bench", "kidney", PRESETS["smoke"], "teacher")
    cfg["train"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="a run of another configuration"):
        run_one(cfg, "teacher")


def test_paired_test():
    assert paired_test([0.5, 0.6], [0.5, 0.6])["p"] is None
    res = paired_test([0.9, 0.8, 0.85, 0.7, 0.95, 0.9], [0.5, 0.6, 0.55, 0.4, 0.6, 0.5])
    assert res["median_diff"] == pytest.approx(0.325) and res["p"] < 0.05


def _entry(dice, p=None, diff=0.0, better=0):
    return {
        "Kidney tumor.dice": {"mean": dice, "sd": 0.0},
        "Kidney tumor.vs_none": {"p": p, "median_diff": diff, "seeds_better": better, "seeds": 3},
    }


def test_verdict_states_targets_ranking_and_significance():
    summary = {
        "teacher": _entry(0.80),
        "none": _entry(0.70),
        "kd": _entry(0.72, p=0.2, diff=0.02, better=2),
        "hlfd": _entry(0.78, p=0.001, diff=0.08, better=3),
    }
    lines = verdict(
        {"labels": ["Kidney", "Kidney tumor"], "summary": summary}, ["none", "kd", "hlfd"]
    )
    assert "0.800 (meets the 0.75 target)" in lines[0] and "10.0 points below" in lines[0]
    assert lines[1] == "- Ranking by mean Kidney tumor Dice: hlfd 0.780, kd 0.720, none 0.700."
    assert "p < 0.0250" in lines[2] and "hlfd (+0.080)" in lines[2] and "kd" not in lines[2]
    assert "+8.0 points" in lines[3] and "3 of 3 seeds" in lines[3] and "+6.0 points" in lines[3]
    summary["teacher"] = _entry(0.72)
    lines = verdict(
        {"labels": ["Kidney", "Kidney tumor"], "summary": summary}, ["none", "kd", "hlfd"]
    )
    assert "misses the 0.75 target" in lines[0] and "misses the 5-point target" in lines[0]
