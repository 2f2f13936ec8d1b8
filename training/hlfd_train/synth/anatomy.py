"""The synthetic patient: body habitus, organs, vessels, bones and bowel as a tissue map.

Sizes and positions follow published anatomy (``shared/SYNTH-REFERENCES.md`` section 3):
kidney length 108 +- 12 mm (Glodny 2009), at T12-L3 with the right one lower; liver
craniocaudal 140 +- 17 mm (Kratzer) and dome at T9-T10; spleen 10 x 9 x 4.6 cm (Caglar 2014);
aorta 19 mm suprarenal, 14-19 mm infrarenal (Jasper 2014); IVC 16 x 26 mm (Cureus 2022);
portal vein 9.3 mm, splenic vein 7.4 mm (Feng 2017); lumbar vertebral body 40-50 mm wide, 30-35
mm deep, 20-30 mm high, discs 10-14 mm; subcutaneous fat 12-20 % of the AP depth. The
arrangement (z = 0 near the L1/L2 disc) is in :class:`Patient`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from .geometry import Grid, random_walk, rotation, smooth_path
from .tissues import T


@dataclass
class Patient:
    """Random body habitus and landmark positions (mm), drawn before any voxel exists."""

    a: float  # body half-width
    b_ant: float  # half-depth anterior of the centre
    b_post: float
    power: float  # superellipse exponent (2: ellipse)
    fat: float  # subcutaneous fat thickness
    wall: float  # abdominal wall muscle thickness
    dome: float  # z of the right diaphragm dome
    dome_left: float
    liver_span: float  # craniocaudal liver extent
    kidney_z: tuple[float, float]  # centre z of (right, left) kidney
    kidney_len: tuple[float, float]
    y_vb: float  # vertebral body centre y
    vb_r: tuple[float, float]  # vertebral body half-width, half-depth
    arms: bool
    oral_contrast: bool
    gallbladder: bool
    extra: dict = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Patient:
        u = rng.uniform
        a = u(125, 185)  # lateral 25-37 cm, AP 18-33 cm (SYNTH-REFERENCES 3, body cross-section)
        b_post = a * u(0.6, 0.78)
        b_ant = b_post * u(0.85, 1.25)
        fat = u(6, 35) * (a / 155) ** 1.2  # 12-20 % of the AP depth on average
        dome = u(140, 185)
        vb_r = (u(20, 25), u(15, 18))
        y_vb = b_post - fat - u(45, 65) - vb_r[1]
        kr = u(-20, 5)
        return cls(
            a=a,
            b_ant=b_ant,
            b_post=b_post,
            power=u(2.0, 2.7),
            fat=fat,
            wall=u(6, 14),
            dome=dome,
            dome_left=dome - u(5, 25),
            liver_span=u(125, 195),
            kidney_z=(kr, kr + u(5, 30)),
            kidney_len=(u(96, 122), u(96, 124)),
            y_vb=y_vb,
            vb_r=vb_r,
            arms=bool(rng.random() < 0.12),
            oral_contrast=bool(rng.random() < 0.3),
            gallbladder=bool(rng.random() < 0.85),
        )


@dataclass
class Anatomy:
    """The tissue map (uint8 ids of :data:`tissues.T`) and the organ hulls the labels need."""

    tissue: np.ndarray
    liver: np.ndarray  # bool: liver label region (parenchyma + intrahepatic vessels + cysts)
    kidney: np.ndarray  # bool: kidneys (parenchyma, sinus, pelvis, cysts)
    body_rho: np.ndarray  # normalised body radius (1 at the skin)
    metal: list[tuple[float, float, float]]
    abdomen: np.ndarray  # bool: the peritoneal cavity below the diaphragm


def _body_rho(grid: Grid, p: Patient) -> np.ndarray:
    """Superellipse radius (1 at the skin) of every voxel, tapering a little with z."""
    power = float(p.power)
    taper = 1.0 + 0.03 * np.sin(grid.Z[:, :1, :1] / 90.0)  # z only: deformation there is small
    x = np.abs(grid.X / (float(p.a) * taper))
    y = np.abs(grid.Y / (np.where(grid.Y < 0, float(p.b_ant), float(p.b_post)) * taper))
    np.power(x, power, out=x)
    np.power(y, power, out=y)
    x += y
    return np.power(x, 1.0 / power, out=x)


def build(grid: Grid, p: Patient, rng: np.random.Generator) -> Anatomy:
    """Paint the tissue map back to front: later structures win where they overlap."""
    u = rng.uniform
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    X, Y, Z = grid.X, grid.Y, grid.Z
    rho = _body_rho(grid, p)
    radius = np.sqrt(X**2 + Y**2)
    depth = radius * (1.0 / np.maximum(rho, 1e-3) - 1.0)  # ~mm inside the skin
    body = rho <= 1.0
    tissue[body] = T["fat"]
    tissue[body & (depth < 2.0)] = T["skin"]
    wall_in, wall_out = p.fat, p.fat + p.wall
    tissue[body & (depth >= wall_in) & (depth < wall_out)] = T["muscle"]
    cavity = body & (depth >= wall_out)
    tissue[cavity] = T["visceral_fat"]
    # diaphragm: two domes; lungs above, abdomen below
    rc = u(120, 190)
    xr, xl = -0.4 * p.a, 0.4 * p.a
    zd = np.maximum(
        p.dome - ((X - xr) ** 2 + (Y + 5) ** 2) / (2 * rc),
        p.dome_left - ((X - xl) ** 2 + (Y + 5) ** 2) / (2 * rc),
    )
    zd = np.maximum(zd, p.dome - 125.0)
    thorax = cavity & (zd < Z)
    abdomen = cavity & (zd - 4 >= Z)
    tissue[cavity & (zd - 4 < Z) & (zd >= Z)] = T["muscle"]  # diaphragm
    y_vb, vd = p.y_vb, p.vb_r[1]
    mediastinum = thorax & (np.abs(X - 10) < 35) & (y_vb + vd > Y)
    tissue[thorax & ~mediastinum] = T["lung"]
    lung_vessels = thorax & ~mediastinum & (grid.fine_noise > 1.9)
    tissue[lung_vessels] = T["myocardium"]  # soft-tissue vessels in lung
    _heart(grid, tissue, p, zd, rng)
    _spine_and_muscles(grid, tissue, p, body, depth, rng)
    _ribs(grid, tissue, p, body, depth, radius, rng)
    vessels = _great_vessels(grid, tissue, p, rng)
    liver = _liver(grid, tissue, p, abdomen, zd, vessels, rng)
    _spleen_stomach_pancreas(grid, tissue, p, abdomen, zd, vessels, rng)
    kidney, sinus_vessels = _kidneys(grid, tissue, p, abdomen, vessels, rng)
    _bowel(grid, tissue, p, abdomen, liver | kidney, rng)
    if "bowel_by_kidney" in p.extra:  # a Generator of its own
        _loops_by_kidneys(grid, tissue, abdomen, kidney, p.extra["bowel_by_kidney"])
    _pelvis(grid, tissue, p, abdomen, rng)
    _mesenteric_vessels(grid, tissue, p, abdomen, rng)
    if p.arms:
        _arms(grid, tissue, p, rng)
    _table(grid, tissue, p, rng)
    metal = []
    if rng.random() < p.extra.get("metal_prob", 0.0):
        metal = _metal(grid, tissue, p, rng)
    # the organs' final masks: what is still theirs after everything was painted
    liver &= np.isin(tissue, [T["liver"], T["portal_vein"], T["hepatic_vein"], T["cyst"]])
    kidney_tissue = np.isin(
        tissue,
        [
            T["kidney_cortex"],
            T["kidney_medulla"],
            T["renal_pelvis"],
            T["renal_sinus_fat"],
            T["cyst"],
        ],
    )
    if sinus_vessels is not None:  # renal_detail: the sinus vessels stay kidney
        kidney_tissue |= sinus_vessels & np.isin(tissue, [T["aorta"], T["ivc"]])
    kidney &= kidney_tissue
    return Anatomy(tissue, liver, kidney, rho.astype(np.float32), metal, abdomen)


def add_ascites(grid: Grid, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Free fluid (cirrhosis, peritoneal spread: common in liver-tumour CTs): a rim of water
    around the liver and spleen, patchy and up to a few cm thick, in the abdominal fat only, so
    no organ loses voxels or labels. Water's HU, the hard negative of a hypodense lesion at the
    liver's edge."""
    t = anatomy.tissue
    organs = anatomy.liver | (t == T["spleen"])
    dx = float(grid.xs[1] - grid.xs[0])
    dz = float(grid.zs[1] - grid.zs[0]) if len(grid.zs) > 1 else dx
    s = rng.uniform(4.0, 14.0)  # mm: a thin rim to moderate ascites
    near = gaussian_filter(organs.astype(np.float32), (s / dz, s / dx, s / dx))
    level = rng.uniform(0.04, 0.2) * np.clip(1.0 + 0.5 * grid.coarse_noise, 0.2, 2.0)
    t[(near > level) & anatomy.abdomen & (t == T["visceral_fat"])] = T["ascites"]


def _paint(tissue, sl, mask, name, where=None):
    if sl is None:
        return
    if where is not None:
        mask = mask & where[sl]
    tissue[sl][mask] = T[name]


def _heart(grid, tissue, p, zd, rng):
    u = rng.uniform
    c = (u(10, 40), -0.35 * p.b_ant, p.dome_left + u(45, 70))
    r = (u(55, 70), u(45, 55), u(55, 65))
    e = grid.ellipsoid(c, r, rotation(rz=u(-30, -10)))
    if e is None:
        return
    sl, q = e
    above = grid.Z[sl] > zd[sl] + 2
    tissue[sl][(q <= 1.25) & above & (tissue[sl] == T["lung"])] = T["visceral_fat"]
    tissue[sl][(q <= 1) & above] = T["myocardium"]
    tissue[sl][(q <= 0.6) & above] = T["heart_blood"]


def _spine_and_muscles(grid, tissue, p, body, depth, rng):
    u = rng.uniform
    vw, vd = p.vb_r
    reach = vw + 95  # the quadratus lumborum is the most lateral structure painted here
    sl = grid.box((-reach, p.y_vb - 45, -1e9), (reach, 1.1 * p.b_post, 1e9))
    if sl is None:
        sl = (slice(0, 0),) * 3
    X, Y, Z = grid.X[sl], grid.Y[sl], grid.Z[sl]
    tissue, body, depth = tissue[sl], body[sl], depth[sl]  # views: painting reaches the map
    level_h, disc_h = u(34, 40), u(8, 12)
    z0 = u(0, level_h)
    yv = p.y_vb + 6.0 * np.sin(Z / 150.0)  # lordosis
    in_level = np.mod(Z - z0, level_h)
    disc = in_level < disc_h
    vb_q = (X / vw) ** 2 + ((Y - yv) / vd) ** 2
    canal_y = yv + vd + u(9, 12)
    canal_r = u(7, 10)
    canal_q = (X**2 + (Y - canal_y) ** 2) / canal_r**2
    # paraspinal (erector) and, from L1 down, psoas and quadratus lumborum
    for s in (-1, 1):
        q = ((X - s * u(30, 40)) / u(24, 32)) ** 2 + ((Y - canal_y - u(10, 20)) / u(20, 28)) ** 2
        tissue[body & (q <= 1) & (depth > p.fat * 0.6)] = T["muscle"]
        grow = np.clip((30.0 - Z) / 110.0, 0, 1)
        pr = 4 + 20 * grow
        q = ((X - s * (vw + pr * 0.9)) / pr) ** 2 + ((Y - yv + 2) / (pr * 0.9)) ** 2
        tissue[body & (q <= 1) & (Z < 35) & (depth > p.fat)] = T["muscle"]
        q = ((X - s * (vw + 45)) / 16) ** 2 + ((Y - yv - 22) / 10) ** 2
        tissue[body & (q <= 1) & (Z < 40) & (Z > -110) & (depth > p.fat)] = T["muscle"]
    bone = body & (vb_q <= 1)
    tissue[bone] = T["cortical_bone"]
    tissue[bone & (vb_q <= 0.78)] = T["cancellous_bone"]
    tissue[bone & disc] = T["disc"]
    arch = body & (canal_q <= ((canal_r + u(5, 7)) / canal_r) ** 2) & (yv + vd * 0.5 < Y) & ~disc
    tissue[arch] = T["cortical_bone"]
    spinous = (
        body
        & (np.abs(X) < 4)
        & (canal_y < Y)
        & (canal_y + u(30, 45) > Y)
        & (in_level > disc_h + 10)
    )
    tissue[spinous] = T["cortical_bone"]
    transverse = (
        body
        & (np.abs(X) > vw - 5)
        & (np.abs(X) < vw + u(25, 35))
        & (np.abs(Y - canal_y + 4) < 5)
        & (in_level > disc_h + 6)
        & (in_level < disc_h + 16)
    )
    tissue[transverse] = T["cortical_bone"]
    tissue[body & (canal_q <= 1)] = T["csf"]


def _ribs(grid, tissue, p, body, depth, radius, rng):
    u = rng.uniform
    X, Y, Z = grid.X, grid.Y, grid.Z
    anterior = np.clip(-Y / np.maximum(radius, 1.0), -1, 1)  # 1 at the front, -1 at the back
    pitch, rib_h = u(30, 40), u(9, 13)
    phase = (Z + u(0, pitch) + u(70, 110) * (anterior + 1)) / pitch  # ribs descend to the front
    near = np.abs(phase - np.round(phase)) * pitch
    ring_d = p.fat + p.wall * 0.4
    in_ring = np.abs(depth - ring_d) < u(4.5, 6.5)
    lowest = p.dome - 150 + 95 * np.clip(anterior, 0, 1)
    ribcage = body & in_ring & (lowest < Z) & ~((np.abs(X) < 30) & (anterior > 0.7))
    ribs = ribcage & (near < rib_h / 2)
    cartilage = anterior > 0.35
    tissue[ribs & ~cartilage] = T["cortical_bone"]
    tissue[ribs & ~cartilage & (near < rib_h / 2 - 2.2)] = T["cancellous_bone"]
    tissue[ribs & cartilage] = T["disc"]
    sternum = body & (np.abs(X) < u(12, 18)) & (anterior > 0.9) & in_ring & (p.dome - u(25, 50) < Z)
    tissue[sternum] = T["cancellous_bone"]


def _great_vessels(grid, tissue, p, rng) -> dict:
    """Aorta (with iliac bifurcation, celiac and SMA), IVC, portal and splenic veins."""
    u = rng.uniform
    vd = p.vb_r[1]
    top, bottom = float(grid.zs.max()) + 30, float(grid.zs.min()) - 30
    ax, ay = u(8, 18), p.y_vb - vd - u(9, 14)
    ar = u(8.5, 12)
    bif = u(-130, -85)
    aorta = smooth_path((ax, ay + 5, top), (ax - 4, ay, bif), rng, 3, 5)
    vessels = {"aorta": (ax, ay, ar), "bif": bif}
    _paint(tissue, *_inside(grid.tube(aorta, (ar, ar * 0.85))), "aorta")
    for s in (-1, 1):  # iliac arteries
        _paint(
            tissue,
            *_inside(grid.tube([(ax - 4, ay, bif), (s * 45, ay + 10, bif - 90)], 6.0)),
            "aorta",
        )
    for zc, length in ((u(35, 50), u(20, 30)), (u(20, 32), u(35, 60))):  # celiac, SMA
        path = [
            (ax, ay - ar + 2, zc),
            (ax - 3, ay - ar - 15, zc - 8),
            (ax - 6, ay - ar - length, zc - 40),
        ]
        _paint(tissue, *_inside(grid.tube(path, 3.5)), "aorta")
    ix, iy = -u(20, 28), p.y_vb - vd - u(4, 9)
    ivc_top = (ix + 5, iy - 25, p.dome + 5)
    ivc = smooth_path((ix + 2, iy + 2, bottom), (ix, iy, p.dome - 80), rng, 3, 4)
    ivc = np.vstack([ivc, ivc_top])
    vessels["ivc"] = (ix, iy)
    vessels["ivc_path"] = ivc
    _paint(tissue, *_inside(grid.tube(ivc, u(10, 13))), "ivc")
    for s in (-1, 1):  # iliac veins
        _paint(
            tissue,
            *_inside(grid.tube([(ix + 2, iy + 2, bif - 10), (s * 40, iy + 18, bif - 100)], 6.5)),
            "ivc",
        )
    conf = (u(-5, 10), ay - ar - u(15, 22), u(15, 30))  # portal confluence behind the pancreas neck
    vessels["confluence"] = conf
    hilum = (-0.38 * p.a + u(-8, 8), p.y_vb - vd - u(25, 40), p.dome - u(70, 95))
    vessels["hilum"] = hilum
    _paint(tissue, *_inside(grid.tube(smooth_path(conf, hilum, rng, 4, 4), u(6, 8))), "portal_vein")
    spl_hilum = (0.55 * p.a, p.y_vb + u(-10, 10), p.dome - u(70, 90))
    vessels["splenic_hilum"] = spl_hilum
    _paint(
        tissue,
        *_inside(grid.tube(smooth_path(conf, spl_hilum, rng, 8, 5), u(3.5, 5))),
        "portal_vein",
    )
    return vessels


def _inside(tube):
    """(box, mask) of a tube result (distance/radius <= 1), or (None, None)."""
    if tube is None:
        return None, None
    sl, d = tube
    return sl, d <= 1.0


def _liver(grid, tissue, p, abdomen, zd, vessels, rng) -> np.ndarray:
    u = rng.uniform
    liver = np.zeros(grid.shape, dtype=bool)
    zc = p.dome - p.liver_span * 0.45
    right = ((-0.4 * p.a, u(-10, 5), zc), (0.45 * p.a, 0.8 * p.b_post, p.liver_span * 0.5))
    left = (
        (u(0, 30), -0.45 * p.b_ant, p.dome - u(35, 55)),
        (u(55, 85), u(28, 42), u(35, 55)),
    )
    lob = u(0.05, 0.15)
    for (c, r), rot in (
        (right, rotation(rx=u(-10, 10), rz=u(-15, 15))),
        (left, rotation(rz=u(-25, 5))),
    ):
        e = grid.ellipsoid(c, r, rot, lobulation=lob)
        if e is None:
            continue
        sl, q = e
        liver[sl] |= q <= 1
    liver &= abdomen & (zd - 5 >= grid.Z)
    liver &= ~((0.2 * p.a < grid.X) & (p.y_vb - 20 < grid.Y))  # left upper quadrant stays spleen's
    tissue[liver] = T["liver"]
    # intrahepatic portal and hepatic veins: branching trees from the hilum and the IVC
    pts = np.argwhere(liver[::4, ::4, ::4])
    if len(pts):
        hil = np.array(vessels["hilum"])
        for _ in range(int(u(4, 7))):
            end = _point(grid, pts, rng)
            path = smooth_path(hil, end, rng, 6, 4)
            _paint(tissue, *_inside(grid.tube(path, (u(5, 7.5), 2.2))), "portal_vein", liver)
            for _ in range(int(u(2, 4))):
                mid = path[rng.integers(1, len(path) - 1)]
                twig = smooth_path(mid, _point(grid, pts, rng), rng, 4, 3)
                _paint(tissue, *_inside(grid.tube(twig, (u(2.5, 4), 1.5))), "portal_vein", liver)
        ivc_top = np.array(vessels["ivc_path"][-1])
        for _ in range(3):  # right, middle and left hepatic veins with side branches
            end = _point(grid, pts, rng)
            path = smooth_path(ivc_top, end, rng, 5, 4)
            _paint(tissue, *_inside(grid.tube(path, (u(5, 7.5), 2.2))), "hepatic_vein", liver)
            mid = path[rng.integers(1, len(path) - 1)]
            twig = smooth_path(mid, _point(grid, pts, rng), rng, 4, 3)
            _paint(tissue, *_inside(grid.tube(twig, (u(2.5, 4), 1.5))), "hepatic_vein", liver)
    if p.gallbladder:
        c = (
            -0.25 * p.a + u(-10, 10),
            -0.35 * p.b_ant + u(-5, 10),
            p.dome - p.liver_span * u(0.65, 0.85),
        )
        e = grid.ellipsoid(
            c, (u(12, 20), u(12, 20), u(25, 45)), rotation(rx=u(-30, 30), ry=u(-20, 20))
        )
        if e is not None:
            sl, q = e
            gb = (q <= 1) & abdomen[sl]
            tissue[sl][gb] = T["gallbladder"]
            liver[sl] &= ~gb
    return liver


def _point(grid: Grid, pts: np.ndarray, rng) -> np.ndarray:
    """A random physical point of a (subsampled) mask's voxel list."""
    k, j, i = pts[rng.integers(len(pts))] * 4
    k, j, i = min(k, grid.shape[0] - 1), min(j, grid.shape[1] - 1), min(i, grid.shape[2] - 1)
    return np.array([grid.X[k, j, i], grid.Y[k, j, i], grid.Z[k, j, i]], dtype=float)


def _spleen_stomach_pancreas(grid, tissue, p, abdomen, zd, vessels, rng):
    u = rng.uniform
    below = abdomen & (zd - 5 >= grid.Z)
    free = np.isin(tissue, [T["visceral_fat"]])
    # splenomegaly (Patient.extra, see SynthConfig): larger, further back and toward the spine
    scale, medial, posterior = p.extra.get("spleen", (1.0, 0.0, 0.0))
    c = ((0.6 - medial) * p.a, (0.45 + posterior) * p.b_post, p.dome_left - u(55, 80))
    radii = tuple(scale * r for r in (u(22, 32), u(48, 62), u(45, 60)))
    e = grid.ellipsoid(c, radii, rotation(rz=u(-50, -25)), lobulation=0.08)
    if e is not None:
        sl, q = e
        tissue[sl][(q <= 1) & below[sl] & free[sl]] = T["spleen"]
    # stomach: wall, air (anterior: the patient lies supine) over fluid or oral contrast
    c = (0.28 * p.a, -0.3 * p.b_ant, p.dome_left - u(45, 75))
    r = (u(35, 55), u(25, 40), u(40, 60))
    e = grid.ellipsoid(c, r, rotation(rz=u(-40, -10), rx=u(-15, 15)), lobulation=0.1)
    if e is not None:
        sl, q = e
        inside = (q <= 1) & below[sl] & np.isin(tissue[sl], [T["visceral_fat"], T["liver"]])
        tissue[sl][inside] = T["bowel_wall"]
        lumen = inside & (q <= u(0.55, 0.8))
        level = c[1] + u(-0.8, 0.5) * r[1]
        content = "oral_contrast" if p.oral_contrast else "bowel_fluid"
        tissue[sl][lumen] = T[content]
        tissue[sl][lumen & (grid.Y[sl] < level)] = T["air"]
    # pancreas: head by the duodenum, neck over the confluence, tail to the splenic hilum
    conf = np.array(vessels["confluence"])
    head = (-u(30, 45), conf[1] - 5, conf[2] - u(10, 25))
    tail = np.add(vessels["splenic_hilum"], (-15, -10, u(0, 15)))
    path = np.vstack([head, np.add(conf, (0, -u(12, 18), 5)), tail])
    t = grid.tube(
        smooth_path(path[0], path[1], rng, 3, 3)[:-1].tolist()
        + smooth_path(path[1], path[2], rng, 6, 4).tolist(),
        (u(13, 18), u(8, 11)),
    )
    if t is not None:
        sl, d = t
        d = d * (1 + 0.15 * grid.fine_noise[sl])
        tissue[sl][(d <= 1) & below[sl] & (tissue[sl] == T["visceral_fat"])] = T["pancreas"]
    for s in (-1, 1):  # adrenals: thin limbs above the kidneys
        base = (
            s * (p.vb_r[0] + u(18, 28)),
            p.y_vb - u(5, 15),
            p.kidney_z[(s + 1) // 2] + u(50, 65),
        )
        for dx in (-8, 8):
            _paint(
                tissue,
                *_inside(grid.tube([base, (base[0] + s * dx, base[1] - 18, base[2] - 20)], 2.5)),
                "adrenal",
                below,
            )


def _kidneys(grid, tissue, p, abdomen, vessels, rng) -> tuple[np.ndarray, np.ndarray | None]:
    """Both kidneys' hulls, and the vessels painted inside them (None without ``renal_detail``)."""
    u = rng.uniform
    kidney = np.zeros(grid.shape, dtype=bool)
    detail = p.extra.get("renal_detail")  # a Generator of its own, or None
    sinus_vessels = None if detail is None else np.zeros(grid.shape, dtype=bool)
    vw = p.vb_r[0]
    for side, s in ((0, -1), (1, 1)):
        half_len = p.kidney_len[side] / 2
        r = (u(27, 34), u(21, 26), half_len * 1.05)
        c = (s * (vw + u(42, 58)), p.y_vb + u(0, 15), p.kidney_z[side])
        rot = rotation(rx=u(-25, -10), ry=s * u(5, 20), rz=s * u(25, 45))
        e = grid.ellipsoid(c, r, rot, lobulation=0.05, pad=1.1)
        if e is None:
            continue
        sl, q = e
        lu, lv, lw = grid.local(sl, c, rot)
        notch = (
            ((lu + s * r[0] * 0.9) / (r[0] * 0.5)) ** 2
            + (lv / (r[1] * 0.45)) ** 2
            + (lw / (r[2] * 0.35)) ** 2
        )
        hull = (q <= 1) & (notch > 1) & abdomen[sl]
        sinus = (
            ((lu + s * r[0] * 0.35) / (r[0] * 0.45)) ** 2
            + (lv / (r[1] * 0.5)) ** 2
            + (lw / (r[2] * 0.62)) ** 2
        )
        pelvis = (
            ((lu + s * r[0] * 0.45) / (r[0] * 0.28)) ** 2
            + (lv / (r[1] * 0.3)) ** 2
            + ((lw + r[2] * 0.1) / (r[2] * 0.35)) ** 2
        )
        angle = np.arctan2(lv, lw)
        pyramids = (q > 0.3) & (q < 0.72) & (np.cos(7 * angle + u(0, 6)) > -0.2)
        sub = tissue[sl]
        sub[hull] = T["kidney_cortex"]
        sub[hull & pyramids & (sinus > 1)] = T["kidney_medulla"]
        sub[hull & (sinus <= 1)] = T["renal_sinus_fat"]
        sub[hull & (pelvis <= 1)] = T["renal_pelvis"]
        kidney[sl] |= hull
        if detail is not None:
            frame = (np.asarray(c, dtype=float), rot, r, s)
            _renal_detail(grid, tissue, sl, hull, (lu, lv, lw), sinus, frame, sinus_vessels, detail)
        # renal vein to the IVC, artery from the aorta, ureter down from the pelvis
        hil = np.array(c) + rot @ np.array([-s * r[0] * 0.8, 0, 0])
        ivc = vessels["ivc"]
        ax, ay, _ = vessels["aorta"]
        _paint(
            tissue, *_inside(grid.tube([hil, (ivc[0], ivc[1], hil[2] + 5)], 5.0)), "ivc", abdomen
        )
        _paint(
            tissue,
            *_inside(grid.tube([np.add(hil, (0, 4, 5)), (ax, ay, hil[2] + 12)], 3.0)),
            "aorta",
            abdomen,
        )
        ureter = [
            np.add(hil, (0, 0, -10)),
            (s * (vw + 15), p.y_vb - 5, hil[2] - 80),
            (s * (vw + 20), p.y_vb - 10, hil[2] - 250),
        ]
        _paint(tissue, *_inside(grid.tube(ureter, 2.5)), "renal_pelvis", abdomen & ~kidney)
    return kidney, sinus_vessels


def _renal_detail(grid, tissue, sl, hull, local, sinus, frame, sinus_vessels, rng) -> None:
    """The inside of a real kidney, for one kidney's box: 8-13 cone-shaped medullary pyramids
    (a kidney has 8-18: Gray's Anatomy) whose papillae point into the sinus, each capped by a
    minor calyx joined to the pelvis, and segmental arteries and veins branching through the
    sinus fat. In a corticomedullary CT the pyramids are the darker cones around the sinus, in a
    nephrographic one they fade into the cortex; the vessels are bright in every contrast phase.
    Draws from ``rng`` only (its own stream): the cases without detail stay as they were."""
    u = rng.uniform
    c, rot, r, s = frame
    lu, lv, lw = local
    k_sin = np.array([0.45, 0.5, 0.62])  # the sinus ellipsoid of _kidneys, in kidney radii
    cs_u = -s * r[0] * 0.35
    # position in the parenchyma: 0 on the sinus surface, 1 on the kidney's surface
    ell = np.sqrt((lu / r[0]) ** 2 + (lv / r[1]) ** 2 + (lw / r[2]) ** 2)
    rs = np.sqrt(np.maximum(sinus, 0.0))
    depth = (rs - 1.0) / np.maximum((rs - 1.0) + (1.0 - ell), 1e-3)
    du, dv, dw = (lu - cs_u) / r[0], lv / r[1], lw / r[2]
    norm = np.sqrt(du * du + dv * dv + dw * dw) + 1e-6
    du, dv, dw = du / norm, dv / norm, dw / norm

    def sinus_point(a: np.ndarray, f: float) -> np.ndarray:
        """The point ``f`` times the way from the sinus centre to its surface along ``a``."""
        to_surface = 1.0 / np.sqrt(np.sum((a / k_sin) ** 2))
        return c + rot @ (np.array([cs_u, 0.0, 0.0]) + f * to_surface * a * np.asarray(r))

    sub = tissue[sl]
    parenchyma = hull & (sinus > 1)
    sub[parenchyma & (sub == T["kidney_medulla"])] = T["kidney_cortex"]  # the plain band goes
    # pyramid axes spread evenly (a turned Fibonacci sphere), none into the hilum
    n = int(rng.integers(11, 18))
    i = np.arange(n) + 0.5
    height = 1.0 - 2.0 * i / n
    ring = np.sqrt(1.0 - height * height)
    fib = np.stack([ring * np.cos(2.39996 * i), ring * np.sin(2.39996 * i), height], axis=1)
    turn, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = [a for a in fib @ turn.T if -s * a[0] <= 0.5]
    spacing = np.sqrt(4 * np.pi / n)  # rad between neighbouring axes
    base = u(0.65, 0.85)  # where the pyramids' bases stop: the cortex is the rest
    t = np.clip(depth / base, 0.0, 1.0)  # 0 at the papilla, 1 at the base
    pelvis_c = c + rot @ np.array([-s * r[0] * 0.45, 0.0, -r[2] * 0.1])
    this = np.zeros(grid.shape, dtype=bool)
    this[sl] = hull
    for a in axes:
        half = spacing * u(0.5, 0.65)  # columns of cortex stay between the pyramids
        theta = np.arccos(np.clip(du * a[0] + dv * a[1] + dw * a[2], -1.0, 1.0))
        cone = (depth > -0.12) & (depth < base) & (theta < half * (0.45 + 0.55 * t))
        cup = (depth > -0.45) & (depth <= 0.0) & (theta < half * 0.55) & ~cone
        sub[hull & cup] = T["renal_pelvis"]  # the minor calyx around the papilla
        sub[hull & cone] = T["kidney_medulla"]
        # an infundibulum from the calyx to the pelvis
        tip = sinus_point(a, 0.8)
        _paint(tissue, *_inside(grid.tube([tip, pelvis_c], u(1.0, 2.0))), "renal_pelvis", this)
    # segmental vessels from the hilum through the sinus, to between the pyramids
    hil = c + rot @ np.array([-s * r[0] * 0.75, 0.0, 0.0])
    for _ in range(int(rng.integers(3, 7))):
        a = rng.normal(size=3)
        a[0] = s * abs(a[0])  # away from the hilum
        a /= np.linalg.norm(a)
        end = sinus_point(a, u(0.9, 1.3))
        mid = (hil + end) / 2 + rng.normal(0, 3.0, 3)
        for name, radius in (("ivc", u(1.5, 2.8)), ("aorta", u(0.9, 1.6))):
            shift = rng.normal(0, 2.0, 3)
            box, inside = _inside(grid.tube([hil + shift, mid + shift, end + shift], radius))
            if box is None:
                continue
            inside &= this[box]
            tissue[box][inside] = T[name]
            sinus_vessels[box] |= inside


def _bowel(grid, tissue, p, abdomen, organs, rng):
    u = rng.uniform
    a, bp, ba = p.a, p.b_post, p.b_ant
    free = abdomen & ~organs
    # colon frame: caecum, ascending, hepatic flexure, transverse, splenic flexure, descending
    zt = p.dome - p.liver_span + u(-10, 25)
    frame = [
        (-0.6 * a, -0.1 * ba, -150),
        (-0.68 * a, 0.05 * bp, zt - 40),
        (-0.5 * a, -0.25 * ba, zt),
        (0.0, -0.62 * ba, zt - u(10, 70)),
        (0.62 * a, -0.05 * ba, p.dome_left - u(60, 90)),
        (0.7 * a, 0.15 * bp, -40),
        (0.55 * a, 0.0, -140),
        (0.1 * a, -0.25 * ba, -190),
    ]
    path = np.vstack(
        [smooth_path(frame[k], frame[k + 1], rng, 8, 4)[:-1] for k in range(len(frame) - 1)]
    )
    t = grid.tube(path, u(17, 26))
    if t is not None:
        sl, d = t
        d = d * (1 + 0.12 * grid.fine_noise[sl])  # haustra
        wall = (d <= 1) & free[sl]
        tissue[sl][wall] = T["bowel_wall"]
        lumen = wall & (d <= 0.85)
        tissue[sl][lumen] = T["feces"]
        tissue[sl][lumen & (grid.coarse_noise[sl] > 0.6) & (grid.Y[sl] < 0)] = T["air"]
    # small bowel: loops of fluid, air or oral contrast in the mid and lower abdomen
    lo = (-0.55 * a, -0.8 * ba, -170)
    hi = (0.55 * a, p.y_vb - 25, min(p.kidney_z) + 30)
    hi = tuple(max(top, low) for top, low in zip(hi, lo))  # a thin patient (1 in 70,000 seeds)
    for _ in range(int(u(6, 14))):
        start = rng.uniform(lo, hi)
        walk = random_walk(start, int(u(4, 10)), u(15, 25), lo, hi, rng)
        t = grid.tube(walk, u(8, 14))
        if t is None:
            continue
        sl, d = t
        wall = (d <= 1) & free[sl] & (tissue[sl] == T["visceral_fat"])
        tissue[sl][wall] = T["bowel_wall"]
        lumen = wall & (d <= u(0.6, 0.8))
        kind = rng.choice(
            ["bowel_fluid", "air", "oral_contrast", "bowel_wall"], p=[0.5, 0.15, 0.15, 0.2]
        )
        if p.oral_contrast and rng.random() < 0.7:
            kind = "oral_contrast"
        tissue[sl][lumen] = T[str(kind)]


def _loops_by_kidneys(grid, tissue, abdomen, kidney, rng) -> None:
    """1-3 small-bowel loops against each kidney's front and side (jejunum lies on the left
    kidney; duodenum and colon touch both), collapsed or filled with fluid, air or oral
    contrast, their walls enhancing like a kidney's outer cortex: the hard negative behind the
    kidney models' false kidney and "tumour" in the bowel of a real CT (3D-IRCADb-01 case 1.1).
    Painted in the abdominal fat only: no organ loses a voxel. Draws from ``rng`` only."""
    u = rng.uniform
    free = abdomen & (tissue == T["visceral_fat"])
    for s in (-1, 1):
        side = kidney & ((grid.X > 0) if s > 0 else (grid.X <= 0))
        z, y, x = np.nonzero(side)
        if len(z) < 50:
            continue
        cx, cy = float(grid.xs[x].mean()), float(grid.ys[y].mean())
        front = (grid.ys[y] < cy + u(-5, 5)) & (s * grid.xs[x] > s * cx - 10)  # front / side
        if not front.any():
            continue
        lo = (grid.xs[x].min() - 60, grid.ys[y].min() - 60, grid.zs[z].min() - 20)
        hi = (grid.xs[x].max() + 60, grid.ys[y].max(), grid.zs[z].max() + 20)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.choice(np.flatnonzero(front)))
            surface = np.array([grid.xs[x[k]], grid.ys[y[k]], grid.zs[z[k]]], dtype=float)
            out = np.array([s * u(0.3, 1.0), -u(0.5, 1.0), u(-0.3, 0.3)])
            radius = u(6, 12)
            start = surface + out / np.linalg.norm(out) * (radius + u(0, 3))
            walk = random_walk(start, int(u(3, 7)), u(12, 18), lo, hi, rng)
            t = grid.tube(walk, radius)
            if t is None:
                continue
            sl, d = t
            wall = (d <= 1) & free[sl]
            tissue[sl][wall] = T["bowel_wall"]
            kind = rng.choice(
                ["bowel_wall", "bowel_fluid", "air", "oral_contrast"], p=[0.4, 0.35, 0.1, 0.15]
            )
            tissue[sl][wall & (d <= u(0.5, 0.75))] = T[str(kind)]


def _pelvis(grid, tissue, p, abdomen, rng):
    u = rng.uniform
    X, Y, Z = grid.X, grid.Y, grid.Z
    crest = u(-125, -95)
    if Z.min() > crest:
        return
    for s in (-1, 1):
        q = ((X - s * 0.42 * p.a) / (0.42 * p.a)) ** 2 + ((Y - p.y_vb - 5) / 55) ** 2
        wing = (np.abs(q - 1) < 0.22) & (crest > Z) & (crest - 110 < Z) & (p.y_vb - 50 < Y)
        wing &= (X * s > 25) & (tissue != T["air"])
        tissue[wing] = T["cortical_bone"]
        tissue[wing & (np.abs(q - 1) < 0.1)] = T["cancellous_bone"]
    e = grid.ellipsoid((0, -0.3 * p.b_ant, crest - u(90, 120)), (u(30, 50), u(30, 45), u(25, 40)))
    if e is not None:
        sl, q = e
        tissue[sl][(q <= 1) & abdomen[sl]] = T["bladder"]


def _mesenteric_vessels(grid, tissue, p, abdomen, rng):
    u = rng.uniform
    for _ in range(int(u(15, 35))):
        start = (u(-0.5, 0.5) * p.a, u(-0.7, 0.1) * p.b_ant, u(-150, 40))
        end = np.add(start, rng.normal(0, 35, 3))
        _paint(
            tissue,
            *_inside(grid.tube([start, end], u(1.2, 3.0))),
            "portal_vein",
            abdomen & (tissue == T["visceral_fat"]),
        )


def _arms(grid, tissue, p, rng):
    u = rng.uniform
    for s in (-1, 1):
        c = (s * (p.a + u(25, 60)), u(-20, 20), 0.0)
        X, Y = grid.X - c[0], grid.Y - c[1]
        q = (X / u(38, 50)) ** 2 + (Y / u(40, 55)) ** 2
        tissue[(q <= 1)] = T["fat"]
        tissue[q <= 0.65] = T["muscle"]
        tissue[(X**2 + Y**2) <= 11**2] = T["cortical_bone"]
        tissue[(X**2 + Y**2) <= 7**2] = T["cancellous_bone"]


def _table(grid, tissue, p, rng):
    u = rng.uniform
    y0 = p.b_post * 1.03 + u(2, 25)  # mattress under the back
    X, Y = grid.xs[None, None, :], grid.ys[None, :, None]
    curve = y0 + (X / 250.0) ** 2 * u(20, 60)
    shell = (curve < Y) & (curve + u(3, 7) > Y) & (np.abs(X) < u(200, 240))
    under = (curve + 18 < Y) & (curve + 22 > Y) & (np.abs(X) < 180)
    mattress = (p.b_post * 0.8 < Y) & (curve >= Y) & (np.abs(X) < 220) & (tissue == T["air"])
    tissue[mattress] = T["mattress"]
    tissue[np.broadcast_to(shell | under, tissue.shape)] = T["table"]


def _metal(grid, tissue, p, rng) -> list[tuple[float, float, float]]:
    """A surgical clip, spinal fixation or hip prosthesis: a dense object that will streak."""
    u = rng.uniform
    kind = rng.choice(["clip", "spine", "hip"])
    zs = grid.zs
    if kind == "clip":
        c = (u(-60, 40), u(-40, 30), u(zs.min(), zs.max()))
        path = [c, np.add(c, (u(-6, 6), u(-6, 6), u(-4, 4)))]
        radius = 1.5
    elif kind == "spine":
        c = (u(-20, 20), p.y_vb + p.vb_r[1] + 12, (zs.min() + zs.max()) / 2)
        path = [(c[0] - 18, c[1], zs.min()), (c[0] - 18, c[1], zs.max())]
        radius = 3.0
    else:
        c = (u(-1, 1) * 0.5 * p.a, p.y_vb, zs.min() + 10)
        path = [c, (c[0], c[1] - 10, zs.min() - 40)]
        radius = 14.0
    _paint(tissue, *_inside(grid.tube(path, radius)), "metal")
    return [tuple(float(v) for v in c)]
