"""Image formation: tissue map -> HU, with lesions, scanner blur, correlated noise and artefacts.

Noise follows CT's noise power spectrum, not white noise: a ramp with a Gaussian roll-off peaking
at 0.1-0.3 cycles/mm (clinical abdomen NPS peaks 0.27 FBP, 0.09-0.18 iterative; SFPM 2017, De
Marco 2018), sd 6-28 HU (portal-venous liver CT 8-11 HU, Zhao 2016 and Shuman 2013; thin slices
and large patients noisier). Metal streaks: alternating dark and bright rays from a dense object
(a hip prosthesis biases urine by about -40 HU without MAR, Jpn J Radiol 2016). Cupping and a
smooth bias field of a few HU (beam hardening, unsourced estimate).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .lesions import texture
from .tissues import HU, KIN, PHASES, TEXTURE, TISSUES, T

# organs whose own attenuation varies between patients beyond one range (``spread_hu``)
SOFT = ("liver", "spleen", "kidney_cortex", "kidney_medulla", "pancreas", "muscle", "bowel_wall")


def tissue_hu(
    rng: np.random.Generator,
    phase: str,
    spread: np.random.Generator | None = None,
    medulla_lag_hu: float = 0.0,
) -> np.ndarray:
    """Per-case mean HU of every tissue id (a lookup table); ``spread`` widens it by patient
    (see :func:`spread_hu`); ``medulla_lag_hu`` keeps the renal medulla that far under the
    cortex (a corticomedullary difference that outlasts the arterial phase)."""
    k = PHASES.index(phase)
    drawn = [0.0 if name in KIN else rng.uniform(*HU[name][k]) for name in TISSUES]
    lut = np.array(drawn, dtype=np.float32)
    for name, kin in KIN.items():
        lut[T[name]] = lut[T[kin]]
    if spread is not None:
        lut = spread_hu(lut, phase, spread)
    # physiological couplings: hepatic veins never brighter than the portal vein in the
    # portal phase; the medulla never brighter than the cortex before the nephrographic phase
    if phase in ("arterial", "portal_venous"):
        lut[T["kidney_medulla"]] = min(lut[T["kidney_medulla"]], lut[T["kidney_cortex"]] - 5)
    if medulla_lag_hu:
        lag = max(lut[T["kidney_cortex"]] - medulla_lag_hu, HU["kidney_medulla"][0][1])
        lut[T["kidney_medulla"]] = min(lut[T["kidney_medulla"]], lag)  # not under unenhanced
    return lut


def spread_hu(lut: np.ndarray, phase: str, rng: np.random.Generator) -> np.ndarray:
    """Patients and protocols differ more than one range per tissue and phase says: contrast
    dose, body weight, cardiac output and timing scale every tissue's enhancement (by 0.5-1.3
    here), and each organ's own attenuation varies by patient (+-12 HU). Population spreads
    are wide: portal-venous spleen 122 +- 27 HU and liver 127 +- 23 in FLARE22; a public
    portal-venous CT has spleen 80, liver 93, aorta 151 (``hlfd-train real-ct``). Without this
    a model can tell spleen from kidney by brightness alone, which real CTs do not allow."""
    k = PHASES.index(phase)
    enhancing = [T[n] for n in TISSUES if n not in KIN and HU[n][k] != HU[n][0]]
    native = np.array([np.mean(HU[n][0]) for n in TISSUES], dtype=np.float32)
    out = lut.copy()
    out[enhancing] = native[enhancing] + rng.uniform(0.5, 1.3) * (lut - native)[enhancing]
    shift = rng.uniform(-12.0, 12.0, len(SOFT)).astype(np.float32)
    out[[T[name] for name in SOFT]] += shift
    return out


def render(
    grid,
    anatomy,
    lesions,
    phase: str,
    rng: np.random.Generator,
    spacing,
    liver_fat_hu=0.0,
    spread: np.random.Generator | None = None,
    medulla_lag_hu: float = 0.0,
) -> np.ndarray:
    """float32 HU image (fine grid) before slice averaging and noise.

    ``spread``: the random stream of :func:`spread_hu`, or None for the ranges as they are.
    ``liver_fat_hu``: steatosis, the mean HU the liver parenchyma loses to fat, patchy (focal
    sparing and focal fat); its vessels and lesions keep their values (tumours hold no fat, so
    a hypodense metastasis loses contrast in a fatty liver, as on real CT).
    ``medulla_lag_hu``: see :func:`tissue_hu`.
    """
    lut = tissue_hu(rng, phase, spread, medulla_lag_hu)
    tissue = anatomy.tissue
    img = lut[tissue]
    for name, amp in TEXTURE.items():
        m = tissue == T[name]
        if m.any():
            field = 0.5 * grid.coarse_noise[m] + 0.85 * grid.fine_noise[m]
            img[m] += amp * rng.uniform(0.5, 1.5) * field
    m = tissue == T["feces"]
    if m.any():  # mottled stool: gas bubbles in soft tissue
        img[m] = np.where(grid.fine_noise[m] > 0.7, -700.0, rng.uniform(-40, 40))
    if liver_fat_hu:
        m = tissue == T["liver"]
        img[m] -= liver_fat_hu * np.clip(1.0 + 0.6 * grid.coarse_noise[m], 0.1, 2.0)
    organ_hu = {"liver": lut[T["liver"]], "kidney": lut[T["kidney_cortex"]]}
    for rec in lesions:
        _lesion(img, rec, organ_hu[rec["organ"]], phase, rng)
    body = anatomy.body_rho <= 1.0
    img += (
        rng.uniform(-6, 6) - rng.uniform(0, 15) * (1 - np.minimum(anatomy.body_rho, 1) ** 2)
    ) * body
    img += rng.uniform(0, 6) * grid.coarse_noise * body
    sx, sy, sz = spacing
    psf = rng.uniform(0.45, 0.9)  # mm, in-plane point spread (Gaussian sigma)
    return gaussian_filter(img, (0.5 * psf / sz, psf / sy, psf / sx), mode="nearest")


def _lesion(img, rec, organ_hu: float, phase: str, rng) -> None:
    sl, q, region = rec["box"], rec["q"], rec["region"]
    sub = img[sl]
    if rec["type"] == "cyst":
        value = np.full(q.shape, rec["hu"], dtype=np.float32)
    else:
        base = organ_hu + rec["delta"][phase]
        tex = texture(q.shape, rng)
        value = base + rec["texture_hu"] * (tex - 0.5) * 2
        if "rim_hu" in rec:
            value += rec["rim_hu"] * np.clip((q - 0.6) / 0.4, 0, 1)
        if "necrosis" in rec:
            n = rec["necrosis"]
            core = np.clip((n["q"] - q) / 0.1, 0, 1)
            value = value * (1 - core) + n["hu"] * core
        if "calcification_hu" in rec:
            value = np.where(tex > 0.97, rec["calcification_hu"], value)
    w = np.clip((1.0 - q) / rec["edge"], 0, 1) * region
    sub[...] = sub * (1 - w) + value * w


def average_slices(img: np.ndarray, k: int) -> np.ndarray:
    """Thick slices: the mean of ``k`` consecutive fine slices (a rectangular slice profile)."""
    if k == 1:
        return img
    n = img.shape[0] // k
    return img[: n * k].reshape(n, k, *img.shape[1:]).mean(1)


def ct_noise(shape, spacing, sd: float, peak: float, rng) -> np.ndarray:
    """Noise with a CT-like in-plane power spectrum (ramp x Gaussian roll-off peaking at
    ``peak`` cycles/mm) and little correlation across slices, scaled to ``sd`` HU."""
    h, w = shape[1:]
    fy = np.fft.fftfreq(h, spacing[1])[:, None]
    fx = np.fft.rfftfreq(w, spacing[0])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    amp = np.sqrt(f * np.exp(-(f**2) / (2 * peak**2)))  # NPS f·exp(-f²/2p²) peaks at f = p
    white = rng.standard_normal(shape).astype(np.float32)
    noise = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
    noise /= max(float(noise.std()), 1e-6)
    return noise * sd


def metal_streaks(shape, grid_xy, centres, spacing, rng) -> np.ndarray:
    """Dark and bright rays from each metal centre (x, y): amplitude falls off with distance."""
    xs, ys = grid_xy
    out = np.zeros(shape[1:], dtype=np.float32)
    for cx, cy, _ in centres:
        dx, dy = xs[None, :] - cx, ys[:, None] - cy
        ang = np.arctan2(dy, dx)
        r = np.sqrt(dx**2 + dy**2)
        rays = np.zeros_like(ang)
        for k in rng.integers(20, 90, 6):
            rays += np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        out += rng.uniform(80, 300) * rays / 6 * np.exp(-r / rng.uniform(60, 160))
    return out
