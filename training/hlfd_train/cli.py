"""``hlfd-train``: prepare data, train a teacher, distill a student, evaluate, export, explain.

    hlfd-train phantom OUT --task kidney --cases 12
    hlfd-train synth write OUT --task liver --cases 60 [--jobs 2] [--set noise_hu=[6,20]]
                           [--matrix 512]
    hlfd-train synth report OUT [--task liver] [--cases 24]
    hlfd-train synth robustness OUT --task liver --models TEACHER STUDENT [--cases 3]
    hlfd-train real-ct  OUT --models MODEL_DIR... [--ircadb DIR...] (public real CTs)
    hlfd-train prepare  --config C [--set data.root=...]
    hlfd-train teacher  --config C [--set train.steps=500 ...]
    hlfd-train distill  --config C --method hlfd --teacher runs/teacher [--set ...]
    hlfd-train evaluate MODEL --run RUN | --config C [--split test] [--protocol paper]
                        [--crop-mm MM]
    hlfd-train compare  NEW/metrics.json OLD/metrics.json [--metric dice]
    hlfd-train export   RUN -o MODEL_DIR [--onnx]
    hlfd-train add-onnx MODEL_DIR...
    hlfd-train runtime  MODEL_DIR IMAGE [--runs 5] [--write]
    hlfd-train card     MODEL_DIR --set postprocessing.cyst_max_hu=20 version=0.5.1
    hlfd-train soup     OUT MODEL_DIR MODEL_DIR [...] [--weights W W ...] [--version V]
    hlfd-train explain  --config C --models RUN_OR_MODEL ... [--case ID] [--slices 10 20]
    hlfd-train bench    [--preset cpu|gpu|synth-gpu|quick|smoke|full] [--toy] [--out DIR]
                        [--report R.md]
    hlfd-train methods

Errors in the data, the config or a model end in one line on stderr and exit code 1.
Multi-GPU/CPU: ``torchrun --nproc_per_node N -m hlfd_train.cli teacher --config C``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from HLFDSegmentLib.cli import positive_int
from HLFDSegmentLib.errors import HLFDError

from .config import ConfigError, load_config
from .synth.generator import SynthError


def _numbers(text: str) -> tuple[float, ...]:
    """``"-3,-2,0"`` -> ``(-3.0, -2.0, 0.0)`` (else a usage error naming the value)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _millimetres(text: str) -> float:
    """A size in mm: a finite number > 0 (else a usage error naming the value)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a size in mm > 0, got {text!r}")
    return value


def _millilitres(text: str) -> float:
    """A volume limit in mL: a finite number >= 0 (else a usage error naming the value)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a volume in mL >= 0, got {text!r}")
    return value


def _config(args: argparse.Namespace, extra: list[str] = ()) -> dict:
    return load_config(args.config, [*(args.set or []), *extra])


def cmd_phantom(args: argparse.Namespace) -> None:
    from HLFDSegmentLib.phantom import PhantomConfig, write_dataset

    layout = args.layout or ("kits19" if args.task == "kidney" else "lits")
    cysts = layout in ("kits21", "kits23")  # KiTS21/23 label simple cysts 3
    cfg = PhantomConfig(task=args.task, shape=tuple(args.shape), cyst_label=3 if cysts else None)
    write_dataset(args.out, "kits19" if cysts else layout, cfg, args.cases, args.seed)
    print(f"{args.cases} {args.task} phantom cases ({layout} layout) in {args.out}")


def _synth_config(args: argparse.Namespace):
    from .config import parse_override
    from .synth import SynthConfig

    values: dict = {}
    for text in args.set or []:
        values.update(parse_override(text))
    return SynthConfig.from_dict(args.task, values)


def cmd_synth_write(args: argparse.Namespace) -> None:
    from .synth.write import write_synth

    cfg = _synth_config(args)
    paths = write_synth(args.out, cfg, args.cases, args.seed, args.layout, args.jobs, args.matrix)
    print(f"{len(paths)} synthetic {args.task} CTs in {args.out}")


def cmd_synth_report(args: argparse.Namespace) -> None:
    from .synth.report import write_report

    path = write_report(args.out, _synth_config(args), args.cases, args.seed)
    print(f"realism report: {path}")


def cmd_synth_robustness(args: argparse.Namespace) -> None:
    from .synth.robustness import write_robustness

    path = write_robustness(args.out, args.task, args.models, args.cases, args.seed)
    print(path.read_text(encoding="utf-8"))


def cmd_real_ct(args: argparse.Namespace) -> None:
    from .realct import CASES, check_models, fetch_cases, ircadb_case, write_report

    cases = (*CASES, *(ircadb_case(folder) for folder in args.ircadb or []))
    root = fetch_cases(args.cache, {p.name: p for p in args.source or []})
    rows = check_models(root, args.models, args.out, cases)
    print(write_report(rows, args.out, cases).read_text(encoding="utf-8"))


def cmd_prepare(args: argparse.Namespace) -> None:
    from .engine import prepare_data

    out = prepare_data(_config(args), rank=0)
    print(f"prepared cache: {out}")


def cmd_teacher(args: argparse.Namespace) -> None:
    from .engine import train

    train(_config(args), role="teacher", progress=not args.quiet)


def cmd_distill(args: argparse.Namespace) -> None:
    from .engine import train

    extra = [f"distill.teacher={args.teacher}"] if args.teacher else []
    cfg = _config(args, extra)
    if args.method and args.method != cfg["distill"]["method"]:
        # the config's options are its own method's; only --set options go to the new one
        own = load_config(None, [o for o in args.set or [] if o.startswith("distill.options")])
        cfg["distill"].update(method=args.method, options=own["distill"]["options"])
    train(cfg, role="student", progress=not args.quiet)


def _eval_data(args: argparse.Namespace) -> Any:
    """The prepared dataset that ``--run RUN`` or ``--config C`` (with ``--set``) names."""
    from .data import PreparedData
    from .engine import prepare_data

    if args.run:
        cfg = load_config(Path(args.run) / "config.yaml", args.set or [])
    elif args.config:
        cfg = _config(args)
    else:
        raise ConfigError(f"{args.command} needs --run RUN or --config C (which dataset and split)")
    return PreparedData(prepare_data(cfg, rank=0))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from HLFDSegmentLib.modelpackage import load_package

    from .evaluate import evaluate

    prepared = _eval_data(args)
    package = load_package(args.model)
    out = args.out or (Path(args.run) / "evaluation" if args.run else Path("evaluation"))
    if args.protocol == "paper":
        out = Path(str(out) + "-paper")
    if args.crop_mm is not None and not args.out:
        out = Path(f"{out}-crop{args.crop_mm:g}")
    report = evaluate(
        package,
        prepared.eval_cases(args.split),
        prepared.label_lut(),
        out,
        protocol=args.protocol,
        device=args.device,
        progress=print,
        crop_mm=args.crop_mm,
    )
    print((out / "metrics.md").read_text(encoding="utf-8"))
    print(f"metrics in {out}/metrics.{{csv,json,md}} ({report['protocol_description']})")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from HLFDSegmentLib.modelpackage import load_package

    from .calibrate import (
        DEFAULT_OFFSETS,
        choose,
        markdown,
        require_folder,
        sweep,
        why_chosen,
        write_offsets,
    )

    prepared = _eval_data(args)
    package = load_package(args.model)
    if args.write:  # before the sweep's minutes, not after
        require_folder(package)
    cases = prepared.eval_cases(args.split)
    offsets = args.offsets or DEFAULT_OFFSETS
    rows = sweep(
        package, cases, prepared.label_lut(), offsets, args.device, print, args.seed_offsets or ()
    )
    chosen = choose(rows, args.max_fp_ml)
    print(markdown(rows, chosen))
    seed = chosen.get("seed_offset")
    print(
        f"chosen tumour logit offset {chosen['offset']:+.1f}"
        + ("" if seed is None else f", seed offset {seed:+.1f}")
        + f" on {len(cases)} {args.split} cases ({why_chosen(chosen, args.max_fp_ml)})"
    )
    if args.write:
        source = f"{args.split} split of {args.config or args.run}"
        write_offsets(package, chosen, args.max_fp_ml, source)
        print(f"written to {package.path / 'model.json'} (inference.logit_offsets, seed_offsets)")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare, markdown, read_evaluation

    result = compare(read_evaluation(args.new), read_evaluation(args.old), args.metric)
    print(markdown(result, args.metric))


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export

    fields = {k: getattr(args, k) for k in ("name", "version", "title", "description")}
    if args.min_island_ml is not None:
        fields["postprocessing"] = {"min_island_ml": args.min_island_ml}
    out = export(
        args.run,
        args.out,
        which=args.which,
        onnx=args.onnx,
        timing=not args.no_timing,
        card_fields={k: v for k, v in fields.items() if v is not None},
        half=args.half,
    )
    print(f"model package: {out}")


def cmd_add_onnx(args: argparse.Namespace) -> None:
    from .export import add_onnx

    for package in args.packages:
        out = add_onnx(package)
        print(f"{out}: model.onnx added ({(out / 'model.onnx').stat().st_size / 1e6:.1f} MB)")


def cmd_runtime(args: argparse.Namespace) -> None:
    from HLFDSegmentLib.errors import InputError
    from HLFDSegmentLib.modelpackage import load_package

    from .export import time_pipeline, update_card

    if not args.image.is_file():
        raise InputError(f"{args.image}: no such image file")
    runtimes = time_pipeline(load_package(args.package), args.image, runs=args.runs)
    r = runtimes[0]
    print(f"{args.package}: {r['seconds']} s (median of {args.runs}), {r['device']}, {r['input']}")
    if args.write:
        update_card(args.package, {"runtimes": runtimes})
        print(f"{args.package}: card runtimes written")


def cmd_card(args: argparse.Namespace) -> None:
    from .config import parse_override
    from .export import update_card

    changes = {}
    for text in args.set:
        key, _, _ = text.partition("=")
        value = parse_override(text)
        for part in key.strip().split("."):
            value = value[part]
        changes[key.strip()] = value
    card = update_card(args.package, changes)
    print(f"{args.package}: {', '.join(changes)} set ({card['name']} {card['version']})")


def cmd_soup(args: argparse.Namespace) -> None:
    from .soup import soup

    fields = {k: getattr(args, k) for k in ("name", "title", "description")}
    card_fields = {k: v for k, v in fields.items() if v is not None}
    out = soup(
        args.packages,
        args.out,
        version=args.version,
        card_fields=card_fields,
        weights=args.weights,
    )
    mean = "weighted mean" if args.weights else "mean"
    print(f"model package: {out} ({mean} of {len(args.packages)}; calibrate it next)")


def cmd_explain(args: argparse.Namespace) -> None:
    from .data import PreparedData
    from .engine import prepare_data
    from .explain import explain, tumour_slices

    prepared = PreparedData(prepare_data(_config(args), rank=0))
    case = args.case or (prepared.cases("test") or prepared.cases("val"))[0]
    image, label = prepared.arrays(case)
    slices = args.slices or tumour_slices(label)
    out = explain(args.models, image, label, slices, args.out, taps=args.taps)
    print(f"attention maps of case {case}, slices {list(slices)}: {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench

    preset = "quick" if args.quick else args.preset
    run_bench(preset, args.out, args.report, args.workers, toy_size=args.toy)


def cmd_methods(args: argparse.Namespace) -> None:
    from .distill import METHODS, method_defaults

    for name in sorted(METHODS):
        doc = (METHODS[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:8s} {doc}")
        print(f"{'':8s} {json.dumps(method_defaults(name))}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hlfd-train",
        description="Teacher/student distillation (HLFD and KD baselines) for kidney and liver "
        "tumour segmentation; exports model packages for hlfd-segment and 3D Slicer.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", "-c", type=Path, required=required, help="YAML config")
        p.add_argument(
            "--set", "-s", action="extend", nargs="+", metavar="KEY=VALUE", help="overrides"
        )

    p = sub.add_parser("phantom", help="write a synthetic dataset in a real layout")
    p.add_argument("out", type=Path)
    p.add_argument("--task", choices=["kidney", "liver"], default="kidney")
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=["kits19", "kits21", "kits23", "lits", "msd", "nnunet"],
        help="default: kits19 for kidney, lits for liver",
    )
    p.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("synth", help="realistic synthetic CT: write a dataset, realism report")
    synth = p.add_subparsers(dest="synth_command", required=True)
    for name, func, text in (
        ("write", cmd_synth_write, "write synthetic cases in a public layout"),
        ("report", cmd_synth_report, "montages, HU histograms, organ volumes, noise spectrum"),
    ):
        q = synth.add_parser(name, help=text)
        q.add_argument("out", type=Path)
        q.add_argument("--task", choices=["kidney", "liver"], default="liver")
        q.add_argument("--cases", type=positive_int, default=60 if name == "write" else 24)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument(
            "--set", "-s", action="extend", nargs="+", metavar="KEY=VALUE", help="generator keys"
        )
        if name == "write":
            q.add_argument("--layout", choices=["kits19", "lits", "msd", "nnunet"])
            q.add_argument("--jobs", type=positive_int, default=1, help="processes")
            q.add_argument(
                "--matrix",
                type=positive_int,
                help="resample each case in-plane to N x N voxels over its field of view "
                "(a scanner's 512 matrix); default: the generator's grid",
            )
        q.set_defaults(func=func)
    q = synth.add_parser("robustness", help="models on held-out synthetic conditions")
    q.add_argument("out", type=Path)
    q.add_argument("--task", choices=["kidney", "liver"], default="liver")
    q.add_argument("--models", nargs="+", type=Path, required=True, help="model packages")
    q.add_argument("--cases", type=positive_int, default=3, help="cases per condition")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_synth_robustness)

    p = sub.add_parser("real-ct", help="models on public real CTs from the package registry")
    p.add_argument("out", type=Path)
    p.add_argument("--models", nargs="+", type=Path, required=True, help="model packages")
    p.add_argument("--cache", type=Path, default=Path("data/real-ct"), help="download folder")
    p.add_argument(
        "--source", type=Path, nargs="+", help="release files already downloaded (by file name)"
    )
    p.add_argument(
        "--ircadb", type=Path, nargs="+", help="3D-IRCADb-01 patient folders you have (also scored)"
    )
    p.set_defaults(func=cmd_real_ct)

    p = sub.add_parser("prepare", help="validate, resample and cache a dataset; write splits")
    with_config(p)
    p.set_defaults(func=cmd_prepare)

    for name, func, text in (
        ("teacher", cmd_teacher, "train the teacher (supervised)"),
        ("distill", cmd_distill, "distill a student from a trained teacher"),
    ):
        p = sub.add_parser(name, help=text)
        with_config(p)
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        if name == "distill":
            p.add_argument("--method", "-m", help="distillation method (see 'methods')")
            p.add_argument("--teacher", "-t", help="teacher run folder, weights or package")
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="per-case metrics through the runtime pipeline")
    p.add_argument("model", type=Path, help="model package (folder or .zip)")
    p.add_argument("--run", type=Path, help="run folder whose config names the data")
    with_config(p, required=False)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--protocol", default="full", choices=["full", "paper"])
    p.add_argument(
        "--crop-mm",
        type=_millimetres,
        help="cut each case in-plane to a square of this size (mm) around its reference labels",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", "-o", type=Path)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="choose the tumour decision threshold on held-out cases")
    p.add_argument("model", type=Path, help="model package (folder; .zip without --write)")
    p.add_argument("--run", type=Path, help="run folder whose config names the data")
    with_config(p, required=False)
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument(
        "--offsets",
        type=_numbers,
        help="tumour logit offsets to try, comma-separated (default: -6 to 1 in steps of 1)",
    )
    p.add_argument(
        "--seed-offsets",
        type=_numbers,
        help="also try hysteresis with these stricter tumour seed offsets, comma-separated "
        "(default: none)",
    )
    p.add_argument(
        "--max-fp-ml",
        type=_millilitres,
        default=5.0,
        help="false tumour limit (mL, >= 0), per tumour-free case",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--write", action="store_true", help="write the choice into the card")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("compare", help="paired comparison of two evaluations of the same cases")
    p.add_argument("new", type=Path, help="metrics.json of hlfd-train evaluate (or its folder)")
    p.add_argument("old", type=Path)
    p.add_argument("--metric", default="dice", choices=["assd", "dice", "hd95", "iou", "rvd"])
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write the model package of a run")
    p.add_argument("run", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked)")
    p.add_argument("--no-timing", action="store_true", help="skip the run-time measurement")
    p.add_argument("--half", action="store_true", help="float16 weights (half the size)")
    p.add_argument(
        "--min-island-ml", type=float, help="lesions smaller than this (mL) become organ"
    )
    for field in ("name", "version", "title", "description"):
        p.add_argument(f"--{field}", help=f"model card {field} (default: from the run)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "add-onnx", help="add a checked model.onnx (ONNX Runtime backend) to package folders"
    )
    p.add_argument("packages", type=Path, nargs="+")
    p.set_defaults(func=cmd_add_onnx)

    p = sub.add_parser(
        "runtime", help="time a package through the runtime pipeline on this CPU (card runtimes)"
    )
    p.add_argument("package", type=Path)
    p.add_argument("image", type=Path, help="a CT volume (NIfTI, NRRD, ...)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs; the median counts")
    p.add_argument("--write", action="store_true", help="write the figure into the card")
    p.set_defaults(func=cmd_runtime)

    p = sub.add_parser("card", help="set model card fields of a package folder (checked)")
    p.add_argument("package", type=Path)
    p.add_argument(
        "--set", "-s", action="extend", nargs="+", metavar="KEY=VALUE", required=True,
        help="dotted card fields, YAML values: postprocessing.cyst_max_hu=20 version=0.5.1",
    )  # fmt: skip
    p.set_defaults(func=cmd_card)

    p = sub.add_parser(
        "soup", help="average the weights of packages fine-tuned from one start (model soup)"
    )
    p.add_argument("out", type=Path)
    p.add_argument("packages", type=Path, nargs="+")
    p.add_argument(
        "--weights", type=float, nargs="+", help="one per package, summing to 1 (default: equal)"
    )
    p.add_argument("--version", help="model card version (default: the first's +soupN)")
    for field in ("name", "title", "description"):
        p.add_argument(f"--{field}", help=f"model card {field} (default: the first package's)")
    p.set_defaults(func=cmd_soup)

    p = sub.add_parser("explain", help="attention maps of teacher and students")
    with_config(p)
    p.add_argument("--models", nargs="+", type=Path, required=True)
    p.add_argument("--case")
    p.add_argument("--slices", type=int, nargs="+")
    p.add_argument("--taps", nargs="+", default=["e2", "e3", "e4", "e5"])
    p.add_argument("--out", "-o", type=Path, default=Path("attention.png"))
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "bench", help="distillation benchmark on phantoms or synthetic CT (resumable)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset",
        choices=["cpu", "gpu", "synth-gpu", "quick", "smoke", "full"],
        default="cpu",
        help="cpu: kidney phantoms, 5 methods x 5 seeds, ~60 min on 2 cores; gpu: every method "
        "and ablation x 5 seeds x both tasks, several runs sharing one GPU; synth-gpu: 5 methods "
        "x 5 seeds x both tasks on synthetic CT, one GPU",
    )
    which.add_argument("--quick", action="store_true", help="same as --preset quick (~10 min)")
    p.add_argument(
        "--toy", action="store_true", help="the preset's flow at toy size on the CPU (a check)"
    )
    p.add_argument("--out", "-o", type=Path, help="run folder (default runs/kd-bench-PRESET)")
    p.add_argument("--report", type=Path, help="markdown report (default OUT/kd-benchmark.md)")
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="runs trained side by side (default: cores / 2, at least 2)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("methods", help="list distillation methods and their defaults")
    p.set_defaults(func=cmd_methods)
    return ap


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # tables hold "±": never fail on an ASCII terminal
        sys.stdout.reconfigure(errors="backslashreplace")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (HLFDError, ConfigError, SynthError) as exc:
        print(f"hlfd-train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hlfd-train: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
