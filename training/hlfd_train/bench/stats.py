"""Statistics of the benchmark: seeds averaged per case, paired tests over cases, bootstrap
confidence intervals over cases and seeds, Holm's correction.

Spreads are sample standard deviations (``evaluate.mean_sd``, ddof 1), as in ``evaluate.py``.
Metric values that are undefined for a case (``None``: e.g. tumour Dice on a tumour-free case)
are left out; a missed label is not undefined (Dice 0, HD95 = image diagonal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..evaluate import mean_sd
from .presets import BOOTSTRAP_REPLICATES, PRIMARY

Reports = Mapping[int, Mapping[str, Any]]  # seed -> evaluation report


def case_seed_matrix(per_seed: Reports, label: str, metric: str) -> tuple[list[str], np.ndarray]:
    """(case ids, values of shape (cases, seeds)) with NaN where undefined."""
    seeds = sorted(per_seed)
    cases = [r["case"] for r in per_seed[seeds[0]]["cases"]]
    m = np.full((len(cases), len(seeds)), np.nan)
    for j, s in enumerate(seeds):
        by_case = {r["case"]: r["labels"][label].get(metric) for r in per_seed[s]["cases"]}
        for i, c in enumerate(cases):
            v = by_case.get(c)
            m[i, j] = np.nan if v is None else float(v)
    return cases, m


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank test of ``a - b`` (two-sided); ``p`` is None when all pairs tie."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, float) - np.asarray(b, float)
    out: dict[str, Any] = {
        "n": int(diff.size),
        "median_diff": float(np.median(diff)) if diff.size else 0.0,
    }
    if diff.size == 0 or np.allclose(diff, 0):
        out["p"] = None
    else:
        out["p"] = float(wilcoxon(diff, zero_method="wilcox").pvalue)
    return out


def bootstrap_ci(
    diff: np.ndarray, n: int = BOOTSTRAP_REPLICATES, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of the mean of ``diff`` (cases x seeds), resampling cases and seeds.

    Each replicate draws cases with replacement and, independently, seeds with replacement
    (both methods keep the same case and seed: the pairing is preserved) and takes the mean
    over the drawn cells that are defined.
    """
    rng = np.random.default_rng(seed)
    c, s = diff.shape
    rows, cols = np.empty((n, c), np.intp), np.empty((n, s), np.intp)
    for b in range(n):  # one replicate at a time (cases, then seeds): the CIs reported so far
        rows[b], cols[b] = rng.integers(0, c, c), rng.integers(0, s, s)
    # every replicate's mean over its defined cells at once (np.nanmean of each, up to rounding)
    cells = diff[rows[:, :, None], cols[:, None, :]].reshape(n, c * s)
    defined = np.isfinite(cells)
    count = defined.sum(1)
    total = np.where(defined, cells, 0.0).sum(1)
    stats = np.full(n, np.nan)
    np.divide(total, count, out=stats, where=count > 0)
    lo, hi = np.nanpercentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); ``None`` stays ``None``."""
    named = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    out: dict[str, float | None] = dict.fromkeys(pvalues)
    running, m = 0.0, len(named)
    for i, (p, k) in enumerate(named):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def label_entry(per_seed: Reports, label: str) -> dict[str, Any]:
    """Mean ± sd over seeds of the per-seed case means, and event counts over case x seed."""
    entry: dict[str, Any] = {}
    for metric in ("dice", "hd95", "rvd", "fp_ml"):
        _, m = case_seed_matrix(per_seed, label, metric)
        seed_means = [float(np.nanmean(col)) for col in m.T if np.isfinite(col).any()]
        mean, sd = mean_sd(seed_means)
        entry[metric] = {"mean": mean, "sd": sd, "n_cases": int(np.isfinite(m).any(1).sum())}
    rows = [r["labels"][label] for rep in per_seed.values() for r in rep["cases"]]
    present = [r for r in rows if r["voxels_ref"] > 0]
    entry["missed"] = {"n": sum(r["voxels_pred"] == 0 for r in present), "of": len(present)}
    lesions = [r["lesions"] for rep in per_seed.values() for r in rep["cases"] if "lesions" in r]
    if lesions and "tumo" in label.lower():
        entry["lesions"] = {k: sum(x[k] for x in lesions) for k in ("tp", "fp", "fn")}
    return entry


def against_none(
    per_seed: Reports,
    base: Reports,
    label: str,
    metric: str = "dice",
    replicates: int = BOOTSTRAP_REPLICATES,
) -> dict:
    """Method minus ``none`` on the seeds both have: Wilcoxon over cases (seeds averaged per
    case first), bootstrap 95% CI over cases and seeds (``replicates`` draws), seeds in which
    the method is better."""
    seeds = sorted(set(per_seed) & set(base))
    mine = {s: per_seed[s] for s in seeds}
    theirs = {s: base[s] for s in seeds}
    _, a = case_seed_matrix(mine, label, metric)
    _, b = case_seed_matrix(theirs, label, metric)
    diff = a - b
    keep = np.isfinite(diff).any(1)
    diff = diff[keep]
    out = (
        paired_test(np.nanmean(a[keep], 1), np.nanmean(b[keep], 1))
        if keep.any()
        else {"n": 0, "median_diff": 0.0, "p": None}
    )
    out["mean_diff"] = float(np.nanmean(diff)) if diff.size else None
    out["ci95"] = list(bootstrap_ci(diff, replicates)) if diff.size else None
    out["seeds_better"] = int(
        sum(np.nanmean(a[:, j]) > np.nanmean(b[:, j]) for j in range(len(seeds)) if keep.any())
    )
    out["seeds"] = len(seeds)
    return out


def summarise_task(
    runs: Mapping[str, Reports],
    labels: Sequence[str],
    family: Sequence[str],
    replicates: int = BOOTSTRAP_REPLICATES,
) -> dict[str, Any]:
    """Per run and label: the seed-level summary and, against ``none``, the paired test and
    CI; Holm's correction over ``family`` (the published methods; ablations are outside)."""
    out: dict[str, Any] = {}
    base = runs.get("none")
    for name, per_seed in runs.items():
        out[name] = {label: label_entry(per_seed, label) for label in labels}
        if base and name not in ("none", "teacher"):
            for label in labels:
                out[name][label]["vs_none"] = against_none(
                    per_seed, base, label, replicates=replicates
                )
    for label in labels:
        tested = {
            m: out[m][label]["vs_none"]["p"]
            for m in family
            if m in out and "vs_none" in out[m][label]
        }
        for m, p in holm(tested).items():
            out[m][label]["vs_none"]["p_holm"] = p
    return out


def tumour_label(labels: Sequence[str]) -> str | None:
    return next((lab for lab in labels if "tumo" in lab.lower() and "incl" not in lab), None)


def verdict(result: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """Plain-language findings on the tumour label: calibration, primary comparison, ranking."""
    summary = result["summary"]
    tumour = tumour_label(result["labels"])
    if tumour is None or "none" not in summary:
        return []

    def dice(name: str) -> float:
        mean = summary[name][tumour]["dice"]["mean"]
        return float("nan") if mean is None else mean

    teacher, none = dice("teacher"), dice("none")
    lines = [
        f"- Calibration: teacher {tumour} Dice {teacher:.3f} "
        f"({'meets' if teacher >= 0.75 else 'misses'} the 0.75 target); student without KD "
        f"{none:.3f}, {100 * (teacher - none):.1f} points below the teacher "
        f"({'meets' if teacher - none >= 0.05 else 'misses'} the 5-point target).",
    ]
    primary, _ = PRIMARY
    if primary in summary:
        t = summary[primary][tumour]["vs_none"]
        lo, hi = t["ci95"] or (float("nan"), float("nan"))
        decided = lo > 0 or hi < 0
        lines.append(
            f"- Primary comparison ({primary} - none, {tumour} Dice): "
            f"{100 * (t['mean_diff'] or 0):+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"(width {100 * (hi - lo):.1f}; target <= 4), Wilcoxon p "
            + ("n/a" if t["p"] is None else f"{t['p']:.3f}")
            + (
                f": the CI excludes 0: {primary} is {'better' if lo > 0 else 'worse'} than none."
                if decided
                else ": the CI includes 0: not shown either way."
            )
        )
    ranked = sorted(
        (m for m in methods if m in summary and dice(m) == dice(m)), key=dice, reverse=True
    )
    lines.append(
        f"- Ranking by mean {tumour} Dice: " + ", ".join(f"{m} {dice(m):.3f}" for m in ranked) + "."
    )
    compared = [m for m in methods if m != "none" and m in summary]
    significant = [
        m
        for m in compared
        if (p := summary[m][tumour]["vs_none"].get("p_holm")) is not None and p < 0.05
    ]
    lines.append(
        f"- Against `none` ({len(compared)} comparisons, Holm-adjusted p < 0.05): "
        + (
            "different: "
            + ", ".join(
                f"{m} ({100 * summary[m][tumour]['vs_none']['mean_diff']:+.1f} points)"
                for m in significant
            )
            if significant
            else "no method differs significantly"
        )
        + "."
    )
    if primary in summary:
        best = next((m for m in ranked if m not in (primary, "none")), None)
        if best:
            beats, gap = dice(primary) > dice(best), 100 * (dice(primary) - dice(best))
            lines.append(
                f"- HLFD against the best baseline ({best}): {gap:+.1f} "
                f"points of mean {tumour} Dice; HLFD {'does' if beats else 'does not'} beat it "
                "(no test between the two is pre-declared)."
            )
    return lines
