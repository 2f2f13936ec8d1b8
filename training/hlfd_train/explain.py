"""Attention maps of teacher and students on chosen slices (the paper's qualitative figure).

For each model (a run folder or model package) and each slice: the CT with the reference
outline, the attention map ``mean_c |F_c|^p`` of each chosen tap upsampled to the slice, and
the prediction. 2D networks only (a 3D network's taps are volumes: use its axial cut).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.pipeline import context_slices, with_context

from .cards import N_CLASSES, input_channels, load_weights
from .config import ConfigError, load_config
from .distill import attention_map, run_with_taps
from .engine import make_network, taps_of


def load_model(src: Path) -> tuple[torch.nn.Module, dict[str, str], str, int]:
    """(eval network, taps, label, context slices) from a run folder or a model package."""
    src = Path(src)
    if (src / "model.json").is_file():
        pkg = load_package(src)
        net = pkg.build_network()
        return net, taps_of(net, {}), pkg.name, context_slices(pkg.card["preprocessing"])
    if not (src / "config.yaml").is_file():
        raise ConfigError(f"{src}: neither a run folder nor a model package")
    cfg = load_config(src / "config.yaml")
    summary = src / "summary.json"
    role = (
        json.loads(summary.read_text()).get("role", "student") if summary.is_file() else "student"
    )
    spec = cfg["model"][role]
    classes = N_CLASSES[cfg["data"]["labelset"]]
    net = make_network(spec, cfg["model"]["spatial_dims"], classes, input_channels(cfg))
    found = [src / n for n in ("best.safetensors", "last.safetensors") if (src / n).is_file()]
    weights = found[0] if found else None
    if weights is None:
        raise ConfigError(f"{src}: no trained weights (best/last.safetensors)")
    net.load_state_dict(load_weights(weights))
    method = cfg["distill"]["method"] if role == "student" else "teacher"
    label = f"{spec['architecture']} ({method})"
    return net.eval(), taps_of(net, spec), label, context_slices(cfg["data"]["preprocessing"])


def explain(
    models: Sequence[Path],
    image: np.ndarray,
    label: np.ndarray,
    slices: Sequence[int],
    out_png: Path,
    taps: Sequence[str] = ("e2", "e3", "e4", "e5"),
    p: float = 2.0,
    names: Sequence[str] | None = None,
) -> Path:
    """Figure of ``models`` on ``slices`` of a prepared (normalised, model-grid) volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [load_model(m) for m in models]
    rows = [(i, z) for i in range(len(loaded)) for z in slices]
    cols = 2 + len(taps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows)), squeeze=False)
    for r, (i, z) in enumerate(rows):
        net, net_taps, label_text, context = loaded[i]
        if names:
            label_text = names[i]
        missing = [t for t in taps if t not in net_taps]
        if missing:
            raise ConfigError(f"{models[i]}: no tap {missing[0]!r} to explain")
        x = torch.from_numpy(with_context(image, [z], context))
        m = int(getattr(net, "size_divisible", 1))
        h, w = x.shape[-2:]
        x = torch.nn.functional.pad(x, (0, (-w) % m, 0, (-h) % m))
        logits, feats = run_with_taps(net, {t: net_taps[t] for t in taps}, x, teacher=True)
        pred = logits.argmax(1)[0, :h, :w].numpy()
        ax = axes[r, 0]
        ax.imshow(image[z], cmap="gray")
        if label[z].any():
            ax.contour(label[z] > 0, levels=[0.5], colors="lime", linewidths=0.8)
            ax.contour(label[z] == label.max(), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_ylabel(f"{label_text}\nslice {z}", fontsize=7)
        for c, tap in enumerate(taps, start=1):
            att = attention_map(feats[tap], p=p, normalize=False)
            att = torch.nn.functional.interpolate(att, size=x.shape[-2:], mode="bilinear")
            a = att[0, 0, :h, :w].numpy()
            axes[r, c].imshow((a - a.min()) / (np.ptp(a) + 1e-12), cmap="jet")
            axes[r, c].set_title(f"attention {tap}", fontsize=7)
        axes[r, -1].imshow(image[z], cmap="gray")
        axes[r, -1].imshow(np.ma.masked_equal(pred, 0), cmap="autumn", alpha=0.5)
        axes[r, -1].set_title("prediction", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def tumour_slices(label: np.ndarray, count: int = 2) -> list[int]:
    """The ``count`` slices with the largest area of the highest label (tumour)."""
    top = int(label.max())
    if top == 0:
        return [label.shape[0] // 2]
    area = (label == top).reshape(label.shape[0], -1).sum(1)
    return sorted(int(z) for z in np.argsort(area)[::-1][:count] if area[z] > 0)
