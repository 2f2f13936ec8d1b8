"""Shared fixtures: small real images with oblique geometry and small real model packages."""

from __future__ import annotations

import os

# One intra-op thread in the test process and the subprocesses it starts (read when torch is
# imported, so set before it is): the suite's tensors are tiny, and OpenMP threads spinning on
# a busy 2-core machine cost far more than they give (the GPU-preset toy benchmark: 180 s with
# 2 threads, 52 s with 1, at load 4). Always one, whatever the shell says: tests compare
# weights trained here with weights trained in a subprocess of one thread (kill/resume, the
# benchmark's pool), bit for bit. A test that needs more threads sets them itself.
os.environ["OMP_NUM_THREADS"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HLFDSegmentLib.devices import CPU_BF16_ENV
from HLFDSegmentLib.modelpackage import make_card, save_package

# Pin the float32 CPU path for the whole suite (and the subprocesses it starts): results must not
# depend on whether this machine's CPU has native bf16. test_pipeline tests the bf16 path itself.
os.environ[CPU_BF16_ENV] = "0"


def oblique_direction(degrees: float = 20.0, flip_x: bool = True) -> tuple[float, ...]:
    """A rotation about z (and a flipped x axis): a non-axis-aligned, non-identity direction."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if flip_x:
        rot[:, 0] *= -1
    return tuple(rot.ravel())


def make_image(
    array: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-30.0, 12.5, 101.0), direction=None
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or oblique_direction())
    return image


def block_ct(shape=(12, 40, 36), seed: int = 0) -> np.ndarray:
    """int16 (z, y, x) volume of air, fat, tissue and bright blocks, no value near a threshold."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, dtype=np.int16)
    z, y, x = shape
    arr[:, 4 : y - 4, 3 : x - 3] = -100
    arr[2 : z - 2, 8 : y - 10, 6 : x // 2] = 0
    arr[3 : z - 3, 12 : y - 14, 8 : x // 2 - 3] = 250
    arr[1:4, y // 2 :, x // 2 : x - 5] = 250
    arr += rng.integers(-5, 6, size=shape, dtype=np.int16)
    return arr


@pytest.fixture
def ct_image() -> sitk.Image:
    return make_image(block_ct())


def build_package(
    out: Path, architecture: str = "tiny_unet2d", spatial_dims: int = 2, seed: int = 0, **card
) -> Path:
    """A real package: a zoo network with seeded random weights and a card for the kidney task."""
    import torch  # here, not at the top: pytest-xdist's controller then starts without it

    from HLFDSegmentLib.nets import build_network

    kwargs = card.pop("network_kwargs", {"base": 4} if architecture == "tiny_unet2d" else {})
    torch.manual_seed(seed)
    channels = 2 * card.get("preprocessing", {}).get("context_slices", 0) + 1
    net = build_network(architecture, spatial_dims, channels, 3, **kwargs)
    card = make_card(
        name="test-model",
        version="0.0.1",
        task="kidney",
        architecture=architecture,
        spatial_dims=spatial_dims,
        network_kwargs=kwargs,
        **card,
    )
    return save_package(out, card, net.state_dict())


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Path:
    return build_package(tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture(scope="session")
def onnx_package(tmp_path_factory) -> Path:
    """``tiny_package``'s network with its ONNX graph: on the CPU the worker then runs ONNX
    Runtime, as Slicer's CPU path does, and never imports torch (0.5 s a process, not 2.5 s).
    For the tests of worker processes whose subject is not the torch backend."""
    from hlfd_train.export import add_onnx

    return add_onnx(build_package(tmp_path_factory.mktemp("pkg") / "tiny-onnx"))
