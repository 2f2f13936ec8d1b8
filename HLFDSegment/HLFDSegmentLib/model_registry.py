"""Model registry, cache and download: turn a MODEL argument into a local package path.

A MODEL argument is a built-in model id (a package shipped in ``Resources/Models/<id>/``, e.g.
``liver`` or ``kidney``), a model package on disk (a folder or a ``.zip``, returned as is) or a
registry id, ``ID`` or ``ID@VERSION``, looked up in ``models.json``. A registry package is taken
from the cache when its sha256 matches (no network), else downloaded: streamed to ``NAME.part``
(resumed with an HTTP Range request when a partial file is left from an earlier try), checked
against the registry's sha256 and size, then renamed in one step, so the final name never shows a
half-written or unverified file. A lock file beside it keeps two downloaders of one file apart.
Network access uses ``urllib`` only; ``http(s)://`` and ``file://`` URLs are supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # jsonschema is imported when a registry is validated, not to list the cache
    import jsonschema

from . import __version__
from .errors import ModelError

REGISTRY_PATH = Path(__file__).resolve().parents[1] / "Resources" / "models.json"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "Resources" / "Schemas" / "models.schema.json"
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
REGISTRY_ENV = "HLFD_MODEL_REGISTRY"
CACHE_ENV = "HLFD_CACHE_DIR"
CHUNK_SIZE = 1 << 20
DEADLINE_S = 3600.0  # a whole download (and a wait for another downloader's lock)
MIN_RATE_BPS = 4096.0  # slower than this on average after GRACE_S: give up (resumable)
GRACE_S = 30.0

ByteProgress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; ``total_bytes`` is 0 when unknown."""

log = logging.getLogger(__name__)


class RegistryError(ModelError):
    """The registry file is missing, not JSON, or does not follow ``models.schema.json``."""


class ModelNotFoundError(ModelError):
    """Neither a package on disk nor a known registry id (or version)."""


class DownloadError(ModelError):
    """The package could not be fetched (HTTP error, network failure, bad URL)."""


class OfflineError(DownloadError):
    """Offline mode, and the package is not in the cache."""


class ChecksumError(ModelError):
    """Downloaded or cached bytes do not match the registry's sha256 or size."""


@dataclass(frozen=True)
class RegistryEntry:
    """One released model package, as listed in ``models.json``."""

    id: str
    title: str
    task: str
    version: str
    url: str
    sha256: str
    size: int
    license: str
    description: str = ""
    runtimes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """``ID@VERSION``: the unambiguous MODEL argument for this entry."""
        return f"{self.id}@{self.version}"

    @property
    def filename(self) -> str:
        """File name of the package in the cache."""
        return f"{self.id}-{self.version}.zip"


# -- locations -------------------------------------------------------------------------------


def registry_path() -> Path:
    """The registry in use: ``$HLFD_MODEL_REGISTRY`` if set, else the one shipped with the code."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env).expanduser() if env else REGISTRY_PATH


def cache_dir() -> Path:
    """Where downloaded packages live: ``$HLFD_CACHE_DIR`` or the platform's user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hlfd-segment" / "models"


def builtin_models() -> dict[str, Path]:
    """Packages shipped inside the extension (``Resources/Models/<id>/``): id -> folder. They
    need no download and are checked like any package (sha256 of every file) when loaded."""
    if not BUILTIN_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUILTIN_DIR.iterdir()) if (p / "model.json").is_file()}


def cached_models() -> list[Path]:
    """Packages already in the cache: ``.zip`` files and folders holding a ``model.json``."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if (p.is_file() and p.suffix.lower() == ".zip")
        or (p.is_dir() and (p / "model.json").is_file())
    ]


# -- registry --------------------------------------------------------------------------------


@cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def _error_key(err: jsonschema.ValidationError) -> list[tuple[int, int | str]]:
    return [(0, p) if isinstance(p, int) else (1, str(p)) for p in err.absolute_path]


def _describe(err: jsonschema.ValidationError) -> tuple[str, str]:
    """(field path, problem) for one schema error; a missing field is named itself."""
    parts = [str(p) for p in err.absolute_path]
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [name for name in err.validator_value if name not in err.instance]
        if missing:
            return "/".join([*parts, missing[0]]), "required field is missing"
    return "/".join(parts) or "(top level)", err.message


def load_registry(path: str | os.PathLike[str] | None = None) -> list[RegistryEntry]:
    """Read and validate a registry file (default: :func:`registry_path`)."""
    path = Path(path) if path is not None else registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"{path}: model registry file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read the model registry ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    errors = list(_validator().iter_errors(data))
    if errors:
        where, problem = _describe(min(errors, key=_error_key))
        raise RegistryError(f"{path}: field '{where}': {problem}")
    entries = [RegistryEntry(**item) for item in data["models"]]
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        if (entry.id, entry.version) in seen:
            raise RegistryError(f"{path}: field 'models/{i}/version': {entry.spec} listed twice")
        seen.add((entry.id, entry.version))
    return entries


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """Order versions numerically part by part ("1.10" > "1.9"; "1.0rc1" < "1.0")."""
    return [(1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"[.+_-]", version)]


def find_entry(
    entries: list[RegistryEntry], spec: str, where: str | Path = "registry"
) -> RegistryEntry:
    """The entry for ``ID`` (its highest version) or ``ID@VERSION``."""
    model_id, _, version = spec.partition("@")
    matches = [e for e in entries if e.id == model_id]
    if not matches:
        known = sorted({e.id for e in entries})
        listed = ", ".join(known) if known else "none (the registry lists no models yet)"
        raise ModelNotFoundError(
            f"{spec!r} is neither a model folder/.zip nor a model id in {where}; "
            f"known ids: {listed}"
        )
    if not version:
        return max(matches, key=lambda e: _version_key(e.version))
    for entry in matches:
        if entry.version == version:
            return entry
    versions = ", ".join(sorted((e.version for e in matches), key=_version_key))
    raise ModelNotFoundError(
        f"model {model_id!r} has no version {version!r} in {where}; available: {versions}"
    )


def _looks_like_path(text: str) -> bool:
    return (
        any(sep in text for sep in ("/", "\\", os.sep))
        or text.lower().endswith(".zip")
        or text.startswith(("~", "."))
    )


def resolve_model(
    spec: str | os.PathLike[str],
    *,
    registry: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: ByteProgress | None = None,
) -> Path:
    """Local path of the package named by ``spec`` (a path, ``ID`` or ``ID@VERSION``).

    A registry package comes from the cache when its sha256 matches, without touching the
    network; otherwise it is downloaded into the cache (refused when ``offline``).
    """
    text = os.fspath(spec)
    if isinstance(spec, os.PathLike) or _looks_like_path(text):
        path = Path(text).expanduser()
        if path.exists():
            return path
        raise ModelNotFoundError(f"{text}: no such model folder or .zip file")
    # an id (no "/", no ".zip"): built-in, then registry; a same-named folder in the working
    # directory never shadows a sha-pinned model (write ./NAME to mean the folder)
    builtin = builtin_models().get(text)
    if builtin is not None:
        return builtin
    reg = Path(registry) if registry is not None else registry_path()
    try:
        entry = find_entry(load_registry(reg), text, reg)
    except ModelNotFoundError as exc:
        hint = f"; built-in models: {', '.join(builtin_models()) or 'none'}"
        if Path(text).exists():
            hint += f"; to use the folder or file {text!r}, write ./{text}"
        raise ModelNotFoundError(f"{exc}{hint}") from None
    dest = cache_dir() / entry.filename
    if dest.is_file():
        digest, nbytes = file_sha256(dest)
        if digest == entry.sha256 and nbytes == entry.size:
            return dest
        if offline:
            raise ChecksumError(
                f"{dest}: cached copy of {entry.spec} is corrupt (sha256 {digest}, {nbytes} B; "
                f"registry {entry.sha256}, {entry.size} B); run without offline mode to fetch it"
            )
        log.warning("%s: cached copy does not match the registry; downloading it again", dest)
    elif offline:
        raise OfflineError(
            f"model {entry.spec} is not in the cache ({dest}) and offline mode forbids "
            f"downloading it from {entry.url}"
        )
    return download(entry.url, dest, entry.sha256, entry.size, progress)


# -- download --------------------------------------------------------------------------------


def file_sha256(path: Path) -> tuple[str, int]:
    """(hex sha256, byte count) of a file, read in chunks."""
    digest = hashlib.sha256()
    nbytes = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
            nbytes += len(chunk)
    return digest.hexdigest(), nbytes


def _open_nofollow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link planted at ``path`` (a shared cache folder)."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise DownloadError(f"{path}: is a symbolic link; refusing to follow it") from None
        raise exc


@contextlib.contextmanager
def _exclusive(lock_path: Path, deadline: float = DEADLINE_S) -> Iterator[None]:
    """Hold an OS lock on ``lock_path`` (released by the OS if the process dies); wait for
    another holder at most ``deadline`` seconds."""
    with os.fdopen(_open_nofollow(lock_path, os.O_RDWR | os.O_CREAT), "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            while True:
                fh.seek(0)
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)  # retries ~10 s, then raises
                    break
                except OSError:
                    log.info("waiting for another download of %s", lock_path.stem)
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            until = time.monotonic() + deadline
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > until:
                        raise DownloadError(
                            f"{lock_path}: another download held the lock for over {deadline:.0f} s"
                        ) from None
                    log.info("waiting for another download of %s", lock_path.stem)
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a ``Content-Range: bytes a-b/total`` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _open(url: str, start: int, timeout: float) -> Any:
    headers = {"User-Agent": f"hlfd-segment/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and start:
            return None  # nothing left to send: the part may already be complete
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"{url}: cannot download ({reason})") from None


@dataclass(frozen=True)
class Limits:
    """How long a download may take: per read (``timeout``), in all (``deadline``), and the
    average rate below which it gives up after ``grace`` seconds (a trickling server)."""

    timeout: float = 30.0
    deadline: float = DEADLINE_S
    min_rate: float = MIN_RATE_BPS
    grace: float = GRACE_S


def _fetch(
    url: str, part: Path, size: int | None, progress: ByteProgress | None, limits: Limits
) -> tuple[str, int, int]:
    """Complete ``part`` from ``url``; return (sha256, byte count, offset it resumed from)."""
    if part.is_symlink():
        raise DownloadError(f"{part}: is a symbolic link; refusing to follow it")
    have = part.stat().st_size if part.is_file() else 0
    timeout = limits.timeout
    if size is not None and have > size:
        part.unlink()
        have = 0
    resp = _open(url, have, timeout)
    if resp is None:
        digest, nbytes = file_sha256(part)
        return digest, nbytes, have
    with resp:
        status = getattr(resp, "status", None)
        crange = _content_range(resp.headers.get("Content-Range"))
        length = resp.headers.get("Content-Length")
        if have and status == 206:
            if crange is None or crange[0] != have:
                resp.close()
                part.unlink()  # a range we did not ask for: start over without one
                return _fetch(url, part, size, progress, limits)
            start, total = have, crange[1]
        else:
            start, total = 0, None  # a full body: the server ignored Range or none was sent
        if total is None and length and length.isdigit():
            total = start + int(length)
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: server offers {total} B, registry expects {size} B")
        expected = size if size is not None else total
        digest = hashlib.sha256()
        if start:
            with part.open("rb") as fh:
                while chunk := fh.read(CHUNK_SIZE):
                    digest.update(chunk)
        done = start
        if progress:
            progress(done, expected or 0)
        read = getattr(resp, "read1", resp.read)  # read1: what has arrived, up to CHUNK_SIZE
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if start else os.O_TRUNC)
        t0 = time.monotonic()
        with os.fdopen(_open_nofollow(part, flags), "ab" if start else "wb") as out:
            try:
                while chunk := read(CHUNK_SIZE):
                    done += len(chunk)
                    if expected is not None and done > expected:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(done, expected or 0)
                    _check_pace(url, done - start, time.monotonic() - t0, limits)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"{url}: download interrupted after {done} B ({exc}); run again to resume"
                ) from None
            out.flush()
            os.fsync(out.fileno())
    if expected is not None and done > expected:
        part.unlink()
        raise ChecksumError(f"{url}: server sent more than the expected {expected} B")
    if total is not None and done < total:
        raise DownloadError(
            f"{url}: connection closed after {done} of {total} B; run again to resume"
        )
    return digest.hexdigest(), done, start


def _check_pace(url: str, received: int, elapsed: float, limits: Limits) -> None:
    if elapsed > limits.deadline:
        raise DownloadError(
            f"{url}: download took longer than {limits.deadline:.0f} s; run again to resume"
        )
    if elapsed > limits.grace and received / elapsed < limits.min_rate:
        raise DownloadError(
            f"{url}: server too slow ({received / elapsed:.0f} B/s for {elapsed:.0f} s, under "
            f"{limits.min_rate:.0f} B/s); run again to resume"
        )


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str,
    size: int | None = None,
    progress: ByteProgress | None = None,
    timeout: float = 30,
    limits: Limits | None = None,
) -> Path:
    """Fetch ``url`` to ``dest``, verified against ``sha256`` (and ``size``); return ``dest``.

    Bytes go to ``dest.part`` (resumed if present) and are renamed to ``dest`` only after the
    check passes. On a mismatch the part is deleted and :class:`ChecksumError` raised; a resumed
    part that fails the check is first retried once from the start. If ``dest`` already holds
    the right bytes (e.g. another process just finished), nothing is fetched.
    """
    dest = Path(dest)
    sha256 = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ModelError(f"{url}: invalid sha256 {sha256!r} (expected 64 hex digits)")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise DownloadError(f"{url}: unsupported URL scheme (use https://, http:// or file://)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    limits = limits or Limits(timeout=timeout)
    with _exclusive(dest.with_name(dest.name + ".lock"), limits.deadline):
        if dest.is_file():
            digest, nbytes = file_sha256(dest)
            if digest == sha256 and (size is None or nbytes == size):
                return dest
            dest.unlink()
        log.info("downloading %s -> %s", url, dest)
        while True:
            digest, nbytes, start = _fetch(url, part, size, progress, limits)
            if digest == sha256 and (size is None or nbytes == size):
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            if start == 0:
                break
            log.warning("%s: resumed download failed its check; starting over", url)
    raise ChecksumError(
        f"{url}: sha256 mismatch for {dest.name}: expected {sha256}, got {digest} ({nbytes} B)"
    )


def tqdm_progress(desc: str = "download", **tqdm_kwargs: Any) -> ByteProgress:
    """A progress callback that draws a tqdm byte counter (created on first call)."""
    from tqdm import tqdm

    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total or None,
                initial=done,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                **tqdm_kwargs,
            )
        else:
            bar.total = total or None
            bar.n = done
            bar.refresh()
        if total and done >= total:
            bar.close()
            bar = None

    return update
