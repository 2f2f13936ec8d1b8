"""Atomic writes: a file or folder appears whole under its final name, or not at all.

One mode rule for everything written this way (:func:`final_mode`): a new file gets what a
plain ``open(path, "w")`` would give (0666 less the umask), a new folder what ``mkdir`` would
(0777 less the umask), and a replaced file or folder keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


UMASK = _current_umask()


def final_mode(path: Path, folder: bool = False) -> int:
    """The permission bits ``path`` gets: the replaced entry's, else the umask-respecting
    default of a new file (0666) or folder (0777)."""
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: another writer's swap
        return stat.S_IMODE(path.stat().st_mode)
    return (0o777 if folder else 0o666) & ~UMASK


def _checked_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise InputError(f"{path}: output folder {path.parent} does not exist")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (ending in ``suffix``, for writers that
    choose the format by extension); on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    _checked_parent(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, final_mode(path))  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an existing
    folder there is removed first; when another process puts its own there in between, as
    two runs preparing the same dataset do, the last one wins), on error it is removed."""
    path = Path(path)
    _checked_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise InputError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, final_mode(path, folder=True))  # mkdtemp makes 0700
        for attempt in range(8):  # a folder swap is two renames: another writer may come between
            old = path.parent / f".{path.name}.old.{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, old)  # moved aside whole, never emptied in place
            try:
                os.replace(tmp, path)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 7:
                    raise
            finally:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:  # a file was there
                    old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
