"""Model soups (weight averages of packages) and paired comparisons of two evaluations."""

from __future__ import annotations

import json

import pytest

from HLFDSegmentLib.modelpackage import load_package
from HLFDSegmentLib.pipeline import Segmenter

from conftest import block_ct, build_package, make_image


def test_soup_is_the_mean_of_the_weights_and_names_its_ingredients(tmp_path, onnx_package):
    import SimpleITK as sitk
    import torch
    from safetensors.torch import load

    from hlfd_train.soup import soup

    other = build_package(tmp_path / "other", seed=1)
    out = soup([onnx_package, other], tmp_path / "soup")
    package = load_package(out)  # checksums and card hold
    a, b, mean = (load(load_package(p).weights) for p in (onnx_package, other, out))
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert floats and any(not torch.equal(a[k], b[k]) for k in floats)
    for k, v in a.items():
        want = (v + b[k]) / 2 if v.is_floating_point() else v  # step counters: the first's
        torch.testing.assert_close(mean[k], want, rtol=1e-6, atol=1e-7)
        assert mean[k].dtype == v.dtype
    card = package.card
    assert card["version"] == "0.0.1+soup2" and card["provenance"]["method"].startswith("weight")
    shas = [
        load_package(p).card["files"]["model.safetensors"]["sha256"] for p in (onnx_package, other)
    ]
    assert [i["sha256"] for i in card["provenance"]["ingredients"]] == shas
    assert package.onnx is not None and set(card["metrics"]) == {"onnx_max_probability_error"}
    image = make_image(block_ct())  # the graph reads the soup's weights: both backends agree
    onnx, torch_ = (Segmenter(package, "cpu", backend=b)(image) for b in ("onnx", "torch"))
    assert onnx.backend == "onnx" and torch_.backend == "torch"
    agree = sitk.GetArrayFromImage(onnx.labels) == sitk.GetArrayFromImage(torch_.labels)
    assert agree.mean() > 0.999


def test_a_weighted_soup_interpolates_and_records_each_weight(tmp_path, capsys):
    import torch
    from safetensors.torch import load

    from hlfd_train.cli import main as train_cli

    a, b = (build_package(tmp_path / n, seed=i) for i, n in enumerate("ab"))
    out = tmp_path / "soup"
    assert train_cli(["soup", str(out), str(a), str(b), "--weights", "0.25", "0.75"]) == 0
    wa, wb, mixed = (load(load_package(p).weights) for p in (a, b, out))
    for k, v in wa.items():
        want = 0.25 * v + 0.75 * wb[k] if v.is_floating_point() else v
        torch.testing.assert_close(mixed[k], want, rtol=1e-6, atol=1e-7)
    card = load_package(out).card
    assert [i["weight"] for i in card["provenance"]["ingredients"]] == [0.25, 0.75]
    assert "the weighted mean of 2 packages" in card["description"]
    capsys.readouterr()
    for bad in (["0.5"], ["0.5", "0.6"], ["-0.5", "1.5"], ["nan", "1"]):
        assert train_cli(["soup", str(tmp_path / "no"), str(a), str(b), "--weights", *bad]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "--weights" in err
        assert not (tmp_path / "no").exists()


def test_a_soup_of_a_soup_says_its_data_and_weights_once_and_keeps_the_inner_ingredients(
    tmp_path,
):
    from hlfd_train.soup import soup

    packages = [build_package(tmp_path / f"p{i}", seed=i) for i in range(3)]
    for i, package in enumerate(packages):  # three streams of synthetic data
        card_path = package / "model.json"
        card = json.loads(card_path.read_text())
        card["provenance"]["data"] = f"stream {i}"
        card_path.write_text(json.dumps(card))
    inner = soup(packages[:2], tmp_path / "inner")
    outer = load_package(soup([inner, packages[2]], tmp_path / "outer")).card
    assert outer["description"].count(" Weights: the ") == 1
    assert outer["description"].endswith(
        "the mean of 2 packages fine-tuned from one start (provenance.ingredients)."
    )
    assert outer["provenance"]["data"] == "stream 0; the other ingredients': provenance.ingredients"
    first, second = outer["provenance"]["ingredients"]
    assert [i["data"] for i in first["ingredients"]] == ["stream 0", "stream 1"]
    assert "ingredients" not in second


def test_soup_refuses_packages_of_other_networks_and_writes_nothing(tmp_path, capsys):
    from hlfd_train.cli import main as train_cli

    a = build_package(tmp_path / "a")
    wider = build_package(tmp_path / "wider", network_kwargs={"base": 8})
    code = train_cli(["soup", str(tmp_path / "soup"), str(a), str(wider)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1
    assert "field 'network' differs" in err and str(wider) in err
    assert train_cli(["soup", str(tmp_path / "soup"), str(a)]) == 1
    assert "two or more" in capsys.readouterr().err
    before = (a / "model.safetensors").read_bytes()
    assert train_cli(["soup", str(a), str(a), str(build_package(tmp_path / "b", seed=1))]) == 1
    assert "is one of the packages to average" in capsys.readouterr().err
    assert (a / "model.safetensors").read_bytes() == before  # the ingredient is untouched
    assert not (tmp_path / "soup").exists()


def test_a_one_slice_ingredient_is_lifted_into_a_25d_soup(tmp_path, capsys):
    """A 2.5D package first: a one-slice ingredient joins with zero neighbour weights, so the
    soup's input convolution is half the 2.5D one's on the neighbour channels; the other way
    round is one clear line and nothing written."""
    import numpy as np
    import torch
    from safetensors.torch import load

    from hlfd_train.cli import main as train_cli
    from hlfd_train.soup import soup

    wide = build_package(
        tmp_path / "wide",
        seed=1,
        preprocessing={"context_slices": 1},
        postprocessing={"enabled": False},
    )
    one = build_package(tmp_path / "one", postprocessing={"enabled": False})
    package = load_package(soup([wide, one], tmp_path / "soup"))
    assert package.card["network"]["in_channels"] == 3
    assert package.card["preprocessing"]["context_slices"] == 1
    w, o, mean = (load(load_package(p).weights) for p in (wide, one, package.path))
    first = [k for k, v in w.items() if v.ndim == 4 and v.shape[1] == 3]
    assert len(first) == 1 and o[first[0]].shape[1] == 1
    k = first[0]
    torch.testing.assert_close(mean[k][:, ::2], w[k][:, ::2] / 2)
    torch.testing.assert_close(mean[k][:, 1:2], (w[k][:, 1:2] + o[k]) / 2)
    arr = np.random.default_rng(0).uniform(0, 1, (4, 32, 32)).astype(np.float32)
    assert Segmenter(package, "cpu", backend="torch").infer(arr).shape == arr.shape
    assert train_cli(["soup", str(tmp_path / "bad"), str(one), str(wide)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "most context_slices first" in err
    assert not (tmp_path / "bad").exists()
    named = ["--version", "0.5.0", "--name", "kidney-student", "--title", "Kidney (2.5D)"]
    assert train_cli(["soup", str(tmp_path / "named"), str(wide), str(one), *named]) == 0
    card = load_package(tmp_path / "named").card
    assert (card["name"], card["version"], card["title"]) == ("kidney-student", "0.5.0", named[5])
    assert card["description"] == package.card["description"]  # not given: the first's + soup


def test_an_ingredient_without_extra_classes_is_widened_into_a_soup_with_them(tmp_path, capsys):
    """The first package learnt an extra class (background_channels=1): a plain ingredient joins
    with its output layer widened (the new row a copy of background, bias 4 lower); the other
    way round is one clear line and nothing written."""
    import numpy as np
    import torch
    from safetensors.torch import load

    from hlfd_train.cli import main as train_cli
    from hlfd_train.soup import soup

    off = {"postprocessing": {"enabled": False}}
    aux = build_package(
        tmp_path / "aux", seed=1, network_kwargs={"base": 4, "background_channels": 1}, **off
    )
    plain = build_package(tmp_path / "plain", **off)
    package = load_package(soup([aux, plain], tmp_path / "soup"))
    assert package.card["network"]["kwargs"] == {"base": 4, "background_channels": 1}
    a, b, mean = (load(load_package(p).weights) for p in (aux, plain, package.path))
    heads = [k for k in a if a[k].shape[:1] == (4,) and b[k].shape[:1] == (3,)]
    assert heads and all(k.endswith(("weight", "bias")) for k in heads)
    for k in heads:
        row = b[k][:1] - (4.0 if k.endswith("bias") else 0.0)
        torch.testing.assert_close(mean[k][:3], (a[k][:3] + b[k]) / 2)
        torch.testing.assert_close(mean[k][3:], (a[k][3:] + row) / 2)
    arr = np.random.default_rng(0).uniform(0, 1, (4, 32, 32)).astype(np.float32)
    assert Segmenter(package, "cpu", backend="torch").infer(arr).max() <= 2
    assert train_cli(["soup", str(tmp_path / "bad"), str(plain), str(aux)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "most first" in err
    assert not (tmp_path / "bad").exists()


def _report(cases: dict[str, tuple[float | None, float | None]]) -> dict:
    """An evaluation report of ``{case: (organ Dice, tumour Dice or None: tumour-free)}``."""
    rows = []
    for case, (organ, tumour) in cases.items():
        fp = None if tumour is not None else 2.0
        rows.append(
            {
                "case": case,
                "labels": {
                    "Kidney": {"dice": organ, "fp_ml": None},
                    "Kidney tumor": {"dice": tumour, "fp_ml": fp},
                },
                "lesions": {"tp": 1, "fn": 0, "fp": 0 if tumour is None else 1},
            }
        )
    fp = [r["labels"]["Kidney tumor"]["fp_ml"] for r in rows if tumour_free(r)]
    summary = {  # the fields of evaluate.summarise that compare reads
        "Kidney": {"fp_ml": {"mean": None, "n": 0}},
        "Kidney tumor": {"fp_ml": {"mean": sum(fp) / len(fp) if fp else None, "n": len(fp)}},
        "lesions": {k: sum(r["lesions"][k] for r in rows) for k in ("tp", "fn", "fp")},
    }
    return {"cases": rows, "summary": summary}


def tumour_free(row: dict) -> bool:
    return row["labels"]["Kidney tumor"]["dice"] is None


def test_compare_pairs_cases_and_leaves_undefined_values_out(tmp_path, capsys):
    from hlfd_train.cli import main as train_cli
    from hlfd_train.compare import compare

    old = _report({"a": (0.8, 0.5), "b": (0.8, 0.4), "c": (0.9, None), "d": (0.7, 0.6)})
    new = _report({"d": (0.7, 0.7), "b": (0.9, 0.5), "a": (0.8, 0.6), "c": (0.9, None)})
    result = compare(new, old)
    tumour = result["Kidney tumor"]
    assert tumour["n"] == 3 and tumour["mean_diff"] == pytest.approx(0.1)
    assert tumour["better"] == 3 and tumour["worse"] == 0 and tumour["fp_cases"] == 1
    lo, hi = tumour["ci95"]
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # every pair differs by 0.1
    organ = result["Kidney"]
    assert organ["n"] == 4 and (organ["better"], organ["worse"]) == (1, 0)
    assert result["lesions"]["new"] == {"tp": 4, "fn": 0, "fp": 3}
    for label in ("Kidney", "Kidney tumor"):  # a distance that falls is an improvement
        for report, scale in ((new, 10.0), (old, 20.0)):
            for row in report["cases"]:
                dice = row["labels"][label]["dice"]
                row["labels"][label]["hd95"] = None if dice is None else scale
    distance = compare(new, old, "hd95")["Kidney tumor"]
    assert distance["mean_diff"] == pytest.approx(-10.0) and distance["better"] == 3
    for name, report in (("new", new), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(report))
    assert (
        train_cli(["compare", str(tmp_path / "new"), str(tmp_path / "old" / "metrics.json")]) == 0
    )
    assert "| Kidney tumor | 3 | +0.1000 | [+0.1000, +0.1000] |" in capsys.readouterr().out
    del new["cases"][0]
    (tmp_path / "new" / "metrics.json").write_text(json.dumps(new))
    assert train_cli(["compare", str(tmp_path / "new"), str(tmp_path / "old")]) == 1
    assert "other cases (1 differ)" in capsys.readouterr().err
    assert train_cli(["compare", str(tmp_path / "new"), str(tmp_path / "missing.json")]) == 1
    assert "not an evaluation report" in capsys.readouterr().err
