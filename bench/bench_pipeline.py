"""End-to-end CLI benchmark: student vs teacher vs a 3D network on a 512x512x200 int16 CT.

Each model runs the whole ``hlfd-segment`` command (read, preprocess, infer, postprocess,
resample back, write .seg.nrrd) as a fresh process ``--repeats`` times on the same phantom CT;
the table gives median wall time, median peak RSS and the ratio to the student, all measured in
this one run. Random weights: timing only. Usage:

    python bench/bench_pipeline.py [--repeats 3] [--slices 200] [--out FILE.md]
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

MODELS = {  # name -> (architecture, spatial dims, kwargs, card overrides)
    "student (mobilenetv2_unet2d)": ("mobilenetv2_unet2d", 2, {}, {}),
    "student (resnet18_unet2d)": ("resnet18_unet2d", 2, {}, {}),
    "teacher (unetpp2d)": ("unetpp2d", 2, {}, {}),
    "3D SegResNet (monai_segresnet3d)": ("monai_segresnet3d", 3, {}, {}),
}

_RUNNER = """
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.exit(r.stderr)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def build(root: Path, arch: str, dims: int, kwargs: dict, overrides: dict) -> Path:
    torch.manual_seed(0)
    net = build_network(arch, dims, 1, 3, **kwargs)
    card = make_card(
        name=arch.replace("_", "-"),
        version="bench",
        task="kidney",
        architecture=arch,
        spatial_dims=dims,
        network_kwargs=kwargs,
        **overrides,
    )
    return save_package(root / arch, card, net.state_dict())


def describe(arch: str, dims: int, kwargs: dict) -> tuple[float, float]:
    net = build_network(arch, dims, 1, 3, **kwargs)
    shape = (1, 1, 256, 256) if dims == 2 else (1, 1, 96, 96, 96)
    return count_parameters(net) / 1e6, count_macs(net, shape) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--only", nargs="*", help="substrings of model names to run")
    ap.add_argument("--out", type=Path, default=Path("docs/results/bench-pipeline.md"))
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
        for name, (arch, dims, kwargs, overrides) in MODELS.items():
            if args.only and not any(s in name for s in args.only):
                continue
            pkg = build(root, arch, dims, kwargs, overrides)
            walls, rss, stages = [], [], []
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
                wall, peak = map(float, res.stdout.split())
                walls.append(wall)
                rss.append(peak)
                stages.append(json.loads(report.read_text())["seconds"])
                print(f"  {name} run {i + 1}: {wall:.1f} s, {peak:.0f} MB")
            params, macs = describe(arch, dims, kwargs)
            infer = statistics.median(s["infer"] for s in stages)
            rows.append(
                (name, params, macs, statistics.median(walls), infer, statistics.median(rss))
            )
    student = rows[0][3]
    lines = [
        f"# Pipeline benchmark ({args.slices}x512x512 int16 CT, CPU)",
        "",
        f"Command: `python bench/bench_pipeline.py --repeats {args.repeats} "
        f"--slices {args.slices}`  ",
        f"Code {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {_cpu_name()}.  ",
        "Whole `hlfd-segment` process (read .nii.gz, preprocess, infer, postprocess, resample, "
        f"write .seg.nrrd); median of {args.repeats} runs; random weights.",
        "",
        "| model | params (M) | GMACs per 256² slice / 96³ window | wall (s) "
        "| of which inference (s) | peak RSS (MB) | wall / student |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params, macs, wall, infer, peak in rows:
        lines.append(
            f"| {name} | {params:.2f} | {macs:.2f} | {wall:.1f} | {infer:.1f} | "
            f"{peak:.0f} | {wall / student:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


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
