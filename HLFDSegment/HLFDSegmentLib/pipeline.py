"""The segmentation pipeline every path runs (CLI, Slicer worker, training evaluation).

read -> reorient + resample to the model grid (one linear resampling from the original) ->
clip + normalise -> infer (2D: batched slices; 3D: sliding window, Gaussian blending; the
network call alone is PyTorch or ONNX Runtime, see :mod:`.backends`) -> argmax to uint8 ->
postprocess on the model grid -> nearest-neighbour back onto exactly the input grid ->
volumes. Float data only ever exists on the (coarser) model grid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .backends import NetworkRunner, make_runner
from .errors import InputError
from .io import check_image, label_counts, mask_box
from .modelpackage import ModelPackage
from .progress import SEGMENT_SPANS, StageProgress, within

_AXIS_OF_LETTER = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS physical space: size/spacing/origin in (x, y, z), direction row-major."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def resample(
        self, image: sitk.Image, interpolator: int, pixel_type: int, default: float = 0.0
    ) -> sitk.Image:
        return sitk.Resample(
            image,
            self.size,
            sitk.Transform(),
            interpolator,
            self.origin,
            self.spacing,
            self.direction,
            default,
            pixel_type,
        )

    def reference(self) -> sitk.Image:
        """A one-voxel image carrying this grid's geometry (for index <-> point transforms)."""
        ref = sitk.Image(1, 1, 1, sitk.sitkUInt8)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref


def resample_labels(labels: np.ndarray, grid: Grid, target: Grid) -> sitk.Image:
    """Nearest-neighbour resampling of a (z, y, x) labelmap on ``grid`` onto ``target``, done
    only where it can be non-zero: the box around the labels is mapped to the target grid
    (its corners, so any direction and orientation), resampled there and pasted into zeros.
    The voxels of resampling the whole volume, at a fraction of its cost, except where a target
    voxel's centre lies exactly halfway between two model voxels: floating-point rounding may
    then pick either neighbour, as it may in the whole-volume resampling."""
    out = np.zeros(target.size[::-1], dtype=np.uint8)
    box = mask_box(labels != 0, margin=1)
    if box is not None:
        src, dst = grid.reference(), target.reference()
        start = [int(b.start) for b in box[::-1]]  # x, y, z
        edges = [(b.start - 0.5, b.stop - 0.5) for b in box[::-1]]
        corners = np.array(
            [
                dst.TransformPhysicalPointToContinuousIndex(
                    src.TransformContinuousIndexToPhysicalPoint(corner)
                )
                for corner in itertools.product(*edges)
            ]
        )
        lo = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, target.size)
        hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, 0, target.size)
        if np.all(hi > lo):
            part = sitk.GetImageFromArray(np.ascontiguousarray(labels[box]))
            part.SetSpacing(grid.spacing)
            part.SetDirection(grid.direction)
            part.SetOrigin(src.TransformIndexToPhysicalPoint(start))
            region = Grid(
                tuple(int(n) for n in hi - lo),
                target.spacing,
                dst.TransformIndexToPhysicalPoint([int(i) for i in lo]),
                target.direction,
            )
            moved = region.resample(part, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
            out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = sitk.GetArrayViewFromImage(moved)
    image = sitk.GetImageFromArray(out)
    image.SetSpacing(target.spacing)
    image.SetOrigin(target.origin)
    image.SetDirection(target.direction)
    return image


def oriented_grid(grid: Grid, code: str) -> Grid:
    """The voxels of ``grid`` with axes permuted/flipped to the nearest ``code`` (e.g. "LPS")."""
    d = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    order: list[int] = []
    for letter in code:
        phys, sign = _AXIS_OF_LETTER[letter]
        weights = [abs(d[phys, a]) if a not in order else -1.0 for a in range(3)]
        order.append(int(np.argmax(weights)))
    direction = np.zeros((3, 3))
    origin = np.asarray(grid.origin, dtype=float)
    for new, (letter, old) in enumerate(zip(code, order)):
        phys, sign = _AXIS_OF_LETTER[letter]
        flip = 1.0 if d[phys, old] * sign >= 0 else -1.0
        direction[:, new] = flip * d[:, old]
        if flip < 0:
            origin = origin + d[:, old] * grid.spacing[old] * (grid.size[old] - 1)
    return Grid(
        tuple(grid.size[a] for a in order),
        tuple(grid.spacing[a] for a in order),
        tuple(origin),
        tuple(direction.ravel()),
    )


def respaced_grid(grid: Grid, spacing: Iterable[float | None]) -> Grid:
    """``grid`` with a new spacing (None keeps an axis), covering the same physical extent."""
    new_spacing = tuple(float(s) if s else old for s, old in zip(spacing, grid.spacing))
    size = tuple(
        max(1, round(n * old / new)) for n, old, new in zip(grid.size, grid.spacing, new_spacing)
    )
    d = np.asarray(grid.direction).reshape(3, 3)
    # keep the outer voxel edge: first centre moves by half the spacing change along each axis
    shift = np.array([(new - old) / 2 for new, old in zip(new_spacing, grid.spacing)])
    origin = np.asarray(grid.origin) + d @ shift
    return Grid(size, new_spacing, tuple(origin), grid.direction)


# A model grid above this many voxels is refused before anything is allocated: 2**28 float32
# voxels are 1 GiB per copy (512 x 512 x 1024 voxels); real CTs at the students'
# 1.5 mm grid are ~10-30 M voxels. A finer limit applies when the machine has less memory.
MAX_MODEL_VOXELS = 2**28


def model_grid(image: sitk.Image, pre: dict[str, Any], where: str = "input image") -> Grid:
    """The grid a model sees: ``image``'s voxels reoriented and resampled per the card. A grid
    that would not fit in memory (e.g. a header's spacing of 100 mm on a fine-grid model) is
    refused with one line before any voxel is resampled."""
    grid = respaced_grid(oriented_grid(Grid.of(image), pre["orientation"]), pre["spacing"])
    voxels = math.prod(grid.size)
    limit = min(MAX_MODEL_VOXELS, _available_bytes() // 24)  # float32 copies + probabilities
    if voxels > limit:
        shown = "x".join(map(str, grid.size))
        raise InputError(
            f"{where}: the model grid would be {shown} voxels ({voxels * 4 / 2**30:.1f} GiB per "
            f"float copy), over the {limit * 4 / 2**30:.1f} GiB this machine allows; check the "
            "spacing in the image header"
        )
    return grid


def _available_bytes() -> int:
    """Memory available to this process (Linux: MemAvailable), else a generous default."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 64 * 2**30


def normalise(image: sitk.Image, grid: Grid, pre: dict[str, Any]) -> np.ndarray:
    """Resample (linear) onto the model grid, clip to the window and normalise; (z, y, x)."""
    lo, hi = pre["window"]
    resampled = grid.resample(image, sitk.sitkLinear, sitk.sitkFloat32, default=lo)
    arr = sitk.GetArrayFromImage(resampled)
    del resampled
    np.clip(arr, lo, hi, out=arr)
    norm = pre["normalize"]
    if norm["mode"] == "minmax":
        arr -= lo
        arr /= hi - lo
    else:
        arr -= norm.get("mean", 0.0)
        arr /= norm.get("std", 1.0)
    return arr


def hounsfield(values: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """HU of normalised values (the inverse of :func:`normalise`, within its window)."""
    lo, hi = pre["window"]
    norm = pre["normalize"]
    if norm["mode"] == "minmax":
        return values * (hi - lo) + lo
    return values * norm.get("std", 1.0) + norm.get("mean", 0.0)


def background_value(pre: dict[str, Any]) -> float:
    """Normalised value of the window's low end: what air becomes, and the padding value."""
    lo = float(pre["window"][0])
    norm = pre["normalize"]
    if norm["mode"] == "minmax":
        return 0.0
    return (lo - norm.get("mean", 0.0)) / norm.get("std", 1.0)


def context_slices(pre: Mapping[str, Any]) -> int:
    """Neighbour slices fed on each side of an axial slice to a 2D network (0: the slice alone)."""
    return int(pre.get("context_slices", 0))


def with_context(arr: np.ndarray, zs: Sequence[int] | np.ndarray, context: int) -> np.ndarray:
    """(len(zs), 2 * context + 1, *rest) float32: for each z, slices z - context .. z + context of
    ``arr`` (z, *rest) as channels; the first and last slice stand in beyond the ends."""
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.asarray(zs)[:, None] + offsets, 0, arr.shape[0] - 1)
    return np.ascontiguousarray(arr[index], dtype=np.float32)


def body_box(arr: np.ndarray, background: float, margin: int = 8) -> tuple[slice, ...] | None:
    """Slices of the box around voxels brighter than ``background`` (+ ``margin``), or None."""
    return mask_box(arr > background + 1e-3, margin)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax over ``axis`` in float32 (numerically stable)."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def gaussian_weights(roi: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of a sliding window: a Gaussian centred on the window (sigma 1/8 of its
    size per axis), 1 at the centre and never 0 at the edges."""
    weights = np.ones((), dtype=np.float64)
    for r in roi:
        x = np.arange(r) - (r - 1) / 2
        weights = np.multiply.outer(weights, np.exp(-(x**2) / (2 * (sigma_scale * r) ** 2)))
    return np.maximum(weights / weights.max(), 1e-6).astype(np.float32)


def window_starts(n: int, roi: int, stride: int) -> list[int]:
    """Window origins covering ``n`` voxels (``n >= roi``) every ``stride``, the last flush."""
    count = math.ceil((n - roi) / stride) + 1 if n > roi else 1
    return [min(i * stride, n - roi) for i in range(count)]


# blended scores (N, C, *spatial) -> uint8 labels (N, *spatial) and lesion seeds or None
Decide = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


def sliding_window_labels(
    arr: np.ndarray,
    roi: tuple[int, ...],
    overlap: float,
    batch: int,
    predict: Callable[[np.ndarray], np.ndarray],
    fill: float,
    decide: Decide,
    progress: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 labels (and lesion seeds, see :meth:`Segmenter.decide`) of a (z, y, x) array from
    ``roi`` windows overlapping by ``overlap``, run ``batch`` at a time through ``predict``
    ((N, 1, *roi) -> (N, C, *roi) probabilities) and blended with :func:`gaussian_weights`; the
    blended scores are turned into labels by ``decide``. An axis shorter than its window is
    padded with ``fill``. Blended scores exist only for this (body-box) array, never the
    original grid."""
    shape = arr.shape
    pad = [(0, max(0, r - n)) for n, r in zip(shape, roi)]
    if any(after for _, after in pad):
        arr = np.pad(arr, pad, constant_values=fill)
    stride = [max(1, int(r * (1 - overlap))) for r in roi]
    windows = [
        tuple(slice(a, a + r) for a, r in zip(origin, roi))
        for origin in itertools.product(
            *(window_starts(n, r, s) for n, r, s in zip(arr.shape, roi, stride))
        )
    ]
    weight = gaussian_weights(roi)
    scores: np.ndarray | None = None
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        probs = predict(np.stack([arr[w] for w in group])[:, None])
        if scores is None:
            scores = np.zeros((probs.shape[1], *arr.shape), dtype=np.float32)
        for window, p in zip(group, probs):
            scores[(slice(None), *window)] += p * weight
        if progress:
            progress(min(1.0, (i + len(group)) / len(windows)))
    assert scores is not None
    labels = np.empty(shape, dtype=np.uint8)
    seeds: np.ndarray | None = None
    for z in range(0, shape[0], 16):  # argmax in slabs: its int64 result is 8 B a voxel
        top = min(shape[0], z + 16)
        slab, slab_seeds = decide(scores[None, :, z:top, : shape[1], : shape[2]])
        labels[z:top] = slab[0]
        if slab_seeds is not None:
            seeds = np.zeros(shape, dtype=bool) if seeds is None else seeds
            seeds[z:top] = slab_seeds[0]
    return labels, seeds


@dataclass
class Result:
    """Labels on the input grid plus what a report needs."""

    labels: sitk.Image
    volumes: list[dict[str, Any]]
    timings: dict[str, float]
    device: str
    precision: str
    warnings: list[str] = field(default_factory=list)
    backend: str = "torch"

    def report(self, package: ModelPackage, source: str = "") -> dict[str, Any]:
        return {
            "input": source,
            "model": {
                "name": package.name,
                "version": package.version,
                "task": package.card["task"],
                "path": str(package.path),
            },
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "grid": {
                "size": list(self.labels.GetSize()),
                "spacing_mm": list(self.labels.GetSpacing()),
            },
            "segments": self.volumes,
            "seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }


class Segmenter:
    """A loaded model ready to segment CT volumes: ``Segmenter(package)(image) -> Result``.

    ``backend`` picks the network runner (:mod:`.backends`): ``torch``, ``onnx`` (the package's
    ONNX graph in ONNX Runtime; torch is never imported) or ``auto`` (torch when installed).
    Everything but the network call is the same numpy/SimpleITK code for both."""

    def __init__(
        self,
        package: ModelPackage,
        device: str = "auto",
        tta: bool = False,
        backend: str = "auto",
        threads: int | None = None,
    ):
        self.package = package
        self.card = package.card
        self.tta = tta
        self.runner: NetworkRunner = make_runner(package, backend, device, threads)
        self.notes = list(self.runner.notes)
        offsets = package.card["inference"].get("logit_offsets")
        self.logit_offsets = None if offsets is None else np.asarray(offsets, np.float32)
        """Per-class numbers added to the logits before the argmax (the card's calibrated
        decision thresholds; None: plain argmax)."""
        seeds = package.card["inference"].get("seed_offsets")
        self.seed_offsets = None if seeds is None else np.asarray(seeds, np.float32)
        """Stricter per-class offsets for lesion seeds (None: no seed rule): a lesion component
        is kept only if one of its voxels is still that lesion with these offsets in place of
        ``logit_offsets`` (hysteresis: a confident core, then its extent)."""
        self.is_lesion = np.zeros(256, dtype=bool)
        self.is_lesion[[lab["value"] for lab in self.card["labels"] if "inside" in lab]] = True

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def description(self) -> str:
        """One line for the UI: the device and how the network runs on it."""
        return self.runner.description

    @property
    def backend(self) -> str:
        return self.runner.backend

    # -- stages ---------------------------------------------------------------------------------
    def decide(self, scores: np.ndarray, log_domain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 labels (argmax over axis 1 of :meth:`_scores`' output: logits when
        ``log_domain``, else probabilities) and, when the card has ``seed_offsets``, the lesion
        voxels that stay the same lesion with them (else None)."""
        labels = scores.argmax(1).astype(np.uint8)
        if self.seed_offsets is None:
            return labels, None
        seeds = self.is_lesion[labels]
        if seeds.any():  # decided again at the seed offsets: the (few) lesion voxels only
            delta = self.seed_offsets - (0.0 if self.logit_offsets is None else self.logit_offsets)
            lesion = np.moveaxis(scores, 1, -1)[seeds]  # (voxels, C)
            strict = (lesion + delta if log_domain else lesion * np.exp(delta)).argmax(1)
            seeds[seeds] = strict == labels[seeds]
        return labels, seeds

    def _scores(self, x: np.ndarray, probabilities: bool = False) -> np.ndarray:
        """(N, C, *spatial) scores whose argmax over C is the label: the logits of one pass, or
        softmax probabilities (averaged over the card's TTA flips when enabled); the card's
        ``logit_offsets`` are applied to either."""
        flips: list[tuple[int, ...]] = [()]
        if self.tta:
            axis_of = {"x": x.ndim - 1, "y": x.ndim - 2, "z": x.ndim - 3}
            default = [["x"], ["y"]] if x.ndim == 4 else [["x"], ["y"], ["z"]]
            flips += [
                tuple(axis_of[a] for a in f)
                for f in self.card["inference"].get("tta_flips", default)
            ]
        shift = None
        if self.logit_offsets is not None:
            shift = self.logit_offsets.reshape(-1, *([1] * (x.ndim - 2)))
        if len(flips) == 1 and not probabilities:
            logits = self.runner(x)
            return logits if shift is None else logits + shift
        total = None
        for dims in flips:
            xi = np.ascontiguousarray(np.flip(x, dims)) if dims else x
            p = softmax(self.runner(xi))
            p = np.flip(p, dims) if dims else p
            total = p if total is None else total + p
        mean = total / len(flips)  # argmax(log p + offset) = argmax(p * exp(offset)); blends too
        return mean if shift is None else mean * np.exp(shift)

    def infer(self, arr: np.ndarray, progress: StageProgress | None = None) -> np.ndarray:
        """uint8 labels (z, y, x) on the model grid for a normalised (z, y, x) array."""
        return self.infer_with_seeds(arr, progress)[0]

    def infer_with_seeds(
        self, arr: np.ndarray, progress: StageProgress | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels as :meth:`infer` and the lesion seeds of :meth:`decide` (None without
        ``seed_offsets``), for :meth:`postprocess`.

        Only the box around the body (voxels above the window's low end, plus a margin) is
        run through the network; the air around it is background. On a 400 mm field of view
        this skips about 40% of the pixels."""
        out = np.zeros(arr.shape, dtype=np.uint8)
        seeds = None if self.seed_offsets is None else np.zeros(arr.shape, dtype=bool)
        box = body_box(arr, background_value(self.card["preprocessing"]))
        if box is None:
            return out, seeds
        run = self._infer_2d if self.package.spatial_dims == 2 else self._infer_3d
        out[box], box_seeds = run(np.ascontiguousarray(arr[box], dtype=np.float32), progress)
        if seeds is not None:
            seeds[box] = box_seeds
        return out, seeds

    def _infer_2d(
        self, arr: np.ndarray, progress: StageProgress | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        z, h, w = arr.shape
        m = self.runner.size_divisible
        ph, pw = (-h) % m, (-w) % m
        batch = int(self.card["inference"].get("slice_batch", 16))
        out = np.empty((z, h, w), dtype=np.uint8)
        seeds = None if self.seed_offsets is None else np.empty((z, h, w), dtype=bool)
        fill = background_value(self.card["preprocessing"])
        context = context_slices(self.card["preprocessing"])
        for start in range(0, z, batch):
            chunk = with_context(arr, range(start, min(z, start + batch)), context)
            if ph or pw:
                chunk = np.pad(chunk, ((0, 0), (0, 0), (0, ph), (0, pw)), constant_values=fill)
            labels, chunk_seeds = self.decide(self._scores(chunk)[..., :h, :w], not self.tta)
            out[start : start + batch] = labels
            if seeds is not None:
                seeds[start : start + batch] = chunk_seeds
            if progress:
                progress("infer", min(z, start + batch) / z)
        return out, seeds

    def _infer_3d(
        self, arr: np.ndarray, progress: StageProgress | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.card["inference"]
        return sliding_window_labels(
            arr,
            tuple(reversed(cfg["roi_size"])),  # card (x, y, z) -> array (z, y, x)
            float(cfg.get("overlap", 0.25)),
            int(cfg.get("sw_batch_size", 1)),
            lambda x: self._scores(x, probabilities=True),
            background_value(self.card["preprocessing"]),
            lambda scores: self.decide(scores, log_domain=False),
            (lambda f: progress("infer", f)) if progress else None,
        )

    def postprocess(
        self,
        labels: np.ndarray,
        voxel_ml: float,
        seeds: np.ndarray | None = None,
        image: np.ndarray | None = None,
    ) -> np.ndarray:
        """Apply the card's rules in place: organs keep their largest components, lesions stay
        inside/touching their organ, lesion islands below ``min_island_ml`` join the organ, and
        so do lesion components without a seed voxel (when ``seeds`` are given) and, with
        ``cyst_max_hu``, those of water density in ``image`` (the normalised model-grid array)."""
        rules = self.card["postprocessing"]
        box = mask_box(labels != 0)  # every rule acts on labelled voxels only
        if not rules.get("enabled", True) or box is None:
            return labels
        # views: edits land in ``labels``
        self._apply_rules(
            labels[box],
            rules,
            voxel_ml,
            None if seeds is None else seeds[box],
            None if image is None else image[box],
        )
        return labels

    def _apply_rules(
        self,
        labels: np.ndarray,
        rules: dict[str, Any],
        voxel_ml: float,
        seeds: np.ndarray | None = None,
        image: np.ndarray | None = None,
    ) -> None:
        min_voxels = round(rules.get("min_island_ml", 0.0) / voxel_ml)
        cyst_max_hu = rules.get("cyst_max_hu") if image is not None else None
        for organ in (lab for lab in self.card["labels"] if "keep_largest" in lab):
            value = organ["value"]
            lesions = [lab["value"] for lab in self.card["labels"] if lab.get("inside") == value]
            union = np.isin(labels, [value, *lesions])
            cc = _components(union)  # numbered by decreasing size
            components = sitk.GetArrayViewFromImage(cc)
            votes = np.bincount(components[labels == value], minlength=int(components.max()) + 1)
            keep = np.zeros(len(votes), dtype=bool)
            keep[np.flatnonzero(votes[1:])[: organ["keep_largest"]] + 1] = True
            labels[union & ~keep[components]] = 0
            del union, components, cc
            for lesion in lesions:
                mask = labels == lesion
                kept = _components(mask, min_voxels)  # the view below borrows its memory
                numbers = sitk.GetArrayViewFromImage(kept)
                keep = np.ones(int(numbers.max()) + 1, dtype=bool)  # component number -> kept
                if seeds is not None:  # only components with a confident voxel stay lesion
                    keep[:] = False
                    keep[numbers[seeds & mask]] = True
                keep[0] = False  # below min_island_ml
                if cyst_max_hu is not None:  # water density: a simple cyst, not a tumour
                    ids, values = numbers[mask], image[mask]
                    for k in np.flatnonzero(keep):
                        median = np.median(values[ids == k])
                        keep[k] = hounsfield(median, self.card["preprocessing"]) > cyst_max_hu
                labels[mask & ~keep[numbers]] = value
                del numbers, kept

    # -- whole run ------------------------------------------------------------------------------
    def __call__(
        self, image: sitk.Image, where: str = "input image", progress: StageProgress | None = None
    ) -> Result:
        timings: dict[str, float] = {}
        warnings = [*self.notes, *check_image(image, where)]

        def report(stage: str, fraction: float) -> None:
            if progress:
                within(progress, *SEGMENT_SPANS[stage])(stage, fraction)

        t = time.perf_counter()
        report("preprocess", 0.0)
        pre = self.card["preprocessing"]
        grid = model_grid(image, pre, where)
        arr = normalise(image, grid, pre)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        labels, seeds = self.infer_with_seeds(arr, report)
        if "cyst_max_hu" not in self.card["postprocessing"]:
            arr = None  # freed: only the cyst rule reads the image after inference
        timings["infer"] = time.perf_counter() - t

        t = time.perf_counter()
        report("postprocess", 0.0)
        labels = self.postprocess(labels, math.prod(grid.spacing) / 1000.0, seeds, arr)
        del seeds, arr
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        report("resample", 0.0)
        out = resample_labels(labels, grid, Grid.of(image))
        timings["resample"] = time.perf_counter() - t
        report("resample", 1.0)
        return Result(
            out,
            segment_volumes(out, self.card["labels"]),
            timings,
            self.device,
            self.precision,
            warnings,
            self.backend,
        )


def _components(mask: np.ndarray, min_voxels: int = 0) -> sitk.Image:
    """26-connected components of a boolean (z, y, x) mask, numbered 1.. by decreasing size;
    components smaller than ``min_voxels`` are dropped (0)."""
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)), True)
    return sitk.RelabelComponent(cc, min_voxels, True)


def segment_volumes(labels: sitk.Image, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Voxel count and volume (mL) of each labelled segment on the labelmap's own grid."""
    counts = label_counts(labels)
    voxel_ml = math.prod(labels.GetSpacing()) / 1000.0
    return [
        {
            "value": e["value"],
            "name": e["name"],
            "voxels": int(counts[e["value"]]),
            "volume_ml": round(float(counts[e["value"]]) * voxel_ml, 3),
        }
        for e in entries
    ]
