"""download_dataset against a real local HTTP server that honours Range requests.

The archives are built here from a tiny Speech Commands-like tree of real wav files, laid out like
the official tarballs (members under "./"), then served truncated, corrupted, cut off mid-way or
with members that try to escape the target folder.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import run_cli
from data_prep.dataset import SpeechCommands
from data_prep.download import MARKER, download_dataset, partial_path
from data_prep.errors import SpeechRNNError

NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files whole (200) or from `Range: bytes=N-` (206/416); can cut a response short once."""

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and srv.ranges:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.name in srv.cut_once:  # announce the whole body, send half, hang up
            srv.cut_once.discard(path.name)
            body = body[: len(body) // 2]
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    for name, value in NO_PROXY.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    httpd.root, httpd.seen, httpd.cut_once, httpd.ranges = root, [], set(), True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def write_tree(root: Path) -> Path:
    """A Speech Commands-like folder: two words, background noise, split lists (real 16 kHz wavs)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(0.3 * 16000)) / 16000
    for rel, freq in [("yes/abc_nohash_0.wav", 440), ("yes/def_nohash_0.wav", 550), ("no/abc_nohash_0.wav", 330)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size), 16000)
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_/noise.wav", 0.1 * rng.standard_normal(16000), 16000)
    (root / "validation_list.txt").write_text("yes/def_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/abc_nohash_0.wav\n")
    return root


@pytest.fixture()
def archive(tmp_path, server) -> bytes:
    """The good archive's bytes, also served as /sc.tar.gz."""
    tree = write_tree(tmp_path / "tree")
    with tarfile.open(server.root / "sc.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=".")
    return (server.root / "sc.tar.gz").read_bytes()


def evil_tarball(path: Path, member: tarfile.TarInfo, content: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("./yes/abc_nohash_0.wav")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"RIFF"))
        member.size = len(content) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(content) if member.isfile() else None)


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert list(parent.iterdir()) == [], "temp folder or bad archive left behind"


def test_good_archive_extracts_and_second_call_returns_at_once(tmp_path, server, archive):
    out = tmp_path / "data" / "sc"
    url = f"{server.url}/sc.tar.gz"
    got = download_dataset(
        "v0.02", out, url=url, sha256=hashlib.sha256(archive).hexdigest().upper(), show_progress=False
    )
    assert got == out.absolute()
    dataset = SpeechCommands.open(out)
    assert sorted(c.word for c in dataset.clips) == ["no", "yes", "yes"]
    assert dataset.split_source == "lists" and len(dataset.noise_files) == 1
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sc"], "partial file or temp folder left behind"
    requests = len(server.seen)
    assert download_dataset("v0.02", out, url=url, show_progress=False) == out.absolute()
    assert len(server.seen) == requests, "already-downloaded folder was fetched again"
    with pytest.raises(SpeechRNNError, match="already holds"):
        download_dataset("v0.01", out, url=url, show_progress=False)


def test_refuses_non_empty_folder_without_marker(tmp_path, server, archive):
    out = tmp_path / "sc"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SpeechRNNError, match="not empty"):
        download_dataset("v0.02", out, url=f"{server.url}/sc.tar.gz", show_progress=False)
    assert (out / "mine.txt").read_text() == "keep me" and server.seen == []


@pytest.mark.parametrize("how", ["half-on-disk", "cut-mid-way", "complete-on-disk", "server-ignores-range"])
def test_resume(tmp_path, server, archive, how):
    out = tmp_path / "data" / "sc"
    url = f"{server.url}/sc.tar.gz"
    part = partial_path(url, out)
    part.parent.mkdir(parents=True)
    half = len(archive) // 2
    if how == "cut-mid-way":
        server.cut_once.add("sc.tar.gz")
    else:
        part.write_bytes(archive if how == "complete-on-disk" else archive[:half])
    server.ranges = how != "server-ignores-range"
    download_dataset("v0.02", out, url=url, show_progress=False)
    assert len(SpeechCommands.open(out).clips) == 3
    assert not part.exists()
    ranges = [r for _, r in server.seen]
    expected = {
        "half-on-disk": [f"bytes={half}-"],
        "cut-mid-way": [None, f"bytes={len(archive) // 2}-"],
        "complete-on-disk": [f"bytes={len(archive)}-"],
        "server-ignores-range": [f"bytes={half}-"],
    }[how]
    assert ranges == expected


def test_network_errors_name_the_url_and_keep_the_partial_file(tmp_path, server, archive):
    out = tmp_path / "data" / "sc"
    with pytest.raises(SpeechRNNError, match=r"/missing\.tar\.gz: HTTP 404"):
        download_dataset("v0.02", out, url=f"{server.url}/missing.tar.gz", show_progress=False)
    url = f"{server.url}/sc.tar.gz"
    part = partial_path(url, out)
    part.write_bytes(archive[:100])
    server.shutdown()
    server.server_close()
    with pytest.raises(SpeechRNNError, match=f"could not download {url}"):
        download_dataset("v0.02", out, url=url, show_progress=False)
    assert part.read_bytes() == archive[:100] and not out.exists()


def test_truncated_archive_is_rejected_and_cleaned_up(tmp_path, server, archive):
    (server.root / "cut.tar.gz").write_bytes(archive[: len(archive) * 2 // 3])
    out = tmp_path / "data" / "sc"
    with pytest.raises(SpeechRNNError, match="truncated or corrupt"):
        download_dataset("v0.02", out, url=f"{server.url}/cut.tar.gz", show_progress=False)
    assert_nothing_left(out.parent, out)


def test_corrupted_archive_and_sha256_mismatch_are_rejected(tmp_path, server, archive):
    bad = bytearray(archive)
    mid = len(bad) // 2
    bad[mid : mid + 8] = bytes(b ^ 0xFF for b in bad[mid : mid + 8])
    (server.root / "bad.tar.gz").write_bytes(bytes(bad))
    out = tmp_path / "data" / "sc"
    with pytest.raises(SpeechRNNError, match="truncated or corrupt"):
        download_dataset("v0.02", out, url=f"{server.url}/bad.tar.gz", show_progress=False)
    assert_nothing_left(out.parent, out)
    with pytest.raises(SpeechRNNError, match="sha256 is .*, expected 0000"):
        download_dataset("v0.02", out, url=f"{server.url}/sc.tar.gz", sha256="0" * 64, show_progress=False)
    assert_nothing_left(out.parent, out)


def _member(kind: str, outside: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": str(outside / "abs.txt")}.get(kind, "./yes/link"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(outside / "target.txt")
    elif kind == "relative-symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "../../../target.txt"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "../../target.txt"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "relative-symlink", "hardlink", "device"])
def test_unsafe_members_are_refused(tmp_path, server, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("secret")
    member = _member(kind, outside)
    evil_tarball(server.root / "evil.tar.gz", member, b"pwned")
    out = tmp_path / "data" / "sc"
    with pytest.raises(SpeechRNNError, match="refusing to extract") as caught:
        download_dataset("v0.02", out, url=f"{server.url}/evil.tar.gz", show_progress=False)
    assert repr(member.name) in str(caught.value)
    assert_nothing_left(out.parent, out)
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert not (tmp_path / "evil.txt").exists()


def test_cli_reports_a_404_without_a_traceback_and_downloads_a_good_archive(tmp_path, server, archive):
    out = tmp_path / "sc"
    bad = run_cli("data", "download", "--out", str(out), "--url", f"{server.url}/nope.tar.gz", env=NO_PROXY, timeout=60)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert "nope.tar.gz" in bad.stderr and "404" in bad.stderr
    good = run_cli("data", "download", "--out", str(out), "--url", f"{server.url}/sc.tar.gz", env=NO_PROXY, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "dataset ready" in good.stdout and (out / "yes" / "abc_nohash_0.wav").is_file()
    assert os.environ.get("no_proxy") == NO_PROXY["no_proxy"]  # the fixture keeps this process off any proxy too


def test_cache_dir_keeps_the_verified_archive_for_the_next_folder(tmp_path, server, archive):
    url, cache = f"{server.url}/sc.tar.gz", tmp_path / "cache"
    download_dataset("v0.02", tmp_path / "a", url=url, show_progress=False, cache_dir=cache)
    assert [p.read_bytes() for p in cache.iterdir()] == [archive]
    requests = len(server.seen)
    download_dataset("v0.02", tmp_path / "b", url=url, show_progress=False, cache_dir=cache)
    assert len(server.seen) == requests and len(SpeechCommands.open(tmp_path / "b").clips) == 3
