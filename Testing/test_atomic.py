"""Atomic writes and their one mode rule: a new file/folder gets the umask's default, a replaced
one keeps its mode; every writer of the project goes through it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from HLFDSegmentLib import atomic
from HLFDSegmentLib.atomic import atomic_folder, atomic_path, atomic_write
from HLFDSegmentLib.errors import InputError
from HLFDSegmentLib.io import write_json
from HLFDSegmentLib.modelpackage import standard_labels
from HLFDSegmentLib.segfile import write_seg_nrrd

from conftest import build_package, make_image

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_new_entries_follow_the_process_umask(tmp_path):
    """Run in a process whose umask is 027: files 0640, folders 0750 (mkstemp/mkdtemp alone
    would give 0600/0700)."""
    code = textwrap.dedent(
        f"""
        import os
        os.umask(0o027)
        from pathlib import Path
        from HLFDSegmentLib.atomic import atomic_folder, atomic_write
        root = Path({str(tmp_path)!r})
        atomic_write(root / "f.txt", "x")
        with atomic_folder(root / "d") as tmp:
            (tmp / "inner").write_text("y")
        for name in ("f.txt", "d"):
            print(oct(os.stat(root / name).st_mode & 0o777))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["0o640", "0o750"]


@posix_only
def test_replaced_entries_keep_their_mode(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    path.chmod(0o600)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o600
    path.chmod(0o644)
    atomic_write(path, "newer")
    assert path.read_text() == "newer" and mode(path) == 0o644
    folder = tmp_path / "pkg"
    folder.mkdir(mode=0o700)
    (folder / "stale").write_text("gone after the replace")
    with atomic_folder(folder) as tmp:
        (tmp / "fresh").write_text("z")
    assert sorted(p.name for p in folder.iterdir()) == ["fresh"] and mode(folder) == 0o700


def test_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("before")
    with pytest.raises(RuntimeError), atomic_path(path, ".json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "d") as tmp:
        raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and path.read_text() == "before"
    with pytest.raises(InputError, match=r"output folder .* does not exist"):
        atomic_write(tmp_path / "missing" / "f", b"")


@posix_only
def test_every_writer_uses_the_rule(tmp_path, monkeypatch):
    """JSON reports, .seg.nrrd files, training checkpoints and model packages: new ones get the
    umask's mode (here 027), replaced ones keep theirs."""
    from hlfd_train.engine import atomic_save

    monkeypatch.setattr(atomic, "UMASK", 0o027)
    labels = standard_labels("kidney")
    image = make_image(np.zeros((4, 8, 8), dtype=np.uint8))
    writers = {
        "r.json": lambda p: write_json({"a": 1}, p),
        "s.seg.nrrd": lambda p: write_seg_nrrd(image, labels, p),
        "w.safetensors": lambda p: atomic_save(b"weights", p),
        "state.pt": lambda p: atomic_save({"step": torch.tensor(1)}, p),
        "pkg": build_package,  # save_package
    }
    for name, write in writers.items():
        path = tmp_path / name
        write(path)
        assert mode(path) == (0o750 if name == "pkg" else 0o640), name
        path.chmod(0o700 if name == "pkg" else 0o600)
        write(path)
        assert mode(path) == (0o700 if name == "pkg" else 0o600), name
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temporaries


def test_writers_of_one_folder_at_once_all_succeed(tmp_path):
    """Two runs preparing the same dataset write the same case folders at the same time: a
    folder swap is not atomic, so one may land between another's removal and its rename; every
    writer still succeeds and one complete folder stays, with no temporary beside it."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "case"

    def write(i: int) -> None:
        with atomic_folder(target) as tmp:
            for name in ("image.npy", "label.npy", "meta.json"):
                (tmp / name).write_text(str(i))

    for _ in range(30):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, range(8)))
        assert sorted(p.name for p in target.iterdir()) == ["image.npy", "label.npy", "meta.json"]
        assert len({(target / n).read_text() for n in ("image.npy", "meta.json")}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["case"]
