"""Write synthetic datasets in the public layouts (MSD Task03 for liver, KiTS19 for kidney)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

from HLFDSegmentLib.phantom import case_seed, write_layout

from .generator import SynthConfig, synth_case

DEFAULT_LAYOUT = {"liver": "msd", "kidney": "kits19"}


def _make(config: SynthConfig, seed: int, index: int):
    return synth_case(config, case_seed(seed, index)).to_sitk()


def write_synth(
    out: str | Path,
    config: SynthConfig,
    cases: int,
    seed: int = 0,
    layout: str | None = None,
    jobs: int = 1,
) -> list[Path]:
    """Write ``cases`` cases of ``config`` (case i from seed ``case_seed(seed, i)``) and a
    ``synth.json`` naming the generator settings, so the dataset can be made again."""
    out = Path(out)
    layout = layout or DEFAULT_LAYOUT[config.task]
    make = functools.partial(_make, config, seed)
    written = write_layout(out, layout, config.task, cases, make, jobs=jobs)
    from ..cards import code_version

    info = {
        "code_version": code_version(),
        "generator": "hlfd_train.synth",
        "seed": seed,
        "cases": cases,
        "layout": layout,
        "config": asdict(config),
        "note": "synthetic CT: no patient data",
    }
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return written
