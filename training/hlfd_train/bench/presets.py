"""What the distillation benchmark runs: methods, ablations, data (phantom difficulty or the
synthesis engine's settings) and presets.

Sizes are set from measured step times of the earlier full preset on this project's 2-core
machine (two 1-thread training processes): a student step of 96² crops, batch 12, takes about
0.42 s without distillation and 0.7-0.8 s with a teacher forward and a method; a teacher step
(batch 16) about 2.1 s; evaluating a run on one held-out phantom about 1 s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from HLFDSegmentLib.phantom import PhantomConfig

# the comparisons as the paper ran them (docs/reproduce.md lists every difference)
METHODS = ("none", "kd", "at", "fitnet", "deep", "cwd", "ifd", "hifd", "hlfd")
# ablations: a registered method with options; outside the family of the Holm correction
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "hlfd-feature-only": ("hlfd", {"pixel_level": False}),
    "hlfd-pixel-only": ("hlfd", {"feature_level": False}),
    "hlfd-unified-only": ("hlfd", {"individual": False}),
    "hlfd-individual-only": ("hlfd", {"unified": False}),
    "hlfd-p2": ("hlfd", {"p": 2.0}),
    "hlfd-T1": ("hlfd", {"temperature": 1.0}),
    "at-p2-e1e5": ("at", {"p": 2.0, "stages": ["e1", "e2", "e3", "e4", "e5"]}),
    "fitnet-joint": ("fitnet", {"schedule": "joint"}),
    "deep-mse": ("deep_mse", {}),
    "flfd-individual": ("flfd_individual", {}),
    "flfd-unified": ("flfd_unified", {}),
}
PRIMARY = ("hlfd", "none")  # the pre-declared primary comparison, on tumour Dice
BOOTSTRAP_REPLICATES = 4000  # draws of each bootstrap CI (the real presets)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The same small grid for every method, on the validation split, one seed.

    Every weight of a method (``weight``, ``kl_weight``, ``at_weight``, ``flfd_weight``,
    ``plfd_weight``; not HLFD's branch split) is multiplied by each scale; methods with a
    ``temperature`` also try each temperature. The best mean validation tumour Dice wins.
    """

    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    temperatures: tuple[float, ...] = ()  # empty: each method's default temperature only
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Preset:
    """How much the benchmark runs."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    splits: tuple[int, int, int]  # train, val, test cases
    shape: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    ablations: tuple[str, ...] = ()
    tuning: Tuning | None = None
    timing_slices: int = 200  # CPU seconds are measured on a (timing_slices, 512, 512) CT
    time_others: bool = True  # also time every other 2D architecture (first task only)
    overrides: tuple[str, ...] = ()  # config overrides, e.g. other networks
    teacher_overrides: tuple[str, ...] = ()  # applied after ``overrides`` to the teacher only
    workers: int = 0  # training processes side by side; 0: one per two cores, at least two
    minutes: float = 0.0  # the planned wall time on the machine it is sized for (report only)
    data: str = "phantom"  # phantom: DIFFICULTY's phantoms; synth: the synthesis engine
    synth: dict[str, Any] = dataclasses.field(default_factory=dict)  # SynthConfig settings
    bootstrap: int = BOOTSTRAP_REPLICATES  # draws of each bootstrap CI
    # further seeds for the two runs of the primary comparison only: its CI narrows with the
    # square root of its seeds, the other methods keep ``seeds``
    primary_seeds: tuple[int, ...] = ()
    # the methods of the tasks after the first (None: ``methods``): the toy runs every method
    # on the first task and the primary pair on the others (the same code, other labels)
    later_methods: tuple[str, ...] | None = None

    def methods_of(self, task: str) -> tuple[str, ...]:
        """The methods ``task`` runs (tuned, trained and compared)."""
        first = task == self.tasks[0] or self.later_methods is None
        return self.methods if first else self.later_methods

    def student_runs(self, task: str) -> list[tuple[int, str]]:
        """(seed, method or ablation) of every student run of ``task``, seed by seed; the
        ablations run on the first task only."""
        ablations = self.ablations if task == self.tasks[0] else ()
        methods = self.methods_of(task)
        runs = [(s, n) for s in self.seeds for n in (*methods, *ablations)]
        primary = [n for n in methods if n in PRIMARY]
        return runs + [(s, n) for s in self.primary_seeds for n in primary]


# 3 mm in-plane grid and 96² crops: what 2 CPU cores can train in the benchmark's time
CPU_BENCH = ("data.crop=[96, 96]", "data.preprocessing.spacing=[3.0, 3.0, null]")
TOY_NETS = (
    "model.teacher.architecture=tiny_unet2d",
    "model.teacher.kwargs.base=8",
    "model.student.architecture=tiny_unet2d",
    "model.student.kwargs.base=4",
    "data.crop=[32, 32]",
    "data.preprocessing.spacing=[4.0, 4.0, null]",
    "train.batch_size=2",
)

PRESETS = {
    "smoke": Preset(  # seconds: proves the whole flow in the tests
        tasks=("kidney",),
        methods=("none", "hlfd"),
        seeds=(0, 1),
        splits=(2, 1, 2),
        shape=(8, 64, 64),
        teacher_steps=4,
        student_steps=4,
        ablations=("hlfd-pixel-only",),
        tuning=Tuning(scales=(1.0, 2.0)),
        timing_slices=2,
        time_others=False,  # the GPU preset's toy times them
        overrides=TOY_NETS,
        bootstrap=500,
    ),
    "quick": Preset(  # ~10 min: checks the flow on one task; not evidence
        tasks=("kidney",),
        methods=("none", "kd", "hlfd"),
        seeds=(0,),
        splits=(6, 1, 2),
        shape=(40, 160, 160),
        teacher_steps=150,
        student_steps=100,
        timing_slices=48,
        overrides=CPU_BENCH,
        teacher_overrides=("train.batch_size=16",),
        minutes=10,
    ),
    # <= 100 min on 2 cores. Measured with 60 test cases: 5 seeds 56 min (2026-12-02, native-
    # bf16 Xeon); 30 seeds for the primary pair 95 min (2026-12-03, AMD EPYC: teacher 4.3 min,
    # a run of none ~2 min and of a method ~2.5 min with its evaluation, two side by side)
    "cpu": Preset(
        tasks=("kidney",),
        methods=("none", "hlfd", "at", "kd", "fitnet"),
        seeds=(0, 1, 2, 3, 4),
        # The primary CI was 7.2 points wide on 12 cases, 4.3 on 40 and 6.1 on 60 test cases,
        # all with 5 seeds: it resamples seeds as well as cases, and the seed-to-seed spread
        # of HLFD - none, not the number of cases, sets its width. With 15 seeds for the
        # primary pair it was 5.2 wide (the spread larger than 5 seeds had suggested); 30
        # seeds: 5.2 x sqrt(15 / 30) ~ 3.7 expected
        primary_seeds=tuple(range(5, 30)),
        splits=(10, 4, 60),  # 60 test cases, every phantom bears tumour
        shape=(40, 160, 160),
        teacher_steps=500,
        student_steps=300,
        tuning=Tuning(scales=(0.5, 1.0, 2.0)),
        overrides=CPU_BENCH,
        teacher_overrides=("train.batch_size=16",),
        minutes=95,
    ),
    # the same design on the synthesis engine's CT (the shipped students' training stream:
    # anatomy, contrast phases, FOV cuts, tumour-free cases), sized for one GPU. On 2 CPU cores
    # a 600-step teacher reached test tumour Dice 0.16 and 300-step students 0.00-0.01 (every
    # method at the floor), so no CPU-sized synthetic preset can decide; run it with --toy
    # to check the flow on a CPU
    "synth-gpu": Preset(
        tasks=("kidney", "liver"),
        methods=("none", "hlfd", "at", "kd", "fitnet"),
        seeds=(0, 1, 2, 3, 4),
        splits=(40, 10, 40),  # ~34 tumour-bearing test cases per task (15% tumour-free)
        shape=(0, 0, 0),  # the engine sets each case's size
        teacher_steps=6000,
        student_steps=3000,
        tuning=Tuning(scales=(0.5, 1.0, 2.0)),
        overrides=(
            "device=cuda",
            "data.crop=[160, 160]",
            "data.preprocessing.spacing=[1.5, 1.5, null]",  # the shipped students' grid
        ),
        teacher_overrides=("train.batch_size=32",),
        workers=6,
        data="synth",
        # the training stream's defaults with fewer tumour-free cases: the primary comparison
        # is on tumour-bearing cases; the others score false tumour
        synth={"tumour_free": 0.15},
    ),
    # one GPU shared by several runs: every method as published, ablations, both tasks,
    # 5 seeds, the weight x temperature grid; 40 test cases per task
    "gpu": Preset(
        tasks=("kidney", "liver"),
        methods=METHODS,
        seeds=(0, 1, 2, 3, 4),
        splits=(40, 10, 40),
        shape=(48, 192, 192),
        teacher_steps=4000,
        student_steps=2000,
        ablations=tuple(ABLATIONS),
        tuning=Tuning(scales=(0.5, 1.0, 2.0), temperatures=(1.0, 4.0)),
        overrides=("device=cuda", "data.crop=[128, 128]"),
        teacher_overrides=("train.batch_size=32",),
        workers=6,
    ),
    "full": Preset(  # the earlier CPU preset: ~90 min on 2 cores, 3 seeds, no tuning
        tasks=("kidney", "liver"),
        methods=METHODS,
        seeds=(0, 1, 2),
        splits=(8, 2, 6),
        shape=(40, 160, 160),
        teacher_steps=300,
        student_steps=150,
        ablations=tuple(ABLATIONS),
        overrides=CPU_BENCH,
        teacher_overrides=("train.batch_size=16",),
    ),
}


# synthetic CT of about 64x64x12 voxels: the engine's whole flow in a fraction of a second
TOY_SYNTH = {"inplane_mm": [5.0, 5.0], "fov_mm": [320.0, 320.0], "max_slices": 12}


# one ablation of each kind the flow runs: a method's options, another registered method, and
# FitNet's joint schedule (the engine's one-stage path); the others differ from these in options
TOY_ABLATIONS = ("hlfd-pixel-only", "deep-mse", "fitnet-joint")


def toy(preset: Preset) -> Preset:
    """The same tasks, methods and grid axes at toy size on the CPU (tests), with one ablation
    of each kind; the tasks after the first run the primary pair only."""
    tuning = preset.tuning and dataclasses.replace(
        preset.tuning,
        scales=preset.tuning.scales[:1],
        temperatures=preset.tuning.temperatures[:1],
    )
    return dataclasses.replace(
        preset,
        synth={**preset.synth, **TOY_SYNTH} if preset.data == "synth" else preset.synth,
        ablations=tuple(a for a in preset.ablations if a in TOY_ABLATIONS),
        later_methods=tuple(m for m in preset.methods if m in PRIMARY),
        seeds=preset.seeds[:1],
        primary_seeds=preset.primary_seeds[:1],
        splits=(1, 1, 1),
        shape=(8, 64, 64),
        teacher_steps=2,
        student_steps=2,
        tuning=tuning,
        timing_slices=2,
        overrides=(*TOY_NETS, "device=cpu"),
        teacher_overrides=(),
        workers=1,
        minutes=0.0,
        bootstrap=200,  # its CIs cover one case and one seed: the flow, not the figures
    )


# Phantom difficulty, calibrated so that the teacher learns the tumours within the budget
# (validation tumour Dice 0.84 for kidney and 0.92 for liver after 200 teacher steps of 16
# crops; smaller, fainter liver tumours left the teacher at 0.73 on held-out cases) while a
# student trained for a fraction of that does not: large, clearly hypodense tumours, with
# look-alike cysts and noise; no hyperdense or necrotic tumours. Every case bears tumours,
# inside the field of view (HLFDSegmentLib.phantom keeps tumour sites inside it).
_COMMON = dict(
    spacing=(2.5, 2.5, 3.0),
    hyper_fraction=0.0,
    necrosis=0.0,
    texture_hu=6.0,
    noise_hu=12.0,
    cysts=(0, 2),
)
DIFFICULTY = {
    "kidney": PhantomConfig(
        task="kidney",
        tumours=(1, 2),
        tumour_radius_mm=(18.0, 32.0),
        tumour_contrast_hu=(-130.0, -90.0),
        **_COMMON,
    ),
    "liver": PhantomConfig(
        task="liver",
        tumours=(1, 2),
        tumour_radius_mm=(16.0, 30.0),
        tumour_contrast_hu=(-120.0, -80.0),
        **_COMMON,
    ),
}


def synth_config(task: str, preset: Preset) -> Any:
    """The synthesis engine's settings of a task in a ``data="synth"`` preset."""
    from ..synth.generator import SynthConfig

    return SynthConfig.from_dict(task, preset.synth)


def difficulty(task: str, preset: Preset) -> dict[str, Any]:
    """The data settings of a task (phantom difficulty or synthesis engine), JSON-ready."""
    if preset.data == "synth":
        cfg = {"generator": "hlfd_train.synth", **dataclasses.asdict(synth_config(task, preset))}
    else:
        cfg = dataclasses.asdict(dataclasses.replace(DIFFICULTY[task], shape=preset.shape))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def method_of(name: str) -> tuple[str, dict[str, Any]]:
    """(registered method, options) of a benchmark row: a method or an ablation."""
    return ABLATIONS.get(name, (name, {}))


BRANCH_SPLIT = ("unified_weight", "individual_weight")


def grid(name: str, tuning: Tuning) -> list[dict[str, Any]]:
    """Option sets of the tuning grid of one method (weights scaled, temperatures tried)."""
    from ..distill import method_defaults

    method, base = method_of(name)
    defaults = {**method_defaults(method), **base}
    weights = [k for k in defaults if k.endswith("weight") and k not in BRANCH_SPLIT]
    temps = tuning.temperatures if "temperature" in defaults and tuning.temperatures else (None,)
    out = []
    for scale in tuning.scales:
        for t in temps:
            opts = {**base, **{k: defaults[k] * scale for k in weights}}
            if t is not None:
                opts["temperature"] = t
            out.append(opts)
    return out


def grid_label(name: str, options: dict[str, Any]) -> str:
    """Short run-name part of a grid point: the values that differ from the row's defaults,
    e.g. ``w0.05-T1``, or ``default``."""
    from ..distill import method_defaults

    method, base = method_of(name)
    defaults = {**method_defaults(method), **base}
    parts = []
    for k, v in sorted(options.items()):
        if defaults.get(k) == v:
            continue
        tag = "T" if k == "temperature" else k.replace("_weight", "").replace("weight", "w")
        parts.append(f"{tag}{v:g}")
    return "-".join(parts) or "default"
