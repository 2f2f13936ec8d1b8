"""Training augmentation: a MONAI ``Compose`` on {"image", "label"} built from a config dict.

Keys (all optional; 0 or absent disables): ``flip`` (probability per spatial axis; axes in
``flip_axes``, default all), ``rotate_deg`` + ``rotate_prob`` (in-plane rotation, bilinear image
/ nearest label), ``rotate90`` (probability of an in-plane quarter turn), ``scale_intensity`` and
``shift_intensity`` (``x * (1 + U(-s, s))``, ``x + U(-s, s)``, in normalised units), and
``noise_std`` (Gaussian noise); ``intensity_prob`` (default 0.5) is the chance of each
intensity transform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

KEYS = {
    "flip",
    "flip_axes",
    "rotate_deg",
    "rotate_prob",
    "rotate90",
    "scale_intensity",
    "shift_intensity",
    "noise_std",
    "intensity_prob",
}


def make_augment(cfg: Mapping[str, Any] | None, spatial_dims: int):
    """MONAI ``Compose`` of the configured random transforms (an empty one when none)."""
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    from .labels import DataError

    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise DataError(f"unknown augment key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    both = ("image", "label")
    plane = (spatial_dims - 2, spatial_dims - 1)  # H, W of (C, [D,] H, W) minus the channel
    out: list = []
    flip = float(cfg.get("flip", 0.0) or 0.0)
    if flip > 0:
        for axis in cfg.get("flip_axes") or range(spatial_dims):
            out.append(RandFlipd(both, prob=flip, spatial_axis=int(axis)))
    if float(cfg.get("rotate90", 0.0) or 0.0) > 0:
        out.append(RandRotate90d(both, prob=float(cfg["rotate90"]), spatial_axes=plane))
    deg, prob = float(cfg.get("rotate_deg", 0.0) or 0.0), float(cfg.get("rotate_prob", 0.0) or 0)
    if deg > 0 and prob > 0:
        out.append(
            RandRotated(  # range_x turns the last two axes in 2D and 3D: in-plane only
                both,
                range_x=math.radians(deg),
                prob=prob,
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
                keep_size=True,
            )
        )
    p = float(cfg.get("intensity_prob", 0.5))
    if float(cfg.get("scale_intensity", 0.0) or 0.0) > 0:
        out.append(RandScaleIntensityd("image", factors=float(cfg["scale_intensity"]), prob=p))
    if float(cfg.get("shift_intensity", 0.0) or 0.0) > 0:
        out.append(RandShiftIntensityd("image", offsets=float(cfg["shift_intensity"]), prob=p))
    if float(cfg.get("noise_std", 0.0) or 0.0) > 0:
        out.append(RandGaussianNoised("image", std=float(cfg["noise_std"]), prob=p))
    return Compose(out)
