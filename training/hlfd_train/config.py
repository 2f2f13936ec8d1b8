"""Run configuration: YAML files merged over defaults, with ``a.b=value`` overrides.

Every number the training uses is a key here (or a distillation method's own default), so a run
is reproduced from the ``config.yaml`` saved beside it. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "output": "runs",  # runs go to <output>/<name>/<run>
    "run": None,  # default: "teacher" for the teacher, "<method>-seed<seed>" for a student
    "seed": 0,
    "deterministic": False,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "data": {
        "root": None,  # dataset folder (KiTS/LiTS/MSD/nnU-Net/NIfTI folder)
        "layout": "auto",
        "prepared": None,  # cache folder; default <output>/prepared/<name of root>
        "task": "kidney",  # kidney | liver
        "labelset": "organ+tumour",  # organ+tumour | tumour | organ
        "cyst": "organ",  # KiTS21/23 label 3 -> organ | background | tumour
        "unlabelled": "error",  # cases without a label file: error | skip (KiTS19 test set)
        "splits": [0.7, 0.15, 0.15],
        "split_seed": 0,  # case-level split; kept apart from the training seed
        "preprocessing": {},  # overrides of the model card's preprocessing
        "crop": [160, 160],  # 2D crops; 3D patches use "patch"
        "patch": [96, 96, 96],
        "foreground_fraction": 0.67,  # samples centred on a labelled voxel
        "tumour_fraction": 0.5,  # share of those centred on tumour
        "augment": {
            "flip": 0.5,
            "rotate_deg": 15.0,
            "rotate_prob": 0.3,
            "scale_intensity": 0.1,
            "shift_intensity": 0.1,
            "noise_std": 0.0,
        },
        "workers": 0,
        "val_cases": 0,  # 0 = every validation case
        # train on synthetic cases made on the fly instead of the root's train split (the root
        # then holds the validation/test cases): {crops_per_case, seed, synth: {generator keys}}
        "stream": None,
    },
    "model": {
        "spatial_dims": 2,
        # init: start from trained weights (a model package, e.g. a shipped synthetic-CT
        # student, or a .safetensors file): fine-tuning on real data
        "teacher": {"architecture": "unetpp2d", "kwargs": {}, "taps": {}, "init": None},
        "student": {"architecture": "resnet18_unet2d", "kwargs": {}, "taps": {}, "init": None},
    },
    "train": {
        "steps": 2000,
        "minutes": None,  # optional wall-clock budget; stops at whichever comes first
        "batch_size": 12,
        "optimizer": "adam",  # adam | adamw | sgd
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 50,
        "grad_clip": 1.0,
        "amp": "auto",  # auto | off | bf16 | fp16
        "log_every": 20,
        "val_every": 250,
        "checkpoint_every": 250,
        "tensorboard": True,
        "curves": True,  # curves.png at the end of the run (log.csv is always written)
    },
    "distill": {
        "method": "none",
        "teacher": None,  # teacher weights (.safetensors) or a teacher run folder
        "options": {},  # the method's own keys (see hlfd_train.distill.method_defaults)
    },
}

# Keys whose value is a free-form mapping: their sub-keys are not checked against DEFAULTS.
FREE = {
    ("data", "preprocessing"),
    ("data", "augment"),
    ("model", "teacher", "kwargs"),
    ("model", "teacher", "taps"),
    ("model", "student", "kwargs"),
    ("model", "student", "taps"),
    ("distill", "options"),
}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


def merge(base: Mapping[str, Any], update: Mapping[str, Any], where: tuple = ()) -> dict:
    """``update`` merged into a copy of ``base``; unknown keys raise :class:`ConfigError`."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        path = (*where, key)
        name = ".".join(map(str, path))
        if where in FREE:
            out[key] = copy.deepcopy(value)
        elif key not in out:
            known = ", ".join(sorted(out)) or "(none)"
            raise ConfigError(f"unknown config key {name!r} (known here: {known})")
        elif isinstance(out[key], Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {name!r} must be a mapping, got {value!r}")
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _numbers(value: Any) -> Any:
    """YAML 1.1 leaves ``1e-3`` as a string: turn such strings into floats, recursively."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = _numbers(yaml.safe_load(raw) if raw.strip() else None)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    out: Any = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), base: Mapping | None = None
) -> dict[str, Any]:
    """Defaults <- ``base`` <- YAML file at ``path`` <- ``key=value`` overrides."""
    cfg = merge(DEFAULTS, base or {})
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping at the top level")
        try:
            cfg = merge(cfg, _numbers(loaded))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    check(cfg)
    return cfg


def check(cfg: Mapping[str, Any]) -> None:
    """Value checks that the merge cannot do (choices, ranges)."""
    choices = {
        ("data", "labelset"): {"organ+tumour", "tumour", "organ"},
        ("data", "cyst"): {"organ", "background", "tumour"},
        ("data", "unlabelled"): {"error", "skip"},
        ("data", "task"): {"kidney", "liver"},
        ("model", "spatial_dims"): {2, 3},
        ("train", "optimizer"): {"adam", "adamw", "sgd"},
        ("train", "amp"): {"auto", "off", "bf16", "fp16"},
    }
    for (section, key), allowed in choices.items():
        value = cfg[section][key]
        if value not in allowed:
            raise ConfigError(
                f"config key '{section}.{key}' = {value!r}: expected one of "
                f"{', '.join(map(str, sorted(allowed, key=str)))}"
            )
    context = cfg["data"]["preprocessing"].get("context_slices", 0)
    if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= 4:
        raise ConfigError(
            f"config key 'data.preprocessing.context_slices' = {context!r}: expected an integer "
            "0-4 (neighbour slices on each side)"
        )
    if context and cfg["model"]["spatial_dims"] != 2:
        raise ConfigError(
            "config key 'data.preprocessing.context_slices' needs model.spatial_dims = 2"
        )
    for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every"):
        value = cfg["train"][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config key 'train.{key}' = {value!r}: expected an integer >= 1")
    for key in ("tensorboard", "curves"):
        if not isinstance(cfg["train"][key], bool):
            raise ConfigError(
                f"config key 'train.{key}' = {cfg['train'][key]!r}: expected true or false"
            )
    for key in ("lr", "weight_decay", "grad_clip"):
        value = cfg["train"][key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"config key 'train.{key}' = {value!r}: expected a number >= 0")


def save_config(cfg: Mapping[str, Any], path: Path) -> None:
    """Write the resolved configuration (the record of what ran)."""
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False), encoding="utf-8")


# A 2D phantom recipe that trains in minutes on a 2-core CPU (the demo and the benchmark): the
# paper's ResNet-18 U-Net as teacher (~1 s per 8x128² step here; its UNet++ takes ~2.7 s) and
# the MobileNetV2 U-Net (1.9 M parameters) as student.
CPU_PHANTOM_RECIPE: dict[str, Any] = merge(
    DEFAULTS,
    {
        "data": {
            "layout": "kits19",
            "crop": [128, 128],
            "preprocessing": {"spacing": [2.0, 2.0, None]},
            "foreground_fraction": 0.8,
        },
        "model": {
            "spatial_dims": 2,
            "teacher": {"architecture": "resnet18_unet2d"},
            "student": {"architecture": "mobilenetv2_unet2d"},
        },
        "train": {
            "batch_size": 8,
            "optimizer": "adamw",
            "lr": 2e-3,
            "warmup_steps": 20,
            "log_every": 10,
        },
    },
)
