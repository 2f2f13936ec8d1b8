"""Synthetic contrast-enhanced abdominal CT phantoms with kidney / liver tumour labels (numpy only).

The anatomy is defined in patient LPS millimetres (x: to the patient's left, y: posterior,
z: superior; origin near the centre of the abdomen at kidney level) and sampled on the chosen
voxel grid, so the same patient on two grids has the same anatomy in physical space. Labels
follow KiTS (task "kidney": 1 kidney, 2 tumour) or LiTS (task "liver": 1 liver, 2 tumour).
Files are written in the public datasets' layouts (KiTS19, LiTS, MSD, nnU-Net) so the real
loaders are exercised as they are.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "bone": 800.0,
    "marrow": 250.0,
    "liver": 110.0,
    "spleen": 120.0,
    "cortex": 180.0,
    "medulla": 100.0,
    "aorta": 180.0,
    "ivc": 130.0,
    "bowel_wall": 45.0,
    "fluid": 10.0,
    "cyst": 8.0,
}


@dataclass(frozen=True)
class PhantomConfig:
    """Every knob of a phantom; defaults give a moderately difficult portal-venous CT."""

    task: str = "kidney"  # "kidney" (KiTS labels) | "liver" (LiTS labels)
    shape: tuple[int, int, int] = (64, 256, 256)  # (z, y, x) voxels
    spacing: tuple[float, float, float] | None = None  # (x, y, z) mm; None: random, realistic
    tumours: tuple[int, int] = (1, 3)  # min, max number of tumours
    tumour_radius_mm: tuple[float, float] = (6.0, 20.0)
    tumour_contrast_hu: tuple[float, float] = (-70.0, -25.0)  # difference to the organ
    hyper_fraction: float = 0.2  # share of tumours that enhance more than the organ instead
    necrosis: float = 0.4  # chance of a hypodense core in a tumour above 12 mm
    texture_hu: float = 12.0  # heterogeneity inside tumours
    cysts: tuple[int, int] = (0, 2)  # look-alike simple cysts in the organ (not tumour)
    cyst_label: int | None = None  # KiTS21/23 cyst label (3) or None: cysts stay organ
    noise_hu: float = 15.0
    blur_mm: float = 0.8  # partial-volume blur (Gaussian sigma)
    oblique_deg: float = 0.0  # rotation of the grid about z
    random_orientation: bool = False  # random axis flips of the direction matrix

    def __post_init__(self):
        if self.task not in ("kidney", "liver"):
            raise ValueError(f"PhantomConfig.task: expected 'kidney' or 'liver', got {self.task!r}")


@dataclass
class Phantom:
    """A phantom CT: int16 HU image and uint8 labels on the same grid, arrays (z, y, x)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    def to_sitk(self):
        """(image, labels) as SimpleITK images carrying the geometry."""
        import SimpleITK as sitk

        out = []
        for arr in (self.image, self.labels):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(self.spacing)
            img.SetOrigin(self.origin)
            img.SetDirection(self.direction)
            out.append(img)
        return tuple(out)


def _grid(cfg: PhantomConfig, rng: np.random.Generator):
    # in-plane: a 340-420 mm field of view (0.66-0.82 mm at 512 voxels; coarser for small grids)
    inplane = max(0.6, float(rng.uniform(340, 420)) / cfg.shape[2])
    spacing = cfg.spacing or (inplane, inplane, float(rng.choice([1.0, 1.25, 2.5, 3.0, 5.0])))
    d = np.eye(3)
    if cfg.oblique_deg:
        a = math.radians(cfg.oblique_deg)
        d = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    if cfg.random_orientation:
        d = d * rng.choice([-1.0, 1.0], size=3)
    size = np.array(cfg.shape[::-1], dtype=float)  # (x, y, z)
    centre = np.array([0.0, 10.0, 0.0])
    origin = centre - d @ ((size - 1) / 2 * np.array(spacing))
    return tuple(spacing), tuple(origin), tuple(d.ravel())


def _coords(shape, spacing, origin, direction):
    """Physical x, y, z (float32, each of ``shape``) of every voxel centre."""
    d = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape)
    out = []
    for row in range(3):
        c = (
            origin[row]
            + d[row, 0] * i[None, None, :]
            + d[row, 1] * j[None, :, None]
            + d[row, 2] * k[:, None, None]
        )
        out.append(np.broadcast_to(c, shape).astype(np.float32))
    return out


class _Space:
    """Physical coordinates of a grid, evaluated lazily on index boxes around each structure."""

    def __init__(self, shape, spacing, origin, direction):
        self.shape = shape
        self.origin = np.asarray(origin)
        self.affine = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)
        self.inverse = np.linalg.inv(self.affine)
        self.x, self.y, self.z = _coords(shape, spacing, origin, direction)

    def box(self, centre, radii) -> tuple[slice, slice, slice]:
        """Index slices (z, y, x) covering the axis-aligned physical box centre +- radii."""
        corners = np.array(
            [
                [centre[a] + sx * radii[a] for a, sx in enumerate(signs)]
                for signs in np.array(np.meshgrid(*[[-1, 1]] * 3)).T.reshape(-1, 3)
            ]
        )
        ijk = (corners - self.origin) @ self.inverse.T
        lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, None)
        hi = np.ceil(ijk.max(0)).astype(int) + 1
        return tuple(slice(lo[a], min(hi[a], self.shape[2 - a])) for a in (2, 1, 0))

    def ellipsoid(self, centre, radii, wobble=None):
        """(box, mask in box) of a (lobulated) ellipsoid; ``wobble`` = (amplitude, phase)."""
        pad = 1.35 if wobble is not None else 1.0
        sl = self.box(centre, [r * pad for r in radii])
        x, y, z = self.x[sl], self.y[sl], self.z[sl]
        q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
        q += ((z - centre[2]) / radii[2]) ** 2
        if wobble is not None:
            amp, ph = wobble
            ang = np.arctan2(y - centre[1], x - centre[0])
            q *= 1 + amp * np.sin(3 * ang + ph) * np.cos(2 * (z - centre[2]) / radii[2] + ph)
        return sl, q <= 1.0

    def inside(self, point, margin_mm: float) -> bool:
        """Whether ``point`` (x, y, z mm) lies in the field of view, ``margin_mm`` from its
        faces (the margin shrinks to 40% of the extent on an axis too short to hold it)."""
        ijk = (np.asarray(point) - self.origin) @ self.inverse.T
        size = np.array(self.shape[::-1], dtype=float)
        step = np.linalg.norm(self.affine, axis=0)  # mm per index along i, j, k
        margin = np.minimum(margin_mm / step, 0.4 * (size - 1))
        return bool(np.all((ijk >= margin) & (ijk <= size - 1 - margin)))

    def full(self, centre, radii, wobble=None) -> np.ndarray:
        """Whole-grid boolean mask of an ellipsoid."""
        mask = np.zeros(self.shape, dtype=bool)
        sl, m = self.ellipsoid(centre, radii, wobble)
        mask[sl] = m
        return mask


def _gaussian_blur(vol: np.ndarray, sigmas_vox) -> np.ndarray:
    """Separable Gaussian blur (numpy only; edges replicated)."""
    for axis, s in enumerate(sigmas_vox):
        if s < 0.3:
            continue
        r = math.ceil(3 * s)
        kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2).astype(np.float32)
        kernel /= kernel.sum()
        padded = np.pad(vol, [(r, r) if a == axis else (0, 0) for a in range(3)], mode="edge")
        out = np.zeros_like(vol)
        n = vol.shape[axis]
        for t, w in enumerate(kernel):
            out += w * np.take(padded, np.arange(t, t + n), axis=axis)
        vol = out
    return vol


def make_phantom(config: PhantomConfig | None = None, seed: int = 0) -> Phantom:
    """A reproducible phantom: the same (config, seed) gives bit-identical arrays."""
    cfg = config or PhantomConfig()
    rng = np.random.default_rng([seed, 0])  # anatomy: independent of the grid
    spacing, origin, direction = _grid(cfg, np.random.default_rng([seed, 1]))
    sp = _Space(cfg.shape, spacing, origin, direction)
    x, y, z = sp.x, sp.y, sp.z
    img = np.full(cfg.shape, HU["air"], dtype=np.float32)
    lab = np.zeros(cfg.shape, dtype=np.uint8)
    u = rng.uniform

    # body wall: skin/fat, muscle ring, intra-abdominal fat
    a, b = u(140, 175), u(105, 130)
    body = (x / a) ** 2 + ((y - 10) / b) ** 2 <= 1
    img[body] = HU["fat"]
    wall = (x / (a - u(12, 25))) ** 2 + ((y - 10) / (b - u(12, 22))) ** 2 <= 1
    img[wall] = HU["muscle"]
    cavity = (x / (a - 32)) ** 2 + ((y - 10) / (b - 30)) ** 2 <= 1
    img[cavity] = HU["fat"] + 20
    # spine, paraspinal muscles, ribs in the upper slices
    for side in (-1, 1):
        img[((x - side * 38) / 22) ** 2 + ((y - 95) / 18) ** 2 <= 1] = HU["muscle"]
    vb = (x / 20) ** 2 + ((y - 62) / 17) ** 2
    img[vb <= 1] = HU["bone"]
    img[vb <= 0.7] = HU["marrow"]
    img[(x / 8) ** 2 + ((y - 88) / 7) ** 2 <= 1] = HU["fluid"]
    rib_ring = (x / (a - 20)) ** 2 + ((y - 10) / (b - 18)) ** 2
    for zc in np.arange(rng.uniform(35, 45), 200, 22):
        img[(np.abs(rib_ring - 1) < 0.05) & (np.abs(z - zc) < 5) & (y > -40)] = HU["bone"]
    # vessels
    img[((x - 15) / 11) ** 2 + ((y - 35) / 11) ** 2 <= 1] = HU["aorta"]
    img[((x + 22) / 13) ** 2 + ((y - 32) / 10) ** 2 <= 1] = HU["ivc"]
    # bowel loops with wall, fluid and air (anterior)
    for _ in range(rng.integers(4, 8)):
        c = (u(-70, 80), u(-80, -20), u(-60, 40))
        r = (u(12, 22), u(10, 18), u(15, 35))
        loop = sp.full(c, r) & cavity
        img[loop] = HU["bowel_wall"]
        inner = sp.full(c, tuple(v * 0.75 for v in r)) & cavity
        img[inner] = HU["air"] if u() < 0.5 else HU["fluid"]
    # organs (liver on the patient's right = -x; spleen left); ellipsoids kept for lesion sites
    liver_e = ((-65 + u(-8, 8), 5.0, 45.0), (u(75, 90), u(70, 85), u(70, 85)))
    liver = sp.full(*liver_e, (0.15, u(0, 6))) & cavity & (x < 10)
    img[liver] = HU["liver"] + u(-10, 10)
    img[sp.full((85, 45, 55), (35, 28, 50)) & cavity] = HU["spleen"]
    kidneys = np.zeros(cfg.shape, dtype=bool)
    kidney_e = []
    for side in (-1, 1):
        c = (side * u(68, 80), u(40, 55), u(-15, 15) + (side < 0) * -12)
        r = (u(24, 30), u(22, 27), u(48, 58))
        kid = sp.full(c, r, (0.08, u(0, 6))) & cavity
        kid &= ~sp.full(
            (c[0] - side * r[0] * 0.8, c[1], c[2]), (r[0] * 0.4, r[1] * 0.35, r[2] * 0.3)
        )
        img[kid] = HU["cortex"] + u(-15, 15)
        img[kid & sp.full(c, tuple(v * 0.62 for v in r))] = HU["medulla"]
        kidneys |= kid
        kidney_e.append((c, r))
    organ, sites = (kidneys, kidney_e) if cfg.task == "kidney" else (liver, [liver_e])
    lab[organ] = 1
    organ_hu = HU["cortex"] if cfg.task == "kidney" else HU["liver"]

    in_fov = sp.inside  # ``sp`` is deleted before the image is blurred

    def site(fov_margin_mm: float | None = None) -> tuple[float, float, float]:
        """A random physical point well inside the organ; with ``fov_margin_mm``, also inside
        the field of view by that margin (a tumour-bearing case must show its tumours)."""
        for _ in range(10_000):
            c, r = sites[rng.integers(len(sites))]
            p = rng.uniform(-0.65, 0.65, 3)
            while (p**2).sum() > 0.65**2:
                p = rng.uniform(-0.65, 0.65, 3)
            point = tuple(float(ci + pi * ri) for ci, pi, ri in zip(c, p, r))
            if fov_margin_mm is None or in_fov(point, fov_margin_mm):
                return point
        raise ValueError(
            f"phantom: no tumour site of the {cfg.task} inside the field of view of shape "
            f"{cfg.shape}, spacing {spacing}; enlarge the shape or set tumours=(0, 0)"
        )

    # tumour centres at least a largest radius inside the field of view, or a quarter of its
    # shortest side where the field is small (a thin slab still shows its tumours)
    extent = min(n * float(sp_) for n, sp_ in zip(cfg.shape[::-1], spacing))
    margin = min(cfg.tumour_radius_mm[1], extent / 4)
    tumours = []
    for _ in range(int(rng.integers(cfg.tumours[0], cfg.tumours[1] + 1))):
        c, r = site(margin), u(*cfg.tumour_radius_mm)
        blob = sp.full(c, (r * u(0.8, 1.2), r * u(0.8, 1.2), r * u(0.8, 1.2)), (0.25, u(0, 6)))
        for _ in range(rng.integers(0, 3)):  # lobules
            blob |= sp.full(tuple(np.add(c, rng.normal(0, r * 0.5, 3))), (r * 0.6,) * 3)
        if cfg.task == "liver":
            blob &= liver
        delta = u(*cfg.tumour_contrast_hu)
        if u() < cfg.hyper_fraction:
            delta = -delta * 0.8
        img[blob] = organ_hu + delta
        img[blob] += rng.normal(0, cfg.texture_hu, int(blob.sum())).astype(np.float32)
        if r > 12 and u() < cfg.necrosis:
            img[blob & sp.full(c, (r * 0.45,) * 3)] = HU["fluid"] + u(5, 25)
        lab[blob] = 2
        tumours.append({"centre_mm": c, "radius_mm": r, "contrast_hu": delta})
    n_cysts = int(rng.integers(cfg.cysts[0], cfg.cysts[1] + 1))
    for _ in range(n_cysts):
        cyst = sp.full(site(), (u(4, 10),) * 3) & organ & (lab != 2)
        img[cyst] = HU["cyst"]
        if cfg.cyst_label is not None:
            lab[cyst] = cfg.cyst_label
    del x, y, z, sp

    sig = [cfg.blur_mm / s for s in spacing[::-1]]  # array axes (z, y, x)
    img = _gaussian_blur(img, sig)
    img += rng.normal(0, cfg.noise_hu, cfg.shape).astype(np.float32)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    meta = {"task": cfg.task, "seed": seed, "tumours": tumours, "cysts": n_cysts}
    return Phantom(image, lab, spacing, origin, direction, meta)


def write_dataset(
    out_dir: str | Path, layout: str, config: PhantomConfig, cases: int, seed: int = 0
) -> list[Path]:
    """Write ``cases`` phantoms in a public dataset layout; return the case image paths.
    Case i uses seed (seed, i): cases do not depend on how many are written."""

    def make(i: int):
        return make_phantom(config, seed=case_seed(seed, i)).to_sitk()

    return write_layout(out_dir, layout, config.task, cases, make)


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset written with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def layout_paths(out: Path, layout: str, organ: str, i: int) -> tuple[Path, Path]:
    """(image, label) paths of case ``i`` in ``layout``: ``kits19`` (case_XXXXX/imaging.nii.gz,
    segmentation.nii.gz), ``lits`` (volume-N.nii, segmentation-N.nii), ``msd`` (Task03_Liver-style
    imagesTr/labelsTr + dataset.json), ``nnunet`` (imagesTr/case_XXXX_0000.nii.gz, labelsTr,
    dataset.json v2)."""
    if layout == "kits19":
        img_p = out / f"case_{i:05d}" / "imaging.nii.gz"
        return img_p, img_p.with_name("segmentation.nii.gz")
    if layout == "lits":
        return out / f"volume-{i}.nii", out / f"segmentation-{i}.nii"
    if layout == "msd":
        name = f"{organ}_{i}.nii.gz"
        return out / "imagesTr" / name, out / "labelsTr" / name
    if layout == "nnunet":
        return (
            out / "imagesTr" / f"case_{i:04d}_0000.nii.gz",
            out / "labelsTr" / f"case_{i:04d}.nii.gz",
        )
    raise ValueError(f"unknown layout {layout!r}: use kits19, lits, msd or nnunet")


def write_layout(
    out_dir: str | Path, layout: str, organ: str, cases: int, make, jobs: int = 1
) -> list[Path]:
    """Write ``cases`` (image, labels) SimpleITK pairs from ``make(i)`` in ``layout`` (see
    :func:`layout_paths`), with the layout's ``dataset.json`` where it has one; ``jobs`` > 1
    makes cases in that many processes. Returns the image paths."""
    import SimpleITK as sitk

    out = Path(out_dir)
    layout_paths(out, layout, organ, 0)  # an unknown layout fails before any work

    def write(i: int, pair) -> Path:
        img_p, lab_p = layout_paths(out, layout, organ, i)
        for path, image in zip((img_p, lab_p), pair):
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(path), useCompression=path.suffix == ".gz")
        return img_p

    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            written = [write(i, pair) for i, pair in enumerate(pool.map(make, range(cases)))]
    else:
        written = [write(i, make(i)) for i in range(cases)]
    pairs = [layout_paths(out, layout, organ, i) for i in range(cases)]
    items = [
        {"image": f"./{a.relative_to(out)}", "label": f"./{b.relative_to(out)}"} for a, b in pairs
    ]
    tumour = "cancer" if organ == "liver" else "tumour"
    if layout == "msd":
        (out / "imagesTs").mkdir(exist_ok=True)
        meta = {
            "name": f"Phantom{organ.capitalize()}",
            "description": "HLFDSegment phantom",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": organ, "2": tumour},
            "numTraining": cases,
            "numTest": 0,
            "training": items,
            "test": [],
        }
        (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    elif layout == "nnunet":
        meta = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, organ: 1, tumour: 2},
            "numTraining": cases,
            "file_ending": ".nii.gz",
        }
        (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic abdominal CT dataset.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="kidney", choices=["kidney", "liver"])
    ap.add_argument("--layout", default="kits19", choices=["kits19", "lits", "msd", "nnunet"])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    args = ap.parse_args(argv)
    cfg = PhantomConfig(task=args.task, shape=tuple(args.shape))
    for path in write_dataset(args.out, args.layout, cfg, args.cases, args.seed):
        print(path)


if __name__ == "__main__":
    main()
