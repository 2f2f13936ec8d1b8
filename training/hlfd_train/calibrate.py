"""Decision thresholds of a model package, chosen on held-out cases.

A segmentation network's argmax is a decision rule with one implicit threshold per class. A
student trained on synthetic CT over-calls tumour (false tumour on healthy kidneys, spleen and
bowel); shifting the tumour logit by a constant trades sensitivity for false positives. This
module measures that trade-off through the runtime pipeline (the same code the CLI and Slicer
run, post-processing included) for a grid of offsets, and picks the offset with the best mean
tumour Dice on tumour-bearing cases among those where *every* tumour-free case stays within
``max_fp_ml`` of false tumour (the least worst-case false tumour when none does): the limit is
a promise about each healthy CT, which a mean over cases would not keep. Choose it on
validation cases and report test figures separately.

With ``seed_offsets`` the sweep also tries hysteresis (the card's ``inference.seed_offsets``):
a tumour component is kept only if one of its voxels is still tumour at the stricter seed
offset. False tumour on healthy organs is mostly faint throughout, a real tumour has a
confident core, so a seed can remove the one and keep the other's whole extent.

    hlfd-train calibrate MODEL -c CONFIG [--split val] [--max-fp-ml 5] [--seed-offsets=-9,-8]
        [--write]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from HLFDSegmentLib.atomic import atomic_write
from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.modelpackage import CARD_NAME, ModelPackage
from HLFDSegmentLib.pipeline import Segmenter

from .config import ConfigError
from .evaluate import COMPOSITE_SUFFIX, EvalCase, evaluate_case, summarise

DEFAULT_OFFSETS = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0)
DEFAULT_MAX_FP_ML = 5.0


def tumour_label(package: ModelPackage) -> dict[str, Any]:
    """The card's tumour label (the one whose name says tumour/tumor)."""
    for lab in package.card["labels"]:
        if "tumo" in lab["name"].lower():
            return lab
    raise ModelError(f"{package.path}: the card has no tumour label to calibrate")


def offset_vector(package: ModelPackage, tumour_offset: float) -> list[float]:
    """Per-class logit offsets (background first): ``tumour_offset`` on the tumour class."""
    offsets = [0.0] * (len(package.card["labels"]) + 1)
    offsets[tumour_label(package)["value"]] = float(tumour_offset)
    return offsets


def sweep(
    package: ModelPackage,
    cases: Sequence[EvalCase],
    label_lut: np.ndarray,
    offsets: Iterable[float] = DEFAULT_OFFSETS,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
    seed_offsets: Iterable[float] = (),
) -> list[dict[str, Any]]:
    """One row per tumour offset, without seeds and with each seed offset stricter (lower)
    than it: mean tumour Dice (tumour-bearing cases), false tumour mL (tumour-free cases: mean
    and per case) and mean organ-including-tumour Dice, through the runtime pipeline."""
    if not cases:
        raise ConfigError("no cases to calibrate on: the chosen split is empty")
    seg = Segmenter(package, device=device)
    tumour = tumour_label(package)["name"]
    organs = [lab["name"] for lab in package.card["labels"] if lab["name"] != tumour]
    composite = organs[0] + COMPOSITE_SUFFIX if len(organs) == 1 else None
    seed_offsets = sorted(set(seed_offsets))
    grid = [(o, s) for o in offsets for s in (None, *(s for s in seed_offsets if s < o))]
    rows = []
    for offset, seed in grid:
        seg.logit_offsets = np.asarray(offset_vector(package, offset), np.float32)
        seg.seed_offsets = (
            None if seed is None else np.asarray(offset_vector(package, seed), np.float32)
        )
        scored = [evaluate_case(seg, case, label_lut) for case in cases]
        summary = summarise(scored)
        entry = summary[tumour]
        row = {
            "offset": float(offset),
            "seed_offset": None if seed is None else float(seed),
            "tumour_dice": entry["dice"]["mean"],
            "tumour_cases": entry["dice"]["n"],
            "fp_ml": entry["fp_ml"]["mean"],
            "tumour_free_cases": entry["fp_ml"]["n"],
            "fp_ml_cases": [
                r["labels"][tumour]["fp_ml"]
                for r in scored
                if r["labels"][tumour].get("fp_ml") is not None
            ],
            "organ_dice": summary[composite]["dice"]["mean"] if composite else None,
        }
        rows.append(row)
        if progress:
            progress(
                f"offset {_point(row)}: tumour Dice {_fmt(row['tumour_dice'])}, "
                f"false tumour {_fmt(row['fp_ml'], 1)} mL, organ Dice {_fmt(row['organ_dice'])}"
            )
    return rows


def choose(rows: Sequence[dict[str, Any]], max_fp_ml: float = DEFAULT_MAX_FP_ML) -> dict[str, Any]:
    """The row with the best tumour Dice among those whose worst tumour-free case stays within
    ``max_fp_ml`` of false tumour (the least worst case when none does); ties go to the offset
    closest to 0, then to no seed rule, then to the least strict seed."""
    if not rows:
        raise ValueError("nothing to choose from")

    def simplest(r: dict[str, Any]) -> tuple[float, bool, float]:
        seed = r.get("seed_offset")
        return -abs(r["offset"]), seed is None, seed or 0.0

    within = [r for r in rows if worst_fp_ml(r) <= max_fp_ml]
    if not within:
        return min(rows, key=lambda r: (worst_fp_ml(r), *(-v for v in simplest(r))))
    return max(within, key=lambda r: (r["tumour_dice"] or 0.0, *simplest(r)))


def why_chosen(row: dict[str, Any], max_fp_ml: float) -> str:
    """What ``choose`` went by for this row, in words (the limit may not have been met)."""
    worst = worst_fp_ml(row)
    if worst <= max_fp_ml:
        return (
            f"best tumour Dice with at most {max_fp_ml:g} mL of false tumour in each "
            "tumour-free case"
        )
    return (
        f"no point keeps every tumour-free case within {max_fp_ml:g} mL of false tumour: "
        f"the least worst, {worst:.1f} mL"
    )


def worst_fp_ml(row: dict[str, Any]) -> float:
    """The largest false tumour volume (mL) of a sweep row's tumour-free cases (0 when none)."""
    return max(row["fp_ml_cases"], default=0.0)


def require_folder(package: ModelPackage) -> None:
    """Offsets are written into a package folder's card, not into an archive."""
    if not package.path.is_dir():
        raise ModelError(f"{package.path}: --write needs a package folder, not an archive")


def write_offsets(
    package: ModelPackage, row: dict[str, Any], max_fp_ml: float, data: str
) -> dict[str, Any]:
    """Write the chosen offsets into the package folder's card (atomically), with a
    ``metrics.calibration`` record of what they were chosen on; returns the new card."""
    require_folder(package)
    card = json.loads((package.path / CARD_NAME).read_text(encoding="utf-8"))
    card["inference"]["logit_offsets"] = offset_vector(package, row["offset"])
    seed = row.get("seed_offset")
    card["inference"].pop("seed_offsets", None)
    if seed is not None:
        card["inference"]["seed_offsets"] = offset_vector(package, seed)
    card.setdefault("metrics", {})["calibration"] = {
        "tumour logit offset": row["offset"],
        "tumour seed offset": seed,
        "tumour Dice": _round(row["tumour_dice"]),
        "false tumour mL": _round(row["fp_ml"], 1),
        "worst tumour-free case mL": _round(worst_fp_ml(row), 1),
        "limit mL": max_fp_ml,
        "cases": f"{row['tumour_cases']} with tumour, {row['tumour_free_cases']} without ({data})",
    }
    atomic_write(package.path / CARD_NAME, json.dumps(card, indent=2) + "\n")
    return card


def markdown(rows: Sequence[dict[str, Any]], chosen: dict[str, Any]) -> str:
    """The sweep as a table, the chosen row marked."""
    lines = [
        "| tumour logit offset (seed offset) | tumour Dice | false tumour, mean (mL) | worst "
        "tumour-free case (mL) | organ incl. tumour Dice |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (chosen)" if r is chosen else ""
        lines.append(
            f"| {_point(r)}{mark} | {_fmt(r['tumour_dice'])} | {_fmt(r['fp_ml'], 1)} "
            f"| {_fmt(worst_fp_ml(r), 1)} | {_fmt(r['organ_dice'])} |"
        )
    return "\n".join(lines)


def _point(row: dict[str, Any]) -> str:
    """``-3.0``, or ``-3.0 (seed -8.0)`` with a seed rule."""
    seed = row.get("seed_offset")
    return f"{row['offset']:+.1f}" + ("" if seed is None else f" (seed {seed:+.1f})")


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
