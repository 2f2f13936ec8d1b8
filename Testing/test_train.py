"""The training engine end to end on tiny phantoms: teacher, one engine step of every method on
the zoo's networks (the losses themselves are in test_distill.py), 3D distillation, resume
after a kill, DDP on two gloo processes, export -> runtime, ONNX, evaluation, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hlfd_train.cards import N_CLASSES, lifted_state, load_weights
from hlfd_train.cli import main as train_cli
from hlfd_train.config import ConfigError, check, load_config
from hlfd_train.data import PreparedData, SliceDataset
from hlfd_train.distill import METHODS, build_method, probe_channels, run_with_taps
from hlfd_train.engine import (
    StudentStep,
    Trainer,
    initial_network,
    make_network,
    prepare_data,
    taps_of,
    train,
)
from hlfd_train.export import export
from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset
from HLFDSegmentLib.pipeline import Segmenter

BIN = Path(sys.executable).parent
TINY_2D = {
    "teacher": {"architecture": "tiny_unet2d", "kwargs": {"base": 8}},
    "student": {"architecture": "tiny_unet2d", "kwargs": {"base": 4}},
}
TINY_3D = {
    "spatial_dims": 3,
    "teacher": {
        "architecture": "monai_dynunet3d",
        "kwargs": {"filters": [4, 8, 8, 16, 16], "strides": [1, 2, 2, 2, 2]},
    },
    "student": {
        "architecture": "monai_unet3d",
        "kwargs": {"channels": [4, 8, 8, 16, 16]},
        # the MONAI U-Net has no d5 stage: name the bottleneck for it
        "taps": {"d5": "model.1.submodule.1.submodule.1.submodule.1.submodule"},
    },
}


def tiny_config(root: Path, out: Path, dims: int = 2, **train_keys) -> dict:
    model = TINY_2D if dims == 2 else TINY_3D
    base = {
        "name": "t",
        "output": str(out),
        "data": {
            "root": str(root),
            "crop": [64, 64],
            "patch": [32, 32, 32],
            "splits": [4, 1, 1],
            "preprocessing": {"spacing": [3.0, 3.0, None if dims == 2 else 3.0]},
        },
        "model": model,
        "train": {
            "steps": 6,
            "batch_size": 4 if dims == 2 else 2,
            "log_every": 2,
            "val_every": 3,
            "checkpoint_every": 3,
            "warmup_steps": 2,
            "tensorboard": False,
            "curves": False,  # curves.png where a test reads it (the teacher run's)
            **train_keys,
        },
    }
    return load_config(None, base=base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "data"
    write_dataset(root, "kits19", PhantomConfig(shape=(24, 96, 96), spacing=(2.5, 2.5, 4.0)), 6)
    return root


@pytest.fixture(scope="module")
def teacher_run(dataset, tmp_path_factory) -> tuple[dict, Path]:
    cfg = tiny_config(dataset, tmp_path_factory.mktemp("runs"), curves=True)
    return cfg, train(cfg, "teacher", progress=False)


def test_a_recipes_teacher_ignores_the_students_method_options(dataset, tmp_path):
    """One recipe config serves both steps: its kd options are the student's, not the teacher's."""
    cfg = tiny_config(dataset, tmp_path)
    cfg["distill"].update(method="kd", options={"weight": 0.05, "temperature": 4.0})
    teacher = Trainer(cfg, "teacher", progress=False)
    assert teacher.method_name == "none" and teacher.teacher is None
    assert teacher.folder.name == "teacher"


@pytest.mark.slow
def test_teacher_run_folder(teacher_run):
    cfg, folder = teacher_run
    assert folder == Path(cfg["output"]) / "t" / "teacher"
    for name in (
        "config.yaml",
        "log.csv",
        "curves.png",
        "best.safetensors",
        "last.safetensors",
        "state.pt",
        "summary.json",
        "best.json",
    ):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["role"] == "teacher"
    assert summary["adapter_parameters"] == 0
    assert load_config(folder / "config.yaml") == cfg  # the resolved config reproduces the run
    header = (folder / "log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "loss.seg", "lr", "val.Kidney", "val.Kidney tumor"} <= set(header)


@pytest.fixture(scope="module")
def fixed_batch(dataset, tmp_path_factory) -> dict:
    """Two tumour-bearing 2D training crops of the prepared phantoms."""
    cfg = tiny_config(dataset, tmp_path_factory.mktemp("batch"))
    prepared = PreparedData(prepare_data(cfg, 0))
    ds = SliceDataset(prepared, "train", crop=(64, 64), foreground_fraction=1.0, seed=1)
    items = [ds[i] for i in range(2)]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "label")}


def _engine_parts(cfg: dict, name: str, x: torch.Tensor):
    """Teacher, student step and method as ``engine.train`` builds them (zoo networks, their
    declared taps plus the config's, channels probed on ``x``)."""
    dims, classes = cfg["model"]["spatial_dims"], N_CLASSES[cfg["data"]["labelset"]]
    torch.manual_seed(0)
    teacher = make_network(cfg["model"]["teacher"], dims, classes).eval()
    student = make_network(cfg["model"]["student"], dims, classes)
    t_taps = taps_of(teacher, cfg["model"]["teacher"])
    s_taps = taps_of(student, cfg["model"]["student"])
    method = build_method(
        name, probe_channels(teacher, t_taps, x), probe_channels(student, s_taps, x), dims
    )
    need_s, need_t = method.required_taps()
    step = StudentStep(student, method, {k: s_taps[k] for k in need_s})

    def terms(y: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits, t_feats = run_with_taps(teacher, {k: t_taps[k] for k in need_t}, x, teacher=True)
        return step(x, y, t_feats, t_logits if method.needs_logits() else None)

    return teacher, step, method, terms


@pytest.mark.parametrize("name", sorted(METHODS))
def test_engine_step_of_every_method_on_zoo_networks(dataset, fixed_batch, tmp_path, name):
    """One engine step (StudentStep) per method on the zoo's 2D networks: the segmentation term
    plus the method's terms, the teacher gets no gradient, every adapter does. (The losses
    themselves, in 2D and 3D, are pinned in test_distill.py on toy networks.)"""
    cfg = tiny_config(dataset, tmp_path)
    teacher, _, method, terms = _engine_parts(cfg, name, fixed_batch["image"])
    got = terms(fixed_batch["label"])
    assert "seg" in got and all(v.ndim == 0 and torch.isfinite(v) for v in got.values()), got
    assert (set(got) > {"seg"}) is (name != "none"), got
    sum(got.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    for p in method.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_engine_step_lowers_the_hlfd_loss(dataset, fixed_batch, tmp_path):
    """Adam on the engine's student step (student + HLFD adapters) lowers the total loss on a
    fixed batch of real phantom slices."""
    cfg = tiny_config(dataset, tmp_path)
    _, step, _, terms = _engine_parts(cfg, "hlfd", fixed_batch["image"])
    opt = torch.optim.Adam(step.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = sum(terms(fixed_batch["label"]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_distill_3d_engine_with_missing_tap_mapped(dataset, tmp_path):
    cfg = tiny_config(dataset, tmp_path, 3, steps=2, val_every=2, checkpoint_every=2)
    train(cfg, "teacher", progress=False)
    unmapped = json.loads(json.dumps(cfg))
    unmapped["model"]["student"]["taps"] = {}
    unmapped["distill"]["method"] = "hlfd"
    with pytest.raises(ConfigError, match=r"no tap 'd5'.*model\.student\.taps\.d5="):
        train(unmapped, "student", progress=False)
    cfg["distill"]["method"] = "hlfd"
    folder = train(cfg, "student", progress=False)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "hlfd" and summary["adapter_parameters"] > 0
    assert "loss.plfd_unified" in (folder / "log.csv").read_text()


def _run_cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(BIN / "hlfd-train"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _write_config(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_method_flag_leaves_the_config_methods_options_behind(teacher_run, tmp_path):
    """``distill --method`` on a config of another method: that method's own options (here
    fitnet's ``schedule``, unknown to kd) do not carry over; ``--set distill.options.*`` do."""
    cfg = json.loads(json.dumps(teacher_run[0]))
    cfg["distill"] = {"method": "fitnet", "teacher": str(teacher_run[1])}
    cfg["distill"]["options"] = {"schedule": "joint"}
    cfg["train"].update(steps=1, val_every=1, curves=False)
    cfg["output"] = str(tmp_path)
    path = _write_config(cfg, tmp_path / "fitnet.yaml")
    flags = ["--method", "kd", "--set", "distill.options.temperature=2"]
    assert train_cli(["distill", "-c", str(path), "-q", *flags]) == 0
    run = load_config(tmp_path / "t" / "kd-seed0" / "config.yaml")
    assert run["distill"]["method"] == "kd" and run["distill"]["options"] == {"temperature": 2}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(dataset, teacher_run, tmp_path, capsys):
    """An uninterrupted distillation (the CLI in this process) and one killed (SIGKILL: the
    CLI in a process of its own) after its first checkpoint and then resumed end with
    identical student weights (resumed in this process: the checkpoint crosses processes)."""
    cfg = json.loads(json.dumps(teacher_run[0]))
    cfg["distill"] = {"method": "hlfd", "teacher": str(teacher_run[1]), "options": {}}
    cfg["train"].update(steps=12, checkpoint_every=4, val_every=4, log_every=2, curves=False)
    cfg["data"]["prepared"] = str(prepare_data(teacher_run[0], 0))
    results, confs = {}, {}
    for label in ("straight", "killed"):
        cfg["output"] = str(tmp_path / label)
        confs[label] = _write_config(cfg, tmp_path / f"{label}.yaml")
    assert train_cli(["distill", "-c", str(confs["straight"]), "-q"]) == 0
    results["straight"] = load_weights(tmp_path / "straight/t/hlfd-seed0/last.safetensors")

    folder = tmp_path / "killed" / "t" / "hlfd-seed0"
    proc = _run_cli(["distill", "-c", str(confs["killed"]), "-q"], tmp_path)
    deadline = time.monotonic() + 120
    while not (folder / "state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "summary.json").exists()  # it really died mid-run
    assert torch.load(folder / "state.pt", weights_only=True)["step"] < 12
    capsys.readouterr()
    assert train_cli(["distill", "-c", str(confs["killed"]), "-q"]) == 0  # resumed here
    out = capsys.readouterr().out
    assert "steps 4->12" in out or "steps 8->12" in out, out
    results["killed"] = load_weights(folder / "last.safetensors")
    for key, value in results["straight"].items():
        torch.testing.assert_close(results["killed"][key], value, rtol=0, atol=0, msg=key)
    logs = {k: _log_without_clock(tmp_path / k / "t/hlfd-seed0/log.csv") for k in results}
    assert logs["killed"] == logs["straight"]


def _log_without_clock(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_ddp_two_gloo_processes(dataset, teacher_run, tmp_path):
    cfg = json.loads(json.dumps(teacher_run[0]))
    cfg["output"] = str(tmp_path)
    cfg["distill"] = {"method": "hlfd", "teacher": str(teacher_run[1]), "options": {}}
    cfg["data"]["prepared"] = str(prepare_data(teacher_run[0], 0))
    cfg["train"].update(steps=4, batch_size=2, val_every=4, checkpoint_every=4, curves=False)
    conf = _write_config(cfg, tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hlfd_train.cli",
            "distill",
            "-c",
            str(conf),
            "-q",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "t" / "hlfd-seed0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


@pytest.mark.slow
def test_export_runtime_onnx_evaluate(teacher_run, tmp_path):
    cfg, folder = teacher_run
    package_dir = export(folder, tmp_path / "model", onnx=True)
    package = load_package(package_dir)
    card = package.card
    assert card["provenance"]["method"] == "none (teacher)"
    assert card["metrics"]["validation_dice"]["step"] >= 3
    assert card["runtimes"] and card["runtimes"][0]["seconds"] > 0
    assert card["onnx"] == "model.onnx"
    # the runtime network carries exactly the run's best weights
    net = package.build_network()
    best = load_weights(folder / "best.safetensors")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0)
    # ONNX Runtime agrees with torch on an input size other than the export's
    import onnxruntime as ort

    x = torch.randn(1, 1, 96, 128)
    session = ort.InferenceSession(str(package_dir / "model.onnx"))
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    assert torch.softmax(torch.from_numpy(got), 1).sub(want).abs().max() < 1e-3
    # the runtime's inference (BN folded, body box, slice batches) predicts what the run's own
    # network predicts on the prepared volume
    prepared = PreparedData(prepare_data(cfg, 0))
    image, _ = prepared.arrays(prepared.cases("val")[0])
    image = np.asarray(image, dtype=np.float32)
    runtime = Segmenter(package, device="cpu").infer(image)
    trained = make_network(cfg["model"]["teacher"], 2, 3).eval()
    trained.load_state_dict(best)
    h, w = image.shape[1:]
    m = trained.size_divisible
    x = torch.nn.functional.pad(torch.from_numpy(image)[:, None], (0, -w % m, 0, -h % m))
    with torch.no_grad():
        own = trained(x).argmax(1)[:, :h, :w].numpy()
    body = image > 0.01  # outside the body box the runtime writes background without inferring
    assert (runtime[body] == own[body]).mean() > 0.999
    # the runtime pipeline segments a held-out phantom with it, same as the evaluation does
    (case,) = prepared.eval_cases("test")
    result = Segmenter(package, device="cpu")(sitk.ReadImage(str(case.image)))
    assert result.labels.GetSize() == sitk.ReadImage(str(case.image)).GetSize()
    out = tmp_path / "eval"
    code = train_cli(
        [
            "evaluate",
            str(package_dir),
            "--config",
            str(_write_config(cfg, tmp_path / "c.yaml")),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["cases"][0]["case"] == case.case_id
    pred = sitk.GetArrayFromImage(result.labels)
    ref = prepared.label_lut()[sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))]
    p, r = pred == 1, ref == 1
    dice = 2 * (p & r).sum() / max(1, p.sum() + r.sum()) if p.sum() + r.sum() else 1.0
    assert report["cases"][0]["labels"]["Kidney"]["dice"] == pytest.approx(dice)
    assert {"Dice", "HD95 (mm)"} <= set((out / "metrics.md").read_text("utf-8").split(" | "))
    assert (out / "metrics.csv").read_text().count("\n") == 4  # + organ incl. tumour


def test_cli_errors_are_one_line(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    assert train_cli(["teacher", "-c", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'train.stepz'" in err[0]

    cfg = tiny_config(dataset, tmp_path)
    conf = _write_config(cfg, tmp_path / "c.yaml")
    assert train_cli(["distill", "-c", str(conf), "-m", "hlfd", "-t", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher weights not found" in err[0]
    assert not (tmp_path / "t").exists()  # the run folder appears only once every check passed

    broken = tmp_path / "broken"
    write_dataset(broken, "kits19", PhantomConfig(shape=(8, 32, 32)), 2)
    (broken / "case_00001" / "segmentation.nii.gz").unlink()
    cfg["data"]["root"] = str(broken)
    conf = _write_config(cfg, tmp_path / "c2.yaml")
    assert train_cli(["prepare", "-c", str(conf)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case_00001" in err[0]


@pytest.mark.slow
def test_explain_figure(teacher_run, tmp_path):
    cfg, folder = teacher_run
    conf = _write_config(cfg, tmp_path / "c.yaml")
    out = tmp_path / "att.png"
    assert train_cli(["explain", "-c", str(conf), "--models", str(folder), "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert np.asarray(__import__("matplotlib.image").image.imread(out)).shape[-1] in (3, 4)


@pytest.mark.slow
def test_half_export_and_fine_tuning_from_a_package(teacher_run, tmp_path):
    """A float16 package predicts what the float32 one does; model.<role>.init starts a run
    from a package's weights (a shipped synthetic-CT model fine-tuned on real data); a package
    of another architecture is one clear error."""
    cfg, folder = teacher_run
    package = export(folder, tmp_path / "pkg", timing=False)
    assert "no patient data" not in load_package(package).card["provenance"]["data"]
    tuned = load_config(
        None,
        [
            f"model.teacher.init={package}",
            "train.steps=1",
            "train.lr=0",
            "train.weight_decay=0",
            f"output={tmp_path / 'runs'}",
        ],
        base=cfg,
    )
    run = train(tuned, "teacher", progress=False)  # one step at lr 0: the weights it started at
    start = load_weights(run / "last.safetensors")
    for k, v in load_weights(folder / "best.safetensors").items():
        if "running_" not in k and "num_batches" not in k:  # BN statistics move in train mode
            torch.testing.assert_close(start[k], v, rtol=0, atol=0)
    origin = load_package(package).card  # the fine-tune's card names what it started from
    tuned_card = load_package(export(run, tmp_path / "tuned", which="last", timing=False)).card
    assert tuned_card["provenance"]["init"] == {
        "name": origin["name"],
        "version": origin["version"],
        "sha256": origin["files"]["model.safetensors"]["sha256"],
    }
    half = load_package(export(folder, tmp_path / "half", timing=False, half=True))
    assert len(half.weights) < 0.6 * len(load_package(package).weights)
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1, (3, 64, 64)).astype(np.float32)
    full, small = (Segmenter(p, device="cpu").infer(arr) for p in (load_package(package), half))
    assert (full == small).mean() > 0.99
    wrong = load_config(
        None, [f"model.student.init={package}", f"output={tmp_path / 'other'}"], base=cfg
    )
    wrong["model"]["student"]["kwargs"] = {"base": 4}
    with pytest.raises(ConfigError, match="init"):
        train(wrong, "student", progress=False)


def test_context_slices_are_checked(dataset, tmp_path):
    for value in (5, -1, "two", True):
        with pytest.raises(ConfigError, match=r"data\.preprocessing\.context_slices.*0-4"):
            load_config(
                None,
                [f"data.preprocessing.context_slices={value}"],
                base=tiny_config(dataset, tmp_path),
            )
    with pytest.raises(ConfigError, match=r"needs model\.spatial_dims = 2"):
        load_config(
            None, ["data.preprocessing.context_slices=1"], base=tiny_config(dataset, tmp_path, 3)
        )


@pytest.mark.slow
def test_a_one_slice_package_starts_a_25d_student_its_teacher_sees_the_centre(
    teacher_run, tmp_path
):
    """context_slices = 1: a one-slice package lifts exactly into a network of 3 input slices
    (neighbour weights zero); a 2.5D student distils from the one-slice teacher (which sees
    the centre slice) and exports a 2.5D package that the runtime runs, ONNX graph included."""
    cfg, folder = teacher_run
    one = load_package(export(folder, tmp_path / "pkg", timing=False))
    net = one.build_network()
    lifted = make_network(cfg["model"]["teacher"], 2, 3, in_channels=3).eval()
    lifted.load_state_dict(lifted_state(net.state_dict(), lifted.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), net(x[:, 1:2]), rtol=0, atol=0)
    student = load_config(
        None,
        [
            "data.preprocessing.context_slices=1",
            f"model.student.init={one.path}",
            "model.student.kwargs={base: 8}",
            "distill.method=kd",
            f"distill.teacher={folder}",
            "train.steps=2",
            f"output={tmp_path / 'runs'}",
        ],
        base=cfg,
    )
    run = train(student, "student", progress=False)
    pkg = load_package(export(run, tmp_path / "wide", which="last", onnx=True, timing=False))
    assert pkg.card["network"]["in_channels"] == 3
    assert pkg.card["preprocessing"]["context_slices"] == 1
    arr = np.random.default_rng(0).uniform(0, 1, (5, 64, 64)).astype(np.float32)
    by_torch = Segmenter(pkg, device="cpu", backend="torch").infer(arr)
    by_onnx = Segmenter(pkg, device="cpu", backend="onnx").infer(arr)
    assert by_torch.shape == arr.shape and (by_torch == by_onnx).mean() > 0.99


@pytest.mark.slow
def test_extra_background_classes_widen_a_package_train_on_aux_labels_and_export(
    teacher_run, tmp_path
):
    """A student with background_channels=1 starts from a 3-class package (output layer widened:
    it predicts what the package did), learns the stream's aux label (the spleen) as a class
    of its own and exports a package whose runtime output, torch and ONNX, has 3 classes."""
    cfg, folder = teacher_run
    one = load_package(export(folder, tmp_path / "pkg", timing=False))
    stream = {
        "crops_per_case": 8,
        "pool": 2,
        "aux_labels": ["spleen"],
        "synth": {"max_slices": 24, "inplane_mm": [2.5, 3.0]},
    }
    keys = [
        f"model.student.init={one.path}",
        "model.student.kwargs={base: 8, background_channels: 1}",
        "data.task=kidney",
        f"output={tmp_path / 'runs'}",
        "train.steps=2",
    ]
    student = load_config(None, keys, base=cfg)
    student["data"]["stream"] = stream
    wide = initial_network(student["model"]["student"], student, 3, "student").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        near = (wide(x).softmax(1) - one.build_network().eval()(x).softmax(1)).abs().max()
    assert near < 0.02
    run = train(student, "student", progress=False)
    pkg = load_package(export(run, tmp_path / "wide", which="last", onnx=True, timing=False))
    assert pkg.card["network"]["kwargs"]["background_channels"] == 1
    assert pkg.card["network"]["out_channels"] == 3
    assert pkg.card["provenance"]["data"].endswith("also learnt, counted as background: spleen")
    arr = np.random.default_rng(0).uniform(0, 1, (5, 64, 64)).astype(np.float32)
    by_torch = Segmenter(pkg, device="cpu", backend="torch").infer(arr)
    by_onnx = Segmenter(pkg, device="cpu", backend="onnx").infer(arr)
    assert by_torch.max() <= 2 and (by_torch == by_onnx).mean() > 0.99
    elsewhere = f"output={tmp_path / 'wrong'}"
    for aux in ([], None):
        wrong = load_config(None, [*keys, elsewhere], base=cfg)
        wrong["data"]["stream"] = None if aux is None else {**stream, "aux_labels": aux}
        with pytest.raises(ConfigError, match="must equal"):
            train(wrong, "student", progress=False)
    assert not (tmp_path / "wrong" / "t").exists()
    # kd from a 3-class teacher: the student's logits are folded before they are compared
    kd = load_config(None, [*keys, "distill.method=kd", f"distill.teacher={folder}"], base=cfg)
    kd["data"]["stream"] = stream
    kd["output"] = str(tmp_path / "kd")
    trainer = Trainer(kd, "student", progress=False)
    batch = next(iter(trainer.loader))
    assert batch["label"].max() <= 3
    trainer.step(batch)
    assert {"loss.seg", "loss.kd"} <= set(trainer.running)


RECIPES = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_is_a_valid_config(recipe):
    cfg = load_config(recipe)  # unknown keys, bad values: ConfigError
    check(cfg)
    assert cfg["name"] == recipe.stem


@pytest.mark.slow
def test_gpu_recipe_script_makes_both_students(tmp_path):
    """training/models_gpu.sh end to end, on the CPU and on budgets of two steps per stage."""
    repo = Path(__file__).parents[1]
    for part in ("training", "HLFDSegment"):
        (tmp_path / part).symlink_to(repo / part)
    for task, layout in (("liver", "msd"), ("kidney", "kits19")):  # small validation cases
        where = str(tmp_path / "data" / f"synth-{task}-val")
        args = ["synth", "write", where, "--task", task, "--cases", "1", "--matrix", "96"]
        assert train_cli([*args, "--layout", layout]) in (0, None)
    tiny = (
        "train.steps=2 data.workers=0 train.batch_size=2 data.crop=[64,64] data.stream.pool=1 "
        "data.stream.crops_per_case=4 data.splits=[0,1,0] data.val_cases=1 device=cpu"
    )
    env = {
        **os.environ,
        "HLFD_TRAIN": f"{sys.executable} -m hlfd_train.cli",
        "SET": tiny,
    }
    done = subprocess.run(
        ["bash", str(repo / "training" / "models_gpu.sh"), "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join((tmp_path / "out" / f"{t}.log").read_text() for t in ("liver", "kidney"))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    for task in ("liver", "kidney"):
        for which in ("best", "last"):
            card = load_package(tmp_path / "out" / f"{task}-{which}").card
            assert card["task"] == task and card["name"] == f"synth-{task}-gpu"
    assert load_package(tmp_path / "out" / "kidney-last").card["network"]["in_channels"] == 3
