"""The distillation benchmark: its flow on the smoke preset (and that it resumes), the GPU
preset's flow at toy size, its statistics and its presets."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from hlfd_train.bench import (
    METHODS,
    PRESETS,
    PRIMARY,
    Tuning,
    bootstrap_ci,
    grid,
    holm,
    paired_test,
    run_bench,
    run_one,
    summarise_task,
    task_config,
    toy,
    verdict,
    write_data,
)
from hlfd_train.bench.presets import DIFFICULTY, TOY_ABLATIONS, difficulty
from hlfd_train.config import ConfigError


@pytest.mark.slow
def test_smoke_benchmark_runs_reports_and_resumes(tmp_path, capsys):
    import torch

    from hlfd_train.bench.pool import cores

    report = tmp_path / "docs" / "kd.md"
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cores() // 2))  # as each process of the pool of two below
    try:
        results = run_bench("smoke", tmp_path / "bench", report, workers=1)  # in this process
    finally:
        torch.set_num_threads(before)
    task = results["tasks"]["kidney"]
    assert set(task["summary"]) == {"none", "hlfd", "hlfd-pixel-only", "teacher"}
    hlfd = task["summary"]["hlfd"]["Kidney tumor"]["vs_none"]
    assert hlfd["n"] == 2 and hlfd["seeds"] == 2 and len(hlfd["ci95"]) == 2  # 2 cases x 2 seeds
    assert "p_holm" in hlfd and "Kidney incl. tumour" in task["summary"]["none"]
    assert [g["point"] for g in task["tuning"]["hlfd"]["grid"]] == ["default", "flfd1.8-plfd0.2"]
    timed = [(e["role"], e["architecture"]) for e in task["efficiency"]]
    assert timed == [("teacher", "tiny_unet2d"), ("student", "tiny_unet2d")]  # no others
    text = report.read_text(encoding="utf-8")
    assert text.index("Pre-declared primary comparison") < text.index("| hlfd |")
    assert "- Primary comparison (hlfd - none, Kidney tumor Dice)" in text
    assert "Tuning (validation split" in text and "Why tumour HD95 is large" in text
    for png in ("kidney-dice.png", "kidney-curves.png", "kidney-attention.png"):
        assert (report.parent / "kd" / png).stat().st_size > 5000
        assert f"](kd/{png})" in text
    # seed 0 of a tuned method is its chosen grid point's run (the tuning seed): trained once
    runs = tmp_path / "bench" / "runs" / "kidney"
    run = runs / f"tune-hlfd-{task['tuning']['hlfd']['chosen']['point']}"
    assert not (runs / "hlfd-seed0").exists() and (runs / "none-seed0").is_dir()
    assert (run / "bench-eval.json").is_file() and (run / "bench-eval-val.json").is_file()
    assert (run / "log.csv").is_file() and not (run / "curves.png").exists()  # report plots it
    rows = (tmp_path / "bench" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + (1 + 3 * 2) * 2 * 3  # (teacher + 3 x 2 seeds) x 2 cases x 3 labels
    # interrupted: two runs lost; resuming redoes those two only, on a pool of two processes
    # (the default: one per two cores, at least two), to the same weights and figures
    for run in ("none-seed1", "hlfd-seed1"):
        shutil.rmtree(tmp_path / "bench" / "runs" / "kidney" / run)
    capsys.readouterr()
    again = run_bench("smoke", tmp_path / "bench", report)
    out = capsys.readouterr().out
    assert out.count("training ") == 1 and "training 2 run(s) on 2 process(es)" in out, out
    assert json.dumps(again["tasks"]["kidney"]["summary"]) == json.dumps(task["summary"])

    # a benchmark folder of other settings is refused, not silently reused
    other = dataclasses.replace(PRESETS["smoke"], splits=(3, 1, 2))
    with pytest.raises(ConfigError, match="data of other settings"):
        write_data(tmp_path / "bench", "kidney", other)
    cfg = task_config(tmp_path / "bench", "kidney", PRESETS["smoke"], "teacher")
    cfg["train"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="a run of another configuration"):
        run_one(cfg, "teacher")


@pytest.mark.slow
def test_gpu_preset_flow_at_toy_size_on_the_cpu(tmp_path):
    results = run_bench("gpu", tmp_path / "bench", tmp_path / "gpu.md", toy_size=True)
    assert set(results["tasks"]) == {"kidney", "liver"}
    kidney = results["tasks"]["kidney"]
    assert set(METHODS) <= set(kidney["summary"]) and "fitnet-joint" in kidney["summary"]
    assert set(kidney["tuning"]) == set(METHODS) - {"none"}
    others = {e["architecture"] for e in kidney["efficiency"][2:]}  # timed in the first task
    liver = results["tasks"]["liver"]
    assert "unetpp2d" in others and len(liver["efficiency"]) == 2
    assert set(liver["summary"]) == {"teacher", *PRIMARY} and set(liver["tuning"]) == {"hlfd"}


def test_synth_preset_writes_the_engines_ct_and_says_so(tmp_path):
    """``data="synth"`` benchmarks on the synthesis engine's CT (toy-sized here): a KiTS19
    folder of engine cases, the engine's settings in the record, and a report title saying so."""
    import SimpleITK as sitk

    from hlfd_train.bench.report import markdown

    preset = toy(PRESETS["synth-gpu"])
    root = write_data(tmp_path, "kidney", preset)
    cases = sorted(root.glob("case_*"))
    assert len(cases) == sum(preset.splits) == 3
    image = sitk.ReadImage(str(cases[0] / "imaging.nii.gz"))
    assert image.GetSize()[:2] == (64, 64) and image.GetSpacing()[0] == 5.0
    record = difficulty("kidney", preset)
    assert record["generator"] == "hlfd_train.synth" and record["tumour_free"] == 0.15
    assert json.loads((root / ".complete").read_text())["difficulty"] == record
    results = {
        "preset": "synth-gpu (toy size)",
        "settings": dataclasses.asdict(preset),
        "code_version": "x",
        "machine": "m",
        "workers": "1",
        "seconds_total": 1.0,
        "tasks": {},
    }
    assert markdown(results, tmp_path, "f").startswith(
        "# Distillation benchmark on synthetic CT (`hlfd_train.synth`)"
    )


def test_presets_are_sized_as_promised():
    cpu, gpu = PRESETS["cpu"], PRESETS["gpu"]
    assert cpu.tasks == ("kidney",) and len(cpu.seeds) == 5 and cpu.minutes <= 100
    assert set(cpu.methods) == {"none", "hlfd", "at", "kd", "fitnet"}
    assert gpu.methods == METHODS and gpu.tasks == ("kidney", "liver") and len(gpu.seeds) == 5
    assert gpu.workers > 1 and "device=cuda" in gpu.overrides
    small = toy(gpu)
    assert small.methods == gpu.methods and small.tasks == gpu.tasks and small.student_steps < 5
    assert set(small.ablations) == set(TOY_ABLATIONS) < set(gpu.ablations)
    assert small.methods_of("liver") == ("none", "hlfd") and gpu.methods_of("liver") == METHODS
    assert "device=cpu" in small.overrides


def test_primary_seeds_add_runs_of_the_primary_pair_only(tmp_path):
    from hlfd_train.bench.report import markdown

    cpu = PRESETS["cpu"]
    runs = cpu.student_runs("kidney")
    assert len(runs) == len(set(runs)) == 5 * 5 + 25 * 2
    assert {n for s, n in runs if s in cpu.seeds} == set(cpu.methods)
    assert {n for s, n in runs if s in cpu.primary_seeds} == {"hlfd", "none"}
    gpu = PRESETS["gpu"]  # ablations on the first task only, no extra seeds
    assert len(gpu.student_runs("liver")) == 5 * len(METHODS)
    assert len(gpu.student_runs("kidney")) == 5 * (len(METHODS) + len(gpu.ablations))
    assert toy(cpu).primary_seeds == (5,)
    results = {
        "preset": "cpu",
        "settings": dataclasses.asdict(cpu),
        "code_version": "x",
        "machine": "m",
        "workers": "2",
        "seconds_total": 1.0,
        "tasks": {},
    }
    text = markdown(results, tmp_path, "f")
    assert "Seeds: 5 for every method; 30 for the two runs of the primary comparison" in text


def test_every_method_gets_the_same_tuning_grid():
    tuning = Tuning(scales=(0.5, 1.0, 2.0), temperatures=(1.0, 4.0))
    kd = grid("kd", tuning)
    assert [(g["weight"], g["temperature"]) for g in kd] == [
        (w, t) for w in (0.05, 0.1, 0.2) for t in (1.0, 4.0)
    ]
    hlfd = grid("hlfd", tuning)
    assert {(g["flfd_weight"], g["plfd_weight"]) for g in hlfd} == {
        (0.45, 0.05),
        (0.9, 0.1),
        (1.8, 0.2),
    }
    assert all("unified_weight" not in g for g in hlfd)  # the branch split is not tuned
    at = grid("at", tuning)  # no temperature: the weight axis only
    assert [g["weight"] for g in at] == [0.5, 1.0, 2.0]
    assert grid("at-p2-e1e5", tuning)[0]["p"] == 2.0  # an ablation keeps its options


def _report(values: dict[str, list[float | None]]) -> dict:
    return {
        "cases": [
            {"case": c, "labels": {"T": {"dice": v, "voxels_ref": 1, "voxels_pred": 1}}}
            for c, v in values.items()
        ]
    }


def test_seeds_are_averaged_per_case_before_the_paired_test():
    # 6 cases x 3 seeds; the method beats none on every case by 0.1 on average
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.6, 6)
    none = {s: _report({f"c{i}": base[i] for i in range(6)}) for s in range(3)}
    noise = [0.05, -0.05, 0.1]  # per seed, so no single (case, seed) pair decides
    method = {s: _report({f"c{i}": base[i] + 0.1 + noise[s] for i in range(6)}) for s in range(3)}
    method[0]["cases"].append(
        {"case": "free", "labels": {"T": {"dice": None, "voxels_ref": 0, "voxels_pred": 0}}}
    )
    none[0]["cases"].append(
        {"case": "free", "labels": {"T": {"dice": None, "voxels_ref": 0, "voxels_pred": 0}}}
    )
    out = summarise_task({"none": none, "m": method}, ["T"], ["m"])
    test = out["m"]["T"]["vs_none"]
    assert test["n"] == 6  # six cases (not 18 case x seed pairs; the tumour-free case left out)
    assert test["mean_diff"] == pytest.approx(0.1 + np.mean(noise))
    lo, hi = test["ci95"]
    assert 0 < lo < test["mean_diff"] < hi
    assert test["p"] == pytest.approx(paired_test([1] * 6, [0] * 6)["p"])
    assert test["p_holm"] == test["p"]  # one comparison in the family


def test_bootstrap_ci_covers_seed_spread():
    diff = np.array([[0.1, -0.1]] * 10)  # every case: +0.1 in one seed, -0.1 in the other
    lo, hi = bootstrap_ci(diff)
    assert lo < 0 < hi and lo == pytest.approx(-0.1) and hi == pytest.approx(0.1)
    assert bootstrap_ci(np.full((5, 3), 0.2)) == pytest.approx((0.2, 0.2))


def test_bootstrap_ci_is_the_replicate_loop():
    """The vectorised CI is the plain loop over replicates (the draws in the same order)."""

    def loop(diff, n):
        rng = np.random.default_rng(0)
        c, s = diff.shape
        stats = np.empty(n)
        for b in range(n):
            cells = diff[rng.integers(0, c, c)][:, rng.integers(0, s, s)]
            stats[b] = np.nanmean(cells) if np.isfinite(cells).any() else np.nan
        return tuple(np.nanpercentile(stats, [2.5, 97.5]))

    rng = np.random.default_rng(1)
    diff = rng.normal(size=(7, 3))
    diff[rng.random(diff.shape) < 0.4] = np.nan  # undefined cells, some replicates all NaN
    diff[0, 0] = 0.3
    assert bootstrap_ci(diff, n=300) == pytest.approx(loop(diff, 300), rel=0, abs=1e-12)


def test_holm_step_down():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adjusted == {
        "a": pytest.approx(0.03),
        "b": pytest.approx(0.06),
        "c": pytest.approx(0.06),
        "d": None,
    }


def test_paired_test():
    assert paired_test([0.5, 0.6], [0.5, 0.6])["p"] is None
    res = paired_test([0.9, 0.8, 0.85, 0.7, 0.95, 0.9], [0.5, 0.6, 0.55, 0.4, 0.6, 0.5])
    assert res["median_diff"] == pytest.approx(0.325) and res["p"] < 0.05


def _entry(dice, p=None, diff=0.0, better=0, ci=(0.0, 0.0)):
    return {
        "Kidney tumor": {
            "dice": {"mean": dice, "sd": 0.0},
            "vs_none": {
                "p": p,
                "p_holm": p,
                "mean_diff": diff,
                "ci95": list(ci),
                "seeds_better": better,
                "seeds": 3,
            },
        }
    }


def test_verdict_states_targets_primary_ranking_and_significance():
    summary = {
        "teacher": _entry(0.80),
        "none": _entry(0.70),
        "kd": _entry(0.72, p=0.2, diff=0.02, better=2),
        "hlfd": _entry(0.78, p=0.001, diff=0.08, better=3, ci=(0.05, 0.11)),
    }
    result = {"labels": ["Kidney", "Kidney tumor"], "summary": summary}
    lines = verdict(result, ["none", "kd", "hlfd"])
    assert "0.800 (meets the 0.75 target)" in lines[0] and "10.0 points below" in lines[0]
    assert "+8.0 points, 95% CI [+5.0, +11.0] (width 6.0; target <= 4)" in lines[1]
    assert "the CI excludes 0: hlfd is better than none" in lines[1]
    summary["hlfd"] = _entry(0.66, p=0.001, diff=-0.04, ci=(-0.06, -0.01))
    assert "the CI excludes 0: hlfd is worse than none" in verdict(result, ["none", "hlfd"])[1]
    assert lines[2] == "- Ranking by mean Kidney tumor Dice: hlfd 0.780, kd 0.720, none 0.700."
    assert "Holm" in lines[3] and "hlfd (+8.0 points)" in lines[3] and "kd" not in lines[3]
    assert "+6.0 points" in lines[4] and "does beat it" in lines[4]
    summary["hlfd"] = _entry(0.71, p=0.5, diff=0.01, ci=(-0.02, 0.04))
    lines = verdict(result, ["none", "kd", "hlfd"])
    assert "the CI includes 0" in lines[1] and "does not beat it" in lines[4]


@pytest.mark.slow
def test_benchmark_phantoms_bear_tumours_inside_the_field_of_view():
    from HLFDSegmentLib.phantom import case_seed, make_phantom

    shape = PRESETS["full"].shape
    for task in ("kidney", "liver"):
        cfg = dataclasses.replace(DIFFICULTY[task], shape=shape)
        for i in range(16):  # liver case 8 had its tumour outside the field of view
            labels = make_phantom(cfg, seed=case_seed(1000, i)).labels
            assert (labels == 2).sum() > 500, (task, i)
