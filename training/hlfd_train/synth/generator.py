"""One synthetic labelled abdominal CT from a seed: ``synth_case(SynthConfig(task), seed)``.

Acquisition follows the public datasets (``shared/SYNTH-REFERENCES.md`` 4a): in-plane 0.56-1.0
mm in LiTS/KiTS, generated here at 1.2-1.7 mm (the students run at 1.5 mm, so finer voxels would
be averaged away); slices 1.5-5 mm with a rectangular slice profile (thick slices average 2-3
fine sub-slices: partial volume); a reconstruction field of view of 300-480 mm that may cut
through the body and its organs at any border, with or without the scanner's circular mask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from HLFDSegmentLib.phantom import Phantom

from .anatomy import Patient, add_ascites, build
from .geometry import Grid
from .lesions import add_lesions
from .render import average_slices, ct_noise, metal_streaks, render
from .tissues import PHASE_WEIGHTS, PHASES, T

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MAX_INPLANE = 288  # voxels per in-plane axis
# tumour-free share: the kidney model must call no tumour in the (mostly tumour-free) kidneys
# of a liver CT, so it sees more healthy kidneys than KiTS (every case has a tumour) would give
TUMOUR_FREE = {"liver": 0.2, "kidney": 0.35}
TASK_LABELS = {"liver": ("Liver", "Liver tumor"), "kidney": ("Kidney", "Kidney tumor")}


class SynthError(ValueError):
    """An impossible synthesis setting; the message names it."""


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator; the defaults are the shipped students' training stream."""

    task: str = "liver"  # liver | kidney: which organ's labels (and lesions) the case carries
    inplane_mm: tuple[float, float] = (1.2, 1.7)
    slice_mm: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 5.0)
    slice_weights: tuple[float, ...] = (0.25, 0.2, 0.2, 0.2, 0.15)
    fov_mm: tuple[float, float] = (300.0, 480.0)
    fov_cut: float = 0.35  # chance that the field of view cuts through the body
    circle_mask: float = 0.5  # chance of the scanner's circular reconstruction mask
    phases: dict[str, float] = field(default_factory=dict)  # {} = the task's PHASE_WEIGHTS
    tumour_free: float | None = None  # chance of a tumour-free case; None: TUMOUR_FREE[task]
    noise_hu: tuple[float, float] = (6.0, 28.0)
    noise_peak: tuple[float, float] = (0.09, 0.3)  # cycles/mm
    metal: float = 0.06
    # chance that the *other* organ bears tumours and cysts, labelled background: the kidney
    # model meets the liver tumours of a liver CT (a hard negative), the liver model renal ones
    other_organ_lesions: float = 0.0
    deform_mm: float = 8.0
    max_slices: int = 160
    # chances of a fatty liver (patchy, 10-45 HU darker parenchyma) and of free fluid around the
    # liver and spleen: both common in the patients of liver-tumour CTs (tissues.py [Pickhardt])
    steatosis: float = 0.0
    ascites: float = 0.0
    # chance of a patient whose enhancement (0.5-1.3x) and organ attenuation (+-12 HU) lie
    # beyond the per-tissue ranges (render.spread_hu): population spreads are wider than them
    hu_spread: float = 0.0
    # chance of an enlarged spleen (x 1.2-1.5 in each axis, 1.7-3.4 x the volume), set
    # further back and toward the spine, where it fills the paravertebral gutter above the left
    # kidney: common in liver-tumour patients (portal hypertension in cirrhosis; after
    # oxaliplatin, Overman et al., J Clin Oncol 2010) and what a real liver CT's spleen looks
    # like beside the kidney models' false kidney
    splenomegaly: float = 0.0
    # chance that a portal-venous case keeps the renal medulla 40-100 HU under the cortex: the
    # corticomedullary phase lasts to about 70 s after injection and the homogeneous nephrogram
    # comes from about 80-100 s (Yuh & Cohan, AJR 1999; homogeneous from +55 s after the bolus
    # trigger, PMID 17367973), so a portal-venous CT at 60-70 s often still shows darker
    # pyramids (3D-IRCADb-01 case 1.17: cortex about 160 HU, medulla about 105)
    medulla_lag: float = 0.0
    # chance of one more, huge liver tumour (radius 40-65 mm, up to 13 cm across; the issue's
    # "huge (12 cm)", beyond Hu et al.'s large class): 3D-IRCADb-01 case 1.7's 669 mL mass,
    # larger than any lesion the stream drew, was called liver by every liver model
    huge_lesions: float = 0.0
    # chance that the kidneys get a real inside (anatomy._renal_detail): cone-shaped pyramids
    # around the sinus, calyces, and segmental vessels in the sinus fat. 3D-IRCADb-01's kidneys
    # (1.7 nephrographic, 1.17 corticomedullary) show them; every kidney model called them tumour
    renal_detail: float = 0.0
    # chance of 1-3 small-bowel loops against each kidney's front and side (collapsed or filled):
    # 3D-IRCADb-01 case 1.1's jejunum by the left kidney was called kidney and tumour
    bowel_by_kidney: float = 0.0
    # chance that the volume is cropped in-plane to a square of organ_crop_mm around the organ
    # (Slicer's Crop Volume before segmenting): organ and tumours run into the image border
    organ_crop: float = 0.0
    organ_crop_mm: tuple[float, float] = (110.0, 220.0)
    # whose scan range: "liver" (dome to below the liver: kidneys often cut, as in a LiTS CT),
    # "kidney" (both kidneys with margins, as in KiTS), "any" (either, even odds); "" = the task's
    scan: str = ""

    def __post_init__(self):
        if self.task not in TASK_LABELS:
            raise SynthError(f"synth task: expected liver or kidney, got {self.task!r}")
        for name in ("inplane_mm", "fov_mm", "noise_hu", "noise_peak", "organ_crop_mm"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi and math.isfinite(hi)):
                raise SynthError(f"synth {name}: need 0 < low <= high, got {[lo, hi]}")
        if len(self.slice_mm) != len(self.slice_weights) or min(self.slice_mm) <= 0:
            raise SynthError("synth slice_mm / slice_weights: same length, positive values")
        for name in (
            "fov_cut",
            "circle_mask",
            "tumour_free",
            "metal",
            "other_organ_lesions",
            "steatosis",
            "ascites",
            "hu_spread",
            "splenomegaly",
            "medulla_lag",
            "huge_lesions",
            "renal_detail",
            "bowel_by_kidney",
            "organ_crop",
        ):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise SynthError(
                    f"synth {name}: a probability in [0, 1], got {getattr(self, name)}"
                )
        if self.scan and self.scan not in (*TASK_LABELS, "any"):
            raise SynthError(f"synth scan: expected liver, kidney, any or empty, got {self.scan!r}")
        unknown = set(self.phases) - set(PHASES)
        if unknown:
            raise SynthError(f"synth phases: unknown {sorted(unknown)}; known: {', '.join(PHASES)}")

    @classmethod
    def from_dict(cls, task: str, values: dict[str, Any] | None) -> SynthConfig:
        values = dict(values or {})
        known = {f for f in cls.__dataclass_fields__ if f != "task"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SynthError(
                f"unknown synth key {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        defaults = cls()
        for k, v in values.items():
            want = getattr(defaults, k)
            if isinstance(want, tuple):
                if not isinstance(v, list) or not all(_is_number(x) for x in v):
                    raise SynthError(f"synth {k}: a list of numbers, got {v!r}")
                values[k] = tuple(float(x) for x in v)
            elif isinstance(want, str):
                if not isinstance(v, str):
                    raise SynthError(f"synth {k}: a word, got {v!r}")
            elif isinstance(want, dict):
                if not isinstance(v, dict) or not all(_is_number(x) for x in v.values()):
                    raise SynthError(f"synth {k}: a mapping of phase -> weight, got {v!r}")
            elif not _is_number(v) or (isinstance(want, int) and not isinstance(v, int)):
                raise SynthError(f"synth {k}: a {type(want).__name__}, got {v!r}")
        return cls(task=task, **values)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SynthCase(Phantom):
    """int16 HU image and uint8 labels (z, y, x) with their geometry (``to_sitk``), plus the
    tissue map the labels come from."""

    tissue: np.ndarray | None = None  # uint8 tissue ids (tissues.T) on the image grid


def _z_range(task: str, p: Patient, rng) -> tuple[float, float]:
    u = rng.uniform
    if task == "liver":
        top = p.dome + (u(-25, 0) if rng.random() < 0.15 else u(0, 70))
        bottom = p.dome - p.liver_span - (u(-20, 0) if rng.random() < 0.1 else u(0, 130))
    else:
        hi = max(z + L / 2 for z, L in zip(p.kidney_z, p.kidney_len))
        lo = min(z - L / 2 for z, L in zip(p.kidney_z, p.kidney_len))
        top = hi + (u(-20, 0) if rng.random() < 0.1 else u(0, 120))
        bottom = lo - (u(-20, 0) if rng.random() < 0.1 else u(0, 130))
    return bottom, top


def synth_case(config: SynthConfig | None = None, seed: int = 0) -> SynthCase:
    """A reproducible case: the same (config, seed) gives identical arrays."""
    cfg = config or SynthConfig()
    rng = np.random.default_rng([seed, 7])
    u = rng.uniform
    p = Patient.draw(rng)
    p.extra["metal_prob"] = cfg.metal
    spleen = np.random.default_rng([seed, 19])  # its own stream: at 0, earlier seeds unchanged
    if spleen.random() < cfg.splenomegaly:
        p.extra["spleen"] = (
            spleen.uniform(1.2, 1.5),
            spleen.uniform(0, 0.15),
            spleen.uniform(0, 0.15),
        )
    detail = np.random.default_rng([seed, 37])  # its own stream: at 0, earlier seeds unchanged
    if detail.random() < cfg.renal_detail:
        p.extra["renal_detail"] = detail
    loops = np.random.default_rng([seed, 41])  # its own stream: at 0, earlier seeds unchanged
    if loops.random() < cfg.bowel_by_kidney:
        p.extra["bowel_by_kidney"] = loops
    # acquisition grid
    sx = u(*cfg.inplane_mm)
    sz = float(rng.choice(cfg.slice_mm, p=np.asarray(cfg.slice_weights) / sum(cfg.slice_weights)))
    k = 1 if sz <= 3.0 else 2  # fine sub-slices per slice
    scan = cfg.scan or cfg.task
    if scan == "any":  # either range, from its own stream (the others' seeds stay as they were)
        scan = ("liver", "kidney")[int(np.random.default_rng([seed, 17]).integers(2))]
    z_lo, z_hi = _z_range(scan, p, rng)
    n_slices = max(8, min(cfg.max_slices, round((z_hi - z_lo) / sz)))
    z_lo = (z_lo + z_hi) / 2 - n_slices * sz / 2
    fov = u(*cfg.fov_mm)
    cx, cy = u(-15, 15), u(-5, 25)
    if rng.random() < cfg.fov_cut:  # reconstruction field smaller than, or off, the body
        fov = min(fov, 2 * p.a * u(0.75, 1.0))
        cx += u(-1, 1) * 0.25 * fov
        cy += u(-1, 1) * 0.2 * fov
    sx = max(sx, fov / MAX_INPLANE)  # bounded cost: a 480 mm field at 1.67 mm
    n = round(fov / sx)
    xs = cx - fov / 2 + sx * (np.arange(n) + 0.5)
    ys = cy - fov / 2 + sx * (np.arange(n) + 0.5)
    fine_dz = sz / k
    zs = z_lo + fine_dz * (np.arange(n_slices * k) + 0.5)
    grid = Grid(xs, ys, zs, rng, cfg.deform_mm)
    anatomy = build(grid, p, rng)
    # the liver's background disease draws from its own stream: with both chances at 0 (the
    # default) every earlier seed still gives the same case
    disease = np.random.default_rng([seed, 11])
    fat_hu = disease.uniform(10, 45) if disease.random() < cfg.steatosis else 0.0
    ascites = bool(disease.random() < cfg.ascites)
    if ascites:
        add_ascites(grid, anatomy, disease)
    share = TUMOUR_FREE[cfg.task] if cfg.tumour_free is None else cfg.tumour_free
    tumour_free = bool(rng.random() < share)
    huge = np.random.default_rng([seed, 29])  # its own stream: at 0, earlier seeds unchanged
    big = cfg.task == "liver" and huge.random() < cfg.huge_lesions
    extra = (huge.uniform(40, 65),) if big else ()
    lesions = add_lesions(grid, anatomy, cfg.task, rng, tumour_free, extra)
    if cfg.other_organ_lesions and rng.random() < cfg.other_organ_lesions:  # 0: no draw
        other = "kidney" if cfg.task == "liver" else "liver"
        lesions += add_lesions(grid, anatomy, other, rng, tumour_free=False)
    weights = cfg.phases or PHASE_WEIGHTS[cfg.task]
    names = sorted(weights)
    phase = str(rng.choice(names, p=np.array([weights[n] for n in names]) / sum(weights.values())))
    # its own stream too: with hu_spread at 0 (the default) earlier seeds are unchanged
    spread = np.random.default_rng([seed, 13])
    spread = spread if spread.random() < cfg.hu_spread else None
    lag = np.random.default_rng([seed, 31])  # and its own: at 0, earlier seeds unchanged
    lagging = phase == "portal_venous" and lag.random() < cfg.medulla_lag
    lag_hu = lag.uniform(40, 100) if lagging else 0.0
    img = render(grid, anatomy, lesions, phase, rng, (sx, sx, fine_dz), fat_hu, spread, lag_hu)
    img = average_slices(img, k)
    organ = anatomy.liver if cfg.task == "liver" else anatomy.kidney
    tumour = anatomy.tissue == T[f"{cfg.task}_tumour"]
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[organ] = 1
    labels[tumour] = 2
    labels = labels[k // 2 :: k][: img.shape[0]]
    body = anatomy.body_rho[k // 2 :: k][: img.shape[0]]
    sd = u(*cfg.noise_hu) * min(1.6, max(0.8, (p.a / 155) ** 1.5)) * math.sqrt(2.5 / sz) ** 0.5
    noise = ct_noise(img.shape, (sx, sx, sz), 1.0, u(*cfg.noise_peak), rng)
    img += noise * np.where(body <= 1.02, np.float32(sd), np.float32(4.0))  # air is noisy too
    del noise
    if anatomy.metal:
        img += metal_streaks(img.shape, (xs, ys), anatomy.metal, sx, rng)[None] * (body <= 1.0)
    if rng.random() < cfg.circle_mask:
        r2 = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2
        img[:, r2 > (fov / 2) ** 2] = rng.choice([-1024.0, -2048.0, -3024.0])
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    meta = {
        "task": cfg.task,
        "seed": seed,
        "phase": phase,
        "slice_mm": sz,
        "inplane_mm": round(sx, 3),
        "fov_mm": round(fov, 1),
        "noise_hu": round(sd, 1),
        "tumour_free": tumour_free,
        "metal": bool(anatomy.metal),
        "liver_fat_hu": round(fat_hu, 1),
        "ascites": ascites,
        "hu_spread": spread is not None,
        "splenomegaly": "spleen" in p.extra,
        "medulla_lag_hu": round(lag_hu, 1),
        "renal_detail": "renal_detail" in p.extra,
        "bowel_by_kidney": "bowel_by_kidney" in p.extra,
        "organ_crop_mm": None,
        "lesions": [
            {k: v for k, v in rec.items() if k not in ("box", "q", "region")} for rec in lesions
        ],
        "patient": {k: v for k, v in asdict(p).items() if k != "extra"},
    }
    origin = (float(xs[0]), float(ys[0]), float(zs[k // 2]))
    tissue = anatomy.tissue[k // 2 :: k][: image.shape[0]]
    case = SynthCase(image, labels, (sx, sx, sz), origin, IDENTITY, meta, tissue)
    crop = np.random.default_rng([seed, 23])  # its own stream: at 0, earlier seeds unchanged
    if crop.random() < cfg.organ_crop:
        width = crop.uniform(*cfg.organ_crop_mm)
        case = roi_crop(case, width)
        case.meta["organ_crop_mm"] = round(width, 1)
    return case


def roi_crop(case: SynthCase, mm: float) -> SynthCase:
    """``case`` cropped in-plane to a ``mm`` square centred on its organ's largest part (the
    liver, or the larger kidney), geometry kept: what cropping a CT to the organ gives."""
    parts, n = ndimage.label(case.labels > 0)
    if n == 0:
        return case
    largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    _, ys, xs = np.nonzero(parts == largest)
    half = max(1, round(mm / case.spacing[0] / 2))
    y0, x0 = max(0, int(ys.mean()) - half), max(0, int(xs.mean()) - half)
    box = (slice(None), slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
    shift = np.reshape(case.direction, (3, 3)) @ (x0 * case.spacing[0], y0 * case.spacing[1], 0)
    return replace(
        case,
        image=case.image[box].copy(),
        labels=case.labels[box].copy(),
        tissue=None if case.tissue is None else case.tissue[box].copy(),
        origin=tuple(float(v) for v in np.add(case.origin, shift)),
        meta=dict(case.meta),
    )
