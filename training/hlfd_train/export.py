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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from HLFDSegmentLib.atomic import atomic_write
from HLFDSegmentLib.backends import onnx_metadata
from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.io import read_image
from HLFDSegmentLib.modelpackage import (
    CARD_NAME,
    ONNX_NAME,
    WEIGHTS_NAME,
    load_package,
    safetensors_arrays,
    save_package,
    validate_card,
)
from HLFDSegmentLib.pipeline import Segmenter

from .cards import card_for, load_weights, package_from_state, state_bytes
from .config import ConfigError, load_config

FIXED_CARD_FIELDS = ("files", "weights", "network", "format_version")  # the weights' own
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


def to_onnx(
    net: torch.nn.Module, spatial_dims: int, example: torch.Tensor, weights: bytes | None = None
) -> tuple[bytes, float]:
    """ONNX bytes of ``net`` (dynamic batch and spatial size, :func:`compact_onnx` against the
    package's safetensors ``weights``) and the max probability error of ONNX Runtime against
    torch on ``example``.

    BatchNorm stays a node of its own (no constant folding at export): its parameters, like the
    convolutions', keep the package's exact values, and ONNX Runtime fuses it at load."""
    from HLFDSegmentLib.backends import onnx_session

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
            do_constant_folding=False,
            dynamo=False,  # the dynamo exporter needs onnxscript, not installed here
        )
    data = compact_onnx(buf.getvalue(), onnx_metadata(net), weights)
    session = onnx_session(data, weights)
    (got,) = session.run(None, {"image": example.numpy()})
    with torch.no_grad():
        want = torch.softmax(net(example), 1).numpy()
    got_p = torch.softmax(torch.from_numpy(got), 1).numpy()
    return data, float(np.abs(got_p - want).max())


def compact_onnx(data: bytes, metadata: dict[str, str], weights: bytes | None = None) -> bytes:
    """``data`` without a second copy of the package's weights, and ``metadata`` set as the
    model's metadata properties.

    When every floating-point tensor of the safetensors ``weights`` is an initializer of the
    graph with the same values, the initializers become ONNX external data pointing into
    ``model.safetensors`` (its real byte offsets: the folder opens in any ONNX tool; the runtime
    feeds them from the checksummed bytes): the graph file is then ~100 kB. Otherwise the
    graph stays self-contained (e.g. freshly initialised networks, whose identical BatchNorm
    tensors the exporter merges), float32 initializers exact in float16 stored as float16. Either
    way a float16 tensor ``key`` is the initializer ``key.fp16`` cast to float32 in the graph,
    so the arithmetic is float32 on exactly the package's values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    floats = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT]
    values = {i.name: numpy_helper.to_array(i) for i in floats}
    stored = {
        k: v
        for k, v in (safetensors_arrays(weights) if weights else {}).items()
        if v[0].dtype.kind == "f"
    }
    shared = bool(stored) and all(
        k in values and np.array_equal(a.astype(np.float32), values[k])
        for k, (a, _) in stored.items()
    )
    casts = []
    for init in floats:
        name, v = init.name, values[init.name]
        if shared and name in stored:
            array, offset = stored[name]
            half = array.dtype == np.float16
            tensor = TensorProto(
                name=f"{name}.fp16" if half else name,
                data_type=TensorProto.FLOAT16 if half else TensorProto.FLOAT,
                dims=list(array.shape),
                data_location=TensorProto.EXTERNAL,
            )
            for key, value in (
                ("location", WEIGHTS_NAME),
                ("offset", offset),
                ("length", array.nbytes),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        elif np.array_equal(v.astype(np.float16).astype(np.float32), v):
            half = True
            tensor = numpy_helper.from_array(v.astype(np.float16), f"{name}.fp16")
        else:
            continue
        init.CopyFrom(tensor)
        if half:
            casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    helper.set_model_props(model, metadata)
    return model.SerializeToString()


def onnx_for(package: Any, example_size: tuple[int, ...] | None = None) -> tuple[dict, bytes]:
    """The checked ONNX graph of a (possibly in-memory) package, sharing its weights as external
    data, and its card with ``onnx`` and the measured error added."""
    net = package.build_network()
    dims = package.spatial_dims
    size = example_size or (
        (256, 256) if dims == 2 else tuple(package.card["inference"]["roi_size"])
    )
    channels = package.card["network"]["in_channels"]
    data, err = to_onnx(net, dims, torch.randn(2, channels, *size), package.weights)
    _check_onnx_error(package.card, err)
    card = {**package.card, "onnx": ONNX_NAME}
    card["metrics"] = {**card.get("metrics", {}), "onnx_max_probability_error": err}
    return card, data


def add_onnx(package_dir: Path, example_size: tuple[int, ...] | None = None) -> Path:
    """Add a checked ``model.onnx`` to an existing package folder; the weights file and every
    other card field stay as they are (the card gains ``onnx`` and its checksum)."""
    from safetensors.torch import load as load_safetensors

    package = load_package(package_dir)
    card, data = onnx_for(package, example_size)
    return save_package(package_dir, card, load_safetensors(package.weights), {ONNX_NAME: data})


def _check_onnx_error(card: dict[str, Any], err: float) -> None:
    if err > ONNX_TOLERANCE:
        raise RuntimeError(
            f"ONNX export of {card['network']['architecture']}: outputs differ from torch by "
            f"{err:.2e} > {ONNX_TOLERANCE:.0e}"
        )


def time_pipeline(package: Any, image_path: Path | None, runs: int = 1) -> list[dict[str, Any]]:
    """Seconds for one volume through the runtime pipeline on this machine's CPU: the median
    of ``runs`` timed runs after a warm-up (``[]`` without an image)."""
    if image_path is None or not Path(image_path).is_file():
        return []
    image = read_image(image_path)
    seg = Segmenter(package, device="cpu")
    seg(image)  # warm-up (allocations, oneDNN kernels)
    seconds = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        seg(image)
        seconds.append(time.perf_counter() - t0)
    size = "x".join(map(str, image.GetSize()))
    spacing = "x".join(f"{s:.3g}" for s in image.GetSpacing())
    cpu = platform.processor() or platform.machine()
    return [
        {
            "device": f"cpu ({torch.get_num_threads()} threads, {cpu})",
            "seconds": round(float(np.median(seconds)), 2),
            "input": f"{Path(image_path).parent.name}/{Path(image_path).name} {size}"
            f" voxels of {spacing} mm",
        }
    ]


def update_card(package_dir: Path, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted card fields (``{"postprocessing.cyst_max_hu": 20}``) of a package folder's
    card, checked against the schema and written atomically; what describes the weights
    (:data:`FIXED_CARD_FIELDS`) is not the card's to change. Returns the new card."""
    card_path = Path(package_dir) / CARD_NAME
    if not card_path.is_file():
        raise ModelError(f"{package_dir}: not a model package folder (no {CARD_NAME})")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        if (parents[:1] or [leaf])[0] in FIXED_CARD_FIELDS:
            raise ModelError(f"{card_path}: field {key!r} describes the weights, not editable")
        node = card
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ModelError(f"{card_path}: field {part!r} of {key!r} is not a mapping")
        node[leaf] = value
    validate_card(card, str(card_path))
    atomic_write(card_path, json.dumps(card, indent=2) + "\n")
    return card


def _run_name(path: Path) -> str:
    """``<name>/<run>`` of a run folder or of a weights file inside one (no machine paths)."""
    folder = path.parent if path.suffix == ".safetensors" else path
    return f"{folder.parent.name}/{folder.name}"


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
        aux = [a.replace("+", ", ") for a in stream["aux_labels"]]
        return (
            f"synthetic CT only (hlfd_train.synth cases made on the fly, stream seed "
            f"{stream['seed']}, a new case every {stream['crops_per_case']} crops; no patient "
            f"data), labelset {labelset}"
            + (f"; also learnt, counted as background: {'; '.join(aux)}" if aux else "")
        )
    if synth.is_file():
        meta = json.loads(synth.read_text(encoding="utf-8"))
        return (
            f"synthetic CT only (hlfd_train.synth, seed {meta.get('seed')}, {cases} cases written "
            f"in the {layout} file layout; no patient data), labelset {labelset}"
        )
    return f"{layout} dataset '{root.name}', labelset {labelset}, {cases} cases"


def started_from(init: str | None) -> dict[str, Any] | str | None:
    """What a fine-tune started from: a package's (folder or .zip, as ``model.<role>.init``
    takes it) name, version and weights' sha256, read now, so export before installing over
    the start; else the path as given."""
    if not init:
        return None
    path = Path(init)
    if not ((path / "model.json").is_file() or path.suffix.lower() == ".zip"):
        return str(init)
    card = load_package(path).card
    sha = card["files"].get("model.safetensors", {}).get("sha256")
    return {"name": card["name"], "version": card["version"], "sha256": sha}


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
        "teacher": _run_name(Path(teacher)) if teacher else teacher,
        "method": "none (teacher)" if role == "teacher" else cfg["distill"]["method"],
        "data": data_description(cfg, info),
        "seed": cfg["seed"],
        "steps": summary.get("steps"),
        "method_options": cfg["distill"]["options"] if role == "student" else {},
        "run": f"{cfg['name']}/{Path(run).name}",
    }
    start = started_from((cfg["model"].get(role) or {}).get("init"))
    if start:
        provenance["init"] = start
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
    state = net.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        package = package_from_state(card, state, Path(out))
        net = package.build_network()  # float32 network holding the float16 values: the ONNX
    extra: dict[str, bytes] = {}
    if onnx:
        dims = cfg["model"]["spatial_dims"]
        crop = cfg["data"]["crop"] if dims == 2 else cfg["data"]["patch"]
        example = torch.randn(2, card["network"]["in_channels"], *crop)
        data, err = to_onnx(net, dims, example, state_bytes(state))
        _check_onnx_error(card, err)
        extra[ONNX_NAME] = data
        card["onnx"] = ONNX_NAME
        card["metrics"]["onnx_max_probability_error"] = err
    if timing:
        card["runtimes"] = time_pipeline(package, timing_image)
    return save_package(out, card, state, extra)
