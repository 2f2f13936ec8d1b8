"""Model packages: round trip, zip, and every refusal with a message naming file and field."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from HLFDSegmentLib.errors import ModelError
from HLFDSegmentLib.modelpackage import (
    load_package,
    save_package,
    sha256_bytes,
    standard_labels,
    validate_card,
)


@pytest.fixture
def pkg(tiny_package, tmp_path) -> Path:
    """A private copy of the session's tiny package, free to be damaged."""
    return Path(shutil.copytree(tiny_package, tmp_path / "pkg"))


def edit_card(pkg: Path, change) -> None:
    card = json.loads((pkg / "model.json").read_text())
    change(card)
    (pkg / "model.json").write_text(json.dumps(card))


def zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, prefix + f.name)
    return out


def test_round_trip_builds_the_same_network(pkg):
    package = load_package(pkg)
    assert package.name == "test-model" and package.spatial_dims == 2
    net = package.build_network()
    assert not net.training
    x = torch.rand(1, 1, 32, 32)
    torch.manual_seed(0)
    again = load_package(pkg).build_network()
    assert torch.equal(net(x), again(x))


def test_weights_fill_every_tensor_and_constructor_buffers_keep_their_value(pkg, monkeypatch):
    """The network is built on the meta device and filled from the weights (no random init
    to overwrite); a network whose constructor sets a non-persistent buffer, which no weights
    file holds, is built for real instead, so that buffer keeps its value."""
    from safetensors.torch import load_file

    import HLFDSegmentLib.modelpackage as modelpackage

    net = load_package(pkg).build_network()
    weights = load_file(pkg / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    build = modelpackage.ModelPackage._card_network

    def with_buffer(self):
        net = build(self)
        net.register_buffer("scale", torch.full((1,), 2.0), persistent=False)
        return net

    monkeypatch.setattr(modelpackage.ModelPackage, "_card_network", with_buffer)
    assert load_package(pkg).build_network().scale.item() == 2.0


@pytest.mark.parametrize("prefix", ["", "tiny/"])
def test_zip_package_loads_in_memory(pkg, tmp_path, prefix):
    archive = zip_folder(pkg, tmp_path / "model.zip", prefix)
    package = load_package(archive)
    assert package.weights == (pkg / "model.safetensors").read_bytes()
    assert not (tmp_path / "model.safetensors").exists()


def test_standard_labels_carry_snomed_codes():
    kidney, tumour = standard_labels("kidney")
    assert kidney["terminology"]["type"]["code"] == "64033007"
    assert tumour["terminology"]["region"]["code"] == "64033007"
    assert tumour["terminology"]["type"]["code"] == "108369006"
    assert standard_labels("liver")[0]["terminology"]["type"]["code"] == "10200004"
    assert kidney["keep_largest"] == 2 and standard_labels("liver")[0]["keep_largest"] == 1


def test_tampered_weights_are_refused(pkg):
    data = bytearray((pkg / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.safetensors: sha256/size mismatch"):
        load_package(pkg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("labels"), r"field '\(top level\)': 'labels' is a required property"),
        (lambda c: c["network"].update(spatial_dims="2"), r"field 'network/spatial_dims'"),
        (lambda c: c["labels"][0].update(color=[0, 0, 300]), r"field 'labels/0/color/2'"),
        (lambda c: c["network"].update(architecture="vgg99"), r"unknown architecture 'vgg99'"),
        (
            lambda c: c["network"].update(out_channels=4),
            r"'network/out_channels' is 4 but 2 labels",
        ),
        (lambda c: c["labels"][1].update(value=3), r"field 'labels': values must be 1..2"),
        (lambda c: c["labels"][1].update(inside=7), r"labels/1/inside': no label 7"),
        (lambda c: c.update(format_version=2), r"field 'format_version'"),
        (
            lambda c: c["preprocessing"].update(context_slices=1),
            r"'network/in_channels' is 1 but 1 context slice\(s\) on each side need 3",
        ),
        (
            lambda c: c["preprocessing"].update(context_slices=5),
            r"field 'preprocessing/context_slices'",
        ),
    ],
)
def test_invalid_cards_are_refused_naming_the_field(pkg, change, message):
    edit_card(pkg, change)
    with pytest.raises(ModelError, match=message) as err:
        load_package(pkg)
    assert str(pkg / "model.json") in str(err.value)


def test_weights_outside_the_package_are_refused(pkg, tmp_path):
    outside = tmp_path / "evil.safetensors"
    shutil.copy(pkg / "model.safetensors", outside)

    def point_out(card):
        card["weights"] = "../evil.safetensors"
        card["files"]["../evil.safetensors"] = card["files"].pop("model.safetensors")

    edit_card(pkg, point_out)
    with pytest.raises(ModelError, match="points outside the package"):
        load_package(pkg)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    ckpt = tmp_path / "student.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(ModelError, match="pickled torch checkpoint"):
        load_package(ckpt)
    raw = tmp_path / "model.pkl"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(ModelError, match="pickle file; refusing"):
        load_package(raw)


@pytest.mark.parametrize("member", ["/etc/model.json", "../model.json", "a/../../model.json"])
def test_zip_slip_member_names_are_refused(pkg, tmp_path, member):
    archive = zip_folder(pkg, tmp_path / "bad.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, "{}")
    with pytest.raises(ModelError, match="unsafe member name"):
        load_package(archive)


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path):
    from HLFDSegmentLib.modelpackage import make_card

    card = make_card(
        name="m",
        version="1",
        task="liver",
        architecture="tiny_unet2d",
        spatial_dims=2,
        network_kwargs={"base": 4},
    )
    out = save_package(tmp_path / "m", card, {"conv.weight": torch.zeros(3, 1, 1, 1)})
    with pytest.raises(ModelError, match=r"model\.safetensors: weights do not fit network"):
        load_package(out).build_network()


def test_missing_folder_and_garbage_file(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        load_package(tmp_path / "nope")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ModelError, match="not a model package"):
        load_package(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"model\.json: missing file"):
        load_package(tmp_path / "empty")


def test_broken_json_names_the_card(pkg):
    (pkg / "model.json").write_text("{ not json")
    with pytest.raises(ModelError, match=r"model\.json: not valid JSON"):
        load_package(pkg)


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path, tiny_package):
    card = load_package(tiny_package).card
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ModelError, match="not a model package; refusing to overwrite"):
        save_package(foreign, card, {})
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_card_checksums_match_files(tiny_package):
    card = json.loads((tiny_package / "model.json").read_text())
    validate_card(card)
    for name, meta in card["files"].items():
        assert sha256_bytes((tiny_package / name).read_bytes()) == meta["sha256"]
