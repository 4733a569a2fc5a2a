"""Fetch, verify and safely extract the real Speech Commands archive.

The archive is a few GB on a plain HTTP server, so a download that breaks off must resume where
it stopped, and a bad archive must never turn into a folder that looks like a complete dataset:
extraction goes into a hidden sibling folder that is renamed to OUT only once every check passed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from contextlib import nullcontext
from pathlib import Path, PurePosixPath

from data_prep.errors import SpeechRNNError
from data_prep.files import staged_folder

log = logging.getLogger(__name__)

OFFICIAL_URLS = {
    "v0.02": "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
    "v0.01": "http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz",
}
# sha256 of the official archives, applied when no --sha256 is given. Left empty on purpose: fill
# in only digests checked against the real files (the gzip/tar read-through still catches damage).
KNOWN_SHA256: dict[str, str] = {}
MARKER = ".speechrnn-download.json"
CHUNK = 1 << 20
TIMEOUT = 60.0
ATTEMPTS = 5  # connections per call; a retry happens only after the previous one made progress
_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # PEP 706 filters (3.11.4+)
_CORRUPT = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)


def partial_path(url: str, out: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the download of URL for OUT is kept until verified; named per URL so mirrors never mix."""
    tag = hashlib.sha1(url.encode()).hexdigest()[:8]
    folder = Path(cache_dir) if cache_dir is not None else Path(out).parent
    return folder / f".{PurePosixPath(url.split('?')[0]).name or 'archive'}.{tag}.part"


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _bar(total: int | None, label: str, enabled: bool):
    """A click progress bar on stderr, or a silent stand-in when disabled or the size is unknown."""
    if not enabled or not total:
        return nullcontext(_NoBar())
    import click

    return click.progressbar(length=total, label=label, file=sys.stderr, show_percent=True)


def _total_of(content_range: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header such as 'bytes 10-99/100' or 'bytes */100'."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (content_range or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def _fetch(url: str, part: Path, show_progress: bool) -> None:
    """Download URL into PART, resuming from PART's size; reconnects while each attempt makes progress."""
    for _ in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing left after byte `have`: done, or the remote file shrank
                if _total_of(err.headers.get("Content-Range"))[1] == have:
                    return
                log.warning("server cannot resume %s at byte %d; starting afresh", url, have)
                part.unlink()
                continue
            raise SpeechRNNError(f"could not download {url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            hint = "; run the command again to resume" if have else ""
            raise SpeechRNNError(f"could not download {url}: {getattr(err, 'reason', None) or err}{hint}") from None
        with resp:
            if resp.status == 206:
                start, total = _total_of(resp.headers.get("Content-Range"))
                if start != have:  # not the range we asked for: appending would garble the file
                    log.warning("server resumed %s at the wrong byte; starting afresh", url)
                    part.unlink()
                    continue
            else:  # 200: the server ignored Range, so the file comes whole again
                have, length = 0, resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            got, problem = have, None
            try:
                with open(part, "ab" if have else "wb") as f, _bar(total, "downloading", show_progress) as bar:
                    bar.update(have)
                    while chunk := resp.read(CHUNK):
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                problem = err
        if total is not None and got > total:
            part.unlink()
            raise SpeechRNNError(f"{url} sent {got} bytes but announced {total}; run the command again", part)
        if problem is None and (total is None or got == total):
            return
        if got == have:
            raise SpeechRNNError(
                f"download of {url} stopped at byte {got}: {problem or 'connection closed'}; "
                "run the command again to resume",
                part,
            )
        log.warning("download of %s broke off at %d of %s bytes; resuming", url, got, total)
    raise SpeechRNNError(f"download of {url} kept breaking off; run the command again to resume", part)


def _unsafe(member: tarfile.TarInfo, root: Path) -> str | None:
    """Why extracting MEMBER under ROOT (resolved) would be unsafe, or None when it is fine."""
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"[A-Za-z]:[/\\]", name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' component"
    target = root / name
    if not target.resolve().is_relative_to(root):
        return "lands outside the target folder"
    if member.issym() or member.islnk():  # symlinks are relative to their folder, hard links to the root
        base = target.parent if member.issym() else root
        if os.path.isabs(member.linkname) or not (base / member.linkname).resolve().is_relative_to(root):
            return f"is a link pointing outside the target folder ({member.linkname})"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "is a device file or fifo"
    return None


class _HashingReader:
    """Passes the raw archive bytes to gzip while hashing them, so one read verifies and extracts."""

    def __init__(self, f, bar):
        self.f, self.bar, self.sha256 = f, bar, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.bar.update(len(data))
        return data


def _extract(archive: Path, dest: Path, show_progress: bool) -> str:
    """Extract the .tar.gz into DEST checking every member; returns the archive's sha256.

    Reads the gzip stream to its very end, so its CRC and length trailer catch truncation and flipped
    bytes that the tar layer alone (which stops at its end marker) would miss.
    """
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with open(archive, "rb") as raw, _bar(archive.stat().st_size, "extracting", show_progress) as bar:
        reader = _HashingReader(raw, bar)
        with gzip.GzipFile(fileobj=reader, mode="rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            count = 0
            for member in tar:
                if reason := _unsafe(member, dest):
                    raise SpeechRNNError(f"archive member {member.name!r} {reason}; refusing to extract", archive)
                tar.extract(member, dest, **safe)
                count += 1
            while gz.read(CHUNK):
                pass
        while reader.read(CHUNK):
            pass
    if not count:
        raise SpeechRNNError("archive holds no files", archive)
    return reader.sha256.hexdigest()


def download_dataset(
    version: str,
    out: str | os.PathLike,
    url: str | None = None,
    sha256: str | None = None,
    show_progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Download, verify and extract Speech Commands VERSION so that OUT becomes the dataset folder.

    OUT appears only when everything succeeded (it then holds a completion marker); a folder with
    the marker is returned at once. A broken download is kept and resumed by the next call; an
    archive that fails verification is deleted so the next call fetches it afresh. With CACHE_DIR
    the verified archive is kept there and reused instead of being deleted.
    """
    if version not in OFFICIAL_URLS and url is None:
        raise SpeechRNNError(f"unknown version {version!r}; choose one of {', '.join(OFFICIAL_URLS)} or give a URL")
    url = url or OFFICIAL_URLS[version]
    out = Path(out).absolute()
    if (out / MARKER).is_file():
        try:
            held = json.loads((out / MARKER).read_text()).get("version")
        except (ValueError, AttributeError):
            held = None
        if held != version:
            raise SpeechRNNError(f"already holds Speech Commands {held or '(unknown version)'}, not {version}", out)
        log.info("%s: already downloaded", out)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpeechRNNError("exists and is not empty; choose a new folder or remove it", out)
    official = PurePosixPath(url).name == PurePosixPath(OFFICIAL_URLS.get(version, "")).name
    expected = (sha256 or (KNOWN_SHA256.get(version) if official else None) or "").strip().lower() or None
    out.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(url, out, cache_dir)
    kept = part.with_name(part.name.removesuffix(".part").lstrip("."))
    if cache_dir is not None and kept.is_file():
        archive = kept
    else:
        part.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", url, part)
        _fetch(url, part, show_progress)
        archive = part
    with staged_folder(out) as tmp:
        try:
            digest = _extract(archive, tmp, show_progress)
            if expected and digest != expected:
                raise SpeechRNNError(
                    f"archive sha256 is {digest}, expected {expected}; it was deleted, run the "
                    "command again to download it afresh (or check --sha256)",
                    archive,
                )
        except SpeechRNNError:
            archive.unlink(missing_ok=True)
            raise
        except _FILTER_ERROR as err:
            archive.unlink(missing_ok=True)
            member = getattr(getattr(err, "tarinfo", None), "name", "?")
            raise SpeechRNNError(f"archive member {member!r} is unsafe ({err}); refusing to extract", archive) from None
        except _CORRUPT as err:
            archive.unlink(missing_ok=True)
            raise SpeechRNNError(
                f"archive from {url} is truncated or corrupt ({err}); run the command again to download it afresh",
                archive,
            ) from None
        except OSError as err:
            raise SpeechRNNError(f"could not extract into {tmp}: {err}", archive) from None
        (tmp / MARKER).write_text(json.dumps({"version": version, "url": url, "sha256": digest}, indent=2))
    if archive == part and cache_dir is not None:
        os.replace(part, kept)
    elif archive == part:
        part.unlink(missing_ok=True)
    log.info("%s: Speech Commands %s ready", out, version)
    return out
