"""Training waveforms as an int16 cache file on disk, read row by row: memory that does not grow
with the corpus.

A ``WaveformStore`` holds one row of ``clip_samples`` int16 samples per training example (105,829
one-second clips: 3.4 GB on disk, where float32 in memory would be 6.8 GB). Rows are read with
``os.preadv`` into the caller's buffer, so they go through the operating system's page cache
(shared by every process on the machine, e.g. two local workers) and never count towards a
process's resident memory.

The file is addressed by content, like the feature cache: its name is the sha1 of the examples'
keys (``extract.example_key``: each audio file's sha1, plus the cut of a silence example), the
sample rate and the clip length. So the same examples from a renamed or copied dataset reuse it,
and a changed file, selection or config never does. Folder layout::

    <cache>/waveforms/<digest>/audio.npy   int16 [rows, clip_samples] (.npy: np.load(mmap_mode="r") reads it)
    <cache>/waveforms/<digest>/kept.npy    int64 [rows]: which examples loaded (the others are the errors)

A store is built in a hidden temporary folder and renamed into place, under a lock, so a killed
build leaves nothing that looks complete and two processes never build the same store at once.

Samples are stored as int16 (``round(x * 32768)``): exact for 16-bit audio at the target rate (the
Speech Commands files, and everything ``data synth`` writes); other sources are quantised to 16
bits. Silence examples are stored before their gain and scaled when read, so a -40 dB cut keeps
its 16 bits of resolution.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_prep.audio import fix_length
from data_prep.dataset import Example
from data_prep.errors import SpeechRNNError
from data_prep.extract import WaveformLoader, default_cache_dir, example_key, progress
from data_prep.features import FeatureConfig

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout changes
SCALE = 32768.0
BUILD_CHUNK = 256


def example_keys(examples: list[Example], workers: int = 2, show_progress: bool = False) -> list[str]:
    """``extract.example_key`` of every example, hashed on ``workers`` threads (hashlib releases the GIL).

    Raises SpeechRNNError for a file that cannot be read."""

    def key(ex: Example) -> str:
        try:
            return example_key(ex)
        except OSError as exc:
            raise SpeechRNNError(f"cannot read file ({exc.strerror or exc})", ex.path) from None

    with ThreadPoolExecutor(max(1, workers)) as pool, progress(
        range(len(examples)), "hashing training audio", show_progress
    ) as bar:
        keys = []
        for k in pool.map(key, examples, chunksize=64):
            keys.append(k)
            if hasattr(bar, "update") and len(keys) % 256 == 0:
                bar.update(256)
        return keys


def store_digest(keys: list[str], config: FeatureConfig) -> str:
    h = hashlib.sha1(f"waveforms:{FORMAT}:{config.sample_rate}:{config.clip_samples}\n".encode())
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


class WaveformStore:
    """The int16 rows of a set of examples, read from disk on demand.

    ``rows`` is the number of examples that loaded; ``kept[i]`` is the position, in the example list
    the store was made from, of row ``i``; ``gains[i]`` the gain its reads are scaled by.
    """

    def __init__(self, folder: Path, gains: np.ndarray):
        self.folder = Path(folder)
        self.kept = np.load(self.folder / "kept.npy")
        audio = np.load(self.folder / "audio.npy", mmap_mode="r")  # parses the header only
        self.rows, self.samples = audio.shape
        self._offset = int(audio.offset)
        del audio
        self._row_bytes = self.samples * 2
        self.gains = np.asarray(gains, np.float32)[self.kept]
        self._fd = os.open(self.folder / "audio.npy", os.O_RDONLY)
        self.digest = self.folder.name

    @property
    def nbytes(self) -> int:
        return self.rows * self._row_bytes

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), samples] in [-1, 1), gains applied; rows in any order, repeats allowed."""
        rows = np.asarray(rows, np.int64)
        raw = np.empty((len(rows), self.samples), np.int16)
        for i, row in enumerate(rows):
            got = os.preadv(self._fd, [memoryview(raw[i]).cast("B")], self._offset + int(row) * self._row_bytes)
            if got != self._row_bytes:
                raise SpeechRNNError(f"waveform cache is truncated (row {row}): delete the folder to rebuild it",
                                     self.folder)
        out = np.empty((len(rows), self.samples), np.float32) if out is None else out
        np.multiply(raw, (self.gains[rows] / SCALE)[:, None], out=out, casting="unsafe")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(samples, np.float32) * SCALE), -SCALE, SCALE - 1).astype(np.int16)


def open_store(
    examples: list[Example],
    config: FeatureConfig,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    workers: int = 2,
    keys: list[str] | None = None,
) -> tuple[WaveformStore, list[SpeechRNNError]]:
    """The store of ``examples`` (built on first use) and the errors of the examples that did not load.

    The examples' files are hashed each time (that is how a changed file is noticed) and decoded
    only when the store is built. Raises SpeechRNNError if the cache folder cannot be written.
    """
    keys = keys if keys is not None else example_keys(examples, workers, show_progress)
    base = Path(cache_dir or default_cache_dir()) / "waveforms"
    folder = base / store_digest(keys, config)
    gains = np.array([ex.gain if ex.is_cut else 1.0 for ex in examples], np.float32)
    errors: list[SpeechRNNError] = []
    if not (folder / "audio.npy").exists():
        try:
            base.mkdir(parents=True, exist_ok=True)
            with open(base / f".{folder.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same store
                if not (folder / "audio.npy").exists():
                    errors = _build(folder, examples, config, show_progress, workers)
        except OSError as exc:
            raise SpeechRNNError(f"cannot write the waveform cache ({exc.strerror or exc}); set SPEECHRNN_CACHE "
                                 "to a writable folder with room for 32 kB per training clip", base) from None
    store = WaveformStore(folder, gains)
    if not errors and len(store.kept) < len(examples):  # built earlier: name what was left out
        missing = sorted(set(range(len(examples))) - set(store.kept.tolist()))
        errors = [SpeechRNNError("could not be decoded when the waveform cache was built", examples[i].path)
                  for i in missing]
    return store, errors


def _create(path: Path, rows: int, length: int) -> tuple[int, int]:
    """An int16 .npy file of [rows, length] (zeros), open for writing: (fd, data offset)."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(rows, length))
    offset = int(header.offset)
    del header  # unmapped: rows are written with pwrite
    return os.open(path, os.O_RDWR), offset


def _build(folder: Path, examples: list[Example], config: FeatureConfig, show_progress: bool,
           workers: int) -> list[SpeechRNNError]:
    """Decode every example into a temporary folder, then rename it to ``folder``.

    Rows are written with pwrite, not through a memory map, so building a 3.4 GB store does not
    show up as 3.4 GB of this process's resident memory."""
    n, length = len(examples), config.clip_samples
    row_bytes = length * 2
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fd, offset = _create(tmp / "audio.npy", n, length)
        loaded = np.zeros(n, bool)
        errors: list[SpeechRNNError] = []

        loader = WaveformLoader(config)  # shared: it keeps the decoded noise recordings

        def work(start: int):
            out, errs = [], []
            for i in range(start, min(n, start + BUILD_CHUNK)):
                ex = examples[i]
                try:
                    if ex.is_cut:  # stored before its gain (see the module docstring)
                        wave = fix_length(loader.noise(ex.path)[ex.offset : ex.offset + length], length)
                    else:
                        wave = loader.load(ex)
                    out.append((i, to_int16(wave)))
                except SpeechRNNError as err:
                    errs.append(err)
            return out, errs

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool, progress(
                range(n), "caching training audio", show_progress
            ) as bar:
                for rows, errs in pool.map(work, range(0, n, BUILD_CHUNK)):
                    for i, wave in rows:
                        os.pwrite(fd, wave.tobytes(), offset + i * row_bytes)
                        loaded[i] = True
                    errors.extend(errs)
                    if hasattr(bar, "update"):
                        bar.update(len(rows) + len(errs))
            os.fsync(fd)
        finally:
            os.close(fd)
        kept = np.flatnonzero(loaded)
        if len(kept) < n:  # keep only the rows of the examples that loaded, in order
            src = os.open(tmp / "audio.npy", os.O_RDONLY)
            dst, dst_offset = _create(tmp / "compact.npy", len(kept), length)
            try:
                for row, i in enumerate(kept):
                    os.pwrite(dst, os.pread(src, row_bytes, offset + int(i) * row_bytes), dst_offset + row * row_bytes)
                os.fsync(dst)
            finally:
                os.close(src)
                os.close(dst)
            os.replace(tmp / "compact.npy", tmp / "audio.npy")
        np.save(tmp / "kept.npy", kept.astype(np.int64))
        if folder.exists():  # a folder left without its audio (not by us): replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return errors
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
