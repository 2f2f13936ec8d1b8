"""End-to-end CLI benchmark: student vs teachers, each on torch and ONNX Runtime, 512x512x200 CT.

Each row runs the whole ``hlfd-segment`` command (process start and imports, read, preprocess,
infer, postprocess, resample back, write .seg.nrrd) as a fresh process ``--repeats`` times on
the same int16 phantom CT; the table gives median wall and CPU time, median peak RSS and each
row's ratio to the student rows, all measured in this one run, plus the installed size of the
torch and the onnxruntime stacks. Random weights (timing only); the student's ONNX graph is
exported with ``hlfd_train.export.add_onnx`` as for the built-in packages (``--backend auto``
runs that graph on the CPU). Usage:

    python bench/bench_pipeline.py [--repeats 3] [--slices 200] [--only student teacher]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from HLFDSegmentLib import __version__
from HLFDSegmentLib.io import write_image
from HLFDSegmentLib.modelpackage import make_card, save_package
from HLFDSegmentLib.nets import build_network, count_macs, count_parameters
from HLFDSegmentLib.phantom import PhantomConfig, make_phantom

MODELS = {  # name -> (architecture, spatial dims, kwargs, backend)
    "student (mobilenetv2_unet2d), torch": ("mobilenetv2_unet2d", 2, {}, "torch"),
    "student (mobilenetv2_unet2d), onnx": ("mobilenetv2_unet2d", 2, {}, "onnx"),
    "demo teacher (resnet18_unet2d), torch": ("resnet18_unet2d", 2, {}, "torch"),
    "demo teacher (resnet18_unet2d), onnx": ("resnet18_unet2d", 2, {}, "onnx"),
    "paper teacher (unetpp2d), torch": ("unetpp2d", 2, {}, "torch"),
    "paper teacher (unetpp2d), onnx": ("unetpp2d", 2, {}, "onnx"),
    "3D SegResNet (monai_segresnet3d)": ("monai_segresnet3d", 3, {}, "torch"),
}
STACKS = {  # runtime stack -> the distributions it installs (besides numpy and SimpleITK)
    "torch backend": ("torch", "monai", "safetensors", "sympy", "networkx", "jinja2"),
    "onnx backend": ("onnxruntime", "flatbuffers", "protobuf", "coloredlogs", "humanfriendly"),
}

_RUNNER = """
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.exit(r.stderr)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(wall, u.ru_maxrss / 1024, u.ru_utime + u.ru_stime)
"""


def build(root: Path, arch: str, dims: int, kwargs: dict, backend: str) -> Path:
    """A package of ``arch`` with seeded random weights (float16, like the shipped students; the
    BatchNorm statistics randomised so that no two tensors are equal, as after training); with
    a model.onnx for the onnx backend."""
    folder = root / f"{arch}-{backend}"
    if folder.exists():
        return folder
    torch.manual_seed(0)
    net = build_network(arch, dims, 1, 3, **kwargs)
    state = {
        k: (v + 0.01 * torch.rand_like(v)).half() if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    card = make_card(
        name=arch.replace("_", "-"),
        version="bench",
        task="kidney",
        architecture=arch,
        spatial_dims=dims,
        network_kwargs=kwargs,
    )
    save_package(folder, card, state)
    if backend == "onnx":
        from hlfd_train.export import add_onnx

        add_onnx(folder)
    return folder


def describe(arch: str, dims: int, kwargs: dict) -> tuple[float, float]:
    net = build_network(arch, dims, 1, 3, **kwargs)
    shape = (1, 1, 256, 256) if dims == 2 else (1, 1, 96, 96, 96)
    return count_parameters(net) / 1e6, count_macs(net, shape) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--only", nargs="*", help="substrings of model names to run")
    ap.add_argument("--out", type=Path, default=Path("docs/results/bench-pipeline-run.md"))
    args = ap.parse_args()
    script = Path(sys.executable).with_name("hlfd-segment")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        phantom = make_phantom(
            PhantomConfig(task="kidney", shape=(args.slices, 512, 512), spacing=(0.78, 0.78, 2.5)),
            seed=0,
        )
        ct = root / "ct.nii.gz"
        write_image(phantom.to_sitk()[0], ct)
        print(f"phantom {args.slices}x512x512 written in {time.perf_counter() - t:.1f} s")
        for name, (arch, dims, kwargs, backend) in MODELS.items():
            if args.only and not any(s in name for s in args.only):
                continue
            pkg = build(root, arch, dims, kwargs, backend)
            walls, rss, cpus, stages = [], [], [], []
            for i in range(args.repeats):
                out, report = root / "seg.seg.nrrd", root / f"r{i}.json"
                cmd = [
                    str(script),
                    str(ct),
                    "-o",
                    str(out),
                    "-m",
                    str(pkg),
                    "--device",
                    "cpu",
                    "--backend",
                    backend,
                    "--report",
                    str(report),
                    "--quiet",
                ]
                res = subprocess.run(
                    [sys.executable, "-c", _RUNNER, *cmd],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                wall, peak, cpu = map(float, res.stdout.split())
                walls.append(wall)
                rss.append(peak)
                cpus.append(cpu)
                stages.append(json.loads(report.read_text())["seconds"])
                print(f"  {name} run {i + 1}: {wall:.1f} s, {cpu:.1f} s CPU, {peak:.0f} MB")
            params, macs = describe(arch, dims, kwargs)
            med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            wall_s, cpu_s, peak = (statistics.median(v) for v in (walls, cpus, rss))
            rows.append((name, params, macs, wall_s, cpu_s, med, peak))
    students = [r for r in rows if r[0].startswith("student")]
    if not students:
        raise SystemExit("no student row: --only must keep a student to compute the ratios")
    lines = [
        f"# Pipeline benchmark ({args.slices}x512x512 int16 CT, CPU)",
        "",
        f"Command: `python bench/bench_pipeline.py --repeats {args.repeats} "
        f"--slices {args.slices}`  ",
        f"Code {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {_cpu_name()}.  ",
        "Whole `hlfd-segment` process (start and imports, read .nii.gz, preprocess, infer, "
        f"postprocess, resample, write .seg.nrrd); median of {args.repeats} runs; random "
        "weights. Stages from the `--report` timings; start = wall minus their total "
        "(interpreter, imports, model load).",
        "",
        "| model | params (M) | GMACs per 256² slice / 96³ window | wall (s) | CPU (s) "
        "| start | read | preprocess | infer | post | resample | write | peak RSS (MB) "
        + "".join(f"| wall / {s[0].split(', ')[-1]} student " for s in students)
        + "|",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(students),
    ]
    for name, params, macs, wall, cpu, med, peak in rows:
        stage = " | ".join(
            f"{med[k]:.2f}" for k in ("read", "preprocess", "infer", "postprocess", "resample")
        )
        lines.append(
            f"| {name} | {params:.2f} | {macs:.2f} | {wall:.2f} | {cpu:.2f} | "
            f"{wall - med['total']:.2f} | {stage} | {med['write']:.2f} | {peak:.0f} | "
            + " | ".join(f"{wall / s[3]:.2f}" for s in students)
            + " |"
        )
    lines += ["", "Installed size of each runtime stack (site-packages of this venv):", ""]
    lines += [
        f"- {stack}: {size_mb:.0f} MB ({', '.join(names)})"
        for stack, size_mb, names in install_sizes()
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def install_sizes() -> list[tuple[str, float, tuple[str, ...]]]:
    """(stack, MB on disk, distributions found) for each of :data:`STACKS`."""
    import importlib.metadata

    out = []
    for stack, names in STACKS.items():
        total, found = 0, []
        for name in names:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            found.append(name)
            for f in dist.files or []:
                path = Path(dist.locate_file(f))
                if path.is_file():
                    total += path.stat().st_size
        out.append((stack, total / 1e6, tuple(found)))
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
