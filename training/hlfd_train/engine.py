"""The training loop shared by teacher training and distillation.

``train(cfg, role)`` runs one run folder ``<output>/<name>`` with a :class:`Trainer`:

- data prepared once (rank 0) with the runtime's own preprocessing, then sampled by a
  step-indexed sampler, so a run killed at any step and resumed draws the very same batches;
- the network from ``HLFDSegmentLib.nets``; for distillation the frozen teacher (weights from a
  teacher run, a ``.safetensors`` file or a model package) and the registered method, whose
  adapters are trained with the student and never exported;
- AMP on CUDA, bf16 on CPUs with native bf16, gradient clipping, warm-up + cosine schedule;
- ``state.pt`` checkpoints (read back with ``weights_only=True``) for resume; ``best`` and
  ``last`` student weights as safetensors; validation Dice through the runtime's ``Segmenter``;
- ``log.csv``, TensorBoard events, ``curves.png`` (``train.curves``), ``config.yaml``,
  ``summary.json``;
- DistributedDataParallel when launched by ``torchrun`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from HLFDSegmentLib.atomic import atomic_path, atomic_write
from HLFDSegmentLib.devices import autocast_dtype
from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.io import write_json
from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.nets import BACKGROUND_CHANNELS, build_network, fold_logits, tap_paths
from HLFDSegmentLib.pipeline import Segmenter

from .cards import (
    N_CLASSES,
    card_for,
    input_channels,
    lifted_state,
    load_weights,
    package_from_state,
    state_bytes,
    widened_state,
)
from .config import ConfigError, load_config, save_config
from .distill import (
    FeatureTaps,
    MissingTapError,
    build_method,
    probe_channels,
    run_with_taps,
    segmentation_loss,
)
from .evaluate import dice
from .logs import RunLog, plot_curves

STATE = "state.pt"


# -- processes and devices ---------------------------------------------------------------------
def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device_name(name: str, cuda: bool, local_rank: int | None = None) -> str:
    """``device`` resolved: ``auto`` -> cuda or cpu; a bare ``cuda`` gets its index (the local
    rank of a distributed run, else 0), since ``torch.cuda.set_device`` refuses one without."""
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    return f"cuda:{local_rank or 0}" if name == "cuda" else name


def pick_device(name: str, rank: int) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", rank)) if dist.is_initialized() else None
    device = torch.device(device_name(name, torch.cuda.is_available(), local))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' = {name!r}: no CUDA device here")
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# -- data --------------------------------------------------------------------------------------
class StepSampler(Sampler[int]):
    """Endless sample indices that depend only on the step: batch ``s`` of rank ``r`` is
    indices ``((s * world + r) * batch ... + batch) mod len``. A resumed run starts at its step
    and therefore sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, length: int, batch: int, start_step: int, rank: int = 0, world: int = 1):
        self.length, self.batch, self.start = length, batch, start_step
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            base = (step * self.world + self.rank) * self.batch
            yield from ((base + i) % self.length for i in range(self.batch))
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def run_folder(cfg: Mapping[str, Any], role: str) -> Path:
    """``<output>/<name>/<run>``; the run defaults to "teacher" or "<method>-seed<seed>"."""
    run = cfg["run"] or (
        "teacher" if role == "teacher" else f"{cfg['distill']['method']}-seed{cfg['seed']}"
    )
    return Path(cfg["output"]) / str(cfg["name"]) / str(run)


def prepared_folder(cfg: Mapping[str, Any]) -> Path:
    """The data cache: ``data.prepared``, else ``<output>/prepared/<root>-<settings hash>``."""
    from .cards import preprocessing_of

    d = cfg["data"]
    if d["prepared"]:
        return Path(d["prepared"])
    if not d["root"]:
        raise ConfigError("config key 'data.root' is not set: the dataset folder to train on")
    settings = [d[k] for k in ("layout", "task", "labelset", "cyst", "splits", "split_seed")]
    settings.append(preprocessing_of(cfg))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg["output"]) / "prepared" / f"{Path(d['root']).name}-{digest}"


def prepare_data(cfg: Mapping[str, Any], rank: int) -> Path:
    """Prepared cache of the run's dataset (made by rank 0, shared by all ranks)."""
    from .cards import preprocessing_of
    from .data import prepare

    d = cfg["data"]
    out = prepared_folder(cfg)
    if not d["root"]:
        raise ConfigError("config key 'data.root' is not set: the dataset folder to train on")
    if rank == 0:
        prepare(
            d["root"],
            out,
            layout=d["layout"],
            task=d["task"],
            labelset=d["labelset"],
            cyst=d["cyst"],
            preprocessing=preprocessing_of(cfg),
            splits=d["splits"],
            seed=d["split_seed"],
            unlabelled=d["unlabelled"],
        )
    barrier()
    return out


def training_set(cfg: Mapping[str, Any], prepared: Any, samples: int):
    from .data import SliceDataset, VolumeDataset

    d = cfg["data"]
    if d["stream"] is not None:
        return synth_stream(cfg, prepared, samples)
    if cfg["model"]["spatial_dims"] == 2:
        return SliceDataset(
            prepared,
            "train",
            crop=tuple(d["crop"]),
            augment=d["augment"],
            foreground_fraction=d["foreground_fraction"],
            tumour_fraction=d["tumour_fraction"],
            samples_per_epoch=samples,
            seed=cfg["seed"],
        )
    return VolumeDataset(
        prepared,
        "train",
        patch=tuple(d["patch"]),
        augment=d["augment"],
        foreground_fraction=d["foreground_fraction"],
        tumour_fraction=d["tumour_fraction"],
        samples_per_epoch=samples,
        seed=cfg["seed"],
    )


# -- networks ----------------------------------------------------------------------------------
def synth_stream(cfg: Mapping[str, Any], prepared: Any, samples: int):
    """``data.stream``: crops of synthetic cases made on the fly in the DataLoader workers."""
    from .synth.stream import SynthSliceStream, stream_settings

    d = cfg["data"]
    if cfg["model"]["spatial_dims"] != 2:
        raise ConfigError("data.stream makes 2D crops: set model.spatial_dims to 2")
    settings = stream_settings(d["stream"], d["task"])
    return SynthSliceStream(
        settings["config"],
        prepared.preprocessing,
        crop=tuple(d["crop"]),
        augment=d["augment"],
        foreground_fraction=d["foreground_fraction"],
        tumour_fraction=d["tumour_fraction"],
        samples=samples,
        crops_per_case=settings["crops_per_case"],
        pool=settings["pool"],
        batch=int(cfg["train"]["batch_size"]),
        workers=int(d["workers"]),
        world=distributed()[1],
        seed=settings["seed"],
        aux_labels=settings["aux_labels"],
    )


def make_network(
    spec: Mapping[str, Any], dims: int, classes: int, in_channels: int = 1
) -> nn.Module:
    return build_network(spec["architecture"], dims, in_channels, classes, **spec["kwargs"])


def centre_channels(given: int, wanted: int) -> slice:
    """The ``wanted`` centre channels of ``given`` slice channels (odd counts)."""
    if wanted > given or (given - wanted) % 2:
        raise ConfigError(
            f"the teacher takes {wanted} input channels, the student's input has {given}: "
            "a teacher may see fewer context slices than its student, never more"
        )
    start = (given - wanted) // 2
    return slice(start, start + wanted)


def taps_of(net: nn.Module, spec: Mapping[str, Any]) -> dict[str, str]:
    """The network's declared taps, with the config's ``taps`` added or replacing them."""
    return {**tap_paths(net), **dict(spec.get("taps") or {})}


def check_taps(role: str, arch: str, taps: Mapping[str, str], needed: tuple[str, ...]) -> None:
    missing = [t for t in needed if t not in taps]
    if missing:
        raise ConfigError(
            f"the {role} {arch!r} has no tap {missing[0]!r} needed by the distillation method; "
            f"name a module for it with model.{role}.taps.{missing[0]}=<module path> "
            f"(its taps: {', '.join(sorted(taps)) or 'none'})"
        )


def load_teacher(cfg: Mapping[str, Any], classes: int) -> tuple[nn.Module, dict, str]:
    """The frozen teacher from ``distill.teacher``: a teacher run folder, a ``.safetensors``
    file (architecture from ``model.teacher``) or a model package. Returns (net, spec, name)."""
    src = cfg["distill"]["teacher"] or run_folder(cfg, "teacher")
    net, spec = trained_network(src, dict(cfg["model"]["teacher"]), cfg, classes, "teacher")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), spec, str(src)


def check_background_channels(cfg: Mapping[str, Any], role: str) -> None:
    """A network with ``background_channels`` learns that many extra classes, the stream's
    ``aux_labels``, one each (the task loss sees them; a distillation loss on logits compares
    the folded ones with the teacher's, which an eval-mode teacher folds too)."""
    extra = (cfg["model"][role].get("kwargs") or {}).get(BACKGROUND_CHANNELS, 0)
    stream = cfg["data"]["stream"]
    aux = list((stream or {}).get("aux_labels") or [])
    if extra != len(aux):
        raise ConfigError(
            f"config key 'model.{role}.kwargs.{BACKGROUND_CHANNELS}' is {extra}: it must equal "
            f"the number of 'data.stream.aux_labels' ({len(aux)}: {aux})"
        )


def initial_network(spec: Mapping[str, Any], cfg: Mapping[str, Any], classes: int, role: str):
    """The run's network: fresh, or with the weights named by ``model.<role>.init`` (a model
    package or a ``.safetensors`` file of the same architecture) for fine-tuning; a package
    fed fewer slices than this run's ``context_slices`` is lifted (:func:`lifted_state`)."""
    dims, channels = cfg["model"]["spatial_dims"], input_channels(cfg)
    if not spec.get("init"):
        return make_network(spec, dims, classes, channels)
    net, got = trained_network(spec["init"], dict(spec), cfg, classes, role)
    got_kwargs, want_kwargs = dict(got.get("kwargs") or {}), dict(spec.get("kwargs") or {})
    got_bg, want_bg = (int(k.pop(BACKGROUND_CHANNELS, 0)) for k in (got_kwargs, want_kwargs))
    want = (spec["architecture"], want_kwargs)
    if (got["architecture"], got_kwargs) != want or got_bg > want_bg:
        raise ConfigError(
            f"model.{role}.init = {spec['init']!r}: a {got['architecture']!r} network with "
            f"kwargs {got.get('kwargs') or {}}, model.{role} asks {want[0]!r} with "
            f"{spec.get('kwargs') or {}}"
        )
    if got_bg < want_bg:  # extra background classes: the output layer widened
        wide = make_network(spec, dims, classes, got["in_channels"])
        wide.load_state_dict(widened_state(net.state_dict(), wide.state_dict()), strict=True)
        net = wide
    if got["in_channels"] != channels:
        if got["in_channels"] > channels:
            raise ConfigError(
                f"model.{role}.init = {spec['init']!r}: a network of {got['in_channels']} input "
                f"channels; this run feeds {channels} (data.preprocessing.context_slices)"
            )
        wide = make_network(spec, dims, classes, channels)  # started where the narrow one was
        wide.load_state_dict(lifted_state(net.state_dict(), wide.state_dict()), strict=True)
        net = wide
    return net.train()


def trained_network(
    src: str | Path, spec: dict, cfg: Mapping[str, Any], classes: int, role: str
) -> tuple[nn.Module, dict]:
    """(network with trained weights, its spec) from a model package (folder or .zip), a run
    folder (teacher runs) or a ``.safetensors`` file of ``spec``'s architecture."""
    path = Path(src)
    if (path.is_dir() and (path / "model.json").is_file()) or path.suffix.lower() == ".zip":
        pkg = load_package(path)
        net = pkg.build_network()
        spec = {
            "architecture": pkg.card["network"]["architecture"],
            "kwargs": pkg.card["network"].get("kwargs", {}),
            "taps": spec.get("taps", {}),
            "in_channels": pkg.card["network"]["in_channels"],
        }
    else:
        if path.is_dir():
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"{path}: not a teacher run folder (no config.yaml)")
            run_cfg = load_config(path / "config.yaml")
            spec = {
                **run_cfg["model"]["teacher"],
                "taps": spec.get("taps") or {},
                "in_channels": input_channels(run_cfg),
            }
            path = next(
                (
                    path / n
                    for n in ("best.safetensors", "last.safetensors")
                    if (path / n).is_file()
                ),
                path / "best.safetensors",
            )
        if not path.is_file():
            raise ConfigError(f"{path}: {role} weights not found")
        spec = {"in_channels": input_channels(cfg), **spec}
        net = make_network(spec, cfg["model"]["spatial_dims"], classes, spec["in_channels"])
        try:
            net.load_state_dict(load_weights(path), strict=True)
        except (RuntimeError, ValueError, ModelError) as exc:
            line = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"{path}: weights do not fit {role} {spec['architecture']!r}: {line}"
            ) from None
    return net, spec


class StudentStep(nn.Module):
    """Student + distillation method as one module (what DDP wraps): returns loss terms."""

    def __init__(self, student: nn.Module, method: nn.Module, taps: Mapping[str, str]):
        super().__init__()
        self.student, self.method = student, method
        self.taps = dict(taps)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher_feats: Mapping[str, torch.Tensor],
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        with FeatureTaps(self.student, self.taps) as ft:
            logits = self.student(x)
            feats = ft.collect()
        terms = {"seg": segmentation_loss(logits.float(), y)}
        if teacher_logits is not None or teacher_feats:
            extra = getattr(self.student, "background_channels", 0)  # the teacher's are folded
            kd = self.method(
                {k: v.float() for k, v in feats.items()},
                {k: v.float() for k, v in teacher_feats.items()},
                (fold_logits(logits, extra) if extra else logits).float(),
                None if teacher_logits is None else teacher_logits.float(),
            )
            terms.update(kd)
        return terms


def lr_factor(step: int, warmup: int, total: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay reaching 0 at ``total`` steps or, with a wall-clock
    budget, when ``time_fraction`` of it is spent, whichever comes first."""
    if step < warmup:
        return (step + 1) / warmup
    done = max((step - warmup) / max(1, total - warmup), time_fraction)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def make_optimizer(params, tcfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    lr, wd = float(tcfg["lr"]), float(tcfg["weight_decay"])
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    if tcfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


# -- validation --------------------------------------------------------------------------------
def validate(
    cfg: Mapping[str, Any],
    role: str,
    state: Mapping[str, torch.Tensor],
    prepared: Any,
    device: torch.device,
    folder: Path,
) -> dict[str, float]:
    """Mean Dice per label over the validation cases, through the runtime's ``Segmenter``
    (folded BN, body box, slice batches / sliding window) on the prepared model-grid volumes."""
    card = card_for(cfg, role, preprocessing=prepared.preprocessing)
    seg = Segmenter(package_from_state(card, state, folder), device=str(device))
    cases = prepared.cases("val") or prepared.cases("train")[:1]
    if cfg["data"]["val_cases"]:
        cases = cases[: cfg["data"]["val_cases"]]
    names = [lab["name"] for lab in card["labels"]]
    scores = []
    for case in cases:
        image, label = prepared.arrays(case)
        pred = seg.infer(np.asarray(image, dtype=np.float32))
        label = np.asarray(label)
        scores.append([dice(pred == v, label == v) for v in range(1, len(names) + 1)])
    mean = np.mean(scores, axis=0)
    out = {f"val.{n}": float(m) for n, m in zip(names, mean)}
    out["val.mean"] = float(mean.mean())
    return out


# -- checkpoints -------------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path) -> None:
    """Bytes as they are, anything else through ``torch.save``, atomically."""
    if isinstance(obj, bytes):
        atomic_write(path, obj)
        return
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: Path) -> dict[str, Any]:
    """A resume checkpoint, read without unpickling code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else sorted(STATE_KEYS)
    if missing:
        raise ConfigError(
            f"{path}: not a training checkpoint of this engine (missing {', '.join(missing)}); "
            "delete it to start the run over"
        )
    return state


STATE_KEYS = {"model", "optimizer", "scaler", "step", "best", "elapsed", "rng", "config"}


def comparable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config without the keys a resumed run may change (budget, logging, workers)."""
    out = json.loads(json.dumps(cfg))
    for key in ("minutes", "log_every", "val_every", "checkpoint_every", "tensorboard", "curves"):
        out["train"].pop(key, None)
    out["data"].pop("workers", None)
    return out


# -- the loop ----------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any], role: str = "student", progress: bool = True) -> Path:
    """Train the run's ``role`` network; returns the run folder. Resumes from ``state.pt``."""
    return Trainer(cfg, role, progress).run()


class Trainer:
    """One run of ``role`` (teacher or student): built ready to go (folder, data, networks,
    method, optimizer, resume state, DDP, loader), then :meth:`run` repeats :meth:`step`,
    :meth:`validate` and :meth:`checkpoint` until the steps or the time budget are spent, and
    :meth:`finish` writes the final weights, curves and summary."""

    def __init__(self, cfg: Mapping[str, Any], role: str = "student", progress: bool = True):
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
        self.cfg, self.role = cfg, role
        self.rank, self.world = distributed()
        self.device = pick_device(cfg["device"], self.rank)
        self.folder = run_folder(cfg, role)
        self.tcfg = cfg["train"]
        # the distillation method and its options are the student's; a teacher trains without
        d = cfg["distill"]
        self.method_name, self.method_options = (
            (d["method"], d["options"]) if role == "student" else ("none", {})
        )
        state = self._saved_state()
        if cfg["data"]["stream"] is not None:  # a bad stream setting leaves no run folder
            from .synth.stream import stream_settings

            stream_settings(cfg["data"]["stream"], cfg["data"]["task"])
        seed_everything(int(cfg["seed"]), bool(cfg["deterministic"]))

        from .data import PreparedData

        self.prepared = PreparedData(prepare_data(cfg, self.rank))
        self._build_networks()
        if self.rank == 0:  # after every check of data, networks and method: no folder on error
            self.folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.folder / "config.yaml")
        self.step_module = StudentStep(self.student, self.method, self.s_taps).to(self.device)
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.tcfg)
        self.total = int(self.tcfg["steps"])
        self.dtype = autocast_dtype(self.device, self.tcfg["amp"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.start, self.best, elapsed = 0, {"val.mean": -1.0, "step": 0}, 0.0
        if state is not None:
            self.step_module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.start, self.best = int(state["step"]), dict(state["best"])
            elapsed = float(state["elapsed"])
            torch.set_rng_state(state["rng"])
        self.model: nn.Module = self.step_module
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.loader = self._loader()
        self.log = (
            RunLog(self.folder, self.start, bool(self.tcfg["tensorboard"]))
            if self.rank == 0
            else None
        )
        self.n_adapters = sum(p.numel() for p in self.method.parameters())
        self.n_student = sum(p.numel() for p in self.student.parameters())
        if self.rank == 0:
            self._announce()
        self.budget = self.tcfg["minutes"] * 60 if self.tcfg["minutes"] else math.inf
        self.t0 = time.perf_counter() - elapsed
        self.bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True)
        self.step_no = self.start
        self.running: dict[str, list[float]] = {}

    # -- setup ---------------------------------------------------------------------------------
    def _saved_state(self) -> dict[str, Any] | None:
        """The resume checkpoint of this run folder, if any (refused for another config)."""
        if not (self.folder / STATE).is_file():
            return None
        state = load_state(self.folder / STATE)
        if comparable(state["config"]) != comparable(self.cfg):
            raise ConfigError(
                f"{self.folder}: holds a run with a different configuration; choose another "
                "'name' or delete the folder"
            )
        return state

    def _build_networks(self) -> None:
        """Student, frozen teacher (distillation only), the method and the taps each needs."""
        cfg, dims = self.cfg, self.cfg["model"]["spatial_dims"]
        classes = N_CLASSES[cfg["data"]["labelset"]]
        self.spec = spec = cfg["model"][self.role]
        check_background_channels(cfg, self.role)
        self.student = initial_network(spec, cfg, classes, self.role)
        self.teacher, t_taps, t_spec, self.teacher_name = None, {}, {}, None
        if self.method_name != "none":
            teacher, t_spec, self.teacher_name = load_teacher(cfg, classes)
            self.teacher = teacher.to(self.device)
            t_taps = taps_of(self.teacher, t_spec)
        s_taps = taps_of(self.student, spec)

        crop = cfg["data"]["crop"] if dims == 2 else cfg["data"]["patch"]
        example = torch.zeros(1, input_channels(cfg), *crop)
        s_channels = probe_channels(self.student, s_taps, example)
        # a one-slice teacher of a 2.5D student sees the centre slice of the student's input
        self.teacher_input = (
            centre_channels(example.shape[1], t_spec["in_channels"]) if self.teacher else None
        )
        t_channels = (
            probe_channels(self.teacher, t_taps, example[:, self.teacher_input].to(self.device))
            if self.teacher
            else {}
        )
        try:
            self.method = build_method(
                self.method_name, t_channels, s_channels, dims, **self.method_options
            )
        except MissingTapError as exc:
            net = spec if exc.side == "student" else cfg["model"]["teacher"]
            check_taps(exc.side, net["architecture"], {k: "" for k in exc.known}, (exc.tap,))
            raise
        except ValueError as exc:
            raise ConfigError(f"distill.options: {exc}") from None
        need_s, need_t = self.method.required_taps()
        check_taps("student", spec["architecture"], s_taps, need_s)
        if self.teacher is not None:
            check_taps("teacher", cfg["model"]["teacher"]["architecture"], t_taps, need_t)
        self.s_taps = {k: s_taps[k] for k in need_s}
        self.t_taps = {k: t_taps[k] for k in need_t}
        self.needs_t_logits = self.teacher is not None and self.method.needs_logits()

    def _loader(self) -> DataLoader:
        """Batches in step order from ``start`` (a resumed run draws the very same ones)."""
        batch = int(self.tcfg["batch_size"])
        dataset = training_set(
            self.cfg, self.prepared, samples=max(1, self.total * batch * self.world)
        )
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=StepSampler(len(dataset), batch, self.start, self.rank, self.world),
            num_workers=int(self.cfg["data"]["workers"]),
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )

    def _announce(self) -> None:
        dtype, world = self.dtype, self.world
        print(
            f"{self.role} {self.spec['architecture']} ({self.n_student / 1e6:.2f} M params) "
            f"method {self.method_name} (adapters {self.n_adapters / 1e3:.1f} k params) on "
            f"{self.device}{f' x{world}' if world > 1 else ''}, steps {self.start}->"
            f"{self.total}, batch {int(self.tcfg['batch_size'])}"
            f"{', ' + str(dtype).removeprefix('torch.') if dtype else ''}",
            flush=True,
        )

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Steps until ``train.steps`` or the time budget; validation, logs and checkpoints on
        their schedules; then :meth:`finish`."""
        tcfg, total = self.tcfg, self.total
        stopped = "steps"
        batches = iter(self.loader)
        self.student.train()
        while self.step_no < total:
            spent = _budget_spent(time.perf_counter() - self.t0, self.budget, self.world)
            if spent >= 1.0:
                stopped = "time budget"
                break
            self.step(next(batches), spent)
            step = self.step_no
            if self.rank == 0 and (step % int(tcfg["log_every"]) == 0 or step == total):
                self._log_running()
            if step % int(tcfg["val_every"]) == 0 or step == total:
                self.validate()
            if step % int(tcfg["checkpoint_every"]) == 0 or step == total:
                self.checkpoint()
        if stopped == "time budget":
            self.validate()
            self.checkpoint()
        return self.finish(stopped)

    def step(self, batch: Mapping[str, torch.Tensor], spent: float = 0.0) -> None:
        """One optimizer step on ``batch`` at the learning rate of the schedule."""
        tcfg, device, dtype = self.tcfg, self.device, self.dtype
        factor = lr_factor(self.step_no, int(tcfg["warmup_steps"]), self.total, spent)
        for group in self.optimizer.param_groups:
            group["lr"] = float(tcfg["lr"]) * factor
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            t_logits, t_feats = None, {}
            if self.teacher is not None:
                t_logits, t_feats = run_with_taps(
                    self.teacher, self.t_taps, x[:, self.teacher_input], teacher=True
                )
            terms = self.model(x, y, t_feats, t_logits if self.needs_t_logits else None)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tcfg["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, float(tcfg["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_no += 1
        for k, v in {"loss": loss, **{f"loss.{k}": t for k, t in terms.items()}}.items():
            self.running.setdefault(k, []).append(float(v.detach()))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                {
                    k.removeprefix("loss."): f"{np.mean(v[-20:]):.3f}"
                    for k, v in self.running.items()
                },
                refresh=False,
            )

    def _log_running(self) -> None:
        row = {k: float(np.mean(v)) for k, v in self.running.items()}
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - self.t0
        self.log.log(self.step_no, row)
        self.running = {}

    def validate(self) -> None:
        """Validate on rank 0; keep ``best.safetensors`` when the mean Dice improves."""
        if self.rank == 0:
            student, folder = self.student, self.folder
            student.eval()
            with torch.no_grad():
                scores = validate(
                    self.cfg, self.role, student.state_dict(), self.prepared, self.device, folder
                )
            student.train()
            self.log.log(self.step_no, scores)
            if scores["val.mean"] > self.best["val.mean"]:
                self.best = {**scores, "step": self.step_no}
                atomic_save(state_bytes(student.state_dict()), folder / "best.safetensors")
                write_json(self.best, folder / "best.json")
        barrier()

    def checkpoint(self) -> None:
        """``state.pt`` at the current step, for resume."""
        if self.rank == 0:
            atomic_save(
                {
                    "model": self.step_module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "step": self.step_no,
                    "best": self.best,
                    "elapsed": time.perf_counter() - self.t0,
                    "rng": torch.get_rng_state(),
                    "config": json.loads(json.dumps(self.cfg)),
                },
                self.folder / STATE,
            )
        barrier()

    def finish(self, stopped: str) -> Path:
        """Last weights, curves and ``summary.json`` (rank 0); returns the run folder."""
        if self.bar is not None:
            self.bar.close()
        if self.rank == 0:
            folder, best, dtype = self.folder, self.best, self.dtype
            self.log.close()
            atomic_save(state_bytes(self.student.state_dict()), folder / "last.safetensors")
            if self.tcfg["curves"]:
                title = f"{self.cfg['name']} ({self.role})"
                plot_curves(folder / "log.csv", folder / "curves.png", title)
            summary = {
                "role": self.role,
                "architecture": self.spec["architecture"],
                "method": self.method_name,
                "teacher": self.teacher_name,
                "steps": self.step_no,
                "stopped_by": stopped,
                "seconds": round(time.perf_counter() - self.t0, 1),
                "parameters": self.n_student,
                "adapter_parameters": self.n_adapters,
                "best": best,
                "device": str(self.device),
                "world_size": self.world,
                "precision": "float32" if dtype is None else str(dtype).removeprefix("torch."),
            }
            write_json(summary, folder / "summary.json")
            print(
                f"done: {self.step_no} steps in {summary['seconds']:.0f} s; best val mean Dice "
                f"{best['val.mean']:.3f} at step {best['step']}; {folder}",
                flush=True,
            )
        barrier()
        return self.folder


def _budget_spent(elapsed: float, budget: float, world: int) -> float:
    """Fraction of the wall-clock budget spent, by rank 0's clock on every rank (so all ranks
    use the same learning rate and stop at the same step)."""
    if math.isinf(budget):
        return 0.0
    spent = torch.tensor([elapsed / budget], dtype=torch.float64)
    if world > 1:
        dist.broadcast(spent, 0)
    return float(spent.item())
