"""Phantom CT volumes for Slicer's Sample Data module, generated on first use and cached."""

from __future__ import annotations

import os
from pathlib import Path

from .io import write_image
from .phantom import PhantomConfig, make_phantom

SAMPLES = {
    "kidney": ("HLFDPhantomKidneyCT", 11),
    "liver": ("HLFDPhantomLiverCT", 12),
}
SHAPE = (64, 192, 192)


def samples_dir() -> Path:
    """``$HLFD_CACHE_DIR/../samples`` or the user cache (beside the model cache)."""
    from .model_registry import cache_dir

    return cache_dir().parent / "samples"


def sample_ct(task: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Path of the phantom CT for ``task`` ("kidney" | "liver"), generating it once."""
    if task not in SAMPLES:
        raise ValueError(f"unknown sample task {task!r}: expected one of {sorted(SAMPLES)}")
    name, seed = SAMPLES[task]
    out = Path(folder) if folder is not None else samples_dir()
    path = out / f"{name}.nrrd"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        image, _ = make_phantom(PhantomConfig(task=task, shape=SHAPE), seed=seed).to_sitk()
        write_image(image, path)  # atomic: a crash never leaves a half-written sample
    return path
