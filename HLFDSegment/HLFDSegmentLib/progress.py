"""Progress of a segmentation run: the stages, in order, and the share of the run each takes.

One table serves the pipeline (its own stages, as fractions of a segmentation), the worker
(a whole run: read, model, the segmentation, write) and the UI stage names, which must match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

StageProgress = Callable[[str, float], None]
"""``progress(stage, fraction)``: the stage now running and the fraction of the run done."""

# rough share of the run each stage takes (only the pacing of progress bars depends on it)
_SEGMENT_SHARES = (("preprocess", 0.10), ("infer", 0.75), ("postprocess", 0.07), ("resample", 0.08))
_RUN_SHARES = (("read", 0.03), ("model", 0.05), ("segment", 0.89), ("write", 0.03))


def _spans(shares: Iterable[tuple[str, float]]) -> dict[str, tuple[float, float]]:
    spans, start = {}, 0.0
    for name, share in shares:
        spans[name] = (round(start, 6), round(start + share, 6))
        start += share
    return spans


SEGMENT_SPANS = _spans(_SEGMENT_SHARES)
"""Pipeline stage -> (start, end) fraction of one segmentation."""
RUN_SPANS = _spans(_RUN_SHARES)
"""Worker stage -> (start, end) fraction of one run; ``segment`` holds :data:`SEGMENT_SPANS`."""
STAGES = ("read", "model", *SEGMENT_SPANS, "write")
"""Every stage name a worker reports, in order (the Slicer panel names each)."""
STAGE_NAMES = {
    "read": "Reading the volume",
    "model": "Loading the model",
    "download": "Downloading the model",
    "preprocess": "Preprocessing",
    "infer": "Running the network",
    "postprocess": "Postprocessing",
    "resample": "Resampling to the CT grid",
    "write": "Writing the result",
}
"""What the panel says for each stage (``download``: while ``model`` fetches the package)."""


def within(progress: StageProgress, start: float, end: float) -> StageProgress:
    """``progress`` for a part of a run that spans ``start..end`` of the whole."""

    def report(stage: str, fraction: float) -> None:
        progress(stage, start + (end - start) * fraction)

    return report
