"""Classify clips and files with an exported model (plain tf.saved_model.load; no Keras needed).

Files longer than the model's clip (1 s) are scored in 1 s windows every 100 ms; the answer is
the window with the highest score for a class other than _silence_ (a word anywhere in the file
wins over the silence around it); if every window is silence, the most confident silence window.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.audio import load_audio
from data_prep.dataset import SILENCE
from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig
from speechrnn.export import FORMAT, META_FILE, XLA_DIR, check_export_graph
from speechrnn.tfutil import import_tf

BATCH = 64
WINDOW_HOP_S = 0.1


def default_model_dir() -> Path:
    """``models/default`` in the current folder, else the one shipped beside the package."""
    local = Path("models/default")
    if (local / "assets" / META_FILE).exists():
        return local
    return Path(__file__).resolve().parent.parent / "models" / "default"


def read_metadata(model_dir: str | os.PathLike) -> dict:
    """An export's metadata (assets/speechrnn.json), once its graphs are checked to be the ones it
    describes (speechrnn.export.check_export_graph; no TensorFlow needed). Raises SpeechRNNError."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "assets" / META_FILE
    if not model_dir.exists():
        raise SpeechRNNError("no such model folder", model_dir)
    if not (model_dir / "saved_model.pb").exists() or not meta_path.exists():
        raise SpeechRNNError(f"not a speechrnn export (no saved_model.pb or assets/{META_FILE}); "
                             "make one with `speechrnn export RUN_DIR OUT`", model_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise SpeechRNNError(f"damaged model metadata ({exc})", meta_path) from None
    if meta.get("format") != FORMAT:
        raise SpeechRNNError("not a speechrnn export (unknown metadata format)", model_dir)
    check_export_graph(model_dir, meta)
    return meta


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
    def __init__(self, model_dir: str | os.PathLike | None = None):
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.meta = read_metadata(self.model_dir)
        self.labels: list[str] = self.meta["labels"]
        self.features = FeatureConfig.from_dict(self.meta["features"])
        tf = import_tf(keras=False)
        self._tf = tf
        try:
            self._loaded = tf.saved_model.load(str(self.model_dir))
        except Exception as exc:  # noqa: BLE001 - any load failure means a damaged export
            raise SpeechRNNError(f"cannot load the SavedModel ({type(exc).__name__})", self.model_dir) from None
        sigs = self._loaded.signatures
        self._fns = {("waveform", False): sigs["serving_default"], ("mfcc", False): sigs["mfcc"]}

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
        """[n, samples] float32 at 16 kHz -> [n, labels], in fixed-size batches.

        ``xla``: the compiled signature; ~1-2 s to compile once, then ~10x faster per call.
        """
        return self._batched(self._fn("waveform", xla), "waveform", np.asarray(waves, np.float32))

    def probabilities_from_mfcc(self, feats: np.ndarray, xla: bool = False) -> np.ndarray:
        return self._batched(self._fn("mfcc", xla), "mfcc", np.asarray(feats, np.float32))

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
        """One clip-length window, or windows every 100 ms over a longer recording."""
        clip = self.features.clip_samples
        if len(samples) <= clip:
            return np.pad(samples, (0, clip - len(samples)))[None]
        hop = int(self.features.sample_rate * WINDOW_HOP_S)
        starts = list(range(0, len(samples) - clip + 1, hop))
        if starts[-1] != len(samples) - clip:
            starts.append(len(samples) - clip)
        return np.stack([samples[s : s + clip] for s in starts])

    def pick_window(self, probs: np.ndarray) -> np.ndarray:
        top = probs.argmax(1)
        silence = self.labels.index(SILENCE) if SILENCE in self.labels else -1
        candidates = np.flatnonzero(top != silence)
        if not len(candidates):
            candidates = np.arange(len(probs))
        return probs[candidates[probs[candidates].max(1).argmax()]]

    def classify_files(self, paths: list[str | os.PathLike], top_k: int = 3) -> list[FileResult]:
        """Decode every file, score all windows of all files in shared batches, pick per file."""
        results, spans, windows = [], [], []
        for path in paths:
            try:
                samples = load_audio(path, self.features.sample_rate)
            except SpeechRNNError as err:
                results.append(FileResult(str(path), error=err.reason))
                spans.append(None)
                continue
            w = self.windows(samples)
            spans.append((sum(len(x) for x in windows), len(w)))
            windows.append(w)
            results.append(FileResult(str(path)))
        probs = self.probabilities(np.concatenate(windows)) if windows else None
        for result, span in zip(results, spans, strict=True):
            if span is None:
                continue
            p = self.pick_window(probs[span[0] : span[0] + span[1]])
            order = np.argsort(-p)[: max(1, top_k)]
            result.label, result.score = self.labels[order[0]], float(p[order[0]])
            result.top = [(self.labels[i], float(p[i])) for i in order]
        return results
