"""Export a trained run as a model package the runtime loads (``hlfd-train export``).

The card carries provenance (teacher, method and its options, data, seed, steps, code
version), the validation metrics, a run time measured here through the runtime pipeline and,
with ``onnx=True``, a ``model.onnx`` whose softmax outputs are checked against torch.
Distillation adapters never reach the package: only the student's own weights are saved.
"""

from __future__ import annotations

import io
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from HLFDSegmentLib.io import read_image
from HLFDSegmentLib.modelpackage import save_package
from HLFDSegmentLib.nets import fold_batchnorm
from HLFDSegmentLib.pipeline import Segmenter

from .cards import card_for, load_weights, package_from_state
from .config import ConfigError, load_config

ONNX_NAME = "model.onnx"
ONNX_TOLERANCE = 1e-3  # max |p_onnx - p_torch| over softmax probabilities


def run_files(run: Path, which: str = "best") -> tuple[dict, dict, Path]:
    """(config, summary, weights path) of a run folder."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    summary = (
        json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    )
    weights = run / f"{which}.safetensors"
    if not weights.is_file():
        weights = run / "last.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{run}: no {which}.safetensors or last.safetensors (not trained yet?)")
    return cfg, summary, weights


def prepared_info(cfg: dict) -> tuple[dict[str, Any], Path | None]:
    """``prepared.json`` of the run's data cache and its first validation CT, if still there."""
    from .data import PreparedData
    from .engine import prepared_folder

    folder = prepared_folder(cfg)
    if not (folder / "prepared.json").is_file():
        return {}, None
    prepared = PreparedData(folder)
    cases = prepared.cases("val") or prepared.cases("train")
    image = Path(prepared.meta(cases[0])["image_path"]) if cases else None
    return prepared.info, image


def to_onnx(net: torch.nn.Module, spatial_dims: int, example: torch.Tensor) -> tuple[bytes, float]:
    """ONNX bytes of ``net`` (dynamic batch and spatial size) and the max probability error
    of ONNX Runtime against torch on ``example``."""
    import onnxruntime as ort

    axes = {0: "batch", **{i: f"s{i}" for i in range(2, 2 + spatial_dims)}}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not broken
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=17,
            dynamo=False,  # the dynamo exporter needs onnxscript, not installed here
        )
    data = buf.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": example.numpy()})
    with torch.no_grad():
        want = torch.softmax(net(example), 1).numpy()
    got_p = torch.softmax(torch.from_numpy(got), 1).numpy()
    return data, float(np.abs(got_p - want).max())


def time_pipeline(package: Any, image_path: Path | None) -> list[dict[str, Any]]:
    """Seconds for one volume through the runtime pipeline on this machine's CPU."""
    if image_path is None or not Path(image_path).is_file():
        return []
    image = read_image(image_path)
    seg = Segmenter(package, device="cpu")
    seg(image)  # warm-up (allocations, oneDNN kernels)
    t0 = time.perf_counter()
    seg(image)
    seconds = time.perf_counter() - t0
    size = "x".join(map(str, image.GetSize()))
    cpu = platform.processor() or platform.machine()
    return [
        {
            "device": f"cpu ({torch.get_num_threads()} threads, {cpu})",
            "seconds": round(seconds, 2),
            "input": f"{Path(image_path).parent.name}/{Path(image_path).name} {size}",
        }
    ]


def data_description(cfg: dict, info: dict) -> str:
    """What the run was trained on, without the training machine's paths: a synthetic dataset
    (``synth.json`` beside it) says so, in words a reader cannot take for KiTS or LiTS."""
    root = Path(str(cfg["data"]["root"]))
    layout = info.get("layout", cfg["data"]["layout"])
    cases = len(info.get("cases", [])) or "?"
    labelset = cfg["data"]["labelset"]
    synth = root / "synth.json"
    if cfg["data"].get("stream") is not None:
        from .synth.stream import STREAM_KEYS

        stream = {**STREAM_KEYS, **cfg["data"]["stream"]}
        return (
            f"synthetic CT only (hlfd_train.synth cases made on the fly, stream seed "
            f"{stream['seed']}, a new case every {stream['crops_per_case']} crops; no patient "
            f"data), labelset {labelset}"
        )
    if synth.is_file():
        meta = json.loads(synth.read_text(encoding="utf-8"))
        return (
            f"synthetic CT only (hlfd_train.synth, seed {meta.get('seed')}, {cases} cases written "
            f"in the {layout} file layout; no patient data), labelset {labelset}"
        )
    return f"{layout} dataset '{root.name}', labelset {labelset}, {cases} cases"


def export(
    run: Path,
    out: Path,
    *,
    which: str = "best",
    onnx: bool = False,
    timing: bool = True,
    card_fields: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write the model package of ``run`` to ``out``; returns ``out``. ``card_fields`` (name,
    version, title, description, license; postprocessing keys are merged) override the card's
    defaults; ``half`` stores the
    floating-point weights as float16 (half the size; loaded back into float32 networks)."""
    cfg, summary, weights = run_files(Path(run), which)
    role = summary.get("role", "student")
    info, timing_image = prepared_info(cfg)
    state = load_weights(weights)
    teacher = summary.get("teacher")
    provenance = {
        "teacher": Path(teacher).name if teacher else teacher,
        "method": "none (teacher)" if role == "teacher" else cfg["distill"]["method"],
        "data": data_description(cfg, info),
        "seed": cfg["seed"],
        "steps": summary.get("steps"),
        "method_options": cfg["distill"]["options"] if role == "student" else {},
        "run": f"{cfg['name']}/{Path(run).name}",
    }
    card = card_for(cfg, role, preprocessing=info.get("preprocessing"), provenance=provenance)
    fields = dict(card_fields or {})
    card["postprocessing"].update(fields.pop("postprocessing", {}))
    card.update(fields)
    best = (
        json.loads((Path(run) / "best.json").read_text())
        if (Path(run) / "best.json").is_file()
        else {}
    )
    card["metrics"] = {"validation_dice": best} if best else {}
    evaluation = Path(run) / "evaluation" / "metrics.json"
    if evaluation.is_file():
        card["metrics"]["evaluation"] = json.loads(evaluation.read_text())["summary"]
    package = package_from_state(card, state, Path(out))
    net = package.build_network()
    extra: dict[str, bytes] = {}
    if onnx:
        dims = cfg["model"]["spatial_dims"]
        crop = cfg["data"]["crop"] if dims == 2 else cfg["data"]["patch"]
        example = torch.randn(2, 1, *crop)
        data, err = to_onnx(fold_batchnorm(net, inplace=False), dims, example)
        if err > ONNX_TOLERANCE:
            raise RuntimeError(
                f"ONNX export of {card['network']['architecture']}: outputs differ from torch by "
                f"{err:.2e} > {ONNX_TOLERANCE:.0e}"
            )
        extra[ONNX_NAME] = data
        card["onnx"] = ONNX_NAME
        card["metrics"]["onnx_max_probability_error"] = err
    state = net.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        package = package_from_state(card, state, Path(out))
    if timing:
        card["runtimes"] = time_pipeline(package, timing_image)
    return save_package(out, card, state, extra)
