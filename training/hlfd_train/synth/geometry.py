"""A voxel grid in patient space with a smooth random deformation, and shape primitives on it.

Coordinates are LPS millimetres (x: to the patient's left, y: posterior, z: superior). Every
shape is an implicit function of the *deformed* coordinates, so one smooth random field bends
all organs together (3D-consistent anatomy, not slice by slice), and each primitive only
touches the index box around it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def smooth_field(shape: tuple[int, ...], cells: tuple[int, ...], rng: np.random.Generator):
    """A float32 field of ``shape`` (z, y, x), unit sd, smooth over ``cells`` control points."""
    coarse = torch.from_numpy(rng.standard_normal(cells).astype(np.float32))[None, None]
    up = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return up / max(float(up.std()), 1e-6)


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """3x3 rotation (degrees about x, then y, then z)."""
    a, b, c = (math.radians(v) for v in (rx, ry, rz))
    mx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    my = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    mz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


class Grid:
    """Voxel centres ``xs`` (columns), ``ys`` (rows), ``zs`` (slices) and deformed coordinates."""

    def __init__(self, xs, ys, zs, rng: np.random.Generator, deform_mm: float = 8.0):
        self.xs, self.ys, self.zs = (np.asarray(v, dtype=np.float32) for v in (xs, ys, zs))
        self.shape = (len(self.zs), len(self.ys), len(self.xs))
        extent = np.array([np.ptp(self.zs), np.ptp(self.ys), np.ptp(self.xs)])
        cells = tuple(
            int(max(2, min(n, math.ceil(e / 70.0) + 2))) for n, e in zip(self.shape, extent)
        )
        self.margin = 3.0 * deform_mm
        self.X = self.xs[None, None, :] + deform_mm * smooth_field(self.shape, cells, rng)
        self.Y = self.ys[None, :, None] + deform_mm * smooth_field(self.shape, cells, rng)
        self.Z = self.zs[:, None, None] + 0.6 * deform_mm * smooth_field(self.shape, cells, rng)
        fine = tuple(
            int(max(2, min(n, math.ceil(e / 12.0) + 2))) for n, e in zip(self.shape, extent)
        )
        self.coarse_noise = smooth_field(self.shape, cells, rng)  # organ lobulation, textures
        self.fine_noise = smooth_field(self.shape, fine, rng)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the physical box [lo, hi] (x, y, z) plus the deformation
        margin; None when it misses the grid."""
        out = []
        for axis, coords in ((2, self.zs), (1, self.ys), (0, self.xs)):
            a, b = lo[axis] - self.margin, hi[axis] + self.margin
            i0 = int(np.searchsorted(coords, a, side="left"))
            i1 = int(np.searchsorted(coords, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def local(self, sl, centre, rot: np.ndarray | None = None):
        """Coordinates in a box relative to ``centre``, in the frame of ``rot`` (its columns)."""
        # Python floats keep the arithmetic in float32 (NumPy 2 promotes with float64 scalars)
        u = self.X[sl] - float(centre[0])
        v = self.Y[sl] - float(centre[1])
        w = self.Z[sl] - float(centre[2])
        if rot is None:
            return u, v, w
        r = np.asarray(rot, dtype=float).tolist()
        return (
            r[0][0] * u + r[1][0] * v + r[2][0] * w,
            r[0][1] * u + r[1][1] * v + r[2][1] * w,
            r[0][2] * u + r[1][2] * v + r[2][2] * w,
        )

    def ellipsoid(self, centre, radii, rot=None, lobulation: float = 0.0, pad: float = 1.0):
        """(box, q) with q < 1 inside the (rotated, lobulated) ellipsoid; None off the grid."""
        reach = max(radii) * pad * (1 + lobulation)
        sl = self.box(np.subtract(centre, reach), np.add(centre, reach))
        if sl is None:
            return None
        u, v, w = self.local(sl, centre, rot)
        q = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2
        if lobulation:
            q *= 1.0 + lobulation * self.fine_noise[sl]
        return sl, q

    def tube(self, points, radius: float | tuple[float, float]):
        """(box, distance / radius) to a polyline ``points`` (N, 3); radius may taper
        (start, end). None off the grid."""
        pts = np.asarray(points, dtype=np.float64)
        r0, r1 = (radius, radius) if np.isscalar(radius) else radius
        rmax = max(r0, r1)
        sl = self.box(pts.min(0) - rmax, pts.max(0) + rmax)
        if sl is None:
            return None
        X, Y, Z = self.X[sl], self.Y[sl], self.Z[sl]
        best = np.full(X.shape, np.inf, dtype=np.float32)
        n = len(pts) - 1
        for k in range(n):
            a, b = pts[k], pts[k + 1]
            seg_lo = np.minimum(a, b) - rmax - self.margin
            seg_hi = np.maximum(a, b) + rmax + self.margin
            sub = self._sub(sl, seg_lo, seg_hi)
            if sub is None:
                continue
            ab = b - a
            length2 = max(float(ab @ ab), 1e-9)
            (ax, ay, az), (bx, by, bz) = a.tolist(), ab.tolist()  # float32 arithmetic below
            px, py, pz = X[sub] - ax, Y[sub] - ay, Z[sub] - az
            t = (px * bx + py * by + pz * bz) * (1.0 / length2)
            np.clip(t, 0.0, 1.0, out=t)
            px -= t * bx
            py -= t * by
            pz -= t * bz
            d = np.sqrt(px * px + py * py + pz * pz)
            d /= r0 + (r1 - r0) * (k + t) / n
            np.minimum(best[sub], d, out=best[sub])
        return sl, best

    def _sub(self, sl, lo, hi):
        """Slices inside box ``sl`` (relative to it) covering [lo, hi]."""
        out = []
        for s, axis, coords in zip(sl, (2, 1, 0), (self.zs, self.ys, self.xs)):
            c = coords[s]
            i0 = int(np.searchsorted(c, lo[axis], side="left"))
            i1 = int(np.searchsorted(c, hi[axis], side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)


def smooth_path(start, end, rng: np.random.Generator, wiggle: float, n: int = 6) -> np.ndarray:
    """A polyline from ``start`` to ``end`` with ``n`` segments bent by up to ``wiggle`` mm."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    t = np.linspace(0, 1, n + 1)[:, None]
    bend = rng.normal(0, wiggle, (n + 1, 3)) * np.sin(np.pi * t)
    return start + t * (end - start) + bend


def random_walk(start, steps: int, step_mm: float, lo, hi, rng: np.random.Generator) -> np.ndarray:
    """A smooth random walk (momentum) kept inside the box [lo, hi]: bowel loops."""
    p = np.asarray(start, float)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    out = [p.copy()]
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    for _ in range(steps):
        direction = direction + rng.normal(0, 0.6, 3)
        centre_pull = ((lo + hi) / 2 - p) / np.maximum(hi - lo, 1) * 1.5
        direction += centre_pull
        direction /= np.linalg.norm(direction)
        p = np.clip(p + step_mm * direction, lo, hi)
        out.append(p.copy())
    return np.array(out)
