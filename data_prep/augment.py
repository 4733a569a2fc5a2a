"""Training-time augmentation on waveforms: background noise, time shift, speed, gain.

Deterministic for a seed: ``augment(waves, noise, config, rng)`` with the same generator state
gives the same output. Never used for validation or testing (the trainer only calls it on
training batches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from data_prep.audio import fix_length, resample


@dataclass(frozen=True)
class AugmentConfig:
    background_probability: float = 0.8  # share of clips that get background noise mixed in
    background_volume: float = 0.1  # the largest noise gain (uniform 0..this)
    time_shift_ms: float = 100.0  # shift each clip by up to +-this, zero-filled
    speed_range: float = 0.0  # e.g. 0.1: play 0.9x..1.1x (changes tempo and pitch together)
    gain_db: float = 0.0  # e.g. 6: random level change of up to +-6 dB

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        return cls(**data)

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)


def time_shift(wave: np.ndarray, shift: int) -> np.ndarray:
    """Move the audio by ``shift`` samples (positive: later), keeping the length, zero-filled."""
    if shift == 0:
        return wave
    out = np.zeros_like(wave)
    if shift > 0:
        out[shift:] = wave[:-shift]
    else:
        out[:shift] = wave[-shift:]
    return out


def change_speed(wave: np.ndarray, factor: float, sample_rate: int = 16000) -> np.ndarray:
    """Play ``factor`` times faster by resampling, centred back into the original length."""
    if factor == 1.0:
        return wave
    n = len(wave)
    # Low quality is plenty for augmentation and 4x cheaper than HQ (it was 96% of augment time).
    faster = resample(wave, int(round(sample_rate * factor)), sample_rate, quality="LQ")
    if len(faster) >= n:
        start = (len(faster) - n) // 2
        return faster[start : start + n]
    pad = n - len(faster)
    return np.pad(faster, (pad // 2, pad - pad // 2))


def augment(
    waves: np.ndarray,
    noise: list[np.ndarray],
    config: AugmentConfig,
    rng: np.random.Generator,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Augmented copies of a batch of waveforms [n, samples] (the input is not changed)."""
    out = np.array(waves, dtype=np.float32, copy=True)
    n, length = out.shape
    max_shift = int(sample_rate * config.time_shift_ms / 1000)
    for i in range(n):
        wave = out[i]
        if config.speed_range > 0:
            wave = change_speed(wave, float(rng.uniform(1 - config.speed_range, 1 + config.speed_range)), sample_rate)
        if max_shift:
            wave = time_shift(wave, int(rng.integers(-max_shift, max_shift + 1)))
        if config.gain_db > 0:
            wave = wave * np.float32(10 ** (rng.uniform(-config.gain_db, config.gain_db) / 20))
        if noise and config.background_volume > 0 and rng.random() < config.background_probability:
            source = noise[rng.integers(len(noise))]
            start = int(rng.integers(0, max(1, len(source) - length)))
            wave = wave + fix_length(source[start : start + length], length) * np.float32(
                rng.uniform(0, config.background_volume)
            )
        out[i] = np.clip(wave, -1.0, 1.0)
    return out
