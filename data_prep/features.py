"""FeatureConfig and mfcc(): the one definition of the features every model is trained on.

MFCC here = librosa mel power spectrogram (center=False, periodic Hann window) ->
10*log10(max(S, 1e-10)) per element (no top_db clipping, so a clip's features never depend on
what else is in the batch) -> orthonormal DCT-II. The exported model computes the same thing
with TensorFlow ops from the same mel matrix (speechrnn.export); a test holds the two equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LOG_FLOOR = 1e-10


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    window_ms: float = 30.0
    hop_ms: float = 10.0
    n_mels: int = 40
    n_mfcc: int = 40
    fmin: float = 20.0
    fmax: float = 7600.0

    def __post_init__(self) -> None:
        if self.n_mfcc > self.n_mels:
            raise ValueError(f"n_mfcc ({self.n_mfcc}) cannot exceed n_mels ({self.n_mels})")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got {self.fmin}, {self.fmax}")

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate * self.window_ms / 1000))

    @property
    def hop_samples(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    def frames_for(self, samples: int) -> int:
        return 1 + (samples - self.window_samples) // self.hop_samples

    @property
    def num_frames(self) -> int:
        return self.frames_for(self.clip_samples)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_frames, self.n_mfcc)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def digest(self) -> str:
        """A short stable hash of the config (and of the feature recipe's version)."""
        text = json.dumps({"recipe": 1, **self.to_dict()}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=8)
def mel_matrix(config: FeatureConfig) -> np.ndarray:
    """[n_mels, n_fft//2+1] librosa (Slaney) mel filterbank; the exported graph embeds it too."""
    import librosa

    return librosa.filters.mel(
        sr=config.sample_rate,
        n_fft=config.window_samples,
        n_mels=config.n_mels,
        fmin=config.fmin,
        fmax=config.fmax,
    ).astype(np.float32)


def mfcc(samples: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """MFCC frames of one clip [samples] -> [frames, n_mfcc], or a batch [n, samples] -> [n, frames, n_mfcc].

    Samples must already be at config.sample_rate; any length >= one window works (streaming
    uses short chunks). Works batched in one call, which is ~2x faster than clip by clip.
    """
    import librosa

    samples = np.asarray(samples, dtype=np.float32)
    if samples.shape[-1] < config.window_samples:
        raise ValueError(f"need at least {config.window_samples} samples, got {samples.shape[-1]}")
    power = librosa.feature.melspectrogram(
        y=samples,
        sr=config.sample_rate,
        n_fft=config.window_samples,
        hop_length=config.hop_samples,
        window="hann",
        center=False,
        power=2.0,
        n_mels=config.n_mels,
        fmin=config.fmin,
        fmax=config.fmax,
    )
    log_mel = 10.0 * np.log10(np.maximum(power, LOG_FLOOR))
    coeffs = librosa.feature.mfcc(S=log_mel, n_mfcc=config.n_mfcc, dct_type=2, norm="ortho")
    return np.swapaxes(coeffs, -1, -2).astype(np.float32, copy=False)


def mfcc_batched(clips: np.ndarray, config: FeatureConfig = FeatureConfig(), batch: int = 512) -> np.ndarray:
    """MFCC of [n, samples] in chunks (bounded memory)."""
    out = np.empty((len(clips), config.frames_for(clips.shape[-1]), config.n_mfcc), np.float32)
    for start in range(0, len(clips), batch):
        out[start : start + batch] = mfcc(clips[start : start + batch], config)
    return out
