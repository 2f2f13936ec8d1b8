"""Network runners: the one step of the pipeline that differs between PyTorch and ONNX Runtime.

A runner maps a float32 batch ``(N, 1, *spatial)`` to float32 logits ``(N, C, *spatial)`` as
numpy arrays; everything around it (slice batching, sliding window, softmax, argmax, resampling)
is shared numpy/SimpleITK code in :mod:`.pipeline`. :class:`OnnxRunner` never imports torch, so
a CPU install needs only onnxruntime; :class:`TorchRunner` imports torch when it is built.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .deps import runs_on_cpu
from .errors import InputError, ModelError

if TYPE_CHECKING:
    import torch

    from .modelpackage import ModelPackage

BACKENDS = ("auto", "torch", "onnx")
SIZE_DIVISIBLE_KEY = "size_divisible"
"""ONNX metadata key: input height/width (and depth) must be multiples of this."""


class NetworkRunner(Protocol):
    """What the pipeline needs from a network: logits of a batch, and how it ran."""

    backend: str
    device: str
    description: str
    precision: str
    size_divisible: int
    notes: list[str]

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def _importable(module: str) -> bool:
    """True when ``import module`` would succeed; does not import it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):
        return False


def torch_available() -> bool:
    return _importable("torch")


def onnxruntime_available() -> bool:
    return _importable("onnxruntime")


def resolve_backend(name: str, package: ModelPackage, device: str = "auto") -> str:
    """The backend that runs ``package`` on ``device``; checks that the choice can run it.

    ``auto``: ONNX Runtime on the CPU when the package has an ONNX graph and onnxruntime is
    installed (float32, faster than torch there, and no 2 s ``import torch``); otherwise torch,
    or ONNX Runtime when torch is not installed."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}: use {', '.join(BACKENDS)}")
    if name == "auto":
        onnx_ready = package.onnx is not None and onnxruntime_available()
        if onnx_ready and runs_on_cpu(device):
            name = "onnx"
        else:
            name = "torch" if torch_available() else "onnx"
    if name == "onnx" and package.onnx is None:
        lack = "" if torch_available() else " and PyTorch is not installed"
        raise ModelError(
            f"{package.path}: the package has no ONNX graph (card field 'onnx'){lack}; "
            "use --backend torch or a package exported with --onnx"
        )
    if name == "onnx" and not onnxruntime_available():
        raise ModelError("backend 'onnx' needs onnxruntime: pip install onnxruntime")
    if name == "torch" and not torch_available():
        raise ModelError("backend 'torch' needs PyTorch, not installed here; try --backend onnx")
    return name


def make_runner(
    package: ModelPackage, backend: str = "auto", device: str = "auto", threads: int | None = None
) -> NetworkRunner:
    """The runner of ``package`` for ``backend`` (see :func:`resolve_backend`)."""
    if resolve_backend(backend, package, device) == "onnx":
        return OnnxRunner(package, device, threads)
    return TorchRunner(package, device, threads)


# -- PyTorch ------------------------------------------------------------------------------------
class TorchRunner:
    """The package's network in PyTorch: BatchNorm folded, channels-last for 2D, bf16 autocast
    where the device has native bf16 (and the card allows it on CPU)."""

    backend = "torch"

    def __init__(
        self,
        package: ModelPackage,
        device: str = "auto",
        threads: int | None = None,
        net: torch.nn.Module | None = None,
    ):
        import torch

        from .deps import describe_device
        from .devices import autocast_dtype, select_device
        from .nets import fold_batchnorm

        if threads:
            torch.set_num_threads(threads)
        self._device, note = select_device(device)
        self.device = str(self._device)
        self.description = describe_device(self.device)
        self.notes = [note] if note else []
        if net is None:  # folding measured 1.6x on CPU for the MobileNetV2 student
            net = fold_batchnorm(package.build_network(), inplace=True)
        self.channels_last = package.spatial_dims == 2 and self._device.type != "mps"
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net.to(self._device).eval()
        self.size_divisible = int(getattr(net, "size_divisible", 1))
        allow_bf16 = package.card["inference"].get("bf16_cpu", True)
        self.amp = autocast_dtype(self._device, cpu_bf16=allow_bf16)
        self.precision = "float32" if self.amp is None else str(self.amp).removeprefix("torch.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(
                self._device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
            ),
        ):
            t = torch.from_numpy(x).to(self._device)
            if self.channels_last and t.ndim == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            return self.net(t).float().cpu().numpy()


# -- ONNX Runtime -------------------------------------------------------------------------------
class OnnxRunner:
    """The package's ``model.onnx`` (sha256-checked with the rest of the package) in ONNX
    Runtime on the CPU. Float16-stored weights are cast to float32 inside the graph, so the
    arithmetic is float32 whatever the file stores."""

    backend = "onnx"
    precision = "float32"

    def __init__(self, package: ModelPackage, device: str = "auto", threads: int | None = None):

        if device.split(":")[0] not in {"auto", "cpu", "cuda", "mps"}:
            raise InputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
        self.device = "cpu"
        self.notes = (
            [f"device {device!r} asked but the ONNX backend runs on the CPU; using CPU"]
            if device not in {"auto", "cpu"}
            else []
        )
        where = package.path / str(package.card["onnx"])
        assert package.onnx is not None
        try:
            self.session = onnx_session(package.onnx, package.weights, threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{where}: ONNX Runtime cannot load it ({_first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{where}: expected one input and one output in the ONNX graph")
        self._input = inputs[0].name
        used = threads or self.session.get_session_options().intra_op_num_threads
        self.description = f"CPU ({used or os.cpu_count()} threads, ONNX Runtime)"
        self._half = inputs[0].type == "tensor(float16)"
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.size_divisible = int(meta.get(SIZE_DIVISIBLE_KEY, 1))
        except ValueError:
            raise ModelError(f"{where}: metadata {SIZE_DIVISIBLE_KEY!r} is not a number") from None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feed = x.astype(np.float16) if self._half else x
        (logits,) = self.session.run(None, {self._input: feed})
        return np.asarray(logits, dtype=np.float32)


def onnx_session(graph: bytes, weights: bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``graph``. A graph whose initializers are external data in
    the package's ``model.safetensors`` (see ``hlfd_train.export.compact_onnx``) gets them from
    ``weights``, the checksummed bytes already in memory: float16 tensors as ``<name>.fp16``."""
    import onnxruntime as ort

    from .modelpackage import WEIGHTS_NAME, safetensors_arrays

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if WEIGHTS_NAME.encode() in graph:  # the external-data location string
        names, values = [], []
        for name, (array, _) in safetensors_arrays(weights).items():
            if array.dtype.kind == "f":
                names.append(f"{name}.fp16" if array.dtype == np.float16 else name)
                values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
        options.add_external_initializers(names, values)
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def onnx_metadata(net: Any) -> dict[str, str]:
    """The metadata an exported graph carries for :class:`OnnxRunner` (from a zoo network)."""
    return {SIZE_DIVISIBLE_KEY: str(int(getattr(net, "size_divisible", 1)))}
