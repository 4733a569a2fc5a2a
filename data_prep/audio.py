"""Audio in: any file soundfile reads -> float32 mono at the target rate, padded or cropped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from data_prep.errors import SpeechRNNError

SAMPLE_RATE = 16000


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mix a [frames] or [frames, channels] array down to one float32 channel."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    return samples


def resample(samples: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE, quality: str = "HQ") -> np.ndarray:
    """Resample with soxr (the resampler librosa itself uses); a no-op at the same rate."""
    if orig_sr == target_sr:
        return np.asarray(samples, dtype=np.float32)
    return soxr.resample(samples, orig_sr, target_sr, quality=quality).astype(np.float32, copy=False)


def check_audio(samples: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Raise the project error for audio no model should see: empty, NaN or Inf."""
    if samples.size == 0:
        raise SpeechRNNError("the file holds no audio samples (empty)", path)
    if not np.all(np.isfinite(samples)):
        raise SpeechRNNError("the audio contains NaN or Inf samples", path)
    return samples


def check_path(path: str | os.PathLike) -> Path:
    """The path-level problems (missing, a directory) as the project error."""
    path = Path(path)
    if not path.exists():
        raise SpeechRNNError("no such file", path)
    if path.is_dir():
        raise SpeechRNNError("is a directory, not an audio file", path)
    return path


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any soundfile-readable file (WAV, FLAC, OGG, ...) to float32 mono at sample_rate.

    Every failure a user can cause becomes a SpeechRNNError naming the file and the problem.
    """
    path = check_path(path)
    try:
        samples, file_rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).split(": ", 1)[-1] if str(exc) else type(exc).__name__
        raise SpeechRNNError(f"cannot decode audio ({reason.strip()})", path) from None
    except OSError as exc:
        raise SpeechRNNError(f"cannot read file ({exc.strerror or exc})", path) from None
    samples = check_audio(to_mono(samples), path)
    return check_audio(resample(samples, int(file_rate), sample_rate), path)


def fix_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end or crop to exactly ``length`` samples (as the dataset's own tools do)."""
    if samples.shape[-1] == length:
        return samples
    if samples.shape[-1] > length:
        return samples[..., :length]
    pad = [(0, 0)] * (samples.ndim - 1) + [(0, length - samples.shape[-1])]
    return np.pad(samples, pad)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sf.write(str(tmp), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
