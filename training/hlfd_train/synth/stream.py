"""The synthetic training stream: 2D crops of cases made on the fly, in DataLoader workers.

No dataset on disk: sample ``i`` is a pure function of (seed, i), like the prepared datasets, so
a resumed run sees the batches an uninterrupted run would have seen. Making a case costs seconds
(``synth_case``), so each case serves ``crops_per_case`` crops. A batch of crops from one case
would give BatchNorm one patient's statistics per step (it measurably unlearns: a fine-tune on
such batches lost 0.06-0.3 organ Dice), so every DataLoader worker keeps a rolling pool of
``pool`` cases, each batch draws its crops from all of them, and the pool renews one case at a
time: with ``W`` workers, batch ``b`` goes to worker ``b mod W`` (PyTorch's round robin), and
slot ``k`` of that worker's pool depends only on ``b mod W``, ``k`` and the worker's batch count.
No case is made twice, and each worker makes a new case every
``crops_per_case / batch`` batches (after its first ``pool`` cases).

The case is preprocessed exactly as the prepared cache and the runtime do (``model_grid``,
``normalise``), and crops are drawn as :class:`~hlfd_train.data.SliceDataset` draws them
(foreground-biased, tumour-biased, then augmented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from torch.utils.data import Dataset

from HLFDSegmentLib.pipeline import background_value, context_slices, model_grid, normalise

from ..config import ConfigError
from ..data.augment import make_augment
from ..data.datasets import context_crop, finish_sample, window, window_start
from .generator import SynthConfig, SynthError, synth_case
from .tissues import T

# aux_labels: tissues (or "+"-joined groups of them: one class) learnt as classes of their own
# (3, 4, ... after background, organ, tumour) by a student built with as many
# ``background_channels``, which fold them into background at inference: the spleen is then
# something the kidney model knows, not only something it must not call kidney
STREAM_KEYS = {"crops_per_case": 32, "pool": 8, "seed": 1, "synth": {}, "aux_labels": []}


@dataclass(frozen=True)
class StreamCase:
    """One preprocessed case: normalised image and target labels on the model grid."""

    image: np.ndarray  # float32 (z, y, x)
    label: np.ndarray  # uint8, 0 background, 1 organ, 2 tumour, 3.. the aux_labels' tissues
    foreground: np.ndarray  # int (n, 3) voxel indices of organ or tumour
    tumour: np.ndarray  # int (n, 3) voxel indices of label == 2


def stream_settings(values: Mapping[str, Any] | None, task: str) -> dict[str, Any]:
    """``data.stream`` checked: crops_per_case, pool (ints > 0), seed (int), synth (generator
    keys)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(STREAM_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key 'data.stream.{unknown[0]}' (known here: "
            f"{', '.join(sorted(STREAM_KEYS))})"
        )
    out = {**STREAM_KEYS, **values}
    for key in ("crops_per_case", "pool", "seed"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or (key != "seed" and v < 1):
            want = "an int" if key == "seed" else "a positive int"
            raise ConfigError(f"config key 'data.stream.{key}': {want}, got {v!r}")
    if not isinstance(out["synth"], Mapping):
        raise ConfigError(f"config key 'data.stream.synth': a mapping, got {out['synth']!r}")
    aux = out["aux_labels"]
    if not isinstance(aux, list) or not all(
        isinstance(a, str) and all(t in T for t in a.split("+")) for a in aux
    ):
        raise ConfigError(
            f"config key 'data.stream.aux_labels': a list of tissue names or '+'-joined groups "
            f"of them ({', '.join(T)}), got {aux!r}"
        )
    if len(set(aux)) != len(aux):
        raise ConfigError(f"config key 'data.stream.aux_labels': a tissue twice in {aux}")
    try:
        out["config"] = SynthConfig.from_dict(task, out["synth"])
    except SynthError as exc:
        raise ConfigError(f"data.stream.{exc}") from None
    return out


def stream_case(
    config: SynthConfig, seed: int, pre: Mapping[str, Any], aux_labels: Sequence[str] = ()
) -> StreamCase:
    """Make case ``seed`` and bring it onto the model grid of ``pre`` (the card's preprocessing);
    background voxels of the tissues ``aux_labels`` (a name or "a+b" for a group) get labels
    3, 4, ... in that order."""
    case = synth_case(config, seed)
    for value, names in enumerate(aux_labels, start=3):
        tissues = [T[name] for name in names.split("+")]
        case.labels[(case.labels == 0) & np.isin(case.tissue, tissues)] = value
    image, label = case.to_sitk()
    grid = model_grid(image, dict(pre))
    arr = normalise(image, grid, dict(pre)).astype(np.float32, copy=False)
    lab = sitk.GetArrayFromImage(grid.resample(label, sitk.sitkNearestNeighbor, sitk.sitkUInt8))
    return StreamCase(arr, lab, np.argwhere((lab == 1) | (lab == 2)), np.argwhere(lab == 2))


class SynthSliceStream(Dataset):
    """Random 2D crops (C, H, W) of synthetic cases made on the fly (see the module doc); C = 1,
    or 2k + 1 slices centred on the labelled one for ``context_slices`` = k (2.5D).

    ``batch`` and ``workers`` must be the DataLoader's (they lay the cases out per worker);
    ``world``: data-parallel ranks, each with its own cases. Items: {"image": float32 (C, H, W),
    "label": int64 (1, H, W), "case": "synth-<seed>", "slice": z}."""

    def __init__(
        self,
        config: SynthConfig,
        preprocessing: Mapping[str, Any],
        *,
        crop: Sequence[int] = (160, 160),
        augment: Mapping[str, Any] | None = None,
        foreground_fraction: float = 0.67,
        tumour_fraction: float = 0.5,
        samples: int = 2**31,
        crops_per_case: int = 32,
        pool: int = 8,
        batch: int = 8,
        workers: int = 0,
        world: int = 1,
        seed: int = 1,
        aux_labels: Sequence[str] = (),
    ):
        if len(crop) != 2:
            raise ConfigError(f"data.crop: 2 values for 2D crops, got {list(crop)}")
        self.config, self.pre = config, dict(preprocessing)
        self.size = tuple(int(s) for s in crop)
        self.augment = make_augment(augment, 2)
        self.foreground_fraction, self.tumour_fraction = foreground_fraction, tumour_fraction
        self.samples, self.batch = int(samples), max(1, int(batch))
        self.workers, self.world, self.seed = max(1, int(workers)), max(1, int(world)), int(seed)
        self.aux_labels = tuple(aux_labels)
        self.pool = max(1, min(int(pool), self.batch))  # a batch draws from at most `batch`
        # a case lives `life` of its worker's batches, serving batch / pool crops in each
        self.life = max(self.pool, round(crops_per_case * self.pool / self.batch))
        self.background = background_value(self.pre)
        self.context = context_slices(self.pre)
        self._cached: dict[int, tuple[int, StreamCase]] = {}  # pool slot -> (seed, case)

    def __len__(self) -> int:
        return self.samples

    def case_seed(self, index: int) -> int:
        """The generator seed of sample ``index``'s case (distinct from ``write``'s seeds)."""
        b, j = divmod(int(index), self.batch)
        step, rank = divmod(b, self.world)
        lane, t = step % self.workers, step // self.workers  # t: the worker's batch count
        slot = j % self.pool
        generation = (t + slot * self.life // self.pool) // self.life  # slots renew in turn
        words = [self.seed, 0x5EED, rank, lane, slot, generation]
        return int(np.random.SeedSequence(words).generate_state(1)[0])

    def case(self, index: int) -> tuple[int, StreamCase]:
        """(seed, preprocessed case) of sample ``index``; the worker's pool keeps its cases."""
        seed, slot = self.case_seed(index), index % self.batch % self.pool
        if slot not in self._cached or self._cached[slot][0] != seed:
            self._cached.pop(slot, None)  # free the old case before making the next
            self._cached[slot] = (seed, stream_case(self.config, seed, self.pre, self.aux_labels))
        return self._cached[slot]

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed, case = self.case(index)
        rng = np.random.default_rng([self.seed, 0xC0, int(index)])
        depth, h, w = case.image.shape
        ch, cw = self.size
        points = None
        if len(case.foreground) and rng.random() < self.foreground_fraction:
            tumour = len(case.tumour) and rng.random() < self.tumour_fraction
            points = case.tumour if tumour else case.foreground
        if points is None:
            z = int(rng.integers(depth))
            top = int(rng.integers(h - ch + 1)) if h > ch else -((ch - h) // 2)
            left = int(rng.integers(w - cw + 1)) if w > cw else -((cw - w) // 2)
        else:
            z, y, x = (int(v) for v in points[rng.integers(len(points))])
            top = window_start(y, ch, h, int(rng.integers(-(ch // 4), ch // 4 + 1)))
            left = window_start(x, cw, w, int(rng.integers(-(cw // 4), cw // 4 + 1)))
        img = context_crop(case.image, z, (top, left), self.size, self.context, self.background)
        lab = window(case.label[z], (top, left), self.size, 0).astype(np.uint8)
        out = finish_sample(self.augment, img, lab, rng)
        return {**out, "case": f"synth-{seed}", "slice": z}
