"""Liver and kidney lesions: tumours of many kinds and benign cysts (a hard negative).

Size, count and appearance rules (``shared/SYNTH-REFERENCES.md`` section 2): KiTS tumour median
33 cm3 (4 cm sphere-equivalent, 0.9-1447 cm3) and cysts in half of the cases; liver lesions from
tiny (5 mm) to huge (12 cm) with several per liver as in Hu et al. (CVPR 2023: tiny/small 3-10,
medium 2-5, large 1-3); hypovascular metastases hypodense in the portal phase with enhancing
rims in 84 % (Ann Acad Med Singapore 2003); HCC hyperenhancing in the arterial phase
(tumour-liver +23..+47 HU, PMID 17329690) with washout and capsule later; ccRCC 173 +- 45
corticomedullary, 149 +- 34 nephrographic (Urologia J); papillary RCC hypoenhancing 32-100;
necrosis 10-30 HU; calcification > 130 HU; the SyntheticTumors texture (blurred Bernoulli noise)
and edge blur of 1-2 voxels.
"""

from __future__ import annotations

import numpy as np

from .geometry import Grid
from .tissues import PHASES, T

# tissues a growing tumour does not replace
FIRM = [
    T[n]
    for n in (
        "air",
        "fat",
        "skin",
        "muscle",
        "cortical_bone",
        "cancellous_bone",
        "disc",
        "csf",
        "aorta",
        "ivc",
        "lung",
        "table",
        "mattress",
        "metal",
    )
]
# neighbours an exophytic kidney tumour pushes aside rather than replaces: a tumour painted over
# the spleen or liver keeps that organ's place and shape, which taught the stage-1/2 kidney
# students to call the spleen and liver next to a healthy upper pole "tumour"
NEIGHBOURS = [
    T[n]
    for n in (
        "liver",
        "portal_vein",
        "hepatic_vein",
        "gallbladder",
        "spleen",
        "pancreas",
        "bowel_wall",
        "bowel_fluid",
        "oral_contrast",
        "feces",
        "adrenal",
    )
]


# liver lesion radius (mm) per size class and how many of that class a case gets: Hu et al.'s
# tiny / small / medium / large classes and counts (3-10, 3-10, 2-5, 1-3), a little fewer
LIVER_CLASSES = {
    "tiny": (2.5, 5.0, 3, 8),
    "small": (5.0, 10.0, 2, 6),
    "medium": (10.0, 20.0, 1, 4),
    "large": (20.0, 40.0, 1, 2),
}
MAX_TUMOUR_SHARE = 0.4  # of the organ: no case where tumour replaces the whole liver


def _liver_radii(rng: np.random.Generator) -> list[float]:
    """Radii of one case's liver tumours: one size class, or a mix (Hu et al., CVPR 2023)."""
    kind = str(rng.choice(["tiny", "small", "medium", "large", "mix"]))
    mix = [str(rng.choice(["medium", "large"])), "small", "tiny"]
    radii = []
    for cls in [kind] if kind != "mix" else mix:
        lo, hi, n_lo, n_hi = LIVER_CLASSES[cls]
        n = int(rng.integers(n_lo, n_hi + 1)) if kind != "mix" else int(rng.integers(1, 4))
        radii += [float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) for _ in range(n)]
    return sorted(radii, reverse=True)


def _kidney_radii(rng: np.random.Generator) -> list[float]:
    """KiTS: one tumour in about 90 % of cases, median 33 cm3 (about 20 mm radius)."""
    radii = []
    for _ in range(int(rng.choice([1, 2], p=[0.9, 0.1]))):
        cls = rng.choice(["small", "medium", "large"], p=[0.3, 0.45, 0.25])
        lo, hi = {"small": (6, 14), "medium": (14, 28), "large": (28, 50)}[cls]
        radii.append(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    return radii


def _centre(grid: Grid, organ_mask: np.ndarray, rng: np.random.Generator, surface: bool):
    """A random point in the organ (near its surface for exophytic kidney tumours)."""
    pts = np.argwhere(organ_mask[::2, ::3, ::3])
    if not len(pts):
        return None
    k, j, i = pts[rng.integers(len(pts))] * (2, 3, 3)
    k, j, i = (min(v, n - 1) for v, n in zip((k, j, i), grid.shape))
    c = np.array([grid.X[k, j, i], grid.Y[k, j, i], grid.Z[k, j, i]], dtype=float)
    if surface:
        c += rng.normal(0, 8, 3)
    return c


def texture(shape, rng: np.random.Generator) -> np.ndarray:
    """SyntheticTumors-style texture in [0, 1]: blurred Bernoulli noise, mean about 0.5."""
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(rng.uniform(size=shape).astype(np.float32), rng.uniform(1.0, 2.5))
    p = rng.uniform(0.3, 0.6)
    spots = (base > np.quantile(base, 1 - p)).astype(np.float32)
    tex = gaussian_filter(spots, rng.uniform(0.8, 2.0))
    return np.clip(tex / max(tex.mean(), 1e-3) * 0.5, 0, 1)


def add_lesions(
    grid: Grid,
    anatomy,
    organ: str,
    rng: np.random.Generator,
    tumour_free: bool,
    extra_radii: tuple[float, ...] = (),
) -> list[dict]:
    """Paint tumours (unless ``tumour_free``) and 0-3 cysts of ``organ`` into the anatomy; the
    per-lesion appearance goes to the returned records for the renderer. ``extra_radii``: more
    tumours (mm), placed first."""
    u = rng.uniform
    mask = anatomy.liver if organ == "liver" else anatomy.kidney
    tissue = anatomy.tissue
    out = []
    drawn = [] if tumour_free else (_liver_radii(rng) if organ == "liver" else _kidney_radii(rng))
    radii = [] if tumour_free else [*extra_radii, *drawn]
    n_cysts = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.3, 0.15, 0.1]))
    organ_voxels = max(1, int(mask.sum()))
    tumour_voxels = 0
    for k, kind in enumerate(["tumour"] * len(radii) + ["cyst"] * n_cysts):
        if kind == "tumour" and tumour_voxels > MAX_TUMOUR_SHARE * organ_voxels:
            continue
        exophytic = organ == "kidney" and kind == "tumour" and rng.random() < 0.5
        c = _centre(grid, mask, rng, exophytic)
        if c is None:
            break
        r = radii[k] if kind == "tumour" else float(np.exp(u(np.log(3), np.log(25))))
        axes = r * rng.uniform(0.75, 1.25, 3)
        lob = u(0.1, 0.35) if kind == "tumour" else u(0.0, 0.05)
        e = grid.ellipsoid(c, axes, lobulation=lob, pad=1.2)
        if e is None:
            continue
        sl, q = e
        region = q <= 1
        if kind == "tumour" and organ == "liver":
            region &= mask[sl] | (q <= 0.6) & np.isin(tissue[sl], [T["visceral_fat"]])  # may bulge
            region &= anatomy.body_rho[sl] < 0.97
        elif kind == "tumour":  # kidney: exophytic into fat, pushing neighbours aside
            region &= ~np.isin(tissue[sl], FIRM + NEIGHBOURS) & (anatomy.body_rho[sl] < 0.9)
        else:
            region &= mask[sl]
        if not region.any():
            continue
        name = f"{organ}_tumour" if kind == "tumour" else "cyst"
        tissue[sl][region] = T[name]
        if kind == "tumour":
            mask[sl] &= ~region
            tumour_voxels += int(region.sum())
        else:
            mask[sl] |= region
        rec = {
            "kind": kind,
            "organ": organ,
            "centre_mm": c.round(1).tolist(),
            "radius_mm": round(r, 1),
        }
        rec.update(_appearance(rng, organ, kind, r))
        rec["box"], rec["q"], rec["region"] = sl, q, region
        out.append(rec)
    return out


# Lesion minus organ HU per phase (non-contrast, arterial, portal venous, delayed).
LIVER_DELTAS = {
    "hypo": ((-25, -5), (-50, -15), (-90, -30), (-70, -20)),
    "rim": ((-25, -5), (-45, -10), (-90, -35), (-70, -25)),
    # hyperenhancing, then washout: at least ~10 HU from the liver
    "hcc": ((-20, -5), (20, 50), (-35, -12), (-45, -15)),
    "necrotic": ((-20, -5), (-40, -10), (-70, -30), (-60, -20)),
    "faint": ((-15, -6), (-25, -10), (-35, -15), (-30, -12)),
}
KIDNEY_DELTAS = {  # against the cortex
    # papillary: hypoenhancing, below the cortex in every contrast phase
    "papillary": ((-15, 10), (-170, -90), (-120, -60), (-100, -40)),
    # ccRCC (173 +- 45 corticomedullary, 149 +- 34 nephrographic): heterogeneous, at least
    # ~20 HU below the cortex after the arterial peak, never parenchyma-like (also necrotic)
    "ccrcc": ((-10, 5), (-80, -15), (-90, -35), (-90, -40)),
}


def _appearance(rng, organ: str, kind: str, r: float) -> dict:
    """How a lesion enhances, relative to its organ (ΔHU per phase) or absolutely."""
    u = rng.uniform
    if kind == "cyst":
        return {"type": "cyst", "hu": u(-5, 20), "edge": u(0.02, 0.08)}
    if organ == "liver":
        t = rng.choice(list(LIVER_DELTAS), p=[0.4, 0.2, 0.15, 0.15, 0.1])
        # every type's deltas are drawn (in table order) so the random stream does not depend
        # on which type was chosen; the chosen type's are kept
        drawn = {k: [u(*r) for r in ranges] for k, ranges in LIVER_DELTAS.items()}
        d = dict(zip(PHASES, drawn[str(t)]))
    else:
        t = rng.choice(["ccrcc", "papillary", "necrotic"], p=[0.55, 0.25, 0.2])
        ranges = KIDNEY_DELTAS["papillary" if t == "papillary" else "ccrcc"]
        d = {phase: u(*r) for phase, r in zip(PHASES, ranges)}
    texture = u(8, 30) if organ == "liver" else u(15, 35)  # RCC: markedly heterogeneous
    rec = {"type": str(t), "delta": d, "edge": u(0.1, 0.35), "texture_hu": texture}
    if t == "rim" or (t == "hcc" and rng.random() < 0.5):
        rec["rim_hu"] = u(20, 60)
    if t == "necrotic" or (r > 20 and rng.random() < 0.4):
        rec["necrosis"] = {"q": u(0.15, 0.45), "hu": u(10, 30)}
    if rng.random() < 0.06:
        rec["calcification_hu"] = u(200, 600)
    return rec
