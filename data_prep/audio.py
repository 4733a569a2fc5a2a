"""Audio in: any file soundfile reads -> float32 mono at the target rate, padded or cropped.

Samples are floats in [-1, 1] (full scale). A file whose samples reach far beyond that (more
than MAX_ABS_SAMPLE) is refused: it is nearly always integer sample values written as float
(32767 for full scale), and no level we could guess for it would be the recording's own.

File names are passed to libsndfile as the bytes the file system holds, so a name that is not
valid UTF-8 (an old disk, another locale) opens like any other.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from data_prep.errors import SpeechRNNError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Full scale is 1.0. A float file may go a little over after processing (resampling, mixing); up
# to 2.0 (+6 dBFS) is read as it is. Beyond that the file is refused, not rescaled (see above).
MAX_ABS_SAMPLE = 2.0
# libsndfile's log of a WAV whose data chunk is cut short: "data : 32000 (should be 16000)".
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


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
    """Raise the project error for audio no model should see: empty, NaN or Inf, or samples far
    outside [-1, 1] (more than MAX_ABS_SAMPLE)."""
    if samples.size == 0:
        raise SpeechRNNError("the file holds no audio samples (empty)", path)
    if not np.all(np.isfinite(samples)):
        raise SpeechRNNError("the audio contains NaN or Inf samples", path)
    peak = float(np.max(np.abs(samples)))
    if peak > MAX_ABS_SAMPLE:
        raise SpeechRNNError(f"samples reach {peak:.3g}, far outside [-1, 1] (integer sample values stored as "
                             "float?); scale the audio to [-1, 1]", path)
    return samples


def check_path(path: str | os.PathLike) -> Path:
    """The path-level problems (missing, a broken link or a link loop, a directory, no permission)
    as the project error, each named for what it is."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise SpeechRNNError(f"broken symbolic link (to {os.readlink(path)}, which does not exist)", path) from None
        if exc.errno == errno.ENOENT:
            raise SpeechRNNError("no such file", path) from None
        if exc.errno == errno.ELOOP:
            raise SpeechRNNError("symbolic link loop (too many levels of symbolic links)", path) from None
        raise SpeechRNNError(f"cannot read file ({exc.strerror or exc})", path) from None
    if stat.S_ISDIR(info.st_mode):
        raise SpeechRNNError("is a directory, not an audio file", path)
    return path


def _decode_reason(exc: Exception) -> str:
    """libsndfile's own words, without the file name it prefixes (the caller names the file once)."""
    if isinstance(exc, sf.LibsndfileError):
        return exc.error_string.strip().rstrip(".")
    text = str(exc).strip()
    return text.split(": ", 1)[-1] if text else type(exc).__name__


def open_audio(path: str | os.PathLike) -> sf.SoundFile:
    """Open an audio file for reading, or raise the project error naming the file and the problem.

    A WAV whose data is shorter than its header announces (a copy cut short) is read as far as it
    goes, with a warning saying so.
    """
    path = check_path(path)
    try:
        handle = sf.SoundFile(os.fsencode(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise SpeechRNNError(f"cannot decode audio ({_decode_reason(exc)})", path) from None
    except OSError as exc:
        raise SpeechRNNError(f"cannot read file ({exc.strerror or exc})", path) from None
    short = _SHORT_DATA.search(handle.extra_info or "")
    if short and int(short.group(2)) < int(short.group(1)) and handle.samplerate:
        held = handle.frames / handle.samplerate
        announced = held * int(short.group(1)) / max(1, int(short.group(2)))
        log.warning("%s: the file ends early: its header announces %.2f s of audio, it holds %.2f s "
                    "(truncated?); using what is there", path, announced, held)
    return handle


def _read(handle: sf.SoundFile, path: Path, frames: int = -1) -> np.ndarray:
    try:
        return handle.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise SpeechRNNError(f"cannot decode audio ({_decode_reason(exc)})", path) from None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any soundfile-readable file (WAV, FLAC, OGG, ...) to float32 mono at sample_rate.

    The whole file is held in memory (clips); stream_audio reads long recordings block by block.
    Every failure a user can cause becomes a SpeechRNNError naming the file and the problem.
    """
    with open_audio(path) as handle:
        samples = _read(handle, Path(path))
        file_rate = handle.samplerate
    samples = check_audio(to_mono(samples), path)
    return resample(samples, int(file_rate), sample_rate)


def stream_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
                 block_seconds: float = 1.0) -> tuple[float, Iterator[np.ndarray]]:
    """A file's length in seconds, and its audio as float32 mono blocks at sample_rate.

    Decoded (and resampled, with a streaming resampler) ``block_seconds`` of the file at a time,
    so a four-hour recording costs no more memory than a minute. Opening problems raise at once;
    problems further in (undecodable data, NaN, samples out of range, no audio at all) raise the
    project error from the iterator, after the blocks before them.
    """
    handle = open_audio(path)
    seconds = handle.frames / handle.samplerate if handle.samplerate else 0.0
    return seconds, _blocks(handle, Path(path), sample_rate, block_seconds)


def _blocks(handle: sf.SoundFile, path: Path, sample_rate: int, block_seconds: float) -> Iterator[np.ndarray]:
    with handle:
        rate = handle.samplerate
        resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32") if rate != sample_rate else None
        block = max(1, int(rate * block_seconds))
        sent = 0
        while True:
            raw = _read(handle, path, block)
            last = len(raw) < block
            chunk = to_mono(raw)
            if len(chunk):
                check_audio(chunk, path)
            if resampler is not None:
                chunk = resampler.resample_chunk(chunk, last=last)
            if len(chunk):
                sent += len(chunk)
                yield chunk
            if last:
                break
        if sent == 0:
            raise SpeechRNNError("the file holds no audio samples (empty)", path)


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
    sf.write(os.fsencode(tmp), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
