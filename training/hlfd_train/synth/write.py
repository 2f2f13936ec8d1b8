"""Write synthetic datasets in the public layouts (MSD Task03 for liver, KiTS19 for kidney)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from HLFDSegmentLib.phantom import case_seed, write_layout

from .generator import SynthConfig, synth_case

DEFAULT_LAYOUT = {"liver": "msd", "kidney": "kits19"}


def on_matrix(image, labels, matrix: int):
    """(image, labels) resampled in-plane to ``matrix`` x ``matrix`` voxels over the same field
    of view, as a scanner reconstructs (512 x 512): image linear, labels nearest."""
    import SimpleITK as sitk

    nx, ny, nz = image.GetSize()
    sx, sy, sz = image.GetSpacing()
    spacing = (sx * nx / matrix, sy * ny / matrix, sz)
    d = np.reshape(image.GetDirection(), (3, 3))
    # the field of view's corner stays where it was: centres move by half the voxel change
    corner = np.asarray(image.GetOrigin()) - d @ (np.array([sx, sy, 0.0]) / 2)
    origin = corner + d @ (np.array([spacing[0], spacing[1], 0.0]) / 2)
    size = (matrix, matrix, nz)

    def resample(img, interpolator, fill):
        return sitk.Resample(
            img, size, sitk.Transform(), interpolator, tuple(origin), spacing,
            img.GetDirection(), fill, img.GetPixelID(),
        )  # fmt: skip

    return resample(image, sitk.sitkLinear, -1024), resample(labels, sitk.sitkNearestNeighbor, 0)


def _make(config: SynthConfig, seed: int, matrix: int | None, index: int):
    pair = synth_case(config, case_seed(seed, index)).to_sitk()
    return on_matrix(*pair, matrix) if matrix else pair


def write_synth(
    out: str | Path,
    config: SynthConfig,
    cases: int,
    seed: int = 0,
    layout: str | None = None,
    jobs: int = 1,
    matrix: int | None = None,
) -> list[Path]:
    """Write ``cases`` cases of ``config`` (case i from seed ``case_seed(seed, i)``), each on a
    ``matrix`` x ``matrix`` in-plane grid when given (:func:`on_matrix`), and a ``synth.json``
    naming the generator settings, so the dataset can be made again."""
    out = Path(out)
    layout = layout or DEFAULT_LAYOUT[config.task]
    make = functools.partial(_make, config, seed, matrix)
    written = write_layout(out, layout, config.task, cases, make, jobs=jobs)
    from ..cards import code_version

    info = {
        "code_version": code_version(),
        "generator": "hlfd_train.synth",
        "seed": seed,
        "cases": cases,
        "layout": layout,
        "matrix": matrix,
        "config": asdict(config),
        "note": "synthetic CT: no patient data",
    }
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return written
