"""What the worker needs in Slicer's Python, and how to install it without breaking Slicer.

Two paths: on the CPU a model with an ONNX graph runs in ONNX Runtime (``onnxruntime``, about
15 MB: no PyTorch at all, see :func:`needs_torch`); a GPU, or a model without a graph, needs
torch. Everything is installed by one background process the panel follows line by line
(``python -m HLFDSegmentLib.deps install``, :func:`install_command`): torch first through
light-the-torch, which picks the build for the computer's NVIDIA driver (or the CPU build) as the
PyTorch extension does, then the rest with pip under a constraints file that pins the packages
Slicer ships (numpy, scipy, SimpleITK, vtk) and the torch just installed, so they are never
replaced (e.g. monai 1.6 requires torch>=2.8: without the pin pip would swap the CUDA build for
a PyPI one; with it pip picks an older monai instead).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
LTT_REQUIREMENT = "light-the-torch>=0.5"
"""Picks the torch build (CUDA version or CPU) for this computer's driver, as the PyTorch
extension does."""
# (import name, pip requirement) the runtime needs besides torch and what Slicer ships
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("monai", "monai>=1.4,<1.7"),
    ("safetensors", "safetensors>=0.4"),
    ("jsonschema", "jsonschema>=4"),
)
"""The torch path's requirements (besides torch)."""
ONNX_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("onnxruntime", "onnxruntime>=1.17"),
    ("safetensors", "safetensors>=0.4"),
    ("jsonschema", "jsonschema>=4"),
)
"""The CPU path's requirements: no torch, no monai."""
DOWNLOAD_MB = {"torch-cuda": 3000, "torch-cpu": 200, "torch-macos": 80, "other": 1}
"""Approximate download sizes (MB): a CUDA torch with its NVIDIA libraries is ~2.5-4 GB (the
wheel and the nvidia-* packages, PyTorch 2.x, Linux/Windows), a CPU one ~200 MB, macOS ~80 MB;
monai ~3 MB; onnxruntime ~15 MB (CPU wheel, 1.2x); safetensors and jsonschema (with its
dependencies) ~1 MB each."""
REQUIREMENT_MB = {"monai": 3, "onnxruntime": 15}
PROTECTED = ("numpy", "scipy", "SimpleITK", "vtk", "torch")
"""Distributions bundled with Slicer (and torch, installed by the PyTorch extension) that an
install must never upgrade or downgrade."""


def missing_requirements(
    requirements: Iterable[tuple[str, str]] = REQUIREMENTS,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> list[tuple[str, str]]:
    """The (module, pip requirement) pairs whose module cannot be imported."""
    return [(module, req) for module, req in requirements if find_spec(module) is None]


def torch_missing(find_spec: Callable[[str], object] = importlib.util.find_spec) -> bool:
    return find_spec("torch") is None


def runs_on_cpu(device: str, gpu: bool | None = None) -> bool:
    """A run on ``device`` (auto, cpu, cuda, cuda:N, mps) is on the CPU whatever torch would say:
    ``cpu``, or ``auto`` where no GPU driver is found (``gpu``, default
    :func:`accelerator_possible`; torch is not imported to decide)."""
    if device != "auto":
        return device == "cpu"
    return not (accelerator_possible() if gpu is None else gpu)


def needs_torch(device: str, has_onnx_graph: bool, gpu: bool | None = None) -> bool:
    """Whether a run on ``device`` of a model with or without an ONNX graph needs torch: off the
    CPU (:func:`runs_on_cpu`) or for a model without a graph. The CPU path needs only
    :data:`ONNX_REQUIREMENTS`."""
    return not has_onnx_graph or not runs_on_cpu(device, gpu)


def requirements_for(
    device: str,
    has_onnx_graph: bool,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
    gpu: bool | None = None,
) -> tuple[bool, list[tuple[str, str]]]:
    """``(torch missing and needed, missing (module, requirement) pairs)`` for a run on
    ``device`` (see :func:`needs_torch`)."""
    if needs_torch(device, has_onnx_graph, gpu):
        return torch_missing(find_spec), missing_requirements(REQUIREMENTS, find_spec)
    return False, missing_requirements(ONNX_REQUIREMENTS, find_spec)


def missing_names(torch_missing: bool, missing: Iterable[tuple[str, str]]) -> list[str]:
    """Module names for messages: ``torch`` first when it is missing, then ``missing``'s."""
    return (["torch"] if torch_missing else []) + [module for module, _ in missing]


def constraints(
    protected: Iterable[str] = PROTECTED,
    version: Callable[[str], str] = importlib.metadata.version,
) -> str:
    """A pip constraints file pinning each installed ``protected`` distribution."""
    lines = []
    for name in protected:
        try:
            lines.append(f"{name}=={version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "".join(f"{line}\n" for line in lines)


def describe_device(device: str) -> str:
    """One line for the torch device a run uses (a CUDA device -> its GPU name); imports torch."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.partition(":")[2] or 0)
        return f"GPU: {torch.cuda.get_device_name(index)} (CUDA)"
    if device.startswith("mps"):
        return "GPU: Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def has_nvidia_gpu(which=shutil.which) -> bool:
    """An NVIDIA driver is installed (``nvidia-smi`` found): the PyTorch extension then picks a
    CUDA build of torch. Needs no torch."""
    return which("nvidia-smi") is not None


def accelerator_possible(
    which=shutil.which, system: str = sys.platform, machine: str | None = None
) -> bool:
    """A GPU torch could use may be here: an NVIDIA or AMD (ROCm) driver, or Apple silicon
    (MPS). False means CPU for sure, decided without importing torch (2 s)."""
    if system == "darwin":
        return (machine or platform.machine()) == "arm64"
    return has_nvidia_gpu(which) or which("rocm-smi") is not None


def torch_build(platform: str = sys.platform, nvidia: bool | None = None) -> str:
    """Which torch the PyTorch extension will install here: torch-cuda, torch-cpu, torch-macos."""
    if platform == "darwin":
        return "torch-macos"
    return "torch-cuda" if (has_nvidia_gpu() if nvidia is None else nvidia) else "torch-cpu"


def download_megabytes(
    torch_needed: bool, missing: Sequence[tuple[str, str]], build: str | None = None
) -> int:
    """About how many MB an install downloads (see :data:`DOWNLOAD_MB`)."""
    total = DOWNLOAD_MB[build or torch_build()] if torch_needed else 0
    return total + sum(REQUIREMENT_MB.get(module, DOWNLOAD_MB["other"]) for module, _ in missing)


def size_text(megabytes: int) -> str:
    return f"about {megabytes / 1000:.1f} GB" if megabytes >= 1000 else f"about {megabytes} MB"


def install_question(
    torch_needed: bool, missing: Sequence[tuple[str, str]], build: str | None = None
) -> str:
    """The confirmation text: what is installed, how, and the real download size."""
    build = build or torch_build()
    names = missing_names(torch_needed, missing)
    text = (
        f"HLFD Segment needs these Python packages: {', '.join(names)}. Install them now? "
        f"This downloads {size_text(download_megabytes(torch_needed, missing, build))} once"
    )
    if torch_needed:
        kind = {
            "torch-cuda": "the CUDA build of PyTorch, for the NVIDIA GPU found here",
            "torch-cpu": "the CPU build of PyTorch (no NVIDIA GPU found)",
            "torch-macos": "PyTorch for macOS",
        }[build]
        text += f" ({kind}, chosen by light-the-torch as the PyTorch extension does)"
    return text + "; Slicer's own packages are not changed."


def install_command(
    python: str | os.PathLike[str],
    torch_needed: bool,
    requirements: Sequence[tuple[str, str]],
    pip_options: Sequence[str] = (),
) -> list[str]:
    """``python -m HLFDSegmentLib.deps install ...``: one process that installs torch (if
    needed) and then ``requirements``, printing pip's lines, for the panel to follow (instead of
    a blocking ``pip_install``). ``pip_options`` go to every pip call (e.g. ``--no-index``)."""
    argv = [os.fspath(python), "-m", "HLFDSegmentLib.deps", "install"]
    argv += ["--torch"] if torch_needed else []
    argv += [f"--pip-option={option}" for option in pip_options]
    return argv + [req for _, req in requirements]


def run_install(argv: Sequence[str] | None = None) -> int:
    """The ``install`` command: torch through light-the-torch, then the requirements with pip,
    Slicer's packages (and the new torch) pinned. Returns the exit status (the failed step's)."""
    ap = argparse.ArgumentParser(prog="python -m HLFDSegmentLib.deps install")
    ap.add_argument("--torch", action="store_true", help=f"install torch{TORCH_REQUIREMENT}")
    ap.add_argument("--pip-option", action="append", default=[], help="passed to pip")
    ap.add_argument("requirements", nargs="*")
    args = ap.parse_args(argv)
    pip = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", *args.pip_option]
    steps: list[tuple[str, list[str]]] = []
    if args.torch and importlib.util.find_spec("light_the_torch") is None:
        steps.append(("light-the-torch (chooses the PyTorch build)", [*pip, LTT_REQUIREMENT]))
    if args.torch:
        ltt = [sys.executable, "-m", "light_the_torch", "install", "--progress-bar", "off"]
        torch = f"torch{TORCH_REQUIREMENT}"
        steps.append((torch, [*ltt, *args.pip_option, torch]))
    if args.requirements:
        steps.append((", ".join(args.requirements), [*pip, *args.requirements]))
    with tempfile.TemporaryDirectory() as folder:
        for i, (what, command) in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] installing {what}", flush=True)
            importlib.invalidate_caches()  # the constraints pin what the steps before installed
            constraints = write_constraints(folder)
            status = subprocess.run([*command, "-c", os.fspath(constraints)], check=False)
            if status.returncode != 0:
                print(f"installing {what} failed (exit status {status.returncode})", flush=True)
                return status.returncode or 1
    return 0


def write_constraints(folder: str | os.PathLike[str]) -> Path:
    """Write the constraints file pinning :data:`PROTECTED` into ``folder``; returns its path."""
    path = Path(folder) / "hlfd-constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(constraints(), encoding="utf-8")
    return path


def detect_device() -> str:
    """One line for the UI: the accelerator torch sees, or why there is none."""
    if torch_missing():
        if accelerator_possible():
            return "GPU driver found; PyTorch (for the GPU) not installed yet"
        return f"CPU only ({os.cpu_count()} cores; ONNX Runtime, no PyTorch needed)"
    from .devices import describe_accelerator

    return describe_accelerator()


if __name__ == "__main__":  # the panel's device probe, or ``install ...`` (see run_install)
    if sys.argv[1:2] == ["install"]:
        sys.exit(run_install(sys.argv[2:]))
    print(detect_device(), flush=True)
