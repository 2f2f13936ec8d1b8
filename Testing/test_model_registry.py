"""Model registry, cache and download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from HLFDSegmentLib import model_registry as registry
from HLFDSegmentLib.errors import HLFDError, ModelError
from HLFDSegmentLib.model_registry import (
    ChecksumError,
    DownloadError,
    ModelNotFoundError,
    OfflineError,
    RegistryError,
    cached_models,
    download,
    load_registry,
    resolve_model,
    tqdm_progress,
)

PAYLOAD = bytes(range(256)) * 1200 + b"tail"  # 307204 B: several 64 KiB chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer:
    """Serves ``files`` over HTTP/1.0; logs every request and the body bytes it sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.cut_after: int | None = None  # drop the connection after this many body bytes
        self.send_length = True
        self.trickle: float | None = None  # seconds between single body bytes
        self.running = True
        self.log: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                data = srv.files.get(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                if data is None:
                    srv.log.append({"range": rng, "status": 404, "sent": 0})
                    self.send_error(404, "Not Found")
                    return
                start, status = 0, 200
                if rng and srv.honour_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                    if start >= len(data):
                        srv.log.append({"range": rng, "status": 416, "sent": 0})
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                sent = body if srv.cut_after is None else body[: srv.cut_after]
                srv.log.append({"range": rng, "status": status, "sent": len(sent)})
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if srv.send_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if srv.trickle is None:
                    self.wfile.write(sent)
                    return
                for i in range(len(sent)):  # one byte at a time, until the client gives up
                    try:
                        self.wfile.write(sent[i : i + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(srv.trickle)

        return Handler


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(registry, "CHUNK_SIZE", 64 * 1024)


@pytest.fixture
def server():
    srv = FileServer()
    srv.files["m.zip"] = PAYLOAD
    yield srv
    srv.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("HLFD_CACHE_DIR", str(path))
    return path


def entry(**overrides) -> dict:
    item = {
        "id": "kidney-test",
        "title": "Test kidney model",
        "task": "kidney",
        "version": "1.0.0",
        "url": "http://127.0.0.1:9/m.zip",
        "sha256": PAYLOAD_SHA,
        "size": len(PAYLOAD),
        "license": "Apache-2.0",
        "description": "served by the test",
        "runtimes": [{"device": "cpu", "seconds": 4.2, "input": "512x512x200", "machine": "x"}],
    }
    item.update(overrides)
    return item


def write_registry(path: Path, models: list[dict], **top) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models, **top}))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# -- download ----------------------------------------------------------------------------------


def test_fresh_download_verifies_and_reports_progress(server, tmp_path):
    got: list[tuple[int, int]] = []
    dest = download(
        server.url("m.zip"),
        tmp_path / "m.zip",
        PAYLOAD_SHA,
        len(PAYLOAD),
        progress=lambda done, total: got.append((done, total)),
    )
    assert dest == tmp_path / "m.zip" and dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["m.zip"]
    assert server.log == [{"range": None, "status": 200, "sent": len(PAYLOAD)}]
    assert got[0] == (0, len(PAYLOAD)) and got[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in got] == sorted(d for d, _ in got) and len(got) > 3
    # the same call again finds the verified file and fetches nothing
    assert download(server.url("m.zip"), dest, PAYLOAD_SHA) == dest
    assert len(server.log) == 1


def test_resume_transfers_only_the_missing_bytes(server, tmp_path):
    have = 100_003
    (tmp_path / "m.zip.part").write_bytes(PAYLOAD[:have])
    got: list[tuple[int, int]] = []
    dest = download(
        server.url("m.zip"),
        tmp_path / "m.zip",
        PAYLOAD_SHA,
        len(PAYLOAD),
        progress=lambda done, total: got.append((done, total)),
    )
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [{"range": f"bytes={have}-", "status": 206, "sent": len(PAYLOAD) - have}]
    assert got[0] == (have, len(PAYLOAD))
    assert leftovers(tmp_path) == ["m.zip"]


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    server.cut_after = 70_000
    with pytest.raises(DownloadError, match=r"m\.zip.*run again to resume"):
        download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert not (tmp_path / "m.zip").exists()
    assert (tmp_path / "m.zip.part").read_bytes() == PAYLOAD[:70_000]
    server.cut_after = None
    download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert (tmp_path / "m.zip").read_bytes() == PAYLOAD
    assert server.log[1] == {
        "range": "bytes=70000-",
        "status": 206,
        "sent": len(PAYLOAD) - 70_000,
    }


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    (tmp_path / "m.zip.part").write_bytes(PAYLOAD[:50_000])
    dest = download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD  # not the first 50 kB twice
    assert server.log == [{"range": "bytes=50000-", "status": 200, "sent": len(PAYLOAD)}]
    assert leftovers(tmp_path) == ["m.zip"]


def test_stale_part_fails_check_then_restarts_once(server, tmp_path):
    (tmp_path / "m.zip.part").write_bytes(b"x" * 1000)  # left from another file
    dest = download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in server.log] == [("bytes=1000-", 206), (None, 200)]


def test_complete_part_answered_416_is_verified(server, tmp_path):
    (tmp_path / "m.zip.part").write_bytes(PAYLOAD)
    dest = download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [r["status"] for r in server.log] == [416]


def test_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download(server.url("m.zip"), tmp_path / "m.zip", wrong, len(PAYLOAD))
    msg = str(info.value)
    assert server.url("m.zip") in msg and "m.zip" in msg
    assert wrong in msg and PAYLOAD_SHA in msg
    assert isinstance(info.value, ModelError) and isinstance(info.value, HLFDError)
    assert leftovers(tmp_path) == []


def test_size_mismatch_and_oversized_body_are_refused(server, tmp_path):
    with pytest.raises(ChecksumError, match=r"offers 307204 B, registry expects 1000 B"):
        download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, 1000)
    assert leftovers(tmp_path) == []
    server.send_length = False  # body delimited by the connection closing: stop at the size
    with pytest.raises(ChecksumError, match=r"m\.zip: server sent more than the expected 1000 B"):
        download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, 1000)
    assert leftovers(tmp_path) == []
    got: list[tuple[int, int]] = []
    download(
        server.url("m.zip"),
        tmp_path / "m.zip",
        PAYLOAD_SHA,
        len(PAYLOAD),
        progress=lambda done, total: got.append((done, total)),
    )
    assert got[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_http_error_and_unsupported_scheme(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.zip: HTTP 404"):
        download(server.url("missing.zip"), tmp_path / "m.zip", PAYLOAD_SHA)
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download("ftp://example.org/m.zip", tmp_path / "m.zip", PAYLOAD_SHA)
    server.stop()
    with pytest.raises(DownloadError, match="cannot download"):
        download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, timeout=5)
    assert leftovers(tmp_path) == []


def test_file_url_download_and_partial_part(tmp_path):
    src = tmp_path / "src dir" / "m.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.zip.part").write_bytes(PAYLOAD[:1234])  # file:// ignores Range: restart
    dest = download(src.as_uri(), out / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD and leftovers(out) == ["m.zip"]
    with pytest.raises(DownloadError, match="cannot download"):
        download((tmp_path / "nope.zip").as_uri(), out / "n.zip", PAYLOAD_SHA)


@pytest.mark.slow
def test_concurrent_downloaders_wait_for_the_lock(server, tmp_path):
    dest = tmp_path / "m.zip"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(download(server.url("m.zip"), dest, PAYLOAD_SHA, len(PAYLOAD)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    with registry._exclusive(tmp_path / "m.zip.lock"):  # a third party holds the lock
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert server.log == [] and not dest.exists()
    for t in threads:
        t.join(10)
    assert not errors and results == [dest, dest]
    assert dest.read_bytes() == PAYLOAD
    assert len(server.log) == 1  # the second one found the verified file


def test_tqdm_progress_draws_a_byte_counter(server, tmp_path):
    stream = io.StringIO()
    callback = tqdm_progress("fetch", file=stream, mininterval=0)
    download(server.url("m.zip"), tmp_path / "m.zip", PAYLOAD_SHA, len(PAYLOAD), callback)
    text = stream.getvalue()
    assert "fetch" in text and "100%" in text and "300k" in text


# -- registry files ------------------------------------------------------------------------------


def test_shipped_registry_is_valid(monkeypatch):
    monkeypatch.delenv("HLFD_MODEL_REGISTRY", raising=False)
    assert registry.REGISTRY_PATH.is_file()
    assert load_registry() == []


def test_registry_entries_load(tmp_path, monkeypatch):
    path = write_registry(tmp_path / "models.json", [entry(), entry(version="1.10", runtimes=[])])
    entries = load_registry(path)
    assert [e.spec for e in entries] == ["kidney-test@1.0.0", "kidney-test@1.10"]
    first = entries[0]
    assert first.size == len(PAYLOAD) and first.runtimes[0]["seconds"] == 4.2
    assert first.filename == "kidney-test-1.0.0.zip"
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(path))
    assert load_registry() == entries


@pytest.mark.parametrize(
    ("models", "top", "field", "problem"),
    [
        ([{k: v for k, v in entry().items() if k != "sha256"}], {}, "models/0/sha256", "missing"),
        ([entry(), entry(id="b", size="big")], {}, "models/1/size", "not of type 'integer'"),
        ([entry(sha256="ABC")], {}, "models/0/sha256", "does not match"),
        ([entry(task="lung")], {}, "models/0/task", "is not one of"),
        ([entry(url="ftp://x/m.zip")], {}, "models/0/url", "does not match"),
        ([entry(id="a/b")], {}, "models/0/id", "does not match"),
        ([entry(runtimes=[{"device": "cpu"}])], {}, "models/0/runtimes/0/seconds", "missing"),
        ([entry(extra=1)], {}, "models/0", "'extra' was unexpected"),
        ([], {"format_version": 2}, "format_version", "1 was expected"),
        ([entry(), entry()], {}, "models/1/version", "kidney-test@1.0.0 listed twice"),
    ],
)
def test_registry_schema_violations_name_the_field(tmp_path, models, top, field, problem):
    path = write_registry(tmp_path / "bad.json", models, **top)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: field '{field}':") and problem in msg, msg
    assert "\n" not in msg


def test_registry_unreadable_files(tmp_path):
    with pytest.raises(RegistryError, match="model registry file not found"):
        load_registry(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text('{"format_version": 1, "models": [}')
    with pytest.raises(RegistryError, match=r"broken\.json: not valid JSON \(line 1, column 34"):
        load_registry(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(RegistryError, match=r"field '\(top level\)': \[\] is not of type"):
        load_registry(tmp_path / "list.json")


# -- resolve_model -------------------------------------------------------------------------------


@pytest.fixture
def reg(server, tmp_path) -> Path:
    return write_registry(
        tmp_path / "models.json",
        [
            entry(url=server.url("m.zip")),
            entry(version="0.9", url=server.url("old.zip"), sha256="1" * 64),
            entry(id="liver-test", task="liver", url=server.url("m.zip")),
        ],
    )


def test_resolve_downloads_then_uses_cache_offline(server, reg, cache):
    path = resolve_model("kidney-test", registry=reg)
    assert path == cache / "kidney-test-1.0.0.zip" and path.read_bytes() == PAYLOAD
    assert cached_models() == [path]
    server.stop()
    assert resolve_model("kidney-test@1.0.0", registry=reg, offline=True) == path
    assert resolve_model("kidney-test", registry=reg) == path  # no network needed either
    assert len(server.log) == 1


def test_resolve_offline_without_cache_is_a_clear_error(server, reg, cache):
    with pytest.raises(OfflineError, match=r"liver-test@1\.0\.0 is not in the cache .*offline"):
        resolve_model("liver-test", registry=reg, offline=True)
    assert server.log == [] and not cache.exists()


def test_resolve_replaces_a_corrupt_cached_copy(server, reg, cache):
    cache.mkdir()
    bad = cache / "kidney-test-1.0.0.zip"
    bad.write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ChecksumError, match=r"cached copy of kidney-test@1\.0\.0 is corrupt"):
        resolve_model("kidney-test", registry=reg, offline=True)
    assert resolve_model("kidney-test", registry=reg) == bad
    assert bad.read_bytes() == PAYLOAD and len(server.log) == 1


def test_resolve_versions(server, reg, cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no version '2\.0'.*available: 0\.9, 1\.0\.0"):
        resolve_model("kidney-test@2.0", registry=reg)
    server.files["old.zip"] = PAYLOAD
    with pytest.raises(ChecksumError):  # the 0.9 entry carries a wrong hash
        resolve_model("kidney-test@0.9", registry=reg)
    newer = write_registry(
        tmp_path / "newer.json",
        [entry(version=v, url=server.url("m.zip")) for v in ("1.9", "1.10", "1.10rc1")],
    )
    assert resolve_model("kidney-test", registry=newer).name == "kidney-test-1.10.zip"


def test_unknown_id_lists_known_ids(reg, cache, tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("kidny-test", registry=reg)
    msg = str(info.value)
    assert "'kidny-test'" in msg and "known ids: kidney-test, liver-test" in msg
    empty = write_registry(tmp_path / "empty.json", [])
    with pytest.raises(ModelNotFoundError, match="registry lists no models yet"):
        resolve_model("spleen", registry=empty)  # "kidney" is built in


def test_local_folder_and_zip_pass_through(tiny_package, tmp_path, monkeypatch):
    monkeypatch.setenv("HLFD_MODEL_REGISTRY", str(tmp_path / "absent.json"))  # never read
    assert resolve_model(tiny_package) == tiny_package
    assert resolve_model(str(tiny_package)) == tiny_package
    archive = Path(shutil.make_archive(str(tmp_path / "pkg"), "zip", tiny_package))
    assert resolve_model(str(archive)) == archive
    monkeypatch.chdir(tmp_path)
    assert resolve_model("pkg.zip") == Path("pkg.zip")
    with pytest.raises(ModelNotFoundError, match=r"missing\.zip: no such model folder or \.zip"):
        resolve_model("missing.zip")
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        resolve_model(tmp_path / "nothing")


def test_downloaded_package_loads(tiny_package, server, cache, tmp_path):
    from HLFDSegmentLib.modelpackage import load_package

    archive = Path(shutil.make_archive(str(tmp_path / "pkg"), "zip", tiny_package)).read_bytes()
    server.files["pkg.zip"] = archive
    item = entry(
        url=server.url("pkg.zip"),
        sha256=hashlib.sha256(archive).hexdigest(),
        size=len(archive),
    )
    reg = write_registry(tmp_path / "models.json", [item])
    package = load_package(resolve_model("kidney-test", registry=reg))
    assert package.card["task"] == "kidney"


def test_trickling_server_is_given_up_and_the_lock_released(server, tmp_path):
    """A server sending a byte every 0.05 s is abandoned once the average rate stays below the
    minimum past the grace time (resumable), and the lock is free for the next try."""
    server.trickle = 0.05
    limits = registry.Limits(timeout=5, deadline=60, min_rate=1000, grace=0.5)
    dest = tmp_path / "m.zip"
    t0 = time.monotonic()
    with pytest.raises(registry.DownloadError, match="too slow"):
        registry.download(server.url("m.zip"), dest, PAYLOAD_SHA, len(PAYLOAD), limits=limits)
    assert time.monotonic() - t0 < 10
    assert not dest.exists() and (tmp_path / "m.zip.part").is_file()  # kept for a resume
    with registry._exclusive(tmp_path / "m.zip.lock", deadline=1):
        pass


def test_planted_symlinks_in_a_shared_cache_are_not_followed(server, tmp_path):
    """A .part or .lock symlink planted in a group-writable cache must not make the downloader
    write through it to another file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    for planted in ("m.zip.part", "m.zip.lock"):
        link = cache / planted
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
        with pytest.raises(registry.DownloadError, match="symbolic link"):
            registry.download(server.url("m.zip"), cache / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
        assert victim.read_text() == "precious"
        link.unlink()
    registry.download(server.url("m.zip"), cache / "m.zip", PAYLOAD_SHA, len(PAYLOAD))
    assert (cache / "m.zip").read_bytes() == PAYLOAD
