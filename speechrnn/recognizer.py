"""Classify clips and files with an exported model: its LiteRT model (no TensorFlow: MFCC from
data_prep.features, the network on the LiteRT interpreter) when it has one, else, or with
backend "tf", its SavedModel (plain tf.saved_model.load; no Keras needed).

Files longer than the model's clip (1 s) are scored in 1 s windows every 100 ms (and one ending at
the last sample); the answer is the window with the highest score for a class other than
_silence_ (a word anywhere in the file wins over the silence around it); if every window is
silence, the most confident silence window. Files are decoded block by block and their windows
scored in fixed-size batches shared between files, so memory does not grow with a file's length.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.audio import stream_audio
from data_prep.dataset import SILENCE
from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig, mfcc_batched
from speechrnn.export_format import (
    LITERT_VARIANTS,
    TF,
    WINDOW_HOP_S,
    XLA_DIR,
    choose_backend,
    default_model_dir,
    read_metadata,
)

log = logging.getLogger(__name__)
BATCH = 64
# Progress of one file: progress(path, seconds decoded and scored so far, the file's length in seconds).
Progress = Callable[[str, float, float], None]


@dataclass
class FileResult:
    path: str
    label: str = ""
    score: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "score": round(self.score, 6),
                "top": [[label, round(p, 6)] for label, p in self.top]}


class Recognizer:
    """An exported model loaded for classification: clips and files (classify_files), and the
    scores the streaming detector calls.

    ``backend``: "litert" (the export's LiteRT float32 model), "litert-int8" (its int8 model),
    "tf" (its SavedModel), or None/"auto": LiteRT float32 when the export has it (format 3), else
    the SavedModel. The LiteRT backends never import TensorFlow. Raises SpeechRNNError for a folder
    that is not a (whole, matching) speechrnn export, or that lacks the backend asked for.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, backend: str | None = None):
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.meta = read_metadata(self.model_dir, backend)
        self.backend = choose_backend(self.meta, backend, self.model_dir)
        self.labels: list[str] = self.meta["labels"]
        self.features = FeatureConfig.from_dict(self.meta["features"])
        self._fns: dict = {}
        self._lite = None
        if self.backend != TF:
            from speechrnn.litert_model import LiteRTModel

            path = self.model_dir / self.meta["litert"][LITERT_VARIANTS[self.backend]]["file"]
            self._lite = LiteRTModel(path, path, labels=len(self.labels))
            if (self._lite.frames, self._lite.coefficients) != self.features.shape:
                raise SpeechRNNError(f"the LiteRT model takes MFCC [{self._lite.frames}, {self._lite.coefficients}], "
                                     f"not the export's {list(self.features.shape)}", path)
            log.info("scoring with %s (backend %s, no TensorFlow)", path, self.backend)
            return
        from speechrnn.tfutil import import_tf

        tf = import_tf(keras=False)
        self._tf = tf
        try:
            self._loaded = tf.saved_model.load(str(self.model_dir))
        except Exception as exc:  # noqa: BLE001 - any load failure means a damaged export
            raise SpeechRNNError(f"cannot load the SavedModel ({type(exc).__name__})", self.model_dir) from None
        sigs = self._loaded.signatures
        self._fns = {("waveform", False): sigs["serving_default"], ("mfcc", False): sigs["mfcc"]}
        log.info("scoring with the SavedModel in %s (backend tf)", self.model_dir)

    def _fn(self, kind: str, xla: bool):
        """The signature; the XLA sub-export is loaded on first use (streaming), not for one-shot calls."""
        if (kind, xla) not in self._fns:
            try:
                sigs = self._tf.saved_model.load(str(self.model_dir / XLA_DIR)).signatures
            except Exception as exc:  # noqa: BLE001 - any load failure means a damaged export
                raise SpeechRNNError(f"cannot load the XLA sub-export ({type(exc).__name__})", self.model_dir) from None
            self._fns.update({("waveform", True): sigs["waveform_xla"], ("mfcc", True): sigs["mfcc_xla"]})
        return self._fns[(kind, xla)]

    def probabilities(self, waves: np.ndarray, xla: bool = False) -> np.ndarray:
        """[n, samples] float32 at 16 kHz in [-1, 1] -> probabilities [n, labels], in fixed-size batches.

        Each row is scored as the export's serving_default scores it: up to a clip (1 s), zero-padded;
        longer, in 1 s windows every 100 ms and one at the end, the most confident non-silence window.
        ``xla`` (SavedModel only): the compiled signature; ~1-2 s to compile once, then ~10x faster.
        """
        waves = np.asarray(waves, np.float32)
        if self._lite is None:
            return self._batched(self._fn("waveform", xla), "waveform", waves)
        clip = self.features.clip_samples
        if waves.ndim != 2:
            raise ValueError(f"expected waveforms [n, samples], got {list(waves.shape)}")
        if waves.shape[1] <= clip:
            return self._lite(mfcc_batched(np.pad(waves, ((0, 0), (0, clip - waves.shape[1]))), self.features))
        return np.stack([self.pick_window(self._lite(mfcc_batched(self.windows(row), self.features))) for row in waves]
                        ) if len(waves) else np.zeros((0, len(self.labels)), np.float32)

    def probabilities_from_mfcc(self, feats: np.ndarray, xla: bool = False) -> np.ndarray:
        """MFCC [n, frames, coefficients] (one 1 s window each) -> probabilities [n, labels]."""
        feats = np.asarray(feats, np.float32)
        if self._lite is not None:
            return self._lite(feats)
        return self._batched(self._fn("mfcc", xla), "mfcc", feats)

    def _batched(self, fn, name: str, x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            return fn(**{name: self._tf.constant(x)})["probabilities"].numpy()
        out = []
        for start in range(0, len(x), BATCH):
            chunk = x[start : start + BATCH]
            n = len(chunk)
            if n < BATCH:  # pad: one batch shape means one trace (and one XLA compile), not one per remainder
                chunk = np.concatenate([chunk, np.zeros((BATCH - n, *chunk.shape[1:]), np.float32)])
            out.append(fn(**{name: self._tf.constant(chunk)})["probabilities"].numpy()[:n])
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """One clip-length window, or windows every 100 ms over a longer recording (all in memory:
        for clips; classify_files makes the same windows block by block)."""
        return np.concatenate(list(self.stream_windows([samples])))

    def stream_windows(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Clip-length windows [k, clip] of audio arriving in blocks: one every 100 ms from the start,
        and one ending at the last sample; audio up to one clip long is one zero-padded window.

        Holds at most one block and one clip of audio, whatever the length of the recording.
        """
        clip = self.features.clip_samples
        hop = int(round(self.features.sample_rate * WINDOW_HOP_S))
        held = np.zeros(0, np.float32)  # audio from sample `held_from` on
        held_from = total = next_start = 0
        for block in blocks:
            held = np.concatenate([held, np.asarray(block, np.float32)])
            total += len(block)
            if total >= next_start + clip:
                count = (total - clip - next_start) // hop + 1
                first = next_start - held_from
                yield np.lib.stride_tricks.sliding_window_view(held[first : first + (count - 1) * hop + clip], clip)[::hop]
                next_start += count * hop
            keep_from = max(0, min(next_start, total - clip))  # the next window's start, and the last clip
            held, held_from = held[keep_from - held_from :], keep_from
        if next_start == 0:  # never a whole clip: one window, zero-padded
            yield np.pad(held, (0, clip - len(held)))[None]
        elif next_start - hop + clip != total:  # the last window did not reach the end
            yield held[-clip:][None]

    def pick_window(self, probs: np.ndarray) -> np.ndarray:
        """[windows, labels] -> [labels]: the most confident window whose best class is not _silence_,
        or the most confident window when every one is silence."""
        best = _BestWindow(self.labels.index(SILENCE) if SILENCE in self.labels else -1)
        best.update(probs)
        return best.probabilities

    def classify_files(self, paths: list[str | os.PathLike], top_k: int = 3,
                       progress: Progress | None = None) -> list[FileResult]:
        """Classify audio files of any length; one FileResult per path, in order.

        Each file is decoded a few seconds at a time and its windows join fixed-size batches shared
        with the other files, so memory stays bounded however long a file is (measured for an hour
        in bench/inference.py). A file that fails (on opening, or further in: damaged data, NaN,
        samples far outside [-1, 1]) gets its error and no label; the others go on. ``progress``,
        if given, is called after each block of a file with the seconds done and the file's length.
        """
        silence = self.labels.index(SILENCE) if SILENCE in self.labels else -1
        results = [FileResult(str(path)) for path in paths]
        best = [_BestWindow(silence) for _ in paths]
        batch = _WindowBatch(self)
        block_seconds = BATCH * WINDOW_HOP_S  # a block of a long file fills about one batch
        for i, path in enumerate(paths):
            try:
                seconds, blocks = stream_audio(path, self.features.sample_rate, block_seconds)
                decoded = _counted(blocks, self.features.sample_rate)
                for windows in self.stream_windows(decoded):
                    batch.add(best[i], windows)
                    if progress is not None:
                        progress(str(path), decoded.seconds, max(seconds, decoded.seconds))
            except SpeechRNNError as err:
                results[i].error = err.reason
                batch.drop(best[i])
        batch.flush()
        for result, chosen in zip(results, best, strict=True):
            if result.error is not None:
                continue
            p = chosen.probabilities
            if p is None or not np.all(np.isfinite(p)):  # never a NaN on the output, whatever went in
                result.error = "the model gave no valid probabilities for this audio"
                continue
            order = np.argsort(-p)[: max(1, top_k)]
            result.label, result.score = self.labels[order[0]], float(p[order[0]])
            result.top = [(self.labels[i], float(p[i])) for i in order]
        return results


class _counted:
    """An iterator of audio blocks that counts the seconds it has handed out."""

    def __init__(self, blocks: Iterator[np.ndarray], sample_rate: int):
        self.blocks, self.sample_rate, self.samples = blocks, sample_rate, 0

    def __iter__(self):
        for block in self.blocks:
            self.samples += len(block)
            yield block

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


class _BestWindow:
    """The running answer for one file as its windows are scored: the most confident window whose
    best class is not _silence_, else (while every window is silence) the most confident one."""

    def __init__(self, silence: int):
        self.silence = silence
        self.word: np.ndarray | None = None
        self.any: np.ndarray | None = None

    def update(self, probs: np.ndarray) -> None:
        scores = probs.max(1)
        words = np.flatnonzero(probs.argmax(1) != self.silence)
        if len(words):
            i = words[scores[words].argmax()]
            if self.word is None or scores[i] > self.word.max():
                self.word = probs[i]
        i = scores.argmax()
        if self.any is None or scores[i] > self.any.max():
            self.any = probs[i]

    @property
    def probabilities(self) -> np.ndarray | None:
        return self.word if self.word is not None else self.any


class _WindowBatch:
    """Windows of any files, scored BATCH at a time; each file's _BestWindow gets its rows."""

    def __init__(self, recognizer: Recognizer):
        self.recognizer = recognizer
        self.parts: list[tuple[_BestWindow, np.ndarray]] = []
        self.count = 0

    def add(self, owner: _BestWindow, windows: np.ndarray) -> None:
        while len(windows):
            take = windows[: BATCH - self.count]
            self.parts.append((owner, take))
            self.count += len(take)
            windows = windows[len(take) :]
            if self.count == BATCH:
                self.flush()

    def drop(self, owner: _BestWindow) -> None:
        """Forget the windows of a file that failed part-way."""
        self.parts = [(o, w) for o, w in self.parts if o is not owner]
        self.count = sum(len(w) for _, w in self.parts)

    def flush(self) -> None:
        if not self.parts:
            return
        probs = self.recognizer.probabilities(np.concatenate([w for _, w in self.parts]))
        start = 0
        for owner, windows in self.parts:
            owner.update(probs[start : start + len(windows)])
            start += len(windows)
        self.parts, self.count = [], 0
