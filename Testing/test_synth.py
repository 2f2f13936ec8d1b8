"""Synthesis engine v2: reproducible, labels consistent with the image, plausible statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from hlfd_train.cli import main as train_cli
from hlfd_train.synth import SynthConfig, SynthError, synth_case
from hlfd_train.synth.tissues import HU, PHASES

# coarse voxels keep each case well under a second here; anatomy is in mm, so it is the same
FAST = {"inplane_mm": (2.5, 3.0), "max_slices": 48}


def fast(task="liver", **kw) -> SynthConfig:
    return SynthConfig(task=task, **{**FAST, **kw})


def ml(case, value) -> float:
    return float((case.labels == value).sum() * np.prod(case.spacing) / 1000)


@pytest.mark.slow
def test_same_seed_same_case_other_seed_other_case():
    a, b, c = (synth_case(fast(), s) for s in (5, 5, 6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.spacing == b.spacing and a.meta == b.meta
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("phase", PHASES)
def test_liver_hu_follows_the_phase(phase):
    """The median HU under the liver label lies in the published range of the phase (plus the
    texture, vessels and noise it carries); tumour is labelled only inside or at the liver."""
    case = synth_case(fast(phases={phase: 1.0}, tumour_free=0.0, metal=0.0), 11)
    lo, hi = HU["liver"][PHASES.index(phase)]
    liver = case.image[case.labels == 1]
    assert lo - 15 <= np.median(liver) <= hi + 20, (phase, np.median(liver))
    assert case.meta["phase"] == phase


@pytest.mark.slow
def test_organ_volumes_and_lesions_are_plausible():
    """Liver 0.7-3.5 L when the whole liver is in view (SYNTH-REFERENCES 3: medians 1.2-1.7 L,
    505-4504); both kidneys 150-600 mL (KiTS median 395); tumours where asked, none when not."""
    livers, kidneys = [], []
    thick = {"slice_mm": (5.0,), "slice_weights": (1.0,)}  # volumes within 1% of thin slices
    for seed in range(6):
        case = synth_case(fast(fov_cut=0.0, tumour_free=0.0, max_slices=200, **thick), seed)
        whole = not (case.labels[0] == 1).any() and not (case.labels[-1] == 1).any()
        if whole:
            livers.append(ml(case, 1) + ml(case, 2))
        assert ml(case, 2) > 0 or not case.meta["lesions"]
        k = synth_case(fast("kidney", fov_cut=0.0, tumour_free=1.0, max_slices=200, **thick), seed)
        if not (k.labels[0] == 1).any() and not (k.labels[-1] == 1).any():
            kidneys.append(ml(k, 1))
        assert ml(k, 2) == 0
    assert livers and all(700 <= v <= 3500 for v in livers), livers
    assert kidneys and all(150 <= v <= 600 for v in kidneys), kidneys


@pytest.mark.slow
def test_field_of_view_cuts_through_the_body():
    """With fov_cut=1 the body reaches the image border (the real-CT failure the engine trains
    for); with fov_cut=0 and the full field it does not."""
    touches = []
    for seed in range(4):
        case = synth_case(fast(fov_cut=1.0, circle_mask=0.0), seed)
        im = case.image
        border = np.concatenate(
            [im[:, 0].ravel(), im[:, -1].ravel(), im[:, :, 0].ravel(), im[:, :, -1].ravel()]
        )
        touches.append((border > -500).mean())
    assert max(touches) > 0.05
    wide = synth_case(fast(fov_cut=0.0, fov_mm=(480.0, 480.0), circle_mask=0.0), 0)
    edge = np.concatenate([wide.image[:, 0].ravel(), wide.image[:, :, 0].ravel()])
    assert (edge > -500).mean() < 0.2  # only the table and arms may reach the edge


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(SynthError, match="fov_cut"):
        SynthConfig(fov_cut=1.5)
    with pytest.raises(SynthError, match="unknown synth key 'noise'"):
        SynthConfig.from_dict("liver", {"noise": 3})
    with pytest.raises(SynthError, match="noise_hu"):
        SynthConfig.from_dict("liver", {"noise_hu": "loud"})
    with pytest.raises(SynthError, match="task"):
        SynthConfig(task="brain")


def test_write_command_writes_a_dataset_the_loaders_read(tmp_path, capsys):
    from hlfd_train.data.layouts import discover

    out = tmp_path / "synth"
    args = ["synth", "write", str(out), "--task", "kidney", "--cases", "2", "--seed", "3"]
    sets = ["--set", "inplane_mm=[2.5,3.0]", "max_slices=32"]
    assert train_cli(args + sets) == 0
    cases = discover(out, "kits19")
    assert len(cases) == 2
    info = json.loads((out / "synth.json").read_text())
    assert info["config"]["task"] == "kidney" and info["config"]["max_slices"] == 32
    assert train_cli(["synth", "write", str(tmp_path / "x"), "--set", "fov_cut=2"]) == 1
    assert "fov_cut" in capsys.readouterr().err


def test_scan_range_of_the_other_task():
    """``scan=liver`` on the kidney task: a liver CT's range (the scored real-CT kidney case),
    the very slices the liver task draws for that seed; bad values are one clear error."""
    liver, kidney_on_liver, kidney = (
        synth_case(fast(task=t, scan=s, max_slices=160), 4)
        for t, s in (("liver", ""), ("kidney", "liver"), ("kidney", ""))
    )
    assert kidney_on_liver.origin[2] == liver.origin[2]
    assert kidney_on_liver.image.shape[0] == liver.image.shape[0]
    assert kidney.origin[2] != liver.origin[2]
    assert set(np.unique(kidney_on_liver.labels)) <= {0, 1, 2}
    # "any": one of the two ranges per seed (seeds 4 and 5 draw different ones), the rest alike
    starts = {}
    for seed in (4, 5):
        cfg = dict(task="kidney", max_slices=160, inplane_mm=(3.0, 3.0))
        either = synth_case(fast(scan="any", **cfg), seed)
        ranges = {s: synth_case(fast(scan=s, **cfg), seed) for s in ("liver", "kidney")}
        match = [s for s, c in ranges.items() if c.origin[2] == either.origin[2]]
        assert len(match) == 1 and np.array_equal(ranges[match[0]].image, either.image)
        starts[match[0]] = seed
    assert set(starts) == {"liver", "kidney"}
    with pytest.raises(SynthError, match="scan"):
        SynthConfig(task="kidney", scan="lung")
    with pytest.raises(SynthError, match="scan"):
        SynthConfig.from_dict("kidney", {"scan": 3})


def test_matrix_resamples_in_plane_over_the_same_field_of_view():
    """``synth write --matrix``: a scanner's 512 x 512 reconstruction of the same case: the
    field of view, slices and organ volumes stay; labels stay labels."""
    import SimpleITK as sitk

    from hlfd_train.synth.write import on_matrix

    image, labels = synth_case(fast(), 11).to_sitk()
    fine, fine_labels = on_matrix(image, labels, 128)

    def edges(img):  # the outer corners of the first and last voxels
        return np.array(
            [img.TransformContinuousIndexToPhysicalPoint(i) for i in
             ([-0.5] * 3, [n - 0.5 for n in img.GetSize()])]
        )  # fmt: skip

    assert fine.GetSize()[:2] == (128, 128) and fine.GetSize()[2] == image.GetSize()[2]
    assert fine.GetSpacing()[2] == image.GetSpacing()[2]
    np.testing.assert_allclose(edges(fine), edges(image), atol=1e-3)
    assert fine.GetPixelID() == image.GetPixelID() and fine_labels.GetPixelID() == sitk.sitkUInt8
    before, after = (sitk.GetArrayFromImage(x) for x in (labels, fine_labels))
    assert set(np.unique(after)) == set(np.unique(before))
    voxel = [np.prod(x.GetSpacing()) for x in (labels, fine_labels)]
    for value in np.unique(before)[1:]:
        ml_before, ml_after = ((a == value).sum() * v for a, v in zip((before, after), voxel))
        assert abs(ml_after - ml_before) / ml_before < 0.1


@pytest.mark.slow
def test_realism_report_has_its_figures(tmp_path):
    from hlfd_train.synth.report import write_report

    path = write_report(tmp_path, fast(), cases=3, seed=1)
    text = path.read_text(encoding="utf-8")
    assert "no patient data" in text and "Organ volumes" in text
    for png in ("synth-montage.png", "synth-hu.png", "synth-nps.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_robustness_metrics_count_border_and_tumour_free_false_positives():
    from hlfd_train.synth.robustness import case_metrics, summarise

    truth = np.zeros((4, 40, 40), np.uint8)
    truth[1:3, 10:20, 10:20] = 1
    pred = truth.copy()
    pred[1:3, 0:3, 15:18] = 2  # tumour called at the image border, none in the truth
    m = case_metrics(pred, truth, (1.0, 1.0, 2.0))
    assert m["organ_dice"] < 1 and np.isnan(m["tumour_dice"])
    assert m["tumour_free_fp_ml"] == pytest.approx(2 * 3 * 3 * 2 / 1000)
    assert m["border_fp_ml"] == pytest.approx(m["tumour_free_fp_ml"])
    both = summarise([m, {**m, "tumour_dice": 0.5}])
    assert both["tumour_dice"] == 0.5  # NaN (no tumour) cases left out of the tumour Dice


def test_roi_crop_centres_the_organ_and_keeps_the_geometry():
    """The "cropped to the organ" condition: a square of the asked width around the organ (the
    larger kidney of two), every voxel at the same physical point as before the crop."""
    from hlfd_train.synth.generator import roi_crop

    case = synth_case(fast("kidney", tumour_free=0.0), 2)
    roi = roi_crop(case, 60.0)
    side = round(60.0 / case.spacing[0] / 2) * 2
    assert roi.image.shape[0] == case.image.shape[0] and max(roi.image.shape[1:]) <= side
    assert roi.labels.shape == roi.image.shape == roi.tissue.shape
    assert (roi.labels > 0).mean() > 4 * (case.labels > 0).mean()  # the organ fills the box
    image, _ = case.to_sitk()
    cropped, _ = roi.to_sitk()
    i, j, k = image.TransformPhysicalPointToIndex(cropped.TransformIndexToPhysicalPoint((0, 0, 0)))
    h, w = roi.image.shape[1:]
    assert k == 0 and np.array_equal(case.image[:, j : j + h, i : i + w], roi.image)
    assert np.array_equal(case.labels[:, j : j + h, i : i + w], roi.labels)


def test_organ_crop_key_crops_some_cases_around_the_organ_from_its_own_stream():
    """``organ_crop``: the case cut to a square around the organ (its width drawn from
    ``organ_crop_mm``, recorded in the meta); off, every case is what it was."""
    plain = synth_case(fast(), 1)
    cropped = synth_case(fast(organ_crop=1.0, organ_crop_mm=(100.0, 100.0)), 1)
    assert plain.meta["organ_crop_mm"] is None and cropped.meta["organ_crop_mm"] == 100.0
    assert cropped.image.shape[1] < plain.image.shape[1]
    assert (cropped.labels[:, :, 0] > 0).any() or (cropped.labels[:, :, -1] > 0).any()
    assert ml(cropped, 1) < ml(plain, 1)  # part of the liver is outside the crop
    off = synth_case(fast(organ_crop=0.0), 1)
    assert np.array_equal(off.image, plain.image) and off.meta == plain.meta
    with pytest.raises(SynthError, match="organ_crop_mm"):
        SynthConfig(organ_crop_mm=(200.0, 100.0))


@pytest.mark.slow
def test_exophytic_kidney_tumours_push_neighbours_aside():
    """Kidney tumours grow into fat and kidney, never over the spleen, liver or bowel: a tumour
    painted over the spleen keeps the spleen's shape, which taught the kidney model to call a
    healthy spleen next to the kidney "tumour"."""
    from hlfd_train.synth.anatomy import Patient, build
    from hlfd_train.synth.geometry import Grid
    from hlfd_train.synth.lesions import NEIGHBOURS, add_lesions
    from hlfd_train.synth.tissues import T

    replaced = grown = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        p = Patient.draw(rng)
        xs = ys = np.arange(-200.0, 200.0, 3.0)
        grid = Grid(xs, ys, np.arange(p.kidney_z[0] - 90, p.kidney_z[0] + 90, 3.0), rng, 8.0)
        anatomy = build(grid, p, rng)
        before = anatomy.tissue.copy()
        add_lesions(grid, anatomy, "kidney", rng, tumour_free=False)
        tumour = anatomy.tissue == T["kidney_tumour"]
        grown += int(tumour.sum())
        replaced += int(np.isin(before[tumour], NEIGHBOURS).sum())
    assert grown > 0 and replaced == 0


@pytest.mark.slow
def test_other_organ_lesions_are_painted_and_never_labelled():
    """``other_organ_lesions``: a kidney case carries liver tumours (the kidney model meets the
    liver tumours of a liver CT) labelled background; off (0) it draws no random number, so
    every case of a seed stays what it was."""
    from hlfd_train.synth.tissues import T

    case = synth_case(fast("kidney", tumour_free=1.0, other_organ_lesions=1.0), 1)
    organs = {rec["organ"] for rec in case.meta["lesions"] if rec["kind"] == "tumour"}
    assert organs == {"liver"} and not (case.labels == 2).any()
    assert (case.tissue == T["liver_tumour"]).sum() > 100
    plain, off = synth_case(fast("kidney"), 0), synth_case(fast("kidney", other_organ_lesions=0), 0)
    assert np.array_equal(plain.image, off.image) and plain.meta == off.meta
    with pytest.raises(SynthError, match="other_organ_lesions"):
        SynthConfig(other_organ_lesions=2.0)


def test_worst_case_montage_shows_the_slice_that_went_most_wrong(tmp_path):
    """The robustness montage keeps, per condition, the case that went most wrong and its
    slice with the most wrong voxels; a perfect prediction is not wrong at all."""
    from hlfd_train.synth.robustness import badness, case_metrics, worst_slice, write_worst_montage

    case = synth_case(fast(tumour_free=0.0, phases={"portal_venous": 1.0}), 3)
    perfect = case_metrics(case.labels, case.labels, case.spacing)
    assert badness(perfect) == 0
    z = int(np.argmax((case.labels > 0).sum(axis=(1, 2))))
    pred = case.labels.copy()
    pred[z] = 0  # one slice missed whole
    row = case_metrics(pred, case.labels, case.spacing)
    worst = worst_slice(case, pred, row)
    assert worst["z"] == z and worst["badness"] > 0 and not worst["pred"].any()
    healthy = {"organ_dice": 1.0, "tumour_dice": float("nan"), "tumour_free_fp_ml": 5.0}
    assert badness(healthy) == 0.5  # 10 mL of false tumour counts as a whole miss
    png = write_worst_montage({"standard": worst, "again": worst}, "m 1.0", tmp_path / "w.png")
    image = __import__("matplotlib.image").image.imread(png)
    assert image.shape[1] > image.shape[0] > 100 and image.std() > 0.05


def test_fatty_liver_and_ascites_change_the_image_not_the_labels():
    """``steatosis`` darkens the liver parenchyma but not its tumours (they hold no fat);
    ``ascites`` paints water into the abdominal fat around the liver; the labels stay, and both
    draw from their own stream: the rest of the case is the seed's plain case."""
    from hlfd_train.synth.tissues import T

    cfg = dict(phases={"portal_venous": 1.0}, tumour_free=0.0, metal=0.0)
    plain = synth_case(fast(**cfg), 2)
    sick = synth_case(fast(steatosis=1.0, ascites=1.0, **cfg), 2)
    assert np.array_equal(plain.labels, sick.labels)
    fat = sick.meta["liver_fat_hu"]
    assert 10 <= fat <= 45 and sick.meta["ascites"] and plain.meta["liver_fat_hu"] == 0
    liver = plain.tissue == T["liver"]
    drop = float(np.median(plain.image[liver]) - np.median(sick.image[liver]))
    assert 0.6 * fat <= drop <= 1.4 * fat, (fat, drop)
    core = plain.tissue == T["liver_tumour"]
    assert np.median(np.abs(plain.image[core] - sick.image[core].astype(np.float32))) < 0.3 * fat
    water = sick.tissue == T["ascites"]
    assert (
        water.sum() * np.prod(sick.spacing) / 1000 > 5 and not (plain.tissue == T["ascites"]).any()
    )
    assert np.array_equal(plain.tissue[~water], sick.tissue[~water])
    assert (plain.tissue[water] == T["visceral_fat"]).all()
    assert -30 < np.median(sick.image[water]) < 40
    with pytest.raises(SynthError, match="steatosis"):
        SynthConfig(steatosis=1.5)


def test_hu_spread_moves_organ_values_beyond_their_ranges_and_nothing_else():
    """``hu_spread`` rescales enhancement and shifts organ attenuation by patient, from its own
    stream: same anatomy and labels, the plain case's values when off, and across patients
    the portal-venous spleen reaches values the plain ranges never give (a real CT's 80 HU)."""
    from hlfd_train.synth.render import SOFT, spread_hu, tissue_hu
    from hlfd_train.synth.tissues import HU, PHASES, T

    cfg = dict(phases={"portal_venous": 1.0}, tumour_free=1.0, metal=0.0)
    plain = synth_case(fast(**cfg), 3)
    spread = synth_case(fast(hu_spread=1.0, **cfg), 3)
    assert np.array_equal(plain.labels, spread.labels)
    assert np.array_equal(plain.tissue, spread.tissue)
    assert spread.meta["hu_spread"] and not plain.meta["hu_spread"]
    spleen = plain.tissue == T["spleen"]
    assert abs(float(np.median(plain.image[spleen]) - np.median(spread.image[spleen]))) > 1.0
    # the lookup tables: the couplings hold, fat and air stay, spleen reaches below its range
    pv = PHASES.index("portal_venous")
    low = []
    for seed in range(40):
        lut = tissue_hu(np.random.default_rng(seed), "portal_venous", np.random.default_rng(seed))
        assert lut[T["kidney_medulla"]] <= lut[T["kidney_cortex"]] - 5
        assert lut[T["fat"]] == pytest.approx(
            tissue_hu(np.random.default_rng(seed), "portal_venous")[T["fat"]]
        )
        low.append(lut[T["spleen"]] < HU["spleen"][pv][0] - 15)
    assert any(low)
    # non-contrast: no enhancement to scale, only the organs' own +-12 HU
    base = tissue_hu(np.random.default_rng(0), "non_contrast")
    moved = spread_hu(base, "non_contrast", np.random.default_rng(1)) - base
    soft = [T[n] for n in SOFT]
    assert not np.delete(moved, soft).any() and 0 < np.abs(moved[soft]).max() <= 12
    with pytest.raises(SynthError, match="hu_spread"):
        SynthConfig(hu_spread=-0.1)


def test_splenomegaly_enlarges_the_spleen_toward_the_spine_from_its_own_stream():
    """``splenomegaly``: the spleen larger and closer to the spine (where the kidney models
    called a real spleen kidney), drawn from its own stream: the liver and its labels stay."""
    from hlfd_train.synth.tissues import T

    cfg = dict(phases={"portal_venous": 1.0}, tumour_free=1.0, metal=0.0, fov_cut=0.0)
    plain = synth_case(fast(**cfg), 4)
    big = synth_case(fast(splenomegaly=1.0, **cfg), 4)
    assert big.meta["splenomegaly"] and not plain.meta["splenomegaly"]
    assert np.array_equal(plain.labels, big.labels)
    spleen = [case.tissue == T["spleen"] for case in (plain, big)]
    assert spleen[1].sum() > 1.3 * spleen[0].sum()
    x = [plain.origin[0] + plain.spacing[0] * np.nonzero(s)[2] for s in spleen]
    assert np.percentile(x[1], 2) < np.percentile(x[0], 2) - 5  # mm nearer the midline
    with pytest.raises(SynthError, match="splenomegaly"):
        SynthConfig(splenomegaly=2.0)


def test_medulla_lag_keeps_portal_venous_pyramids_darker_from_its_own_stream():
    """``medulla_lag``: a portal-venous kidney whose medulla stays 40-100 HU under the cortex
    (a real CT's look that made every kidney model call tumour); same anatomy and labels, and
    no other phase changes."""
    from hlfd_train.synth.tissues import T

    cfg = dict(task="kidney", phases={"portal_venous": 1.0}, tumour_free=1.0, metal=0.0)
    plain = synth_case(fast(**cfg), 5)
    lag = synth_case(fast(medulla_lag=1.0, **cfg), 5)
    assert np.array_equal(plain.labels, lag.labels) and np.array_equal(plain.tissue, lag.tissue)
    assert 40 <= lag.meta["medulla_lag_hu"] <= 100 and plain.meta["medulla_lag_hu"] == 0
    cortex, medulla = (lag.tissue == T[n] for n in ("kidney_cortex", "kidney_medulla"))
    gap = [float(np.median(c.image[cortex]) - np.median(c.image[medulla])) for c in (plain, lag)]
    assert gap[1] > gap[0] + 25 and gap[1] > 30, gap
    far = ~ndimage.binary_dilation(medulla, iterations=6)  # scanner blur spreads the change
    assert np.abs(plain.image[far].astype(int) - lag.image[far]).max() == 0
    late = dict(cfg, phases={"delayed": 1.0})
    delayed = [synth_case(fast(**late), 5), synth_case(fast(medulla_lag=1.0, **late), 5)]
    assert np.array_equal(delayed[0].image, delayed[1].image)
    with pytest.raises(SynthError, match="medulla_lag"):
        SynthConfig(medulla_lag=1.5)


def test_huge_lesions_add_one_tumour_of_40_to_65_mm_from_their_own_stream():
    """``huge_lesions``: one more liver tumour, radius 40-65 mm (a real CT's 669 mL metastasis
    was larger than any the stream drew), placed first; none in a tumour-free case, none for
    the kidney task, and the case as it was with the chance at 0."""
    cfg = dict(tumour_free=0.0, metal=0.0)
    plain, huge = synth_case(fast(**cfg), 6), synth_case(fast(huge_lesions=1.0, **cfg), 6)
    assert np.array_equal(plain.image, synth_case(fast(huge_lesions=0.0, **cfg), 6).image)
    radius = huge.meta["lesions"][0]["radius_mm"]
    assert 40 <= radius <= 65
    assert radius >= max(rec["radius_mm"] for rec in plain.meta["lesions"])
    assert ml(huge, 2) > ml(plain, 2) + 50
    free = synth_case(fast(huge_lesions=1.0, tumour_free=1.0), 6)
    assert not (free.labels == 2).any()
    kidney = dict(task="kidney", tumour_free=1.0)
    assert np.array_equal(
        synth_case(fast(**kidney), 6).image, synth_case(fast(huge_lesions=1.0, **kidney), 6).image
    )
    with pytest.raises(SynthError, match="huge_lesions"):
        SynthConfig(huge_lesions=-1.0)


@pytest.mark.slow
def test_renal_detail_gives_pyramids_calyces_and_sinus_vessels_from_its_own_stream():
    """``renal_detail``: the inside of a real kidney (darker cone-shaped pyramids round the sinus,
    calyces, bright segmental vessels in the sinus fat) in the same kidneys; nothing outside
    them changes, and the vessels stay kidney in the labels."""
    from hlfd_train.synth.tissues import T

    cfg = dict(task="kidney", phases={"arterial": 1.0}, tumour_free=1.0, metal=0.0)
    cfg.update(inplane_mm=(1.4, 1.5), slice_mm=(1.5,), slice_weights=(1.0,), fov_cut=0.0)
    plain = synth_case(SynthConfig(**cfg, max_slices=64), 3)
    real = synth_case(SynthConfig(**cfg, max_slices=64, renal_detail=1.0), 3)
    assert real.meta["renal_detail"] and not plain.meta["renal_detail"]
    kidney = [c.labels == 1 for c in (plain, real)]
    assert (kidney[0] & kidney[1]).sum() >= 0.99 * kidney[0].sum()
    near = ndimage.binary_dilation(kidney[0] | kidney[1], iterations=3)
    assert np.array_equal(plain.tissue[~near], real.tissue[~near])
    vessels = kidney[1] & np.isin(real.tissue, [T["aorta"], T["ivc"]])
    assert vessels.sum() > 20 and not (kidney[0] & np.isin(plain.tissue, [T["aorta"]])).any()
    medulla = kidney[1] & (real.tissue == T["kidney_medulla"])
    parenchyma = medulla | (kidney[1] & (real.tissue == T["kidney_cortex"]))
    assert 0.15 < medulla.sum() / parenchyma.sum() < 0.45
    calyx = kidney[1] & (real.tissue == T["renal_pelvis"])
    assert (ndimage.binary_dilation(calyx) & medulla).sum() > 50  # papillae open into calyces
    cortex = kidney[1] & (real.tissue == T["kidney_cortex"])
    assert np.median(real.image[cortex]) - np.median(real.image[medulla]) > 40  # arterial
    with pytest.raises(SynthError, match="renal_detail"):
        SynthConfig(renal_detail=2.0)


@pytest.mark.slow
def test_medulla_lag_and_organ_crop_draw_from_streams_of_their_own():
    """Both chances drew the first number of the same stream: every cropped portal-venous case
    lagged and no uncropped one did."""
    cfg = fast(task="kidney", phases={"portal_venous": 1.0}, medulla_lag=0.5, organ_crop=0.5)
    cases = [synth_case(cfg, seed) for seed in range(12)]
    lagging = [c.meta["medulla_lag_hu"] > 0 for c in cases]
    cropped = [c.meta["organ_crop_mm"] is not None for c in cases]
    assert 0 < sum(lagging) < 12 and 0 < sum(cropped) < 12
    assert lagging != cropped


def test_bowel_by_kidney_lays_loops_against_the_kidneys_in_the_fat_only():
    """``bowel_by_kidney``: small-bowel loops against the kidneys (a real CT's jejunum by the
    left kidney was called kidney and tumour), painted over abdominal fat only: the labels and
    every organ stay as they were."""
    from hlfd_train.synth.tissues import T

    cfg = dict(task="kidney", tumour_free=1.0, metal=0.0, fov_cut=0.0)
    plain, loops = synth_case(fast(**cfg), 3), synth_case(fast(bowel_by_kidney=1.0, **cfg), 3)
    assert loops.meta["bowel_by_kidney"] and not plain.meta["bowel_by_kidney"]
    assert np.array_equal(plain.labels, loops.labels)
    changed = plain.tissue != loops.tissue
    assert changed.any() and (plain.tissue[changed] == T["visceral_fat"]).all()
    kidney = plain.labels == 1
    rim = ndimage.binary_dilation(kidney, iterations=2) & ~kidney
    wall = [(c.tissue == T["bowel_wall"]) & rim for c in (plain, loops)]
    assert wall[1].sum() > wall[0].sum()
    with pytest.raises(SynthError, match="bowel_by_kidney"):
        SynthConfig(bowel_by_kidney=-0.1)


def test_a_thin_patient_seed_makes_a_case():
    """Seed 82782 draws a patient so thin that the small bowel's box had no room front to back:
    the generator raised inside a training stream (1 in about 70,000 seeds)."""
    case = synth_case(fast(), 82782)
    assert case.image.shape == case.labels.shape and (case.labels == 1).any()


def stream(workers=0, context=0, **kw):
    from hlfd_train.synth.stream import SynthSliceStream, stream_settings

    s = stream_settings({"synth": {"max_slices": 24, "inplane_mm": [2.5, 3.0]}}, "kidney")
    pre = {"orientation": "LPS", "spacing": [3.0, 3.0, None], "window": [-200.0, 300.0]}
    pre["context_slices"] = context
    args = dict(crop=(64, 64), samples=10**6, crops_per_case=8, pool=2, batch=4, seed=3)
    return SynthSliceStream(
        s["config"], {**pre, "normalize": {"mode": "minmax"}}, **{**args, **kw}, workers=workers
    )


def test_stream_mixes_cases_in_every_batch_and_renews_them_in_turn():
    """Every batch draws from `pool` cases (BatchNorm sees several patients per step); each
    case serves crops_per_case crops, then its slot gets a new case, one slot at a time; each
    worker (batch b -> worker b mod W) makes its own cases."""
    from collections import Counter

    one = stream(0, pool=4)  # batch 4, 8 crops per case: a case lives 8 batches
    seeds = [[one.case_seed(4 * b + j) for j in range(4)] for b in range(64)]
    assert all(len(set(batch)) == 4 for batch in seeds)
    uses = Counter(s for batch in seeds for s in batch)
    assert sorted(set(uses.values()))[-1] == 8  # a whole life serves crops_per_case crops
    new = [len(set(seeds[b]) - set(seeds[b - 1])) for b in range(1, 64)]
    assert set(new) == {0, 1} and sum(new) == 63 // 2  # one new case every 2 batches
    two = stream(2, pool=4)
    lanes = [{two.case_seed(4 * b + j) for b in range(w, 32, 2) for j in range(4)} for w in (0, 1)]
    assert not lanes[0] & lanes[1]  # no case is made by both workers


@pytest.mark.slow
def test_stream_items_are_reproducible_and_workers_do_not_change_them():
    import torch
    from torch.utils.data import DataLoader

    from hlfd_train.engine import StepSampler

    def batches(ds, workers, start=0):
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=StepSampler(len(ds), 4, start),
            num_workers=workers,
            drop_last=True,
        )
        it = iter(loader)
        return [next(it) for _ in range(4)]

    a, b = batches(stream(2), 2), batches(stream(2), 0)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["image"].shape == (4, 1, 64, 64) and x["image"].dtype == torch.float32
    resumed = batches(stream(2), 0, start=2)  # a resumed run sees the same batches
    assert torch.equal(resumed[0]["image"], a[2]["image"])
    labels = torch.cat([x["label"] for x in a])
    assert set(labels.unique().tolist()) <= {0, 1, 2} and (labels > 0).any()


@pytest.mark.slow
def test_stream_with_context_slices_centres_the_one_slice_crop():
    import torch

    one, three = stream(0), stream(0, context=1)
    for i in (0, 1, 5):
        a, b = one[i], three[i]
        assert b["image"].shape == (3, 64, 64) and b["slice"] == a["slice"]
        assert torch.equal(b["image"][1:2], a["image"]) and torch.equal(b["label"], a["label"])


def test_stream_aux_labels_mark_the_tissues_after_organ_and_tumour():
    """aux_labels: background voxels of the named tissues get 3, 4, ... in order; organ and
    tumour keep theirs, and crops are still centred on organ or tumour, not on the aux ones."""
    from hlfd_train.synth.stream import stream_case, stream_settings

    s = stream_settings(
        {"synth": {"max_slices": 24, "inplane_mm": [2.5, 3.0]}, "aux_labels": ["spleen", "liver"]},
        "kidney",
    )
    pre = {"orientation": "LPS", "spacing": [3.0, 3.0, None], "window": [-200.0, 300.0]}
    pre["normalize"] = {"mode": "minmax"}
    plain = stream_case(s["config"], 7, pre)
    aux = stream_case(s["config"], 7, pre, s["aux_labels"])
    assert np.array_equal(plain.image, aux.image)
    kept = plain.label > 0
    assert np.array_equal(aux.label[kept], plain.label[kept])
    assert set(np.unique(aux.label[~kept])) == {0, 3, 4}
    assert (aux.label == 3).sum() > 100 and (aux.label == 4).sum() > (aux.label == 3).sum()
    assert np.array_equal(aux.foreground, plain.foreground)
    both = stream_case(s["config"], 7, pre, ["spleen+liver"])  # a group: one class
    assert np.array_equal(both.label == 3, (aux.label == 3) | (aux.label == 4))


def test_stream_settings_are_checked():
    from hlfd_train.config import ConfigError
    from hlfd_train.synth.stream import stream_settings

    for bad, word in [
        ({"aux_labels": ["spleen", "kidneys"]}, "aux_labels"),
        ({"aux_labels": ["spleen+kidneys"]}, "aux_labels"),
        ({"aux_labels": "spleen"}, "aux_labels"),
        ({"aux_labels": ["spleen", "spleen"]}, "twice"),
        ({"crop_per_case": 3}, "data.stream.crop_per_case"),
        ({"crops_per_case": 0}, "crops_per_case"),
        ({"pool": 0}, "pool"),
        ({"seed": "x"}, "seed"),
        ({"synth": {"noise_hu": [5, 1]}}, "noise_hu"),
    ]:
        with pytest.raises(ConfigError, match=word):
            stream_settings(bad, "kidney")


def test_a_bad_stream_setting_leaves_no_run_folder(tmp_path, capsys):
    from pathlib import Path

    recipe = str(Path(__file__).parents[1] / "training/configs/synth-liver-stream.yaml")
    code = train_cli(
        ["distill", "-c", recipe, "-q", "--set", f"output={tmp_path}", "data.stream.pool=0"]
    )
    assert code == 1 and "data.stream.pool" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
