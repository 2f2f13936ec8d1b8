"""Torch datasets over a prepared cache (see :mod:`.prepare`): 2D slices and 3D patches.

Random samples are a pure function of (seed, index): every DataLoader worker, every
``DistributedSampler`` rank and every rerun draws the same crop for the same index. Arrays are
memory-mapped (``np.load(mmap_mode="r")``) and only the crop is read, unless the whole cache is
small (``cache_bytes``), in which case each process keeps it in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from HLFDSegmentLib.pipeline import background_value, context_slices, with_context

from .augment import make_augment
from .labels import DataError, tumour_value
from .layouts import Case

SPLITS = ("train", "val", "test", "unused", "all")


class PreparedData:
    """A prepared cache: settings, splits, per-case meta and (memory-mapped) arrays."""

    def __init__(self, out: str | os.PathLike[str], cache_bytes: int = 256 * 2**20):
        self.root = Path(out)
        self.info = _read_json(self.root / "prepared.json")
        self.split_info = _read_json(self.root / "splits.json")
        self.preprocessing: dict[str, Any] = self.info["preprocessing"]
        self.labels = {int(k): v for k, v in self.info["labels"].items()}
        self.num_classes = len(self.labels)
        self.tumour = tumour_value(self.info["labelset"])
        self.background = background_value(self.preprocessing)
        sizes = [p.stat().st_size for p in (self.root / "cases").glob("*/*.npy")]
        self.in_memory = sum(sizes) <= cache_bytes
        self._meta: dict[str, dict] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:  # workers reopen their own maps
        return {**self.__dict__, "_arrays": {}}

    def cases(self, split: str = "train") -> list[str]:
        """Case ids of ``split`` (train | val | test | unused | all)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if split == "all":
            return list(self.info["cases"])
        return list(self.split_info.get(split, []))

    def meta(self, case: str) -> dict[str, Any]:
        if case not in self._meta:
            self._meta[case] = _read_json(self.root / "cases" / case / "meta.json")
        return self._meta[case]

    def arrays(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """(float16 image, uint8 label), (z, y, x) on the model grid (read-only)."""
        if case not in self._arrays:
            folder = self.root / "cases" / case
            mode = None if self.in_memory else "r"
            try:
                pair = tuple(
                    np.load(folder / n, mmap_mode=mode) for n in ("image.npy", "label.npy")
                )
            except OSError as exc:
                raise DataError(f"case {case}: prepared arrays unreadable ({exc})") from None
            self._arrays[case] = pair
        return self._arrays[case]

    def eval_cases(self, split: str = "test") -> list[Case]:
        """The original files of ``split``'s cases (for evaluation at original resolution)."""
        labels = {int(k): v for k, v in self.info["source_labels"].items()}
        out = []
        for cid in self.cases(split):
            m = self.meta(cid)
            out.append(
                Case(cid, Path(m["image_path"]), Path(m["label_path"]), self.info["layout"], labels)
            )
        return out

    def label_lut(self) -> np.ndarray:
        """uint8[256]: source label value -> target value (unknown values -> 0)."""
        table = np.zeros(256, dtype=np.uint8)
        for src, dst in self.info["label_map"].items():
            table[int(src)] = dst
        return table


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise DataError(f"{path}: missing; run prepare first") from None
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def window(arr: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``arr[start:start+size]`` per axis, padded with ``fill`` where it leaves the array."""
    src, dst = [], []
    for s, n, total in zip(start, size, arr.shape):
        lo, hi = max(0, s), min(total, s + n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out = np.full(tuple(size), fill, dtype=np.float32)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def window_start(centre: int, size: int, total: int, jitter: int) -> int:
    """Window start holding ``centre`` (shifted by ``jitter``); inside the array when it fits,
    else centred on the array (padded evenly)."""
    if total <= size:
        return -((size - total) // 2)
    return int(np.clip(centre - size // 2 + jitter, 0, total - size))


def finish_sample(augment, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict:
    """A channel-first (C, H, W) or (C, D, H, W) image crop and its (H, W) or (D, H, W) label as
    tensors, through ``augment`` (MONAI Compose seeded from ``rng``): {"image": float32,
    "label": int64}, both channel-first."""
    data = {"image": torch.from_numpy(image), "label": torch.from_numpy(label[None])}
    if augment.transforms:
        augment.set_random_state(seed=int(rng.integers(2**31)))
        data = augment(data)
    img, lab = data["image"], data["label"]
    img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    lab = lab.as_tensor() if hasattr(lab, "as_tensor") else torch.as_tensor(lab)
    return {"image": img.float().contiguous(), "label": lab.round().long().contiguous()}


def context_crop(
    volume: np.ndarray,
    z: int,
    corner: Sequence[int],
    size: Sequence[int],
    context: int,
    fill: float,
) -> np.ndarray:
    """(2 * context + 1, H, W): the ``size`` crop at ``corner`` of slices z - context .. z +
    context of ``volume`` (the runtime's :func:`with_context`: end slices repeat)."""
    stack = with_context(volume, [z], context)[0]
    return window(stack, (0, *corner), (len(stack), *size), fill)


class _Sampled(Dataset):
    """Shared foreground-biased sampling of crops from a split of a prepared cache."""

    dims = 2

    def __init__(
        self,
        prepared: PreparedData | str | os.PathLike[str],
        split: str,
        size: Sequence[int],
        augment: Mapping[str, Any] | None,
        foreground_fraction: float,
        tumour_fraction: float,
        samples_per_epoch: int | None,
        seed: int,
    ):
        self.prepared = prepared if isinstance(prepared, PreparedData) else PreparedData(prepared)
        self.context = context_slices(self.prepared.preprocessing)
        self.split = split
        self.case_ids = self.prepared.cases(split)
        if not self.case_ids:
            raise DataError(f"{self.prepared.root}: split {split!r} has no cases")
        if len(size) != self.dims:
            raise DataError(f"crop/patch size {list(size)} must have {self.dims} values")
        self.size = tuple(int(s) for s in size)
        self.augment = make_augment(augment, self.dims)
        self.foreground_fraction = float(foreground_fraction)
        self.tumour_fraction = float(tumour_fraction)
        self.samples = samples_per_epoch
        self.seed = int(seed)
        tv = str(self.prepared.tumour) if self.prepared.tumour is not None else None
        self.fg_cases, self.tumour_cases = [], []
        for cid in self.case_ids:
            m = self.prepared.meta(cid)
            if m["points"]:
                self.fg_cases.append(cid)
            if tv is not None and m["points"].get(tv):
                self.tumour_cases.append(cid)

    def __len__(self) -> int:
        return int(self.samples) if self.samples else self._default_length()

    def _default_length(self) -> int:
        return len(self.case_ids)

    def _pick(self, rng: np.random.Generator) -> tuple[str, int | None]:
        """(case, target label value or 0 for "any foreground", or None for a random place)."""
        if self.fg_cases and rng.random() < self.foreground_fraction:
            if self.tumour_cases and rng.random() < self.tumour_fraction:
                return self.tumour_cases[rng.integers(len(self.tumour_cases))], self.prepared.tumour
            return self.fg_cases[rng.integers(len(self.fg_cases))], 0
        return self.case_ids[rng.integers(len(self.case_ids))], None

    def _finish(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict:
        return finish_sample(self.augment, image, label, rng)

    def _rng(self, index: int) -> np.random.Generator:
        # the middle 0 keeps the key of the first runs (it held an epoch number that was never
        # set), so every recorded run draws the same samples
        return np.random.default_rng([self.seed, 0, int(index)])


class SliceDataset(_Sampled):
    """Random 2D crops (C, H, W) of axial slices, foreground-biased: C = 1, or 2k + 1 slices
    centred on the labelled one for ``context_slices`` = k in the preprocessing (2.5D).

    A share ``foreground_fraction`` of samples is centred (with jitter of up to a quarter crop)
    on a foreground pixel of a slice holding it; ``tumour_fraction`` of those on tumour. The rest
    are uniform over slices and positions. Crops larger than a slice are padded with the
    normalised background (image) and 0 (label). Items: {"image": float32 (C, H, W),
    "label": int64 (1, H, W), "case": id, "slice": z}."""

    dims = 2

    def __init__(
        self,
        prepared: PreparedData | str | os.PathLike[str],
        split: str = "train",
        *,
        crop: Sequence[int] = (160, 160),
        augment: Mapping[str, Any] | None = None,
        foreground_fraction: float = 0.5,
        tumour_fraction: float = 0.5,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            prepared,
            split,
            crop,
            augment,
            foreground_fraction,
            tumour_fraction,
            samples_per_epoch,
            seed,
        )

    def _default_length(self) -> int:
        return sum(self.prepared.meta(c)["shape"][0] for c in self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        case, value = self._pick(rng)
        image, label = self.prepared.arrays(case)
        meta = self.prepared.meta(case)
        depth, h, w = image.shape
        ch, cw = self.size
        if value is None:
            z = int(rng.integers(depth))
            top = int(rng.integers(max(1, h - ch + 1))) if h > ch else -((ch - h) // 2)
            left = int(rng.integers(max(1, w - cw + 1))) if w > cw else -((cw - w) // 2)
        else:
            keys = [str(value)] if value else list(meta["slices"])
            slices = sorted({z for k in keys for z in meta["slices"][k]})
            z = int(slices[rng.integers(len(slices))])
            sl = np.asarray(label[z])
            ys, xs = np.nonzero(sl == value if value else sl > 0)
            k = int(rng.integers(len(ys)))
            top = window_start(int(ys[k]), ch, h, int(rng.integers(-(ch // 4), ch // 4 + 1)))
            left = window_start(int(xs[k]), cw, w, int(rng.integers(-(cw // 4), cw // 4 + 1)))
        img = context_crop(image, z, (top, left), self.size, self.context, self.prepared.background)
        lab = window(label[z], (top, left), self.size, 0).astype(np.uint8)
        out = self._finish(img, lab, rng)
        return {**out, "case": case, "slice": z}


class VolumeDataset(_Sampled):
    """Random 3D patches (1, D, H, W), foreground-biased like :class:`SliceDataset` (centres
    drawn from each case's stored sample points). Items: {"image", "label", "case",
    "start": int64 (3,) patch corner (z, y, x) in the prepared array}."""

    dims = 3

    def __init__(
        self,
        prepared: PreparedData | str | os.PathLike[str],
        split: str = "train",
        *,
        patch: Sequence[int] = (96, 96, 96),
        augment: Mapping[str, Any] | None = None,
        foreground_fraction: float = 0.5,
        tumour_fraction: float = 0.5,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            prepared,
            split,
            patch,
            augment,
            foreground_fraction,
            tumour_fraction,
            samples_per_epoch,
            seed,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        case, value = self._pick(rng)
        image, label = self.prepared.arrays(case)
        meta = self.prepared.meta(case)
        if value is None:
            start = [
                int(rng.integers(n - p + 1)) if n > p else -((p - n) // 2)
                for n, p in zip(image.shape, self.size)
            ]
        else:
            keys = [str(value)] if value else list(meta["points"])
            points = [p for k in keys for p in meta["points"][k]]
            centre = points[rng.integers(len(points))]
            start = [
                window_start(c, p, n, int(rng.integers(-(p // 4), p // 4 + 1)))
                for c, p, n in zip(centre, self.size, image.shape)
            ]
        img = window(image, start, self.size, self.prepared.background)
        lab = window(label, start, self.size, 0).astype(np.uint8)
        out = self._finish(img[None], lab, rng)
        return {**out, "case": case, "start": torch.tensor(start, dtype=torch.int64)}
