"""Training-time augmentation on waveforms: speed, room reverberation, microphone colouring,
time shift, gain, background noise.

Deterministic for a seed: ``augment(waves, noise, config, rng)`` with the same generator state
gives the same output. Given one generator per clip instead, each clip's augmentation depends on
its own generator alone, so any subset of an epoch (one worker's shard) comes out exactly as it
would within the whole epoch. Never used for validation or testing (the trainer only calls it on
training batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.signal import fftconvolve, lfilter

from data_prep.audio import fix_length, resample


@dataclass(frozen=True)
class AugmentConfig:
    background_probability: float = 0.8  # share of clips that get background noise mixed in
    background_volume: float = 0.1  # the largest noise gain (uniform 0..this), on the recording as it is
    # When set, (lo, hi) in dBFS replaces background_volume: each recording is first brought to unit
    # RMS, then mixed at an RMS level drawn uniformly in dB between lo and hi. The recordings differ
    # by 38 dB in their own level (dude_miaowing 0.004 RMS, white_noise 0.33), so a gain on the raw
    # file leaves the quiet ones (cat, bike, dishes) far below the levels a room gives them.
    background_dbfs: tuple[float, float] | None = None
    # When set, (lo, hi) in dB replaces both: the noise is mixed at a signal-to-noise ratio drawn
    # uniformly between lo and hi, against the clip's own speech level (active_rms). A level in
    # dBFS buries a quiet recording and barely touches a loud one; a ratio treats them alike.
    background_snr_db: tuple[float, float] | None = None
    time_shift_ms: float = 100.0  # shift each clip by up to +-this, zero-filled
    speed_range: float = 0.0  # e.g. 0.1: play 0.9x..1.1x (changes tempo and pitch together)
    gain_db: float = 0.0  # e.g. 6: random level change of up to +-6 dB
    reverb_probability: float = 0.0  # share of clips played in a simulated room
    reverb_seconds: float = 0.6  # the longest reverberation time (RT60) drawn
    eq_probability: float = 0.0  # share of clips given a random spectral tilt (another microphone)
    # Share of word examples (commands and unknown words) cut as a sliding-window detector sees
    # them: beside a neighbouring word, the window at a random offset, so the word may be partly
    # outside it; relabelled by where the words' energy falls (see stream_context).
    context_probability: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.background_dbfs is not None:
            lo, hi = (float(x) for x in self.background_dbfs)
            if lo > hi or hi > 0:
                raise ValueError(f"background_dbfs must be [low, high] with low <= high <= 0 dBFS, not {self.background_dbfs}")
            object.__setattr__(self, "background_dbfs", (lo, hi))
        if self.background_snr_db is not None:
            lo, hi = (float(x) for x in self.background_snr_db)
            if lo > hi:
                raise ValueError(f"background_snr_db must be [low, high] with low <= high, not {self.background_snr_db}")
            object.__setattr__(self, "background_snr_db", (lo, hi))

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        return cls(**data)

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(background_probability=0.0, background_volume=0.0, time_shift_ms=0.0)


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


def reverberate(wave: np.ndarray, rng: np.random.Generator, max_rt60: float, sample_rate: int = 16000) -> np.ndarray:
    """Play ``wave`` in a random simulated room, at the same energy.

    The room is the classic statistical model: a direct path, then after a few milliseconds a
    tail of Gaussian noise decaying by 60 dB over the reverberation time, at a random
    direct-to-reverberant ratio. espeak-ng speaks in no room at all; people record in rooms.
    """
    rt60 = float(rng.uniform(0.1, max(max_rt60, 0.1)))
    delay = int(sample_rate * rng.uniform(0.001, 0.01))
    n = int(sample_rate * min(rt60, 1.0))
    tail = rng.standard_normal(n) * np.exp(-6.908 * np.arange(n) / (rt60 * sample_rate))
    drr_db = rng.uniform(-3.0, 12.0)
    tail *= np.sqrt(10 ** (-drr_db / 10) / max(float(np.sum(tail**2)), 1e-12))
    response = np.zeros(delay + n)
    response[0] = 1.0
    response[delay:] += tail
    return _at_energy_of(wave, fftconvolve(wave, response)[: len(wave)])


def tilt(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random first-order tilt, from brighter (pre-emphasis) to duller, at the same energy."""
    coef = float(rng.uniform(-0.6, 0.9))
    return _at_energy_of(wave, lfilter([1.0, -coef], [1.0], wave))


def active_rms(wave: np.ndarray, sample_rate: int = 16000, within_db: float = 20.0) -> float:
    """RMS of the 20 ms frames within ``within_db`` of the loudest one: the level of the speech,
    not of the silence around it."""
    width = sample_rate // 50
    n = len(wave) // width
    if n == 0:
        return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if len(wave) else 0.0
    power = np.mean(np.square(wave[: n * width].reshape(n, width), dtype=np.float64), axis=1)
    loud = power >= power.max() * 10 ** (-within_db / 10)
    return float(np.sqrt(np.mean(power[loud])))


def _at_energy_of(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """``changed`` scaled to the energy of ``original``, as float32 (silence stays silence)."""
    energy = float(np.sum(changed**2))
    scale = np.sqrt(float(np.sum(original**2)) / energy) if energy > 0 else 0.0
    return (changed * scale).astype(np.float32)


def _speech_span(wave: np.ndarray, sample_rate: int, within_db: float = 30.0) -> tuple[int, int]:
    """First and last sample of the 10 ms frames within ``within_db`` of the loudest one."""
    hop = sample_rate // 100
    n = len(wave) // hop
    power = np.mean(np.square(wave[: n * hop].reshape(n, hop), dtype=np.float64), axis=1)
    loud = np.flatnonzero(power >= power.max() * 10 ** (-within_db / 10)) if power.max() > 0 else np.array([0])
    return int(loud[0] * hop), int((loud[-1] + 1) * hop)


def stream_context(
    wave: np.ndarray, neighbour: np.ndarray, label: int, neighbour_label: int, rng: np.random.Generator,
    is_command: np.ndarray, unknown: int, sample_rate: int = 16000,
) -> tuple[np.ndarray, int]:
    """A training window cut as a detector sliding over a stream sees it: (window, label).

    wave, neighbour: one-second clips [samples] of a word each (a command or an unknown word);
    label, neighbour_label: their label indices; is_command: [num_labels] bool. The neighbour's
    speech is laid 50-600 ms after the end of the word's speech or before its start, and a window
    of one clip's length is cut at a random offset that keeps at least 100 ms of the word. Its
    label follows the energy: a word with at least half of its energy inside the window names it
    (a command before an unknown word, the louder of two commands); otherwise (fragments only)
    ``unknown``. The inputs are unchanged.
    """
    n = len(wave)
    a0, a1 = _speech_span(wave, sample_rate)
    b0, b1 = _speech_span(neighbour, sample_rate)
    gap = int(rng.uniform(0.05, 0.6) * sample_rate)
    # both clips on one track: the neighbour's speech starts `gap` after ours ends, or ends `gap` before ours starts
    shift = (a1 + gap - b0) if rng.random() < 0.5 else (a0 - gap - b1)
    lo = min(0, shift)
    length = max(n, shift + n) - lo
    track_a, track_b = np.zeros(length, np.float32), np.zeros(length, np.float32)
    track_a[-lo : -lo + n] = wave
    track_b[shift - lo : shift - lo + n] = neighbour
    # (a word whose speech lies within 100 ms of a clip's edge: the window stays inside the track)
    first = min(max(0, a0 - lo - n + sample_rate // 10), length - n)
    last = min(length - n, a1 - lo - sample_rate // 10)
    start = int(rng.integers(first, max(first, last) + 1))
    inside = slice(start, start + n)
    named = []
    for track, which in ((track_a, label), (track_b, neighbour_label)):
        total = float(np.sum(np.square(track, dtype=np.float64)))
        part = float(np.sum(np.square(track[inside], dtype=np.float64)))
        if total > 0 and part / total >= 0.5:
            named.append((bool(is_command[which]), part, which))
    return np.clip(track_a[inside] + track_b[inside], -1.0, 1.0), (max(named)[2] if named else unknown)


def augment(
    waves: np.ndarray,
    noise: list[np.ndarray],
    config: AugmentConfig,
    rng: np.random.Generator | Sequence[np.random.Generator],
    sample_rate: int = 16000,
) -> np.ndarray:
    """Augmented copies of a batch of waveforms [n, samples] (the input is not changed).

    ``rng``: one generator for the whole batch, or a sequence of n generators, one per clip."""
    out = np.array(waves, dtype=np.float32, copy=True)
    n, length = out.shape
    rngs = [rng] * n if isinstance(rng, np.random.Generator) else list(rng)
    if len(rngs) != n:
        raise ValueError(f"{len(rngs)} generators for {n} clips")
    max_shift = int(sample_rate * config.time_shift_ms / 1000)
    by_snr = config.background_snr_db is not None
    mixing = bool(noise) and (by_snr or config.background_dbfs is not None or config.background_volume > 0)
    noise_rms = [max(1e-9, float(np.sqrt(np.mean(np.square(s, dtype=np.float64))))) for s in noise] \
        if mixing and (by_snr or config.background_dbfs is not None) else []
    for i in range(n):
        wave, rng = out[i], rngs[i]
        if config.speed_range > 0:
            wave = change_speed(wave, float(rng.uniform(1 - config.speed_range, 1 + config.speed_range)), sample_rate)
        if config.reverb_probability > 0 and rng.random() < config.reverb_probability:
            wave = reverberate(wave, rng, config.reverb_seconds, sample_rate)
        if config.eq_probability > 0 and rng.random() < config.eq_probability:
            wave = tilt(wave, rng)
        if max_shift:
            wave = time_shift(wave, int(rng.integers(-max_shift, max_shift + 1)))
        if config.gain_db > 0:
            wave = wave * np.float32(10 ** (rng.uniform(-config.gain_db, config.gain_db) / 20))
        if mixing and rng.random() < config.background_probability:
            k = int(rng.integers(len(noise)))
            source = noise[k]
            start = int(rng.integers(0, max(1, len(source) - length)))
            if by_snr:
                # A _silence_ clip is itself a noise cut: it gets a second noise at a ratio to its own level.
                gain = active_rms(wave, sample_rate) * 10 ** (-rng.uniform(*config.background_snr_db) / 20) / noise_rms[k]
            elif config.background_dbfs is not None:
                gain = 10 ** (rng.uniform(*config.background_dbfs) / 20) / noise_rms[k]
            else:
                gain = rng.uniform(0, config.background_volume)
            wave = wave + fix_length(source[start : start + length], length) * np.float32(gain)
        out[i] = np.clip(wave, -1.0, 1.0)
    return out
