"""Import structure: no import cycles between the project's modules (lazy imports included);
the runtime needs nothing from the training extra; pyproject declares what the runtime needs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "HLFDSegment" / "HLFDSegmentLib", ROOT / "training" / "hlfd_train")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            parts = list(path.relative_to(package.parent).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file, parent packages excluded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found |= {f"{base}.{a.name}" for a in node.names} | ({base} if node.module else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return (found & known) - parents - {name}


def import_cycles() -> list[list[str]]:
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """Two modules that import each other (one lazily, inside a function) are reported."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    (package / "b.py").write_text("B = 2\n\ndef f():\n    from .a import A\n    return A\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", (package,))
    assert import_cycles() == [["pkg.a", "pkg.b", "pkg.a"]]


TRAIN_ONLY = ("matplotlib", "yaml", "scipy", "tensorboard", "onnx", "slicerio", "hlfd_train")


@pytest.mark.slow
def test_runtime_runs_without_the_training_dependencies(tmp_path):
    """``hlfd-segment`` with a built-in model segments a CT in a process where every module of
    the ``[train]`` extra is unimportable, and imports none of them."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in {TRAIN_ONLY!r}:
            sys.modules[name] = None  # importing it now raises ImportError
        from HLFDSegmentLib.cli import main
        from HLFDSegmentLib.io import write_image
        from HLFDSegmentLib.phantom import PhantomConfig, make_phantom

        config = PhantomConfig(shape=(12, 64, 64), spacing=(3.0, 3.0, 5.0))
        image, _ = make_phantom(config).to_sitk()
        write_image(image, {str(tmp_path / "ct.nii.gz")!r})
        code = main([{str(tmp_path / "ct.nii.gz")!r}, "-o", {str(tmp_path / "ct.seg.nrrd")!r},
                     "-m", "kidney", "--offline", "--quiet", "--device", "cpu"])
        loaded = [m for m in sys.modules if m.split(".")[0] in {TRAIN_ONLY!r} and sys.modules[m]]
        print(code, loaded)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0", "[]"], done.stdout + done.stderr[-2000:]
    assert (tmp_path / "ct.seg.nrrd").stat().st_size > 0


def test_package_declares_torch_like_the_slicer_path():
    """pyproject's runtime dependencies hold the Slicer install's torch range and packages."""
    import tomllib

    from HLFDSegmentLib import deps

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = project["dependencies"]
    assert f"torch{deps.TORCH_REQUIREMENT}" in runtime
    assert {req for _, req in deps.REQUIREMENTS} <= set(runtime)
    assert not {r for r in runtime if r.split(">")[0].split("=")[0].lower() in TRAIN_ONLY}
    assert "hlfd-segment[train]" in project["optional-dependencies"]["dev"]
