"""The distillation benchmark, in modules named for what they hold.

``presets`` (methods, ablations, data settings, presets, tuning grid), ``pool`` (training
and evaluating runs on worker processes, resumable), ``stats`` (seed-averaged paired tests,
bootstrap CIs, Holm), ``report`` (efficiency, CSV, plots, markdown) and ``run`` (the flow).
"""

from .pool import run_one
from .presets import ABLATIONS, METHODS, PRESETS, PRIMARY, Preset, Tuning, grid, toy
from .run import run_bench, task_config, write_data
from .stats import bootstrap_ci, holm, paired_test, summarise_task, verdict

__all__ = [
    "ABLATIONS",
    "METHODS",
    "PRESETS",
    "PRIMARY",
    "Preset",
    "Tuning",
    "bootstrap_ci",
    "grid",
    "holm",
    "paired_test",
    "run_bench",
    "run_one",
    "summarise_task",
    "task_config",
    "toy",
    "verdict",
    "write_data",
]
