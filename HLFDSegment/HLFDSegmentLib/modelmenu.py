"""The Slicer panel's model selector: what it lists, why a source failed, what it remembers
across sessions, and the model card it shows. Plain JSON only (no jsonschema, no torch), so it
works on first start, before any dependency is installed. No Qt, no Slicer.
"""

from __future__ import annotations

import html
import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model_registry as registry
from .slicerjob import model_choices

REMEMBERED_LIMIT = 20
SETTINGS_KEY = "HLFDSegment/LoadedModels"
"""Slicer settings key (``slicer.app.userSettings()``) of the models loaded from disk."""
NOT_FOR_DIAGNOSIS = "Research use only; not for diagnosis."


@dataclass
class ModelList:
    """The selector's entries, (title, MODEL argument), and one line per source that failed."""

    choices: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def list_models(extra: Iterable[str | os.PathLike[str]] = ()) -> ModelList:
    """Built-in models, registry entries, cached packages, then ``extra`` (loaded from disk);
    a source that cannot be read adds its reason to :attr:`ModelList.problems`."""
    problems: list[str] = []
    builtin = registry.builtin_models()
    if not builtin:
        problems.append(f"No built-in models in {registry.BUILTIN_DIR}.")
    try:
        entries = registry.load_registry()
    except ImportError as exc:  # jsonschema comes with the dependencies
        entries = []
        problems.append(
            f"Registry models are listed once the dependencies are installed ({exc.name} missing)."
        )
    except registry.ModelError as exc:
        entries = []
        problems.append(f"Model registry not readable: {exc}")
    try:
        cached = registry.cached_models()
    except OSError as exc:
        cached = []
        problems.append(f"Model cache {registry.cache_dir()} not readable: {exc}")
    present = []
    for path in map(Path, extra):
        if path.exists():
            present.append(path)
        else:
            problems.append(f"{path}: no longer there; removed from the list.")
    for model_id, folder in builtin.items():
        if read_card(folder) is None:
            problems.append(f"Built-in model {model_id!r}: {folder / 'model.json'} not readable.")
    return ModelList(model_choices(entries, cached, present, builtin), problems)


# -- remembered across sessions -----------------------------------------------------------------


def remembered_models(value: Any) -> list[str]:
    """The settings value (None, one string or a list, as QSettings returns it) as the model
    paths that still exist, without duplicates, newest last, at most :data:`REMEMBERED_LIMIT`."""
    if value is None or value == "":
        items: list[Any] = []
    elif isinstance(value, (str, os.PathLike)):
        items = [value]
    else:
        items = list(value)
    paths = [os.fspath(p) for p in items if isinstance(p, (str, os.PathLike)) and str(p)]
    existing = [p for p in dict.fromkeys(paths) if Path(p).exists()]
    return existing[-REMEMBERED_LIMIT:]


def remember_model(models: Iterable[str], path: str | os.PathLike[str]) -> list[str]:
    """``models`` with ``path`` added last (moved there if already listed), capped."""
    path = os.fspath(path)
    kept = [m for m in models if m != path] + [path]
    return kept[-REMEMBERED_LIMIT:]


def check_model_path(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a model package (one line), or None if it can."""
    p = Path(path)
    if p.is_dir():
        return None if (p / "model.json").is_file() else f"{p} holds no model.json."
    if p.is_file():
        return None if p.suffix.lower() == ".zip" else f"{p} is not a .zip model package."
    return f"{p}: no such file or folder."


# -- model card -----------------------------------------------------------------------------------


def read_card(spec: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The card of a MODEL argument as plain JSON: built-in id, package folder or .zip, or a
    registry id (its listing: title, task, licence, description). None if it cannot be read."""
    text = os.fspath(spec)
    builtin = registry.builtin_models().get(text)
    path = builtin if builtin is not None else Path(text)
    try:
        if path.is_dir():
            return _as_card(json.loads((path / "model.json").read_text(encoding="utf-8")))
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(
                    (n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "model.json"), None
                )
                return _as_card(json.loads(archive.read(name))) if name else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    try:
        entry = registry.find_entry(registry.load_registry(), text)
    except (ImportError, registry.ModelError):
        return None
    return {
        "name": entry.id,
        "version": entry.version,
        "title": entry.title,
        "task": entry.task,
        "license": entry.license,
        "description": entry.description,
        "runtimes": entry.runtimes,
    }


def has_onnx_graph(spec: str | os.PathLike[str]) -> bool:
    """The MODEL argument's card names an ONNX graph, so it runs on the CPU without PyTorch
    (registry entries are not known to have one until downloaded)."""
    card = read_card(spec)
    return bool(card and card.get("onnx"))


def _as_card(data: Any) -> dict[str, Any] | None:
    return data if isinstance(data, dict) else None


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def metric_lines(metrics: Mapping[str, Any]) -> list[str]:
    """``{"validation_dice": {"val.Liver": 0.905, "step": 900}}`` -> ``["validation Dice:
    Liver 0.91"]``: one line per metric group, numbers rounded, bookkeeping keys left out."""
    lines = []
    for group, values in metrics.items():
        title = group.replace("_", " ").replace("dice", "Dice")
        if isinstance(values, Mapping):
            parts = [
                f"{str(k).removeprefix('val.')} {_number(v)}"
                for k, v in values.items()
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "val.mean")
            ]
            if parts:
                lines.append(f"{title}: {', '.join(parts)}")
        elif isinstance(values, (int, float)):
            lines.append(f"{title}: {_number(values)}")
    return lines


def card_summary(card: Mapping[str, Any] | None) -> str:
    """The model card as short rich text for the panel: title, task and labels, the input depth
    of a 2.5D model, a cyst rule, training data, measured accuracy and run time, licence, and
    that it is not for diagnosis."""
    if not card:
        return f"<i>No model card available.</i><br><b>{NOT_FOR_DIAGNOSIS}</b>"
    e = html.escape
    name = f"{card.get('name', '')} {card.get('version', '')}".strip()
    rows = [f"<b>{e(str(card.get('title') or name))}</b>" + (f" ({e(name)})" if name else "")]
    labels = [str(lab.get("name")) for lab in card.get("labels", []) if isinstance(lab, dict)]
    task = f"{card.get('task', '?')} CT segmentation"
    rows.append(f"Task: {e(task)}" + (f": {e(', '.join(labels))}" if labels else ""))
    context = (card.get("preprocessing") or {}).get("context_slices") or 0
    if context:  # 2.5D: neighbour slices as input channels
        rows.append(
            f"Input: each axial slice with {context} neighbouring slice(s) on each side "
            f"({2 * context + 1} slices, 2.5D)"
        )
    cyst_hu = (card.get("postprocessing") or {}).get("cyst_max_hu")
    if isinstance(cyst_hu, (int, float)):  # what the model will never call tumour
        rows.append(
            f"Cyst rule: a lesion whose median is at most {float(cyst_hu):g} HU (water "
            "density, a simple cyst) is counted as organ, not tumour"
        )
    provenance = card.get("provenance") or {}
    if provenance.get("data"):
        rows.append(f"Training data: {e(str(provenance['data']))}")
    if provenance.get("ingredients"):  # hlfd-train soup
        ingredients = provenance["ingredients"]
        weights = [i.get("weight") for i in ingredients]
        mean = (
            f"weighted mean ({', '.join(f'{float(w):g}' for w in weights)})"
            if all(isinstance(w, (int, float)) for w in weights)
            else "mean"
        )
        rows.append(
            f"Training: the {mean} of the weights of {len(ingredients)} fine-tuned students "
            "(model soup)"
        )
    elif provenance.get("method"):
        method = str(provenance["method"])
        teacher = f" from {provenance['teacher']}" if provenance.get("teacher") else ""
        how = "the task loss alone" if method == "none" else f"{method} distillation{teacher}"
        start = provenance.get("init")
        if isinstance(start, dict) and start.get("name"):  # a fine-tune of a package
            how = (
                f"fine-tuned from {start['name']} {start.get('version', '')}".rstrip() + f", {how}"
            )
        rows.append(f"Training: {e(how)}")
    accuracy = metric_lines(card.get("metrics") or {})
    rows.append("Measured accuracy: " + (e("; ".join(accuracy)) if accuracy else "not reported"))
    for runtime in card.get("runtimes") or []:
        where = f" ({runtime['input']})" if runtime.get("input") else ""
        rows.append(
            f"Measured time: {e(_number(runtime.get('seconds')))} s on "
            f"{e(str(runtime.get('device')))}{e(where)}"
        )
    rows.append(f"Licence: {e(str(card.get('license') or 'not stated'))}")
    if card.get("description") and not provenance:  # a registry listing: its description
        rows.append(e(str(card["description"])))
    rows.append(f"<b>{NOT_FOR_DIAGNOSIS}</b>")
    return "<br>".join(rows)
