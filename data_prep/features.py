"""FeatureConfig and mfcc(): the one definition of the features every model is trained on.

MFCC here = librosa's mel power spectrogram (center=False, periodic Hann window) ->
10*log10(max(S, 1e-10)) per element (no top_db clipping, so a clip's features never depend on
what else is in the batch) -> orthonormal DCT-II, as librosa.feature.mfcc computes it. The
exported model computes the same with TensorFlow ops from the same constants
(mfcc_constants); tests hold all three equal.

Loud input cannot overflow: a clip whose samples exceed 1 is first scaled down by a power of two
(exact in floating point) and the level added back after the logarithm, so the features of any
finite input are finite (float32 power spectra overflow from about 1e17 in amplitude). Input
within [-1, 1], the contract, is computed exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LOG_FLOOR = 1e-10
DB_PER_OCTAVE = float(20.0 * np.log10(2.0))  # a factor of two in amplitude, in dB


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


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_MEL_HZ_PER_MEL = 200.0 / 3
_MEL_LOG_HZ = 1000.0
_MEL_LOG_MEL = _MEL_LOG_HZ / _MEL_HZ_PER_MEL
_MEL_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    return np.where(hz >= _MEL_LOG_HZ, _MEL_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MEL_LOG_HZ) / _MEL_LOG_STEP,
                    hz / _MEL_HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= _MEL_LOG_MEL, _MEL_LOG_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_LOG_MEL)), mel * _MEL_HZ_PER_MEL)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float32: the triangular, area-normalised ("slaney") filters of
    librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) (htk=False, norm="slaney"), written out in
    numpy so that inference needs no librosa (a ~1-3 s import); tests hold the two equal."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # in float32, as librosa scales them
    return weights


@lru_cache(maxsize=8)
def mfcc_constants(config: FeatureConfig) -> dict[str, np.ndarray]:
    """The numbers that define the features, shared by numpy here and TensorFlow in the export.

    window: periodic Hann (librosa's default STFT window); mel: librosa's Slaney filterbank
    [fft bins, mels] (mel_filterbank); dct: orthonormal DCT-II [mels, coefficients] (what
    librosa.feature.mfcc uses). numpy and scipy.fft only.
    """
    import scipy.fft

    n = config.window_samples
    mel = mel_filterbank(config.sample_rate, n, config.n_mels, config.fmin, config.fmax)
    dct = scipy.fft.dct(np.eye(config.n_mels), type=2, norm="ortho", axis=0)[: config.n_mfcc]
    return {
        "window": (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32),
        "mel": np.ascontiguousarray(mel.T, dtype=np.float32),
        "dct": np.ascontiguousarray(dct.T, dtype=np.float32),
    }


def level_exponents(samples: np.ndarray) -> np.ndarray:
    """[..., samples] -> [..., 1]: the k for which samples / 2**k lie within [-1, 1] (0 when they do)."""
    peak = np.max(np.abs(samples), axis=-1, keepdims=True)
    return np.where(peak > 1.0, np.ceil(np.log2(np.maximum(peak, 1.0))), 0.0)


def mfcc(samples: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """MFCC frames of one clip [samples] -> [frames, n_mfcc], or a batch [n, samples] -> [n, frames, n_mfcc].

    The same numbers as librosa.feature.melspectrogram(center=False) -> 10*log10 ->
    librosa.feature.mfcc (a test holds them equal), written as numpy FFT + matrix products with
    librosa's filterbank: no numba JIT (librosa's STFT costs ~18 s to compile on a fresh machine
    and ~2 s to load in every new process), and faster (scipy's FFT; numpy's was 20x slower here).
    Samples must already be at config.sample_rate; any length >= one window works (streaming
    feeds short chunks; frames do not depend on audio outside them). Finite for any finite input
    (see the module docstring); NaN in, NaN out.
    """
    import scipy.fft

    samples = np.asarray(samples, dtype=np.float32)
    width, hop = config.window_samples, config.hop_samples
    if samples.shape[-1] < width:
        raise ValueError(f"need at least {width} samples, got {samples.shape[-1]}")
    consts = mfcc_constants(config)
    exponents = level_exponents(samples)
    loud = bool(exponents.any())
    if loud:  # in two steps, so that no factor is a subnormal number (2**-128 would be)
        half = np.floor(exponents / 2)
        samples = samples * np.exp2(-half).astype(np.float32) * np.exp2(half - exponents).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(samples, width, axis=-1)[..., ::hop, :]
    spectrum = scipy.fft.rfft(frames * consts["window"], n=width, axis=-1)  # float32 in, complex64 out
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32, copy=False)
    mel_power = power @ consts["mel"]
    if loud:  # the floor where it was before scaling (or the smallest normal float), the level added back
        floor = np.maximum(LOG_FLOOR * np.exp2(-2.0 * exponents), np.finfo(np.float32).tiny).astype(np.float32)
        log_mel = 10.0 * np.log10(np.maximum(mel_power, floor[..., None])) + (DB_PER_OCTAVE * exponents[..., None])
    else:
        log_mel = 10.0 * np.log10(np.maximum(mel_power, LOG_FLOOR))
    return (log_mel @ consts["dct"]).astype(np.float32, copy=False)


def mfcc_batched(clips: np.ndarray, config: FeatureConfig = FeatureConfig(), batch: int = 512) -> np.ndarray:
    """MFCC of [n, samples] in chunks (bounded memory)."""
    out = np.empty((len(clips), config.frames_for(clips.shape[-1]), config.n_mfcc), np.float32)
    for start in range(0, len(clips), batch):
        out[start : start + batch] = mfcc(clips[start : start + batch], config)
    return out
