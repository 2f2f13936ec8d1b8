"""Realistic synthetic abdominal CT (synthesis engine v2): the shipped students' training data.

``synth_case(SynthConfig(task="liver"), seed)`` gives one labelled case; :mod:`.write` writes
datasets in the public layouts and :mod:`.report` the realism report.
"""

from .generator import SynthCase, SynthConfig, SynthError, synth_case

__all__ = ["SynthCase", "SynthConfig", "SynthError", "synth_case"]
