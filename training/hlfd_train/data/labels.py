"""Source label values -> training label sets.

Every source value has a *role*: background, organ, tumour or cyst (KiTS21/23 label 3). A label
set ("organ+tumour", "tumour", "organ") and the ``cyst`` option turn roles into target values:

================  ==========  =====  ======  ====================================
labelset          background  organ  tumour  cyst ("organ" | "background" | "tumour")
================  ==========  =====  ======  ====================================
organ+tumour      0           1      2       1 | 0 | 2
tumour            0           0      1       0 | 0 | 1
organ             0           1      1       1 | 0 | 1
================  ==========  =====  ======  ====================================
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.modelpackage import standard_labels

LABELSETS = ("organ+tumour", "tumour", "organ")
CYST_OPTIONS = ("organ", "background", "tumour")
_TUMOUR_WORDS = ("tumor", "tumour", "cancer", "lesion", "mass", "neoplasm", "metasta", "carcinoma")
_TARGET = {
    "organ+tumour": {"background": 0, "organ": 1, "tumour": 2},
    "tumour": {"background": 0, "organ": 0, "tumour": 1},
    "organ": {"background": 0, "organ": 1, "tumour": 1},
}


# the fixed label values of the public dataset layouts (the other layouts say theirs in a file)
_KITS = {0: "background", 1: "kidney", 2: "tumor"}
LAYOUT_LABELS: dict[str, dict[int, str]] = {
    "kits19": _KITS,
    "kits21": {**_KITS, 3: "cyst"},
    "kits23": {**_KITS, 3: "cyst"},
    "lits": {0: "background", 1: "liver", 2: "tumor"},
    "folder": {0: "background", 1: "organ", 2: "tumour"},
}
LAYOUT_TASK = {"kits19": "kidney", "kits21": "kidney", "kits23": "kidney", "lits": "liver"}


class DataError(InputError):
    """A dataset that cannot be used for training; the message names the folder or case."""


def role_of(name: str) -> str:
    """Role of a source label name: background | organ | tumour | cyst."""
    low = name.lower()
    if low in ("background", "bg", "0"):
        return "background"
    if "cyst" in low:
        return "cyst"
    if any(w in low for w in _TUMOUR_WORDS):
        return "tumour"
    return "organ"


def _check_options(labelset: str, cyst: str) -> None:
    if labelset not in LABELSETS:
        raise DataError(f"unknown labelset {labelset!r}: expected one of {', '.join(LABELSETS)}")
    if cyst not in CYST_OPTIONS:
        raise DataError(f"unknown cyst option {cyst!r}: expected one of {', '.join(CYST_OPTIONS)}")


def label_map(
    source: str | Mapping[int, str], labelset: str = "organ+tumour", cyst: str = "organ"
) -> dict[int, int]:
    """Source value -> target value for a layout name (e.g. "kits23") or a {value: name} dict."""
    _check_options(labelset, cyst)
    if isinstance(source, str):
        if source not in LAYOUT_LABELS:
            raise DataError(
                f"layout {source!r} has no fixed labels; pass its {{value: name}} labels "
                f"(known: {', '.join(sorted(LAYOUT_LABELS))})"
            )
        source = LAYOUT_LABELS[source]
    target = _TARGET[labelset]
    out = {}
    for value, name in source.items():
        role = role_of(name)
        out[int(value)] = target[cyst if role == "cyst" else role]
    return out


def lookup_table(mapping: Mapping[int, int], unknown: int = 0) -> np.ndarray:
    """uint8 table of 256 entries: ``table[source value] = target value`` (``unknown`` else)."""
    table = np.full(256, unknown, dtype=np.uint8)
    for src, dst in mapping.items():
        if not 0 <= src < 256:
            raise DataError(f"label value {src} outside 0..255")
        table[src] = dst
    return table


def target_labels(task: str, labelset: str) -> dict[int, str]:
    """Target value -> name of a label set (standard runtime names, e.g. "Kidney tumor")."""
    _check_options(labelset, "organ")
    organ, tumour = (lab["name"] for lab in standard_labels(task))
    if labelset == "organ+tumour":
        return {0: "background", 1: organ, 2: tumour}
    return {0: "background", 1: tumour if labelset == "tumour" else organ}


def tumour_value(labelset: str) -> int | None:
    """Target value of the tumour class, or None when the label set has none."""
    return {"organ+tumour": 2, "tumour": 1, "organ": None}[labelset]
