"""What the worker needs in Slicer's Python, and how to install it without breaking Slicer.

torch comes from the PyTorch extension (``PyTorchUtils``, which picks the right CUDA build);
the rest is installed with pip under a constraints file that pins the packages Slicer ships
(numpy, scipy, SimpleITK, vtk) and the extension's torch to their installed versions, so they
are never replaced (e.g. monai 1.6 requires torch>=2.8: without the pin pip would swap the
PyTorch extension's CUDA/CPU build for a PyPI one; with it pip picks an older monai instead).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
# (import name, pip requirement) the runtime needs besides torch and what Slicer ships
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("monai", "monai>=1.4,<1.7"),
    ("safetensors", "safetensors>=0.4"),
    ("jsonschema", "jsonschema>=4"),
)
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


def pip_arguments(
    requirements: Sequence[str], constraints_path: str | os.PathLike[str]
) -> list[str]:
    """Arguments for ``slicer.util.pip_install`` (a list: no quoting issues on any platform)."""
    return [*requirements, "-c", os.fspath(constraints_path)]


def install(
    requirements: Sequence[tuple[str, str]],
    pip_install: Callable[[list[str]], object],
    folder: str | os.PathLike[str],
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> None:
    """Install (module, requirement) pairs with ``pip_install`` (``slicer.util.pip_install``),
    pinning :data:`PROTECTED`; a failure is raised as ``RuntimeError`` with a readable message."""
    if not requirements:
        return
    reqs = [req for _, req in requirements]
    path = Path(folder) / "hlfd-constraints.txt"
    path.write_text(constraints(), encoding="utf-8")
    try:
        pip_install(pip_arguments(reqs, path))
    except Exception as exc:
        raise RuntimeError(
            f"Installing {', '.join(reqs)} failed ({exc}). Check the internet connection, "
            "or install them from the Python console with slicer.util.pip_install."
        ) from exc
    finally:
        path.unlink(missing_ok=True)
    importlib.invalidate_caches()
    still = missing_requirements(requirements, find_spec)
    if still:
        names = ", ".join(module for module, _ in still)
        raise RuntimeError(f"Installation finished but {names} still cannot be imported")


def detect_device() -> str:
    """One line for the UI: the accelerator torch sees, or why there is none."""
    if torch_missing():
        return "PyTorch not installed yet"
    from .devices import describe_accelerator

    return describe_accelerator()
