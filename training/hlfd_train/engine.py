"""The training loop shared by teacher training and distillation.

``train(cfg, role)`` runs one run folder ``<output>/<name>``:

- data prepared once (rank 0) with the runtime's own preprocessing, then sampled by a
  step-indexed sampler, so a run killed at any step and resumed draws the very same batches;
- the network from ``HLFDSegmentLib.nets``; for distillation the frozen teacher (weights from a
  teacher run, a ``.safetensors`` file or a model package) and the registered method, whose
  adapters are trained with the student and never exported;
- AMP on CUDA, bf16 on CPUs with native bf16, gradient clipping, warm-up + cosine schedule;
- ``state.pt`` checkpoints (read back with ``weights_only=True``) for resume; ``best`` and
  ``last`` student weights as safetensors; validation Dice through the runtime's ``Segmenter``;
- ``log.csv``, TensorBoard events, ``curves.png``, ``config.yaml``, ``summary.json``;
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
from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.nets import build_network, tap_paths
from HLFDSegmentLib.pipeline import Segmenter

from .cards import N_CLASSES, card_for, load_weights, package_from_state, state_bytes
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


def pick_device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    device = torch.device(name)
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
def make_network(spec: Mapping[str, Any], dims: int, classes: int) -> nn.Module:
    return build_network(spec["architecture"], dims, 1, classes, **spec["kwargs"])


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


def initial_network(spec: Mapping[str, Any], cfg: Mapping[str, Any], classes: int, role: str):
    """The run's network: fresh, or with the weights named by ``model.<role>.init`` (a model
    package or a ``.safetensors`` file of the same architecture) for fine-tuning."""
    if not spec.get("init"):
        return make_network(spec, cfg["model"]["spatial_dims"], classes)
    net, got = trained_network(spec["init"], dict(spec), cfg, classes, role)
    want = (spec["architecture"], dict(spec.get("kwargs") or {}))
    if (got["architecture"], dict(got.get("kwargs") or {})) != want:
        raise ConfigError(
            f"model.{role}.init = {spec['init']!r}: a {got['architecture']!r} network with "
            f"kwargs {got.get('kwargs') or {}}, model.{role} asks {want[0]!r} with {want[1]}"
        )
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
        }
    else:
        if path.is_dir():
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"{path}: not a teacher run folder (no config.yaml)")
            run_cfg = load_config(path / "config.yaml")
            spec = {**run_cfg["model"]["teacher"], "taps": spec.get("taps") or {}}
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
        net = make_network(spec, cfg["model"]["spatial_dims"], classes)
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
            kd = self.method(
                {k: v.float() for k, v in feats.items()},
                {k: v.float() for k, v in teacher_feats.items()},
                logits.float(),
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
    for key in ("minutes", "log_every", "val_every", "checkpoint_every", "tensorboard"):
        out["train"].pop(key, None)
    out["data"].pop("workers", None)
    return out


# -- the loop ----------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any], role: str = "student", progress: bool = True) -> Path:
    """Train the run's ``role`` network; returns the run folder. Resumes from ``state.pt``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
    rank, world = distributed()
    device = pick_device(cfg["device"], rank)
    folder = run_folder(cfg, role)
    tcfg, dims = cfg["train"], cfg["model"]["spatial_dims"]
    classes = N_CLASSES[cfg["data"]["labelset"]]
    method_name = cfg["distill"]["method"] if role == "student" else "none"

    state = None
    if (folder / STATE).is_file():
        state = load_state(folder / STATE)
        if comparable(state["config"]) != comparable(cfg):
            raise ConfigError(
                f"{folder}: holds a run with a different configuration; choose another "
                "'name' or delete the folder"
            )
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.yaml")
    seed_everything(int(cfg["seed"]), bool(cfg["deterministic"]))

    from .data import PreparedData

    prepared = PreparedData(prepare_data(cfg, rank))
    spec = cfg["model"][role]
    student = initial_network(spec, cfg, classes, role)
    teacher, t_taps, t_name = None, {}, None
    if method_name != "none":
        teacher, t_spec, t_name = load_teacher(cfg, classes)
        teacher = teacher.to(device)
        t_taps = taps_of(teacher, t_spec)
    s_taps = taps_of(student, spec)

    crop = cfg["data"]["crop"] if dims == 2 else cfg["data"]["patch"]
    example = torch.zeros(1, 1, *crop)
    s_channels = probe_channels(student, s_taps, example)
    t_channels = probe_channels(teacher, t_taps, example.to(device)) if teacher else {}
    try:
        method = build_method(
            method_name, t_channels, s_channels, dims, **cfg["distill"]["options"]
        )
    except MissingTapError as exc:
        net = spec if exc.side == "student" else cfg["model"]["teacher"]
        check_taps(exc.side, net["architecture"], {k: "" for k in exc.known}, (exc.tap,))
        raise
    except ValueError as exc:
        raise ConfigError(f"distill.options: {exc}") from None
    need_s, need_t = method.required_taps()
    check_taps("student", spec["architecture"], s_taps, need_s)
    if teacher is not None:
        check_taps("teacher", cfg["model"]["teacher"]["architecture"], t_taps, need_t)
    s_taps = {k: s_taps[k] for k in need_s}
    t_taps = {k: t_taps[k] for k in need_t}
    needs_t_logits = teacher is not None and method.needs_logits()

    step_module = StudentStep(student, method, s_taps).to(device)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg)
    total = int(tcfg["steps"])
    dtype = autocast_dtype(device, tcfg["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    start, best, elapsed = 0, {"val.mean": -1.0, "step": 0}, 0.0
    if state is not None:
        step_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best, elapsed = int(state["step"]), dict(state["best"]), float(state["elapsed"])
        torch.set_rng_state(state["rng"])
    model: nn.Module = step_module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )

    batch = int(tcfg["batch_size"])
    dataset = training_set(cfg, prepared, samples=max(1, total * batch * world))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=StepSampler(len(dataset), batch, start, rank, world),
        num_workers=int(cfg["data"]["workers"]),
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
    )
    log = RunLog(folder, start, bool(tcfg["tensorboard"])) if rank == 0 else None
    n_adapters = sum(p.numel() for p in method.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    if rank == 0:
        print(
            f"{role} {spec['architecture']} ({n_student / 1e6:.2f} M params) method "
            f"{method_name} (adapters {n_adapters / 1e3:.1f} k params) on {device}"
            f"{f' x{world}' if world > 1 else ''}, steps {start}->{total}, batch {batch}"
            f"{', ' + str(dtype).removeprefix('torch.') if dtype else ''}",
            flush=True,
        )

    budget = tcfg["minutes"] * 60 if tcfg["minutes"] else math.inf
    warmup = int(tcfg["warmup_steps"])
    t0 = time.perf_counter() - elapsed
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def validate_and_keep() -> dict:  # at the current step
        return _validate_and_keep(
            cfg, role, student, prepared, device, folder, step, best, log, rank
        )

    def checkpoint() -> None:  # the current step, for resume
        _checkpoint(
            folder, cfg, step_module, optimizer, scaler, step, best, time.perf_counter() - t0, rank
        )

    running: dict[str, list[float]] = {}
    stopped = "steps"
    step = start
    batches = iter(loader)
    student.train()
    while step < total:
        spent = _budget_spent(time.perf_counter() - t0, budget, world)
        if spent >= 1.0:
            stopped = "time budget"
            break
        for group in optimizer.param_groups:
            group["lr"] = float(tcfg["lr"]) * lr_factor(step, warmup, total, spent)
        b = next(batches)
        x = b["image"].to(device, non_blocking=True)
        y = b["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            t_logits, t_feats = None, {}
            if teacher is not None:
                t_logits, t_feats = run_with_taps(teacher, t_taps, x, teacher=True)
            terms = model(x, y, t_feats, t_logits if needs_t_logits else None)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, float(tcfg["grad_clip"]))
        scaler.step(optimizer)
        scaler.update()
        step += 1
        for k, v in {"loss": loss, **{f"loss.{k}": t for k, t in terms.items()}}.items():
            running.setdefault(k, []).append(float(v.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                {k.removeprefix("loss."): f"{np.mean(v[-20:]):.3f}" for k, v in running.items()},
                refresh=False,
            )
        if rank == 0 and (step % int(tcfg["log_every"]) == 0 or step == total):
            row = {k: float(np.mean(v)) for k, v in running.items()}
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = time.perf_counter() - t0
            log.log(step, row)
            running = {}
        if step % int(tcfg["val_every"]) == 0 or step == total:
            best = validate_and_keep()
        if step % int(tcfg["checkpoint_every"]) == 0 or step == total:
            checkpoint()
    if stopped == "time budget":
        best = validate_and_keep()
        checkpoint()
    if bar is not None:
        bar.close()
    if rank == 0:
        log.close()
        atomic_save(state_bytes(student.state_dict()), folder / "last.safetensors")
        plot_curves(folder / "log.csv", folder / "curves.png", f"{cfg['name']} ({role})")
        summary = {
            "role": role,
            "architecture": spec["architecture"],
            "method": method_name,
            "teacher": t_name,
            "steps": step,
            "stopped_by": stopped,
            "seconds": round(time.perf_counter() - t0, 1),
            "parameters": n_student,
            "adapter_parameters": n_adapters,
            "best": best,
            "device": str(device),
            "world_size": world,
            "precision": "float32" if dtype is None else str(dtype).removeprefix("torch."),
        }
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"done: {step} steps in {summary['seconds']:.0f} s; best val mean Dice "
            f"{best['val.mean']:.3f} at step {best['step']}; {folder}",
            flush=True,
        )
    barrier()
    return folder


def _budget_spent(elapsed: float, budget: float, world: int) -> float:
    """Fraction of the wall-clock budget spent, by rank 0's clock on every rank (so all ranks
    use the same learning rate and stop at the same step)."""
    if math.isinf(budget):
        return 0.0
    spent = torch.tensor([elapsed / budget], dtype=torch.float64)
    if world > 1:
        dist.broadcast(spent, 0)
    return float(spent.item())


def _validate_and_keep(cfg, role, student, prepared, device, folder, step, best, log, rank):
    """Validate on rank 0; keep ``best.safetensors`` when the mean Dice improves."""
    if rank == 0:
        student.eval()
        with torch.no_grad():
            scores = validate(cfg, role, student.state_dict(), prepared, device, folder)
        student.train()
        log.log(step, scores)
        if scores["val.mean"] > best["val.mean"]:
            best = {**scores, "step": step}
            atomic_save(state_bytes(student.state_dict()), folder / "best.safetensors")
            (folder / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    barrier()
    return best


def _checkpoint(folder, cfg, module, optimizer, scaler, step, best, elapsed, rank):
    if rank == 0:
        atomic_save(
            {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "best": best,
                "elapsed": elapsed,
                "rng": torch.get_rng_state(),
                "config": json.loads(json.dumps(cfg)),
            },
            folder / STATE,
        )
    barrier()
