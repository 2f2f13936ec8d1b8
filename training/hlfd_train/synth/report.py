"""Realism report of the synthesis engine: ``hlfd-train synth report OUT`` -> OUT/synth.md.

Montages of axial and coronal slices per contrast phase, per-tissue HU histograms against the
published ranges of :mod:`.tissues`, organ volumes against literature ranges
(``shared/SYNTH-REFERENCES.md`` section 3) and the noise power spectrum of the generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .generator import SynthConfig, synth_case
from .render import ct_noise
from .tissues import HU, PHASES, T

SHOWN = ("liver", "spleen", "kidney_cortex", "aorta", "portal_vein", "muscle", "visceral_fat")
VOLUME_RANGES = {"liver": (505, 4504), "kidney": (124, 542)}  # mL: AbdomenCT-1K; WORD x 2


def write_report(out: str | Path, config: SynthConfig, cases: int = 24, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, list[float]]] = {p: {t: [] for t in SHOWN} for p in PHASES}
    volumes, montage, metas = [], {}, []
    for i in range(cases):
        case = synth_case(config, seed * 100003 + i)
        metas.append(case.meta)
        phase = case.meta["phase"]
        for name in SHOWN:
            values = case.image[case.tissue == T[name]]
            if values.size:
                stats[phase][name].append(float(np.median(values)))
        whole = not (case.labels[[0, -1]] == 1).any()
        if whole:
            volumes.append(float((case.labels > 0).sum() * np.prod(case.spacing) / 1000))
        montage.setdefault(phase, case)
    # montage: one case per phase, an axial slice through the organ and a coronal one
    fig, axes = plt.subplots(2, len(montage), figsize=(4 * len(montage), 8), squeeze=False)
    for col, (phase, case) in enumerate(sorted(montage.items())):
        zs = np.nonzero((case.labels > 0).any((1, 2)))[0]
        z = int(zs[len(zs) // 2]) if len(zs) else case.image.shape[0] // 2
        y = case.image.shape[1] // 2
        sx, _, sz = case.spacing
        for row, (img, lab, aspect) in enumerate(
            (
                (case.image[z], case.labels[z], 1.0),
                (case.image[::-1, y], case.labels[::-1, y], sz / sx),
            )
        ):
            ax = axes[row][col]
            ax.imshow(img, cmap="gray", vmin=-160, vmax=240, aspect=aspect)
            ax.contour(lab == 1, [0.5], colors="lime", linewidths=0.6)
            if (lab == 2).any():
                ax.contour(lab == 2, [0.5], colors="red", linewidths=0.6)
            ax.set_title(f"{phase} ({case.meta['slice_mm']} mm)" if row == 0 else "coronal")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "synth-montage.png", dpi=70)
    plt.close(fig)
    # HU of each tissue (median per case) against the published range per phase
    fig, axes = plt.subplots(1, len(PHASES), figsize=(16, 4), sharey=True)
    for ax, phase in zip(axes, PHASES):
        for j, name in enumerate(SHOWN):
            lo, hi = HU[name][PHASES.index(phase)]
            ax.plot([j, j], [lo, hi], color="0.7", linewidth=8, solid_capstyle="butt")
            ax.plot([j] * len(stats[phase][name]), stats[phase][name], "k.", markersize=4)
        ax.set_xticks(range(len(SHOWN)), SHOWN, rotation=60, fontsize=8)
        ax.set_title(phase)
    axes[0].set_ylabel("median HU per case (grey: published range)")
    fig.tight_layout()
    fig.savefig(out / "synth-hu.png", dpi=70)
    plt.close(fig)
    # noise power spectrum (radial average) of the generator at two peak settings
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rng = np.random.default_rng(seed)
    for peak in config.noise_peak:
        n = ct_noise((4, 256, 256), (1.5, 1.5, 2.5), 10.0, peak, rng)
        ps = np.abs(np.fft.fftshift(np.fft.fft2(n), axes=(1, 2))) ** 2
        f = np.hypot(*np.meshgrid(*(np.fft.fftshift(np.fft.fftfreq(256, 1.5)),) * 2))
        bins = np.linspace(0, f.max(), 40)
        idx = np.digitize(f.ravel(), bins)
        radial = [ps.mean(0).ravel()[idx == k].mean() for k in range(1, len(bins))]
        ax.plot(bins[1:], np.array(radial) / max(radial), label=f"peak {peak} /mm")
    ax.set_xlabel("spatial frequency (cycles/mm)")
    ax.set_ylabel("NPS (normalised)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "synth-nps.png", dpi=70)
    plt.close(fig)
    lo, hi = VOLUME_RANGES[config.task]
    inside = sum(lo <= v <= hi for v in volumes)
    phases = {p: sum(m["phase"] == p for m in metas) for p in PHASES}
    lines = [
        f"# Synthetic CT realism report ({config.task}, {cases} cases, seed {seed})",
        "",
        "Made by `hlfd-train synth report`. Every case is synthetic: no patient data.",
        "",
        "![montage](synth-montage.png)",
        "",
        "## Attenuation per tissue and phase",
        "![HU](synth-hu.png)",
        "",
        "Dots: median HU of a tissue in one case (after blur and noise); grey bars: the published",
        "range the generator draws from (sources in `hlfd_train/synth/tissues.py`).",
        "",
        "## Organ volumes",
        f"{len(volumes)} cases hold the whole {config.task} (organ + tumour); {inside} of them lie",
        f"in the literature range {lo}-{hi} mL. Median {np.median(volumes):.0f} mL"
        if volumes
        else "No case holds the whole organ.",
        "",
        "## Acquisition",
        f"Phases: {', '.join(f'{p} {n}' for p, n in phases.items())}. Slices: "
        + ", ".join(sorted({f"{m['slice_mm']} mm" for m in metas}))
        + f". Noise sd {min(m['noise_hu'] for m in metas)}-{max(m['noise_hu'] for m in metas)} HU.",
        f" Tumour-free cases: {sum(m['tumour_free'] for m in metas)}; with metal:"
        f" {sum(m['metal'] for m in metas)}.",
        "",
        "![NPS](synth-nps.png)",
        "",
    ]
    path = out / "synth.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
