"""The end-to-end demo: phantom CTs -> train a 2D student -> model package -> ``hlfd-segment``.

    python -m hlfd_train.demo OUTDIR [--task kidney] [--cases 8] [--minutes 4] [--seed 0]

No pretrained weights can be downloaded, so the demo trains a compact student (supervised,
method "none") on synthetic phantoms within a time budget, exports it as a model package, then
segments a held-out phantom with the command-line tool exactly as a user would. OUTDIR gets:
``data/`` (KiTS19 layout), ``model/``, ``case.seg.nrrd``, ``case.report.json``, ``overlay.png``
and ``metrics.json`` (Dice and HD95 vs. the phantom's truth, and the untrained network's Dice).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from HLFDSegmentLib.cli import main as segment_cli
from HLFDSegmentLib.io import read_image
from HLFDSegmentLib.modelpackage import make_card, save_package
from HLFDSegmentLib.nets import build_network
from HLFDSegmentLib.phantom import PhantomConfig, write_dataset
from HLFDSegmentLib.pipeline import model_grid, normalise

from .distill.losses import segmentation_loss


def load_slices(case_dirs: list[Path], pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices of every case on the model grid: the runtime's own preprocessing."""
    images, labels = [], []
    for case in case_dirs:
        image = read_image(case / "imaging.nii.gz")
        grid = model_grid(image, pre)
        images.append(normalise(image, grid, pre))
        lab = grid.resample(
            read_image(case / "segmentation.nii.gz"), sitk.sitkNearestNeighbor, sitk.sitkUInt8
        )
        labels.append(sitk.GetArrayFromImage(lab))
    size = max(a.shape[1] for a in images), max(a.shape[2] for a in images)
    pad = [
        np.pad(a, ((0, 0), (0, size[0] - a.shape[1]), (0, size[1] - a.shape[2]))) for a in images
    ]
    lpad = [
        np.pad(a, ((0, 0), (0, size[0] - a.shape[1]), (0, size[1] - a.shape[2]))) for a in labels
    ]
    return torch.from_numpy(np.concatenate(pad))[:, None], torch.from_numpy(np.concatenate(lpad))


def train(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    minutes: float,
    seed: int,
    crop: int = 160,
    batch: int = 12,
    lr: float = 2e-3,
) -> list[float]:
    """Supervised training with foreground-biased sampling, flips and random crops."""
    gen = torch.Generator().manual_seed(seed)
    fg = (y > 0).flatten(1).any(1)
    weights = torch.where(fg, 4.0, 1.0)
    weights = torch.where((y == 2).flatten(1).any(1), 12.0, weights)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    budget, start, losses = minutes * 60, time.perf_counter(), []
    est_steps = max(50, int(budget / 0.5))
    net.train()
    step = 0
    while time.perf_counter() - start < budget:
        warm = min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / est_steps)))
        idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
        h, w = x.shape[-2:]
        top = int(torch.randint(0, max(1, h - crop) + 1, (1,), generator=gen))
        left = int(torch.randint(0, max(1, w - crop) + 1, (1,), generator=gen))
        xb = x[idx, :, top : top + crop, left : left + crop]
        yb = y[idx, top : top + crop, left : left + crop].long()
        if torch.rand(1, generator=gen) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        xb = xb * (1 + 0.1 * (torch.rand(batch, 1, 1, 1, generator=gen) - 0.5))
        loss = segmentation_loss(net(xb), yb[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            print(
                f"  step {step:4d}  loss {np.mean(losses[-20:]):.3f}  "
                f"{time.perf_counter() - start:5.0f} s",
                flush=True,
            )
    return losses


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing, value: int) -> tuple[float, float]:
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.from_numpy(pred == value)[None, None]
    t = torch.from_numpy(truth == value)[None, None]
    dice = float(compute_dice(p, t, include_background=True)[0, 0])
    hd = float(
        compute_hausdorff_distance(
            p, t, include_background=True, percentile=95, spacing=list(spacing[::-1])
        )[0, 0]
    )
    return dice, hd


def overlay(image: sitk.Image, labels: sitk.Image, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    zs, ys, xs = np.nonzero(lab == 2) if (lab == 2).any() else np.nonzero(lab >= 0)
    z, y, x = int(np.median(zs)), int(np.median(ys)), int(np.median(xs))
    sx, sy, sz = image.GetSpacing()
    views = [
        (ct[z], lab[z], sy / sx, "axial"),
        (ct[:, y][::-1], lab[:, y][::-1], sz / sx, "coronal"),
        (ct[:, :, x][::-1], lab[:, :, x][::-1], sz / sy, "sagittal"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (c, lb, aspect, title) in zip(axes, views):
        ax.imshow(c, cmap="gray", vmin=-200, vmax=300, aspect=aspect)
        ax.imshow(
            np.ma.masked_equal(lb, 0), cmap="autumn", alpha=0.45, aspect=aspect, vmin=1, vmax=2
        )
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(
    out: Path,
    task: str = "kidney",
    cases: int = 8,
    minutes: float = 4.0,
    seed: int = 0,
    architecture: str = "mobilenetv2_unet2d",
    shape=(64, 256, 256),
) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PhantomConfig(
        task=task, shape=tuple(shape), spacing=(1.5, 1.5, 2.5), tumour_radius_mm=(10.0, 22.0)
    )
    print(f"[1/5] phantom dataset: {cases} training cases + 1 held-out ({task})")
    write_dataset(out / "data", "kits19", cfg, cases + 1, seed)
    case_dirs = sorted((out / "data").glob("case_*"))
    train_dirs, held_out = case_dirs[:-1], case_dirs[-1]
    card = make_card(
        name=f"demo-{task}-student",
        version="0.1.0",
        task=task,
        architecture=architecture,
        spatial_dims=2,
        title=f"Demo {task} student trained on phantoms (not for clinical use)",
        provenance={
            "teacher": None,
            "method": "none (supervised)",
            "seed": seed,
            "data": f"phantom kits19 {cases} cases seed {seed}",
        },
    )
    x, y = load_slices(train_dirs, card["preprocessing"])
    print(
        f"[2/5] {x.shape[0]} slices of {tuple(x.shape[-2:])}; training {architecture} "
        f"for {minutes:g} min"
    )
    net = build_network(architecture, 2, 1, 3)
    untrained = {k: v.clone() for k, v in net.state_dict().items()}
    losses = train(net, x, y, minutes, seed)

    print("[3/5] export model package")
    card["metrics"] = {
        "train_loss_first": losses[0],
        "train_loss_last": float(np.mean(losses[-20:])),
        "steps": len(losses),
    }
    model_dir = save_package(out / "model", card, net.state_dict())
    untrained_dir = save_package(out / ".untrained", card, untrained)

    print("[4/5] hlfd-segment on the held-out case")
    seg, report = out / "case.seg.nrrd", out / "case.report.json"
    ct = held_out / "imaging.nii.gz"
    code = segment_cli([str(ct), "-o", str(seg), "-m", str(model_dir), "--report", str(report)])
    if code:
        raise SystemExit(f"hlfd-segment failed with exit code {code}")
    base = out / ".untrained.nii.gz"
    segment_cli([str(ct), "-o", str(base), "-m", str(untrained_dir), "--quiet"])

    print("[5/5] metrics and overlay")
    truth_img = read_image(held_out / "segmentation.nii.gz")
    truth = sitk.GetArrayFromImage(truth_img)
    import slicerio

    pred = slicerio.read_segmentation(str(seg))["voxels"].transpose(2, 1, 0)
    untrained_pred = sitk.GetArrayFromImage(read_image(base))
    names = {1: task, 2: f"{task} tumour"}
    metrics = {"task": task, "case": str(ct), "labels": {}}
    for value, name in names.items():
        dice, hd = dice_hd95(pred, truth, truth_img.GetSpacing(), value)
        metrics["labels"][name] = {
            "dice": round(dice, 4),
            "hd95_mm": round(hd, 2),
            "untrained_dice": round(
                dice_hd95(untrained_pred, truth, truth_img.GetSpacing(), value)[0], 4
            ),
        }
    pred_img = sitk.GetImageFromArray(pred.astype(np.uint8))
    pred_img.CopyInformation(truth_img)
    overlay(read_image(ct), pred_img, out / "overlay.png")
    metrics["seconds_total"] = round(time.perf_counter() - t0, 1)
    metrics["segment_seconds"] = json.loads(report.read_text())["seconds"]["total"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    base.unlink(missing_ok=True)
    shutil.rmtree(untrained_dir)
    for line in (
        f"{n}: Dice {m['dice']:.3f} (untrained {m['untrained_dice']:.3f}), "
        f"HD95 {m['hd95_mm']:.1f} mm"
        for n, m in metrics["labels"].items()
    ):
        print("  " + line)
    print(
        f"outputs in {out}: model/, case.seg.nrrd, case.report.json, overlay.png, metrics.json "
        f"({metrics['seconds_total']:.0f} s)"
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="kidney", choices=["kidney", "liver"])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--architecture", default="mobilenetv2_unet2d")
    args = ap.parse_args(argv)
    run(args.out, args.task, args.cases, args.minutes, args.seed, args.architecture)


if __name__ == "__main__":
    main()
