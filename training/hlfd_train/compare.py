"""Paired comparison of two evaluations of the same cases (``hlfd-train evaluate -o``).

    hlfd-train compare NEW/metrics.json OLD/metrics.json [--metric dice]

Per label: the mean of NEW - OLD over the cases where both are defined, its bootstrap 95% CI
over cases, the Wilcoxon signed-rank p-value and how many cases got better or worse; then the
false volume called in the cases without the label and the lesion counts of each model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .bench.stats import bootstrap_ci, paired_test
from .config import ConfigError

# how much better NEW is than OLD per case: overlap up, distances down, volume error towards 0
BETTER = {
    "dice": lambda new, old: new - old,
    "iou": lambda new, old: new - old,
    "hd95": lambda new, old: old - new,
    "assd": lambda new, old: old - new,
    "rvd": lambda new, old: abs(old) - abs(new),
}


def read_evaluation(path: Path) -> dict[str, Any]:
    """An evaluation report (``metrics.json``, or the folder holding it)."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
        report["cases"] = list(report["cases"])
        report["summary"] = dict(report["summary"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not an evaluation report of hlfd-train evaluate ({exc})"
        ) from None
    return report


def compare(new: Mapping[str, Any], old: Mapping[str, Any], metric: str = "dice") -> dict:
    """``{label: {n, mean_diff, ci95, p, better, worse, fp_ml: (new, old)}, "lesions": ...}``."""
    a = {r["case"]: r for r in new["cases"]}
    b = {r["case"]: r for r in old["cases"]}
    if set(a) != set(b):
        raise ConfigError(
            f"the two evaluations hold other cases ({len(set(a) ^ set(b))} differ): "
            "compare evaluations of the same split"
        )
    cases = sorted(a)
    out: dict[str, Any] = {}
    for label in a[cases[0]]["labels"]:
        pairs = [
            (a[c]["labels"][label].get(metric), b[c]["labels"][label].get(metric)) for c in cases
        ]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        diff = np.array([x - y for x, y in pairs], float)
        gain = np.array([BETTER[metric](x, y) for x, y in pairs], float)
        fp = [rep["summary"][label]["fp_ml"] for rep in (new, old)]  # evaluate.summarise's
        out[label] = {
            "n": len(pairs),
            "mean_diff": float(diff.mean()) if len(pairs) else None,
            "ci95": bootstrap_ci(diff[:, None]) if len(pairs) > 1 else None,
            "p": paired_test([x for x, _ in pairs], [y for _, y in pairs])["p"],
            "better": int((gain > 0).sum()),
            "worse": int((gain < 0).sum()),
            "fp_ml": tuple(f["mean"] for f in fp),
            "fp_cases": fp[0]["n"],
        }
    out["lesions"] = {
        name: {k: rep["summary"].get("lesions", {}).get(k, 0) for k in ("tp", "fn", "fp")}
        for name, rep in (("new", new), ("old", old))
    }
    return out


def markdown(result: Mapping[str, Any], metric: str = "dice") -> str:
    lines = [
        f"| label | cases | {metric}: new - old | 95% CI | Wilcoxon p | better / worse "
        "| false mL, cases without it: new / old |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in result.items():
        if label == "lesions":
            continue
        ci = "-" if r["ci95"] is None else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        p = "-" if r["p"] is None else f"{r['p']:.3g}"
        d = "-" if r["mean_diff"] is None else f"{r['mean_diff']:+.4f}"
        fp = " / ".join("-" if v is None else f"{v:.1f}" for v in r["fp_ml"])
        lines.append(
            f"| {label} | {r['n']} | {d} | {ci} | {p} | {r['better']} / {r['worse']} "
            f"| {fp} ({r['fp_cases']}) |"
        )
    les = result["lesions"]
    lines.append("")
    lines.append(
        "Lesions found / missed / false: new "
        + " / ".join(str(les["new"][k]) for k in ("tp", "fn", "fp"))
        + ", old "
        + " / ".join(str(les["old"][k]) for k in ("tp", "fn", "fp"))
    )
    return "\n".join(lines)
