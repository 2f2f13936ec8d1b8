"""Write synthetic datasets in the public layouts (MSD Task03 for liver, KiTS19 for kidney)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

from HLFDSegmentLib.phantom import case_seed, write_layout
from HLFDSegmentLib.pipeline import Grid, respaced_grid

from .generator import SynthConfig, synth_case

DEFAULT_LAYOUT = {"liver": "msd", "kidney": "kits19"}


def on_matrix(image, labels, matrix: int):
    """(image, labels) resampled in-plane to ``matrix`` x ``matrix`` voxels over the same field
    of view, as a scanner reconstructs (512 x 512): image linear, labels nearest."""
    import SimpleITK as sitk

    grid = Grid.of(image)
    (nx, ny, _), (sx, sy, _) = grid.size, grid.spacing
    target = respaced_grid(grid, (sx * nx / matrix, sy * ny / matrix, None))
    return (
        target.resample(image, sitk.sitkLinear, image.GetPixelID(), -1024),
        target.resample(labels, sitk.sitkNearestNeighbor, labels.GetPixelID(), 0),
    )


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
