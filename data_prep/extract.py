"""Examples -> waveforms -> MFCC features, with an on-disk feature cache and a progress bar.

The cache is content-addressed: an example's key is the sha1 of its audio file's bytes (plus the
cut for silence examples), stored under a folder named after the FeatureConfig digest. So a
renamed or copied dataset still hits the cache, and a changed file or config never does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.audio import fix_length, load_audio
from data_prep.dataset import Example
from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig, mfcc

log = logging.getLogger(__name__)
CHUNK = 256


def default_cache_dir() -> Path:
    base = os.environ.get("SPEECHRNN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "speechrnn"
    )
    return Path(base)


def progress(items, label: str, enabled: bool = True):
    """A click progress bar on stderr (click is already a dependency of the CLI)."""
    if not enabled:
        return nullcontext(items)
    import click

    return click.progressbar(items, label=label, file=sys.stderr, show_pos=True, show_percent=True)


class WaveformLoader:
    """Loads examples as fixed-length waveforms; keeps decoded noise files in memory."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        self._noise: dict[Path, np.ndarray] = {}

    def noise(self, path: Path) -> np.ndarray:
        if path not in self._noise:
            self._noise[path] = load_audio(path, self.config.sample_rate)
        return self._noise[path]

    def load(self, example: Example) -> np.ndarray:
        n = self.config.clip_samples
        if example.is_cut:
            return fix_length(self.noise(example.path)[example.offset : example.offset + n] * example.gain, n)
        return fix_length(load_audio(example.path, self.config.sample_rate), n)

    def load_many(self, examples: list[Example], progress_label: str | None = None
                  ) -> tuple[np.ndarray, list[int], list[SpeechRNNError]]:
        """Waveforms of the examples that loaded, their indices, and the errors of those that did not.

        A clip that cannot be read is left out and logged as an error (``<file>: <reason>``): the
        rest go on, and the CLI exits 1 at the end (README, "Exit status").
        """
        waves, kept, errors = [], [], []
        with progress(examples, progress_label or "", progress_label is not None) as bar:
            for i, ex in enumerate(bar):
                try:
                    waves.append(self.load(ex))
                    kept.append(i)
                except SpeechRNNError as err:
                    log.error("%s", err)
                    errors.append(err)
        out = np.stack(waves) if waves else np.zeros((0, self.config.clip_samples), np.float32)
        return out, kept, errors


def example_key(example: Example) -> str:
    digest = hashlib.sha1(Path(example.path).read_bytes()).hexdigest()
    return f"{digest}@{example.offset}x{example.gain!r}" if example.is_cut else digest


class FeatureCache:
    """Shards of (keys, features) under ``<cache_dir>/features/<config digest>/``."""

    def __init__(self, cache_dir: str | os.PathLike, config: FeatureConfig):
        self.dir = Path(cache_dir) / "features" / config.digest()
        self.config = config
        self._index: dict[str, tuple[int, int]] | None = None
        self._shards: list[np.ndarray] = []

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index, self._shards = {}, []
            for shard in sorted(self.dir.glob("shard-*.npz")) if self.dir.is_dir() else []:
                try:
                    with np.load(shard) as data:
                        keys, feats = data["keys"], data["features"]
                except Exception as exc:  # noqa: BLE001 - a damaged shard is only a cache miss
                    log.warning("ignoring damaged cache shard %s (%s)", shard, exc)
                    continue
                n = len(self._shards)
                self._shards.append(feats)
                self._index.update({str(k): (n, i) for i, k in enumerate(keys)})
        return self._index

    def get(self, keys: list[str]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Cached features by position, and the positions that missed."""
        index = self._load()
        hits, misses = {}, []
        for pos, key in enumerate(keys):
            loc = index.get(key)
            if loc is None:
                misses.append(pos)
            else:
                hits[pos] = self._shards[loc[0]][loc[1]]
        return hits, misses

    def put(self, keys: list[str], features: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.npz"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, keys=np.array(keys), features=features)
        os.replace(tmp, self.dir / name)
        index = self._load()
        n = len(self._shards)
        self._shards.append(features)
        index.update({k: (n, i) for i, k in enumerate(keys)})


@dataclass
class Featurized:
    features: np.ndarray  # [n, frames, n_mfcc]
    examples: list[Example]  # the examples that loaded, in order
    errors: list[SpeechRNNError]
    from_cache: int = 0
    keys: list[str] = field(default_factory=list)  # example_key of each example (when the cache is used)


def featurize(
    examples: list[Example],
    config: FeatureConfig = FeatureConfig(),
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    show_progress: bool = True,
    workers: int = 2,
) -> Featurized:
    """MFCC features of un-augmented examples, from the cache where possible.

    Files that cannot be decoded are left out, logged as errors and returned, so one broken clip
    does not stop a dataset. ``workers`` threads decode and featurise chunks in parallel (numpy's FFT
    and matrix products release the GIL; measured in bench/features.py).
    """
    cache = FeatureCache(cache_dir or default_cache_dir(), config) if use_cache else None
    keys, hits, misses = [], {}, list(range(len(examples)))
    if cache is not None:
        keys = [example_key(ex) for ex in examples]
        hits, misses = cache.get(keys)
    computed: dict[int, np.ndarray] = {}
    errors: list[SpeechRNNError] = []
    chunks = [misses[i : i + CHUNK] for i in range(0, len(misses), CHUNK)]

    def work(chunk: list[int]):
        loader = WaveformLoader(config)
        waves, kept, errs = loader.load_many([examples[i] for i in chunk])
        feats = mfcc(waves, config) if len(waves) else np.zeros((0, *config.shape), np.float32)
        return [chunk[k] for k in kept], feats, errs

    if chunks:
        with ThreadPoolExecutor(max(1, workers)) as pool, progress(
            range(len(misses)), "extracting MFCC", show_progress
        ) as bar:
            for positions, feats, errs in pool.map(work, chunks):
                computed.update(zip(positions, feats, strict=False))
                errors.extend(errs)
                if hasattr(bar, "update"):
                    bar.update(len(positions) + len(errs))
        if cache is not None:
            order = sorted(computed)
            cache.put([keys[i] for i in order], np.stack([computed[i] for i in order]) if order else None)
    order = sorted({**hits, **computed})
    feats = np.stack([hits[i] if i in hits else computed[i] for i in order]) if order else np.zeros((0, *config.shape), np.float32)
    return Featurized(feats.astype(np.float32, copy=False), [examples[i] for i in order], errors, len(hits),
                      [keys[i] for i in order] if keys else [])
