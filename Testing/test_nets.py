"""The network zoo: every architecture builds, runs, exposes working taps and reports its cost."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from HLFDSegmentLib.nets import (
    ARCHITECTURES,
    TAP_NAMES,
    UnknownArchitectureError,
    build_network,
    count_macs,
    count_parameters,
    fold_batchnorm,
    tap_paths,
)

EXPECTED = {
    "unetpp2d",
    "resnet18_unet2d",
    "mobilenetv2_unet2d",
    "tiny_unet2d",
    "monai_unet3d",
    "monai_segresnet3d",
    "monai_dynunet3d",
}

# architecture -> (kwargs, input shape) for the cheap functional tests.
CASES = {
    "unetpp2d": ({}, (2, 1, 64, 64)),
    "resnet18_unet2d": ({}, (2, 1, 64, 64)),
    "mobilenetv2_unet2d": ({}, (2, 1, 64, 64)),
    "tiny_unet2d": ({"base": 8}, (2, 1, 64, 64)),
    "monai_unet3d": ({}, (1, 1, 32, 32, 32)),
    "monai_segresnet3d": ({"init_filters": 8}, (1, 1, 32, 32, 32)),
    # Default DynUNet needs >= 64 voxels a side (InstanceNorm at a 1-voxel bottleneck fails).
    "monai_dynunet3d": ({"filters": (4, 8, 8, 16, 16, 16)}, (1, 1, 64, 64, 64)),
}
# the networks whose tests take a second or more here (real-size 2D, 3D at 64³): ``slow``
BIG = {"unetpp2d", "monai_segresnet3d", "monai_dynunet3d"}
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in sorted(EXPECTED)]


def _build(name: str, **extra) -> nn.Module:
    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    return build_network(name, len(shape) - 2, 1, 3, **{**kwargs, **extra})


def _capture(net: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, path in tap_paths(net).items():
        module = net.get_submodule(path)

        def hook(_m, _i, out, name=name):
            seen.setdefault(name, []).append(out)

        handles.append(module.register_forward_hook(hook))
    return seen, handles


def test_registry_has_every_architecture():
    assert set(ARCHITECTURES) == EXPECTED
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
        assert spec.spatial_dims[0] == (3 if name.endswith("3d") else 2)


@pytest.mark.parametrize("name", NAMES)
def test_forward_taps_and_gradients(name):
    net = _build(name)
    shape = CASES[name][1]
    x = torch.randn(shape)
    seen, handles = _capture(net)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:])
    assert set(net.taps) <= set(TAP_NAMES) and "out" in net.taps
    for tap, outs in seen.items():
        assert len(outs) == 1, f"{tap} fired {len(outs)} times"
        assert isinstance(outs[0], torch.Tensor) and outs[0].dim() == len(shape), tap
        assert outs[0].shape[0] == shape[0], tap
    assert torch.equal(seen["out"][0], y)

    size = {t: seen[t][0].shape[2:].numel() for t in seen}
    enc = [size[f"e{k}"] for k in range(1, 6) if f"e{k}" in size]
    dec = [size[f"d{k}"] for k in range(5, 1, -1) if f"d{k}" in size]
    assert len(enc) >= 4 and len(dec) >= 3
    assert all(a >= b for a, b in itertools.pairwise(enc)) and enc[0] > enc[-1]
    assert all(a < b for a, b in itertools.pairwise(dec))
    for k in range(2, 6):  # d_k lies at e_{k-1}'s scale
        if f"d{k}" in seen and f"e{k - 1}" in seen:
            assert seen[f"d{k}"][0].shape[2:] == seen[f"e{k - 1}"][0].shape[2:], k

    for h in handles:
        h.remove()
    y.float().square().mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_non_square_multiples_of_size_divisible(name):
    net = _build(name).eval()
    d = net.size_divisible
    assert isinstance(d, int) and d >= 1
    # 3D: keep >= 2 voxels at the deepest level (InstanceNorm needs them).
    spatial = (3 * d, 2 * d) if len(CASES[name][1]) == 4 else (2 * d, 3 * d, 2 * d)
    with torch.no_grad():
        y = net(torch.randn(1, 1, *spatial))
    assert y.shape == (1, 3, *spatial)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_through_safetensors(name):
    net = _build(name)
    state = net.state_dict()
    blob = st_save({k: v.contiguous() for k, v in state.items()})  # refuses shared tensors
    fresh = _build(name)
    fresh.load_state_dict(st_load(blob), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.slow
def test_default_dynunet_and_monai_weights_load():
    from monai.networks.nets import DynUNet

    net = build_network("monai_dynunet3d", 3, 1, 2).eval()
    assert not any(k.startswith("skip_layers") for k in net.state_dict())
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)
    plain = DynUNet(3, 1, 2, [3] * 6, [1, 2, 2, 2, 2, 2], [2] * 5)
    assert any(k.startswith("skip_layers") for k in plain.state_dict())
    net.load_state_dict(plain.state_dict(), strict=True)
    w = "downsamples.0.conv1.conv.weight"
    assert torch.equal(net.state_dict()[w], plain.state_dict()[w])


def test_monai_nets_accept_two_dims_and_default_to_three():
    net = build_network("monai_unet3d", 2, 1, 2)
    assert net(torch.randn(2, 1, 32, 48)).shape == (2, 2, 32, 48)
    seg = build_network("monai_segresnet3d", 2, 1, 2, init_filters=8)
    assert seg(torch.randn(1, 1, 16, 24)).shape == (1, 2, 16, 24)
    assert build_network("monai_unet3d", None, 1, 2).dimensions == 3


def test_mobilenet_student_has_no_full_resolution_conv():
    net = build_network("mobilenetv2_unet2d", 2, 1, 2).eval()
    sizes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: sizes.append(o.shape[2:]))
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    for h in hooks:
        h.remove()
    assert sizes and max(s.numel() for s in sizes) <= 32 * 32


def test_costs_rank_student_below_teacher():
    macs = {n: count_macs(build_network(n, 2, 1, 2), (1, 1, 64, 64)) for n in CASES if "2d" in n}
    assert macs["mobilenetv2_unet2d"] * 5 < macs["resnet18_unet2d"] < macs["unetpp2d"]


def test_unknown_architecture():
    with pytest.raises(UnknownArchitectureError) as info:
        build_network("unet9000", 2, 1, 2)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "unet9000" in msg and all(n in msg for n in EXPECTED)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("unetpp2d", 3, 1, 2), {}, "spatial_dims"),
        (("monai_dynunet3d", 1, 1, 2), {}, "spatial_dims"),
        (("tiny_unet2d", 2, 0, 2), {}, "in_channels"),
        (("tiny_unet2d", 2, 1, 2), {"bogus": 1}, "bogus"),
        (("tiny_unet2d", 2, 1, 2), {"base": 0}, "base"),
        (("unetpp2d", 2, 1, 2), {"encoder": "resnet50"}, "encoder"),
        (("resnet18_unet2d", 2, 1, 2), {"decoder_channels": (8, 8)}, "decoder_channels"),
        (("mobilenetv2_unet2d", 2, 1, 2), {"width": -1}, "width"),
        (("monai_dynunet3d", 3, 1, 2), {"deep_supervision": True}, "deep_supervision"),
        (("monai_segresnet3d", 3, 1, 2), {"blocks_up": (1,)}, "blocks_up"),
        (("monai_unet3d", 3, 1, 2), {"strides": (2, 2)}, "strides"),
    ],
)
def test_bad_arguments_name_the_field(args, kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        build_network(*args, **kwargs)
    assert args[0] in str(info.value)


def test_background_channels_are_learnt_raw_and_folded_into_background_in_eval():
    """background_channels=k: k more output channels; in training mode the raw logits, in eval
    mode channel 0 is log(sum(exp)) of background and the k (softmax probabilities added)."""
    torch.manual_seed(0)
    net = build_network("tiny_unet2d", 2, 1, 3, base=4, background_channels=2)
    x = torch.randn(2, 1, 32, 32)
    raw = net(x)
    assert raw.shape == (2, 5, 32, 32) and net.background_channels == 2
    with torch.no_grad():
        folded = net.eval()(x)
        net.training = True  # the top module's flag decides; its BatchNorm layers stay in eval
        raw = net(x)
    assert folded.shape == (2, 3, 32, 32)
    p, q = raw.softmax(1), folded.softmax(1)
    torch.testing.assert_close(q[:, 0], p[:, 0] + p[:, 3] + p[:, 4])
    torch.testing.assert_close(q[:, 1:], p[:, 1:3])
    # the weights are the plain network's with a wider output layer
    plain = build_network("tiny_unet2d", 2, 1, 5, base=4)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    for bad in (-1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="background_channels"):
            build_network("tiny_unet2d", 2, 1, 3, background_channels=bad)


def test_json_lists_are_accepted():
    small = build_network("unetpp2d", 2, 1, 2, encoder="resnet18", decoder_channels=[32] * 5)
    assert count_parameters(small) < count_parameters(build_network("unetpp2d", 2, 1, 2))
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_tap_paths():
    """A copy of the declared taps (resolved by the training package's hooks), {} for a net
    that declares none."""
    net = build_network("tiny_unet2d", 2, 1, 2, base=4)
    paths = tap_paths(net)
    paths["e1"] = "nowhere"
    assert net.taps["e1"] != "nowhere"
    assert net.get_submodule(tap_paths(net)["out"]) is net.head
    assert tap_paths(nn.Conv2d(1, 1, 1)) == {}


def test_count_macs_matches_hand_computation():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (2, 3, 10, 12)) == 2 * 8 * 10 * 12 * 3 * 3 * 3
    assert count_parameters(conv) == 8 * 3 * 9 + 8
    grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
    assert count_macs(grouped, (1, 8, 10, 10)) == 8 * 5 * 5 * 2 * 9
    up = nn.ConvTranspose3d(4, 2, 2, stride=2)
    assert count_macs(up, (1, 4, 3, 3, 3)) == 4 * 27 * 2 * 8
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_macs(lin, (3, 3, 4)) == 3 * 5 * 12
    assert conv.training  # mode restored


@pytest.mark.slow
def test_meta_build_has_the_shapes_and_costs_and_draws_no_random_numbers():
    """What a package's shape check and the benchmark's cost counts build: on the meta device
    (weight init skipped there), the real network's shapes, parameters and MACs, without
    touching the random generator."""
    for name in sorted(n for n in EXPECTED if n.endswith("2d")):
        kwargs = CASES[name][0]
        real = build_network(name, 2, 1, 3, **kwargs)
        rng = torch.get_rng_state()
        with torch.device("meta"):
            meta = build_network(name, 2, 1, 3, **kwargs)
        assert torch.equal(rng, torch.get_rng_state()), name
        shapes = {k: v.shape for k, v in real.state_dict().items()}
        assert {k: v.shape for k, v in meta.state_dict().items()} == shapes, name
        assert all(v.is_meta for v in meta.state_dict().values()), name
        assert count_parameters(meta) == count_parameters(real), name
        assert count_macs(meta, (1, 1, 32, 48)) == count_macs(real, (1, 1, 32, 48)), name


def test_channels_last_bf16_and_folding():
    net = build_network("mobilenetv2_unet2d", 2, 1, 3).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        ref = net(x)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x.to(memory_format=torch.channels_last))
        assert low.shape == ref.shape and torch.isfinite(low.float()).all()
        folded = fold_batchnorm(net)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(x), ref, atol=1e-4, rtol=1e-4)
        for path in net.taps.values():  # every tap still names a module of the folded net
            folded.get_submodule(path)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # original untouched


@pytest.mark.slow
def test_import_does_not_pull_in_monai():
    import subprocess
    import sys

    code = "import sys, HLFDSegmentLib.nets as n; n.build_network('tiny_unet2d', 2, 1, 2); "
    code += "assert 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
