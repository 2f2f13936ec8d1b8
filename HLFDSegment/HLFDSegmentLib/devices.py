"""Where and in which precision networks run: the one place that decides it (runtime,
training, and the one-line device description of the Slicer panel). Imports without torch
(each function imports it), so reading ``CPU_BF16_ENV`` costs nothing."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch

CPU_BF16_ENV = "HLFD_CPU_BF16"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def select_device(name: str = "auto") -> tuple[torch.device, str | None]:
    """Resolve ``auto|cpu|cuda|mps`` (or ``cuda:N``); fall back to CPU with a note if absent."""
    import torch

    cuda, mps = torch.cuda.is_available(), _mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu"), None
    if name.startswith("cuda") and not cuda:
        return torch.device("cpu"), f"device {name!r} asked but no CUDA GPU is available; using CPU"
    if name == "mps" and not mps:
        return torch.device("cpu"), "device 'mps' asked but Apple MPS is not available; using CPU"
    if name.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name), None


def describe_accelerator() -> str:
    """One line: the accelerator torch sees, else the CPU threads."""
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA)"
    if _mps_available():
        return "GPU: Apple MPS"
    return f"CPU only ({torch.get_num_threads()} threads)"


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 / AMX); elsewhere bf16 is slower.

    ``HLFD_CPU_BF16=0`` or ``=1`` forces the answer, so tests and benchmarks choose the CPU
    precision path instead of inheriting it from the machine's CPU flags."""
    import torch

    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in {"0", "off", "false", "no"}:
        return False
    if forced in {"1", "on", "true", "yes"}:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(
    device: torch.device, mode: str = "auto", cpu_bf16: bool = True
) -> torch.dtype | None:
    """Autocast dtype for ``mode`` ``auto|bf16|fp16|off``, or None for float32.

    CUDA: bf16 where supported, else (or with ``fp16``) float16. CPU: bf16 when asked, or in
    ``auto`` where the CPU has native bf16 and ``cpu_bf16`` allows it. Otherwise float32."""
    import torch

    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    auto_cpu = mode == "auto" and device.type == "cpu" and cpu_bf16 and cpu_has_fast_bf16()
    return torch.bfloat16 if mode == "bf16" or auto_cpu else None
