"""Pipeline stages: grids, voxel-exact geometry round trips, inference paths, postprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from HLFDSegmentLib.backends import TorchRunner
from HLFDSegmentLib.devices import CPU_BF16_ENV, autocast_dtype, cpu_has_fast_bf16, select_device
from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.pipeline import (
    Grid,
    Segmenter,
    body_box,
    oriented_grid,
    resample_labels,
    respaced_grid,
    segment_volumes,
    softmax,
    with_context,
)

from conftest import block_ct, build_package, make_image, oblique_direction


class ThresholdNet(torch.nn.Module):
    """A fixed 1x1 convolution whose argmax is a pure intensity threshold (0 / 1 / 2 at
    normalised 0.3 and 0.6): any voxel moved by a geometry bug changes the answer."""

    size_divisible = 1

    def __init__(self, spatial_dims: int):
        super().__init__()
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        self.conv = conv(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0, 3.0]).view(3, 1, *[1] * spatial_dims))
            self.conv.bias.copy_(torch.tensor([0.3, 0.0, -1.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NextSliceNet(ThresholdNet):
    """ThresholdNet of the third of three input channels: with context_slices = 1 the label of
    slice z is the threshold of slice z + 1."""

    def __init__(self):
        super().__init__(2)
        weight = self.conv.weight.detach()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 2:] = weight
            self.conv.bias.copy_(torch.tensor([0.3, 0.0, -1.2]))


def expected_threshold(arr: np.ndarray) -> np.ndarray:
    x = (np.clip(arr.astype(np.float32), -200, 300) + 200) / 500
    return np.where(x > 0.6, 2, np.where(x > 0.3, 1, 0)).astype(np.uint8)


def threshold_segmenter(
    tmp_path,
    spatial_dims: int,
    orientation: str,
    tta=False,
    offsets=None,
    seed_offsets=None,
    postprocessing=None,
) -> Segmenter:
    arch = "tiny_unet2d" if spatial_dims == 2 else "monai_unet3d"
    kwargs = {"base": 4} if spatial_dims == 2 else {"channels": [4, 8, 16], "strides": [2, 2]}
    inference = {"roi_size": [16, 16, 8]} if spatial_dims == 3 else {}
    if offsets is not None:
        inference["logit_offsets"] = offsets
    if seed_offsets is not None:
        inference["seed_offsets"] = seed_offsets
    pkg = build_package(
        tmp_path / "pkg",
        arch,
        spatial_dims,
        network_kwargs=kwargs,
        preprocessing={"orientation": orientation, "spacing": [None, None, None]},
        postprocessing=postprocessing or {"enabled": False},
        inference=inference,
    )
    package = load_package(pkg)
    seg = Segmenter(package, device="cpu", tta=tta, backend="torch")
    seg.runner = TorchRunner(package, "cpu", net=ThresholdNet(spatial_dims))
    return seg


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SLP"])
@pytest.mark.parametrize("flip_x", [True, False])
def test_oriented_grid_addresses_the_same_points(orientation, flip_x):
    image = make_image(block_ct(), direction=oblique_direction(25, flip_x))
    grid = Grid.of(image)
    new = oriented_grid(grid, orientation)
    assert sorted(new.size) == sorted(grid.size)
    back = new.resample(image, sitk.sitkNearestNeighbor, sitk.sitkInt16)
    # same voxels, only permuted/flipped: the set of values and every physical point agree
    corner = (0, 0, 0)
    far = tuple(n - 1 for n in new.size)
    for idx in (corner, far):
        p = back.TransformIndexToPhysicalPoint(idx)
        assert image.GetPixel(image.TransformPhysicalPointToIndex(p)) == back.GetPixel(idx)
    assert np.array_equal(
        np.sort(sitk.GetArrayViewFromImage(back), axis=None),
        np.sort(sitk.GetArrayViewFromImage(image), axis=None),
    )


def test_respaced_grid_keeps_extent():
    grid = Grid((100, 80, 10), (0.75, 0.75, 5.0), (1.0, 2.0, 3.0), oblique_direction())
    new = respaced_grid(grid, [1.5, 1.5, None])
    assert new.size == (50, 40, 10)
    assert new.spacing == (1.5, 1.5, 5.0)
    d = np.asarray(grid.direction).reshape(3, 3)
    edge_old = np.asarray(grid.origin) - d @ (np.asarray(grid.spacing) / 2)
    edge_new = np.asarray(new.origin) - d @ (np.asarray(new.spacing) / 2)
    assert np.allclose(edge_old, edge_new)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_labels_land_voxel_exactly_on_oblique_anisotropic_input(
    tmp_path, spatial_dims, orientation
):
    arr = block_ct()
    image = make_image(arr, spacing=(0.7, 0.9, 2.5), direction=oblique_direction(20, True))
    result = threshold_segmenter(tmp_path, spatial_dims, orientation)(image)
    out = result.labels
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), expected_threshold(arr))


def test_tta_of_a_pointwise_net_changes_nothing(tmp_path):
    arr = block_ct()
    image = make_image(arr)
    plain = threshold_segmenter(tmp_path / "a", 2, "LPS")(image)
    tta = threshold_segmenter(tmp_path / "b", 2, "LPS", tta=True)(image)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(tta.labels), sitk.GetArrayViewFromImage(plain.labels)
    )


@pytest.mark.parametrize(("dims", "tta"), [(2, False), (2, True), (3, False)])
def test_card_logit_offsets_move_the_tumour_threshold(tmp_path, dims, tta):
    """A tumour offset of -0.2 moves ThresholdNet's label-2 threshold from 0.6 to 0.7 (x =
    normalised HU), in one pass, with TTA (probabilities) and in the 3D sliding window."""
    arr = block_ct((6, 24, 20))
    arr[:, 4:20, 3:9] = 125  # x = 0.65: tumour without offsets, organ with them
    arr[:, 4:20, 12:17] = 200  # x = 0.8: tumour either way
    image = make_image(arr)
    result = threshold_segmenter(tmp_path, dims, "LPS", tta, offsets=[0.0, 0.0, -0.2])(image)
    x = (np.clip(arr.astype(np.float32), -200, 300) + 200) / 500
    expected = np.where(x > 0.7, 2, np.where(x > 0.3, 1, 0))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.labels), expected)
    assert not np.array_equal(expected, expected_threshold(arr))  # the offset mattered


@pytest.mark.parametrize(("dims", "tta"), [(2, False), (2, True), (3, False)])
def test_lesion_components_without_a_seed_join_their_organ(tmp_path, dims, tta):
    """Hysteresis: with seed offset -0.2 a tumour voxel (x > 0.6) is a seed where x > 0.7. A
    tumour component holding a seed keeps its whole extent, faint rim included; one without
    (x = 0.65 throughout) becomes organ. In one pass, with TTA and in the 3D window."""
    arr = np.full((6, 24, 24), -1000, dtype=np.int16)
    arr[:, 2:22, 2:22] = 0  # organ: x = 0.4
    arr[1:5, 4:9, 4:9] = 125  # faint lesion, no seed: x = 0.65
    arr[1:5, 12:20, 12:20] = 125  # the same faint tissue ...
    arr[2:4, 15:17, 15:17] = 200  # ... around a confident core (x = 0.8)
    image = make_image(arr)
    rules = {"enabled": True, "min_island_ml": 0.0}
    result = threshold_segmenter(
        tmp_path, dims, "LPS", tta, seed_offsets=[0.0, 0.0, -0.2], postprocessing=rules
    )(image)
    labels = sitk.GetArrayViewFromImage(result.labels)
    assert (labels[1:5, 4:9, 4:9] == 1).all()  # joined the organ
    assert (labels[1:5, 12:20, 12:20] == 2).all()  # kept whole: core and rim
    without = threshold_segmenter(tmp_path / "no-seeds", dims, "LPS", tta, postprocessing=rules)
    assert (sitk.GetArrayViewFromImage(without(image).labels)[1:5, 4:9, 4:9] == 2).all()


def test_volume_smaller_than_the_3d_patch_is_padded(tmp_path):
    arr = block_ct((4, 10, 9))
    arr[1:3, 3:7, 2:6] = 250
    image = make_image(arr)
    result = threshold_segmenter(tmp_path, 3, "LPS")(image)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(result.labels), expected_threshold(arr)
    )


def test_real_network_runs_with_resampling_and_reports(tiny_package, ct_image):
    seg = Segmenter(load_package(tiny_package), device="cpu")
    stages = []
    result = seg(ct_image, progress=lambda stage, f: stages.append((stage, f)))
    assert result.labels.GetSize() == ct_image.GetSize()
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, 1, 2}
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {s for s, _ in stages} == {"preprocess", "infer", "postprocess", "resample"}
    report = result.report(seg.package, "x.nii.gz")
    assert [s["name"] for s in report["segments"]] == ["Kidney", "Kidney tumor"]
    assert set(report["seconds"]) == {"preprocess", "infer", "postprocess", "resample"}


def test_postprocess_keeps_two_kidneys_and_lesions_inside(tiny_package):
    seg = Segmenter(load_package(tiny_package), device="cpu")
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[2:12, 5:15, 5:15] = 1  # left kidney, 1000 voxels
    labels[5:8, 8:11, 8:11] = 2  # tumour inside it
    labels[2:12, 5:15, 25:35] = 1  # right kidney
    labels[10:14, 10:14, 14:16] = 2  # tumour bulging out of the left kidney: kept (touches)
    labels[15:18, 30:33, 2:5] = 1  # small third organ blob: removed
    labels[15:19, 20:24, 20:24] = 2  # lesion far from any kidney: removed
    labels[7, 8, 28] = 2  # one-voxel lesion island inside the right kidney: becomes kidney
    voxel_ml = 1.0 / 1000  # 1 mm^3 voxels; min_island_ml 0.1 -> 100 voxels
    out = seg.postprocess(labels.copy(), voxel_ml)
    assert out[16, 31, 3] == 0
    assert out[17, 22, 22] == 0
    assert out[6, 9, 9] == 1  # 27-voxel tumour < 100 voxels joins the kidney
    assert out[7, 8, 28] == 1
    assert (out[2:12, 5:15, 25:35] == 1).all()
    assert np.count_nonzero(out == 1) >= 2000
    big = labels.copy()
    big[1:15, 20:38, 8:30] = 0
    big[2:14, 15:30, 8:22] = 2  # 2520-voxel tumour touching the left kidney: kept
    big[2:12, 5:15, 5:15] = 1
    kept = seg.postprocess(big.copy(), voxel_ml)
    assert (kept[2:14, 15:30, 8:22] == 2).all()


def test_cyst_rule_turns_water_density_lesions_into_organ(tiny_package, ct_image):
    """``cyst_max_hu``: a lesion component whose median HU (in the image the network read) is
    water, as a simple cyst's (-9..20 HU, Bosniak 2019), joins its organ; an enhancing one stays;
    the rule needs the image, and the whole pipeline hands it over."""
    from HLFDSegmentLib.pipeline import hounsfield

    seg = Segmenter(load_package(tiny_package), device="cpu")
    pre = seg.card["preprocessing"]
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[2:16, 5:35, 5:35] = 1  # kidney
    labels[4:10, 8:16, 8:16] = 2  # cyst: 8 HU
    labels[4:10, 20:30, 20:30] = 2  # tumour: 60 HU
    hu = np.full(labels.shape, 150.0, np.float32)
    hu[4:10, 8:16, 8:16] = 8.0
    hu[4:10, 20:30, 20:30] = 60.0
    lo, hi = pre["window"]
    image = (hu - lo) / (hi - lo)  # as ``normalise`` makes it (minmax)
    np.testing.assert_allclose(hounsfield(image, pre), hu, atol=1e-3)
    seg.card["postprocessing"]["cyst_max_hu"] = 20.0
    out = seg.postprocess(labels.copy(), 1e-3, image=image)
    assert (out[4:10, 8:16, 8:16] == 1).all() and (out[4:10, 20:30, 20:30] == 2).all()
    assert np.array_equal(seg.postprocess(labels.copy(), 1e-3), labels)  # no image: no rule
    # end to end: every lesion is "water" below 3071 HU, none below -1024
    seg.card["postprocessing"]["cyst_max_hu"] = 3071.0
    assert 2 not in sitk.GetArrayFromImage(seg(ct_image).labels)
    seg.card["postprocessing"]["cyst_max_hu"] = -1024.0
    strict = sitk.GetArrayFromImage(seg(ct_image).labels)
    del seg.card["postprocessing"]["cyst_max_hu"]
    plain = sitk.GetArrayFromImage(seg(ct_image).labels)
    assert np.array_equal(strict, plain) and 2 in plain


def test_postprocess_in_the_label_box_equals_the_whole_volume(tiny_package):
    """The rules run on the box around the labels: the same result as on the whole grid
    (the box's view carries the edits back), blobs at the grid's edges included."""
    seg = Segmenter(load_package(tiny_package), device="cpu")
    rng = np.random.default_rng(3)
    for _ in range(4):
        labels = np.zeros((24, 48, 48), dtype=np.uint8)
        for _ in range(6):
            z, y, x = rng.integers(0, [22, 44, 44])
            labels[z : z + rng.integers(1, 6), y : y + rng.integers(1, 12), x : x + 8] = (
                rng.integers(1, 3)
            )
        whole = labels.copy()
        seg._apply_rules(whole, seg.card["postprocessing"], 1e-4)
        assert np.array_equal(seg.postprocess(labels.copy(), 1e-4), whole)
    empty = np.zeros((4, 8, 8), np.uint8)
    assert not seg.postprocess(empty, 1.0).any()


@pytest.mark.parametrize("direction", ["identity", "flipped", "permuted", "oblique"])
def test_label_resampling_in_the_box_equals_the_whole_volume(direction):
    """Nearest-neighbour labels onto the input grid: resampling only the box around the
    labels gives the voxels of a whole-volume resampling, for any input direction."""
    directions = {
        "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
        "flipped": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
        "permuted": (0, 1, 0, 0, 0, -1, 1, 0, 0),
        "oblique": oblique_direction(23.0),
    }
    target = Grid((61, 53, 29), (0.8, 0.7, 2.5), (-20.0, 15.0, 7.0), directions[direction])
    grid = respaced_grid(oriented_grid(target, "LPS"), (1.5, 1.5, None))
    labels = np.zeros(grid.size[::-1], dtype=np.uint8)
    labels[3:9, 5:14, 2:20] = 1
    labels[5:7, 8:10, 4:9] = 2
    labels[-2:, -3:, -4:] = 1  # at the grid's far corner
    model = sitk.GetImageFromArray(labels)
    model.SetSpacing(grid.spacing)
    model.SetOrigin(grid.origin)
    model.SetDirection(grid.direction)
    whole = target.resample(model, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    boxed = resample_labels(labels, grid, target)
    a, b = sitk.GetArrayViewFromImage(boxed), sitk.GetArrayViewFromImage(whole)
    assert b.any()
    # the only voxels allowed to differ: centres exactly halfway between two model voxels,
    # which floating-point rounding may give to either (the oblique grid has some)
    for z, y, x in np.argwhere(a != b):
        point = whole.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        index = np.asarray(model.TransformPhysicalPointToContinuousIndex(point))
        assert np.any(np.abs(index - np.floor(index) - 0.5) < 1e-6), (z, y, x, index)
    if direction != "oblique":
        assert np.array_equal(a, b)
    assert boxed.GetDirection() == whole.GetDirection() and boxed.GetOrigin() == whole.GetOrigin()
    empty = resample_labels(np.zeros_like(labels), grid, target)
    assert empty.GetSize() == target.size and not sitk.GetArrayViewFromImage(empty).any()


def test_segment_volumes_in_ml():
    labels = sitk.GetImageFromArray(np.pad(np.ones((10, 10, 10), np.uint8), 2))
    labels.SetSpacing((0.5, 0.5, 2.0))
    vols = segment_volumes(labels, [{"value": 1, "name": "Kidney"}, {"value": 2, "name": "T"}])
    assert vols[0] == {"value": 1, "name": "Kidney", "voxels": 1000, "volume_ml": 0.5}
    assert vols[1]["voxels"] == 0


def test_device_selection_falls_back_with_a_note():
    assert select_device("cpu") == (torch.device("cpu"), None)
    if not torch.cuda.is_available():
        device, note = select_device("cuda")
        assert device.type == "cpu" and "no CUDA GPU" in note
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        select_device("tpu")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_autocast_dtype_on_cpu(monkeypatch, forced):
    """One precision rule for runtime (``auto``, card's ``bf16_cpu``) and training (config
    ``train.amp``): on a CPU, bf16 only where asked or native and allowed."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert autocast_dtype(cpu) is (bf16 if forced == "1" else None)
    assert autocast_dtype(cpu, cpu_bf16=False) is None
    assert autocast_dtype(cpu, "bf16") is bf16
    assert autocast_dtype(cpu, "off") is None and autocast_dtype(cpu, "fp16") is None


def test_body_box_limits_inference_to_the_body():
    arr = np.zeros((10, 60, 50), np.float32)
    arr[2:5, 20:30, 10:12] = 0.5
    assert body_box(arr, 0.0, margin=3) == (slice(0, 8), slice(17, 33), slice(7, 15))
    assert body_box(np.zeros((4, 4, 4), np.float32), 0.0) is None
    assert body_box(arr, 0.6) is None  # nothing above the background value


@pytest.mark.parametrize("forced", ["0", "1"])
def test_cpu_precision_path_follows_the_setting(monkeypatch, tiny_package, forced):
    """HLFD_CPU_BF16 decides the CPU path whatever the CPU flags (tests pin it to float32)."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert cpu_has_fast_bf16() is (forced == "1")
    segmenter = Segmenter(load_package(tiny_package), device="cpu")
    assert segmenter.precision == ("bfloat16" if forced == "1" else "float32")


def test_bf16_path_agrees_with_float32(monkeypatch, tmp_path):
    """The bf16 CPU path gives the float32 labels up to near-ties: probabilities within bf16's
    resolution (8 mantissa bits, a few layers deep) and >= 98% of voxels identical."""
    package = load_package(build_package(tmp_path / "m", "mobilenetv2_unet2d", seed=3))
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1, (4, 64, 64)).astype(np.float32)
    probs, labels = {}, {}
    for forced in ("0", "1"):
        monkeypatch.setenv(CPU_BF16_ENV, forced)
        seg = Segmenter(package, device="cpu", backend="torch")
        probs[forced] = softmax(seg.runner(arr[:, None]))
        labels[forced] = seg.infer(arr)
    assert probs["0"].dtype == probs["1"].dtype == np.float32
    assert np.abs(probs["1"] - probs["0"]).max() < 0.05
    assert (labels["1"] == labels["0"]).mean() >= 0.98


def test_with_context_stacks_neighbours_and_repeats_the_end_slices():
    arr = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), dtype=np.float32)
    stack = with_context(arr, [0, 2, 3], 1)
    assert stack.shape == (3, 3, 2, 3) and stack.dtype == np.float32
    np.testing.assert_array_equal(stack[:, :, 0, 0], [[0, 0, 1], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(with_context(arr, [1], 0), arr[1:2][None])
    np.testing.assert_array_equal(with_context(arr, [0], 2)[0, :, 0, 0], [0, 0, 0, 1, 2])


def test_context_slices_feed_the_neighbours_in_order(tmp_path):
    """A 2.5D card (context_slices 1) gets slices z-1, z, z+1 as channels, across slice
    batches, the last slice standing in for the one after it."""
    arr = block_ct((7, 24, 20))  # the bright block of slices 1-3 makes the shift visible
    pkg = build_package(
        tmp_path / "pkg",
        network_kwargs={"base": 4},
        preprocessing={"spacing": [None, None, None], "context_slices": 1},
        postprocessing={"enabled": False},
        inference={"slice_batch": 3},
    )
    package = load_package(pkg)
    assert package.card["network"]["in_channels"] == 3
    seg = Segmenter(package, device="cpu", backend="torch")
    seg.runner = TorchRunner(package, "cpu", net=NextSliceNet())
    labels = sitk.GetArrayFromImage(seg(make_image(arr)).labels)
    nxt = np.minimum(np.arange(7) + 1, 6)
    np.testing.assert_array_equal(labels, expected_threshold(arr[nxt]))
    assert not np.array_equal(labels, expected_threshold(arr))
