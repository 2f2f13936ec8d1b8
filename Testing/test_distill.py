"""Distillation package: taps, loss primitives, registry and every registered method (2D + 3D)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hlfd_train.distill import (
    HLFD,
    METHODS,
    FeatureTaps,
    at_loss,
    attention_map,
    build_method,
    cwd_loss,
    kl_pixelwise,
    method_defaults,
    probe_channels,
    resize_to,
    run_with_taps,
    segmentation_loss,
)

STAGES = ("e1", "e2", "e3", "e4", "e5", "d5", "d4", "d3", "d2")
K = 3  # classes


class ToyUNet(nn.Module):
    """Tiny U-Net with named stages e1..e5, d5..d2 and head ("out").

    Teacher (``student=False``): stage k at 1/2**(k-1) of the input. Student: every stage
    halved except e5 (stride 1, like an output-stride-16 encoder), so scales differ per stage.
    """

    def __init__(self, dims: int, widths: tuple[int, ...], student: bool = False):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        w1, w2, w3, w4, w5 = widths
        s1, s5 = (2, 1) if student else (1, 2)
        self.enc = nn.ModuleDict(
            {
                "e1": nn.Sequential(conv(1, w1, 3, s1, 1), norm(w1), nn.LeakyReLU(0.1)),
                "e2": nn.Sequential(conv(w1, w2, 3, 2, 1), nn.LeakyReLU(0.1)),
                "e3": nn.Sequential(conv(w2, w3, 3, 2, 1), nn.LeakyReLU(0.1)),
                "e4": nn.Sequential(conv(w3, w4, 3, 2, 1), nn.LeakyReLU(0.1)),
                "e5": nn.Sequential(conv(w4, w5, 3, s5, 1), nn.LeakyReLU(0.1)),
            }
        )
        self.dec = nn.ModuleDict(
            {
                "d5": nn.Sequential(conv(w5, w4, 3, 1, 1), nn.LeakyReLU(0.1)),
                "d4": nn.Sequential(conv(2 * w4, w3, 3, 1, 1), nn.LeakyReLU(0.1)),
                "d3": nn.Sequential(conv(2 * w3, w2, 3, 1, 1), nn.LeakyReLU(0.1)),
                "d2": nn.Sequential(conv(2 * w2, w1, 3, 1, 1), nn.LeakyReLU(0.1)),
            }
        )
        self.head = conv(2 * w1, K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = {}
        h = x
        for name, block in self.enc.items():
            h = e[name] = block(h)
        d = self.dec["d5"](e["e5"])
        for name, skip in (("d4", "e4"), ("d3", "e3"), ("d2", "e2")):
            up = F.interpolate(d, size=e[skip].shape[2:], mode="nearest")
            d = self.dec[name](torch.cat([up, e[skip]], 1))
        up = F.interpolate(d, size=e["e1"].shape[2:], mode="nearest")
        out = self.head(torch.cat([up, e["e1"]], 1))
        return F.interpolate(out, size=x.shape[2:], mode="nearest")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run fastest (and steadiest on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TAPS = {**{s: f"enc.{s}" for s in STAGES[:5]}, **{s: f"dec.{s}" for s in STAGES[5:]}, "out": "head"}


def make_pair(dims: int, seed: int = 0):
    torch.manual_seed(seed)
    teacher = ToyUNet(dims, (6, 8, 10, 12, 14)).eval().requires_grad_(False)
    student = ToyUNet(dims, (2, 3, 4, 5, 6), student=True)
    shape = (2, 1, 32, 32) if dims == 2 else (1, 1, 32, 32, 32)
    x = torch.randn(shape)
    y = (x > 0.5).long().squeeze(1) + (x > 1.2).long().squeeze(1)
    return teacher, student, x, y


def build(name: str, teacher, student, x, dims: int, **cfg):
    t_ch = probe_channels(teacher, TAPS, x)
    s_ch = probe_channels(student, TAPS, x)
    return build_method(name, t_ch, s_ch, dims, **cfg)


def adapter_count(method: nn.Module) -> int:
    """Trainable adapter parameters, counted as the engine reports them."""
    return sum(p.numel() for p in method.parameters())


def step_terms(method, teacher, student, x):
    s_taps, t_taps = method.required_taps()
    t_out, t_feat = run_with_taps(teacher, {k: TAPS[k] for k in t_taps}, x, teacher=True)
    s_out, s_feat = run_with_taps(student, {k: TAPS[k] for k in s_taps}, x)
    return method(s_feat, t_feat, s_out, t_out), s_out


# --- primitives, pinned by hand ------------------------------------------------------------


def test_attention_map_known_tensor():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    raw = attention_map(f, p=2, normalize=False)
    assert raw.shape == (1, 1, 1, 2)
    assert torch.allclose(raw.flatten(), torch.tensor([5.0, 2.0]))  # mean_c f^2
    norm = attention_map(f, p=2)
    assert torch.allclose(norm.flatten(), torch.tensor([5.0, 2.0]) / math.sqrt(29))
    p4 = attention_map(f, p=4, normalize=False).flatten()
    assert torch.allclose(p4, torch.tensor([(1 + 81) / 2, 16 / 2]))


def test_at_loss_values_and_resize():
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    assert at_loss(s, t).item() == pytest.approx(2.0)  # orthogonal unit maps
    assert at_loss(s, s * 7).item() == pytest.approx(0.0, abs=1e-7)  # scale invariant
    # 3D, student 1 voxel resized to the teacher's 2 voxels: map (1,1)/sqrt2 vs (1,0).
    s3 = torch.ones(1, 3, 1, 1, 1)
    t3 = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    assert at_loss(s3, t3).item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)


def test_kl_pixelwise_hand_values():
    # voxel 1: teacher (0.5, 0.5), student (0.25, 0.75); voxel 2 identical.
    t = torch.tensor([[0.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).view(1, 2, 1, 2)
    assert kl_pixelwise(s, t, 1.0).item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    # temperature 2 softens the student to (1, sqrt3)/(1+sqrt3) and scales by T^2 = 4
    q = 1 / (1 + math.sqrt(3))
    expect = 4 * 0.5 * (0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)))
    assert kl_pixelwise(s, t, 2.0).item() == pytest.approx(expect, rel=1e-6)
    # three classes at one 3D voxel: KL(p || uniform) = sum p log(3p), not a .view(-1, 2)
    p = torch.tensor([0.2, 0.3, 0.5])
    t3 = p.log().view(1, 3, 1, 1, 1)
    s3 = torch.zeros(1, 3, 1, 1, 1)
    expect3 = float((p * (3 * p).log()).sum())
    assert kl_pixelwise(s3, t3, 1.0).item() == pytest.approx(expect3, rel=1e-6)
    assert kl_pixelwise(t3, t3, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_cwd_loss_hand_value():
    # channel 0: teacher uniform over 2 positions, student (0.25, 0.75); channel 1 identical
    t = torch.zeros(1, 2, 1, 2)
    s = torch.tensor([0.0, math.log(3.0), 0.0, 0.0]).view(1, 2, 1, 2)
    assert cwd_loss(s, t, 1.0).item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    x = torch.randn(2, 4, 3, 5, 6)
    assert cwd_loss(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="channels"):
        cwd_loss(torch.zeros(1, 3, 2, 2), t)


def test_resize_to_area_and_linear():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    assert torch.allclose(resize_to(x, (1, 2)).flatten(), torch.tensor([1.5, 3.5]))
    up = resize_to(torch.ones(1, 2, 1, 2, 2), (2, 4, 4))
    assert up.shape == (1, 2, 2, 4, 4) and torch.allclose(up, torch.ones_like(up))
    assert resize_to(x, (1, 4)) is x


def test_segmentation_loss_hand_value_and_errors():
    logits = torch.zeros(1, 2, 1, 1)  # p = (0.5, 0.5)
    target = torch.ones(1, 1, 1, dtype=torch.long)
    focal = 0.25 * math.log(2)  # -(1 - 0.5)^2 log 0.5
    dice = 1 - (2 * 0.5 + 1e-5) / (0.5 + 1 + 1e-5)  # foreground channel only
    expect = 0.5 * focal + 0.5 * dice
    assert segmentation_loss(logits, target).item() == pytest.approx(expect, rel=1e-5)
    assert segmentation_loss(logits, target.unsqueeze(1)).item() == pytest.approx(expect, rel=1e-5)
    sure = torch.tensor([-20.0, 20.0]).view(1, 2, 1, 1, 1)
    assert segmentation_loss(sure, torch.ones(1, 1, 1, 1, dtype=torch.long)).item() < 1e-6
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(logits, torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels span"):
        segmentation_loss(logits, torch.full((1, 1, 1), 5))


# --- taps -----------------------------------------------------------------------------------


def test_feature_taps_capture_errors_and_probe():
    teacher, student, x, _ = make_pair(2)
    with FeatureTaps(student, {"e2": "enc.e2", "whole": ""}) as ft:
        out = student(x)
        assert ft.features["e2"].shape == (2, 3, 8, 8) and ft.features["e2"].requires_grad
        assert torch.equal(ft.features["whole"], out)
    assert not student.enc.e2._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match=r"'enc\.e9'"):
        FeatureTaps(student, {"e9": "enc.e9"})

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    net = nn.Sequential(Pair())
    with pytest.raises(TypeError, match="module path '0'"), FeatureTaps(net, {"p": "0"}):
        net(x)
    with pytest.raises(ValueError, match="not reached"):
        run_with_taps(student, {"e2": "enc.e2", "orphan": "dec"}, x)

    bn = student.enc.e1[1]
    before = bn.running_mean.clone()
    student.train()
    ch = probe_channels(student, TAPS, x)
    assert ch == {
        "e1": 2,
        "e2": 3,
        "e3": 4,
        "e4": 5,
        "e5": 6,
        "d5": 5,
        "d4": 4,
        "d3": 3,
        "d2": 2,
        "out": K,
    }
    assert student.training and torch.equal(bn.running_mean, before)
    _, feats = run_with_taps(teacher, TAPS, x, teacher=True)
    assert all(not f.requires_grad for f in feats.values())


# --- registry -------------------------------------------------------------------------------


def test_registry_errors():
    ch = dict.fromkeys((*STAGES, "out"), 4)
    with pytest.raises(ValueError, match=r"unknown distillation method 'nope'.*hlfd"):
        build_method("nope", ch, ch, 2)
    with pytest.raises(ValueError, match="unknown config key 'temprature'"):
        build_method("kd", ch, ch, 2, temprature=2.0)
    with pytest.raises(ValueError, match="'stages'"):
        build_method("at", ch, ch, 2, stages="e1")
    with pytest.raises(ValueError, match="student tap 'e3'"):
        build_method("fitnet", ch, {"e1": 4}, 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_method("kd", ch, ch, 1)
    with pytest.raises(ValueError, match="no term"):
        build_method("hlfd", ch, ch, 2, feature_level=False, pixel_level=False)
    with pytest.raises(ValueError, match="'temperature' must be > 0"):
        build_method("hlfd", ch, ch, 3, temperature=0)
    m = build_method("at", ch, ch, 2, stages=["e2", "e3"])
    assert m.required_taps() == (("e2", "e3"), ("e2", "e3"))
    with pytest.raises(ValueError, match="missing student tap 'e3'"):
        m({"e2": torch.zeros(1, 4, 4, 4)}, {"e2": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="expected 4 dims"):
        m(
            {"e2": torch.zeros(1, 4, 4), "e3": torch.zeros(1, 4, 4, 4)},
            {"e2": torch.zeros(1, 4, 4, 4), "e3": torch.zeros(1, 4, 4, 4)},
        )
    d = method_defaults("hlfd")
    assert (d["flfd_weight"], d["plfd_weight"], d["p"], d["temperature"]) == (0.9, 0.1, 4.0, 4.0)
    assert (d["unified_weight"], d["individual_weight"]) == (0.5, 0.5)
    at = method_defaults("at")
    assert (at["p"], at["stages"], method_defaults("kd")["weight"]) == (4.0, ("e5",), 0.1)


# --- every method, 2D and 3D ----------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_and_gradients(name, dims):
    teacher, student, x, _ = make_pair(dims)
    method = build(name, teacher, student, x, dims)
    terms, _ = step_terms(method, teacher, student, x)
    if name == "none":
        assert terms == {} and adapter_count(method) == 0
        return
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values()), terms
    total = sum(terms.values())
    assert total.item() > 0
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    for p in method.parameters():  # every adapter is trained
        assert p.grad is not None and p.grad.abs().sum() > 0
    s_taps, _ = method.required_taps()
    reached = [*s_taps, "out"] if name in ("kd", "cwd") else s_taps  # hlfd: aux heads only
    for tap in reached:
        grads = [p.grad for p in student.get_submodule(TAPS[tap]).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, tap


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"none"}))
def test_method_depends_on_teacher(name):
    """Guards against a loss that compares the student with itself."""
    teacher, student, x, _ = make_pair(2)
    method = build(name, teacher, student, x, 2)
    s_taps, t_taps = method.required_taps()
    s_out, s_feat = run_with_taps(student, {k: TAPS[k] for k in s_taps}, x)
    t_out, t_feat = run_with_taps(teacher, {k: TAPS[k] for k in t_taps}, x, teacher=True)
    a = sum(method(s_feat, t_feat, s_out, t_out).values())
    g = torch.Generator().manual_seed(1)
    t_feat2 = {k: v * torch.rand(v.shape, generator=g) for k, v in t_feat.items()}
    t_out2 = t_out + 3 * torch.randn(t_out.shape, generator=g)
    b = sum(method(s_feat, t_feat2, s_out, t_out2).values())
    assert abs(a.item() - b.item()) > 1e-6


def test_trainable_teacher_still_gets_no_gradient():
    teacher, student, x, _ = make_pair(2)
    teacher.requires_grad_(True)
    method = build("hlfd", teacher, student, x, 2)
    terms, _ = step_terms(method, teacher, student, x)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("kd", 2),
        ("at", 2),
        ("fitnet", 2),
        ("deep", 2),
        ("deep_mse", 2),
        ("cwd", 2),
        ("ifd", 2),
        ("hifd", 2),
        ("flfd_individual", 2),
        ("flfd_unified", 2),
        ("hlfd", 2),
        ("hlfd", 3),
    ],
)
def test_adam_steps_lower_method_loss(name, dims):
    teacher, student, x, y = make_pair(dims)
    # kd's default weight (0.1, the authors') and cwd's 1/8-resolution logits leave the toy
    # task loss in charge; a larger weight shows that the term itself can be lowered
    louder = {"kd": {"weight": 2.0}, "cwd": {"weight": 30.0}}.get(name, {})
    method = build(name, teacher, student, x, dims, **louder)
    opt = torch.optim.Adam([*student.parameters(), *method.parameters()], lr=1e-2)
    history = []
    for _ in range(12):
        terms, s_out = step_terms(method, teacher, student, x)
        distill = sum(terms.values())
        history.append(distill.item())
        opt.zero_grad()
        (segmentation_loss(s_out, y) + distill).backward()
        opt.step()
    assert history[-1] < 0.9 * history[0], history


# --- adapters and HLFD layer map ------------------------------------------------------------


def test_adapters_created_once_and_counted():
    teacher, student, x, _ = make_pair(2)
    fit = build("fitnet", teacher, student, x, 2)
    assert adapter_count(fit) == 4 * 10 + 10  # 1x1 conv student e3 (4) -> teacher (10)
    hl = build("hlfd", teacher, student, x, 2)
    heads = {"d4": 4, "d3": 3, "d2": 2}  # student decoder channels
    unified = 5 * 30 + 30  # student d5 (5) -> teacher d5 + d4 + d3 (12 + 10 + 8)
    assert adapter_count(hl) == sum(c * K + K for c in heads.values()) + unified
    assert set(hl.aux_heads) == set(heads)
    deep = build("deep", teacher, student, x, 2)
    assert len(list(deep.projections)) == 4  # student d5..d2 -> teacher channels
    assert len(list(build("deep_mse", teacher, student, x, 2).adapters)) == 9
    for m in (fit, hl, deep):
        ids = [id(p) for p in m.parameters()]
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        w0 = [p.detach().clone() for p in m.parameters()]
        for _ in range(2):
            terms, _ = step_terms(m, teacher, student, x)
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()
        assert [id(p) for p in m.parameters()] == ids
        assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters(), strict=True))
    assert adapter_count(build("hlfd", teacher, student, x, 2, pixel_level=False)) == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_hlfd_layer_map_and_target_shapes(dims):
    teacher, student, x, _ = make_pair(dims)
    hl = build("hlfd", teacher, student, x, dims)
    assert isinstance(hl, HLFD)
    s_taps, t_taps = hl.required_taps()
    assert s_taps == ("e1", "e2", "e3", "e4", "d5", "d4", "d3", "d2")
    assert t_taps == ("e2", "e3", "e4", "e5", "d5", "d4", "d3")
    assert hl.needs_logits()
    t_out, t_feat = run_with_taps(teacher, TAPS, x, teacher=True)
    _, s_feat = run_with_taps(student, TAPS, x)
    n, full = x.shape[0], x.shape[2:]
    tg = hl.targets(s_feat, t_feat, t_out)
    assert set(tg) == {"flfd_unified", "flfd_individual", "plfd_unified", "plfd_individual"}
    assert list(tg["flfd_unified"]) == ["e1"]
    assert list(tg["flfd_individual"]) == ["e2", "e3", "e4"]
    assert list(tg["plfd_unified"]) == ["d5"]
    assert list(tg["plfd_individual"]) == ["d4", "d3", "d2"]
    for term, per_tap in tg.items():
        for tap, target in per_tap.items():
            size = s_feat[tap].shape[2:]  # student stage k: full / 2**k, e5 and d5 at full / 16
            k = min(int(tap[1]), 4)
            assert tuple(size) == tuple(f // 2**k for f in full)
            chans = 1 if term.startswith("flfd") else 30 if term == "plfd_unified" else K
            assert target.shape == (n, chans, *size), (term, tap)
            assert not target.requires_grad
            if term.startswith("flfd"):
                assert torch.allclose(target.flatten(1).norm(dim=1), torch.ones(n))
            else:
                assert torch.allclose(target.sum(1), torch.ones_like(target.sum(1)))
    # the teacher e5 map (full / 16) is upsampled to the student e2 grid (full / 4)
    assert tuple(t_feat["e5"].shape[2:]) == tuple(f // 16 for f in full)
    assert tuple(tg["flfd_individual"]["e2"].shape[2:]) == tuple(f // 4 for f in full)


def test_hlfd_weights_and_ablations():
    teacher, student, x, _ = make_pair(2)
    base = build("hlfd", teacher, student, x, 2)
    terms, _ = step_terms(base, teacher, student, x)
    torch.manual_seed(0)
    doubled = build("hlfd", teacher, student, x, 2, unified_weight=1.0, plfd_weight=0.2)
    doubled.load_state_dict(base.state_dict())
    terms2, _ = step_terms(doubled, teacher, student, x)
    assert terms2["flfd_unified"].item() == pytest.approx(
        2 * terms["flfd_unified"].item(), rel=1e-5
    )
    assert terms2["plfd_unified"].item() == pytest.approx(
        4 * terms["plfd_unified"].item(), rel=1e-5
    )
    assert terms2["plfd_individual"].item() == pytest.approx(
        2 * terms["plfd_individual"].item(), rel=1e-5
    )
    feat_only = build("hlfd", teacher, student, x, 2, pixel_level=False)
    assert feat_only.required_taps() == (("e1", "e2", "e3", "e4"), ("e2", "e3", "e4", "e5"))
    assert not feat_only.needs_logits()
    uni = build("hlfd", teacher, student, x, 2, individual=False)
    assert uni.required_taps() == (("e1", "d5"), ("e2", "e3", "e4", "d5", "d4", "d3"))
    assert set(uni.aux_heads) == set() and uni.unified_projection is not None
    assert not uni.needs_logits()  # the unified pixel branch works on teacher features
    t_uni, _ = step_terms(uni, teacher, student, x)
    assert set(t_uni) == {"flfd_unified", "plfd_unified"}
    ind = build("hlfd", teacher, student, x, 2, unified=False, feature_level=False)
    assert ind.required_taps() == (("d4", "d3", "d2"), ())
    assert set(step_terms(ind, teacher, student, x)[0]) == {"plfd_individual"}


@pytest.mark.parametrize("layer", ["d5", "d4", "d3"])
def test_hlfd_unified_pixel_branch_follows_every_teacher_middle_layer(layer):
    """Changing any one of the teacher's d5, d4, d3 features changes the unified PLFD loss (it
    used to depend on their shapes only)."""
    teacher, student, x, _ = make_pair(2)
    hl = build("hlfd", teacher, student, x, 2, feature_level=False, individual=False)
    t_out, t_feat = run_with_taps(teacher, TAPS, x, teacher=True)
    _, s_feat = run_with_taps(student, TAPS, x)
    base = hl(s_feat, t_feat, None, t_out)["plfd_unified"].item()
    changed = dict(t_feat)
    changed[layer] = t_feat[layer] * 3.0 + torch.rand_like(t_feat[layer])
    assert hl(s_feat, changed, None, t_out)["plfd_unified"].item() != pytest.approx(base, rel=1e-4)


def test_hlfd_individual_branch_sums_its_stages_like_the_authors():
    teacher, student, x, _ = make_pair(2)
    summed = build("hlfd", teacher, student, x, 2)
    assert summed.config["individual_reduction"] == "sum"
    torch.manual_seed(0)
    mean = build("hlfd", teacher, student, x, 2, individual_reduction="mean")
    mean.load_state_dict(summed.state_dict())
    t_sum, _ = step_terms(summed, teacher, student, x)
    t_mean, _ = step_terms(mean, teacher, student, x)
    for term in ("flfd_individual", "plfd_individual"):
        assert t_sum[term].item() == pytest.approx(3 * t_mean[term].item(), rel=1e-5)
    assert t_sum["plfd_unified"].item() == pytest.approx(t_mean["plfd_unified"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="individual_reduction"):
        build("hlfd", teacher, student, x, 2, individual_reduction="max")


# --- the baselines as the paper ran them (authors' train_kd.py) ------------------------------


def _taps_and_logits(method, teacher, student, x):
    s_taps, t_taps = method.required_taps()
    s_out, s_feat = run_with_taps(student, {k: TAPS[k] for k in s_taps}, x)
    t_out, t_feat = run_with_taps(teacher, {k: TAPS[k] for k in t_taps}, x, teacher=True)
    return s_feat, t_feat, s_out, t_out


def test_kd_uses_the_authors_alpha():
    teacher, student, x, _ = make_pair(2)
    kd = build("kd", teacher, student, x, 2)
    s_feat, t_feat, s_out, t_out = _taps_and_logits(kd, teacher, student, x)
    got = kd(s_feat, t_feat, s_out, t_out)["kd"]
    assert torch.allclose(got, 0.1 * kl_pixelwise(s_out, t_out, 4.0))  # 0.1 x T^2 x KL


def test_cwd_compares_eighth_resolution_logits():
    teacher, student, x, _ = make_pair(2)  # 32 x 32 logits -> 4 x 4
    cwd = build("cwd", teacher, student, x, 2)
    s_feat, t_feat, s_out, t_out = _taps_and_logits(cwd, teacher, student, x)
    got = cwd(s_feat, t_feat, s_out, t_out)["cwd_logits"]
    pooled = (F.avg_pool2d(s_out, 8), F.avg_pool2d(t_out, 8))
    assert torch.allclose(got, 3.0 * cwd_loss(*pooled, 1.0))
    # detail inside one 8 x 8 cell that keeps its mean does not reach the loss
    bump = torch.zeros_like(t_out)
    bump[..., 0, 0], bump[..., 0, 1] = 5.0, -5.0
    assert torch.allclose(cwd(s_feat, t_feat, s_out, t_out + bump)["cwd_logits"], got)


def test_at_is_p4_on_e5_only():
    teacher, student, x, _ = make_pair(2)
    at = build("at", teacher, student, x, 2)
    assert at.required_taps() == (("e5",), ("e5",))
    s_feat, t_feat, _, _ = _taps_and_logits(at, teacher, student, x)
    base = at(s_feat, t_feat)["at_e5"]
    assert torch.allclose(base, at_loss(s_feat["e5"], t_feat["e5"], 4.0))
    changed = {"e5": t_feat["e5"] * torch.linspace(0.1, 3, t_feat["e5"].shape[-1])}
    assert abs(at(s_feat, changed)["at_e5"].item() - base.item()) > 1e-6


def test_deep_is_the_authors_dkd():
    teacher, student, x, _ = make_pair(2)
    deep = build("deep", teacher, student, x, 2)
    s_feat, t_feat, s_out, t_out = _taps_and_logits(deep, teacher, student, x)
    terms = deep(s_feat, t_feat, s_out, t_out)
    kl = {"dkd_kl_out", "dkd_kl_d5", "dkd_kl_d4", "dkd_kl_d3", "dkd_kl_d2"}
    at = {f"dkd_at_e{k}" for k in range(1, 6)}
    assert set(terms) == kl | at
    assert torch.allclose(terms["dkd_kl_out"], 0.1 * kl_pixelwise(s_out, t_out, 4.0))
    for k in range(1, 6):
        e = f"e{k}"
        assert torch.allclose(terms[f"dkd_at_{e}"], 0.9 * at_loss(s_feat[e], t_feat[e], 4.0))
    # each student decoder stage is compared with the teacher's (their d5 term: with itself)
    for d in ("d5", "d4", "d3", "d2"):
        other = {**t_feat, d: t_feat[d].flip(-1) * 2}
        assert abs(deep(s_feat, other, s_out, t_out)[f"dkd_kl_{d}"] - terms[f"dkd_kl_{d}"]) > 1e-7


def test_ifd_and_hifd_carry_pixel_level_and_e5_terms():
    teacher, student, x, _ = make_pair(2)
    for name, expected in (
        ("ifd", {"ifd_kl_out", "ifd_kl_decoders", "ifd_at_e5", "ifd_at_encoders"}),
        (
            "hifd",
            {
                "hifd_kl_out",
                "hifd_kl_d4",
                "hifd_kl_d2",
                *(f"hifd_at_{e}" for e in ("e5", "e2", "e4")),
            },
        ),
    ):
        m = build(name, teacher, student, x, 2)
        assert m.required_taps()[1] == ("e5",) and m.needs_logits()
        s_feat, t_feat, s_out, t_out = _taps_and_logits(m, teacher, student, x)
        terms = m(s_feat, t_feat, s_out, t_out)
        assert set(terms) == expected, name
        assert torch.allclose(terms[f"{name}_kl_out"], 0.1 * kl_pixelwise(s_out, t_out, 4.0))
        assert torch.allclose(
            terms[f"{name}_at_e5"], 0.9 * at_loss(s_feat["e5"], t_feat["e5"], 4.0)
        )
        e5 = {"e5": t_feat["e5"] * torch.linspace(0.1, 3, t_feat["e5"].shape[-1])}
        moved = m(s_feat, e5, s_out, t_out)
        logits = m(s_feat, t_feat, s_out, t_out.flip(-1))
        for term in terms:  # AT terms follow the teacher's e5, KL terms its logits
            follows = moved if "_at_" in term else logits
            assert abs(follows[term].item() - terms[term].item()) > 1e-7, (name, term)
    hifd = build("hifd", teacher, student, x, 2)
    s_feat, t_feat, s_out, t_out = _taps_and_logits(hifd, teacher, student, x)
    got = hifd(s_feat, t_feat, s_out, t_out)["hifd_at_e2"]
    assert torch.allclose(got, 0.9 * at_loss(s_feat["e2"], t_feat["e5"], 4.0))


def test_fitnet_runs_a_hint_stage_then_a_task_stage():
    teacher, student, x, _ = make_pair(2)
    fit = build("fitnet", teacher, student, x, 2, hint_steps=2)
    s_feat, t_feat, _, _ = _taps_and_logits(fit, teacher, student, x)
    hints = [fit(s_feat, t_feat)["fitnet_e3"].item() for _ in range(4)]
    assert hints[0] > 0 and hints[1] == hints[0] and hints[2:] == [0.0, 0.0]
    assert int(fit.state_dict()["steps_done"]) == 4  # saved with the run: resume keeps the stage
    joint = build("fitnet", teacher, student, x, 2, hint_steps=2, schedule="joint")
    assert all(joint(s_feat, t_feat)["fitnet_e3"].item() > 0 for _ in range(4))
    with pytest.raises(ValueError, match="two-stage or joint"):
        build("fitnet", teacher, student, x, 2, schedule="sometimes")
