"""Audio sources for the streaming detector: the microphone (sounddevice/PortAudio) and files.

Both hand 16 kHz float32 chunks to the same StreamingDetector, through `run_listener`.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from data_prep.errors import SpeechRNNError
from speechrnn.streaming import Detection, StreamConfig, StreamingDetector

log = logging.getLogger(__name__)
STALL_SECONDS = 3.0  # no audio for this long: the device has gone


def import_sounddevice():
    try:
        import sounddevice
    except OSError as exc:  # the Python package is there, the PortAudio library is not
        raise SpeechRNNError(f"cannot use the microphone: {exc}; install it with: sudo apt-get install libportaudio2"
                             ) from None
    except ImportError:
        raise SpeechRNNError("cannot use the microphone: sounddevice is not installed; "
                             "install it with: pip install 'speechrnn[mic]'") from None
    return sounddevice


def list_devices() -> list[dict]:
    sd = import_sounddevice()
    try:
        devices = sd.query_devices()
        default_in = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise SpeechRNNError(f"cannot list audio devices ({exc})") from None
    return [
        {"index": i, "name": d["name"], "inputs": d["max_input_channels"], "outputs": d["max_output_channels"],
         "default_samplerate": d["default_samplerate"], "default_input": i == default_in}
        for i, d in enumerate(devices)
    ]


def resolve_device(device: str | None):
    """An index, an exact name or a unique part of a name -> PortAudio device index (None: default)."""
    if device is None:
        return None
    if device.isdigit():
        return int(device)
    inputs = [d for d in list_devices() if d["inputs"] > 0]
    exact = [d for d in inputs if d["name"] == device]
    matches = exact or [d for d in inputs if device.lower() in d["name"].lower()]
    if len(matches) != 1:
        names = ", ".join(repr(d["name"]) for d in inputs) or "none"
        what = "no" if not matches else "more than one"
        raise SpeechRNNError(f"{what} input device matches {device!r}; input devices: {names}")
    return matches[0]["index"]


@dataclass
class ListenStats:
    seconds: float = 0.0
    detections: list[Detection] = field(default_factory=list)
    overflows: int = 0
    cpu_seconds: float = 0.0


def check_input_device(device: str | None) -> dict:
    """The input device's PortAudio info, or the project error (before any model is loaded)."""
    sd = import_sounddevice()
    index = resolve_device(device)
    try:
        return sd.query_devices(index, "input")
    except (sd.PortAudioError, ValueError) as exc:
        raise SpeechRNNError(f"no usable input device ({exc}); see `speechrnn devices`") from None


def microphone_chunks(device: str | None, block_ms: float = 50.0, stats: ListenStats | None = None,
                      duration: float | None = None) -> Iterator[np.ndarray]:
    """16 kHz mono chunks from an input device, resampled from whatever rate it supports."""
    sd = import_sounddevice()
    import soxr

    index = resolve_device(device)
    info = check_input_device(device)
    rate = 16000
    try:
        sd.check_input_settings(device=index, channels=1, samplerate=rate, dtype="float32")
    except Exception:  # noqa: BLE001 - PortAudio says "invalid sample rate" in several ways
        rate = int(info["default_samplerate"])
    resampler = soxr.ResampleStream(rate, 16000, 1, dtype="float32") if rate != 16000 else None
    chunks: queue.Queue = queue.Queue()
    stats = stats or ListenStats()

    def callback(indata, frames, time_info, status):
        if status.input_overflow:
            stats.overflows += 1
        chunks.put(indata[:, 0].copy())

    try:
        stream = sd.InputStream(device=index, channels=1, samplerate=rate, dtype="float32",
                                blocksize=int(rate * block_ms / 1000), callback=callback)
        stream.start()
    except sd.PortAudioError as exc:
        raise SpeechRNNError(f"cannot open input device {info['name']!r} ({exc})") from None
    log.info("listening on %r at %d Hz", info["name"], rate)
    reported_overflows = 0
    received = 0
    try:
        while duration is None or received < duration * rate:
            try:
                block = chunks.get(timeout=STALL_SECONDS)
            except queue.Empty:
                raise SpeechRNNError(f"input device {info['name']!r} stopped delivering audio "
                                     f"(unplugged or gone)") from None
            if not stream.active:
                raise SpeechRNNError(f"input device {info['name']!r} stopped") from None
            received += len(block)
            if stats.overflows > reported_overflows:
                log.warning("input overflow: audio was dropped (the machine is busy); going on")
                reported_overflows = stats.overflows
            yield resampler.resample_chunk(block) if resampler else block
    finally:
        try:
            stream.abort()
            stream.close()
        except Exception:  # noqa: BLE001 - closing a device that has vanished may fail too
            pass


def file_chunk_source(path, chunk_ms: float = 50.0, realtime: bool = False,
                      duration: float | None = None) -> Iterator[np.ndarray]:
    """A file streamed in microphone-sized chunks; as fast as possible unless ``realtime``.

    Decoded block by block (and resampled with a streaming resampler), so an hour-long file
    costs no more memory than a minute-long one.
    """
    import soundfile as sf
    import soxr

    from data_prep.audio import check_audio, check_path, to_mono

    check_path(path)
    try:
        handle = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise SpeechRNNError(f"cannot decode audio ({exc})", path) from None
    with handle:
        rate = handle.samplerate
        resampler = soxr.ResampleStream(rate, 16000, 1, dtype="float32") if rate != 16000 else None
        block = max(1, int(rate * chunk_ms / 1000))
        limit = int(duration * 16000) if duration is not None else None
        sent = 0
        start = time.monotonic()
        while limit is None or sent < limit:
            raw = handle.read(block, dtype="float32", always_2d=True)
            last = len(raw) < block
            chunk = to_mono(raw)
            if len(chunk):
                check_audio(chunk, path)
            if resampler is not None:
                chunk = resampler.resample_chunk(chunk, last=last)
            if limit is not None:
                chunk = chunk[: limit - sent]
            if len(chunk):
                if realtime:
                    delay = start + (sent + len(chunk)) / 16000 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                sent += len(chunk)
                yield chunk
            if last:
                break
        if sent == 0:
            raise SpeechRNNError("the file holds no audio samples (empty)", path)


def run_listener(detector: StreamingDetector, source: Iterator[np.ndarray],
                 on_detection: Callable[[Detection], None], on_status: Callable[[StreamingDetector], None] | None = None,
                 stats: ListenStats | None = None) -> ListenStats:
    """Pump a source through the detector until it ends (or Ctrl-C, which ends it cleanly)."""
    stats = stats or ListenStats()
    cpu0 = time.process_time()
    last_status = 0.0
    try:
        for chunk in source:
            for detection in detector.push(chunk):
                on_detection(detection)
            if on_status and time.monotonic() - last_status > 0.1:
                on_status(detector)
                last_status = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        stats.seconds = detector.samples_seen / detector.features.sample_rate
        stats.detections = list(detector.detections)
        stats.cpu_seconds = time.process_time() - cpu0
    return stats


def detector_for(recognizer, config: StreamConfig) -> StreamingDetector:
    """A detector scoring with the export's XLA-compiled MFCC signature (compiled once up front).

    Per-label thresholds the export carries (``streaming.label_thresholds`` in its metadata, set by
    ``speechrnn export --threshold LABEL=T``) apply unless ``config`` sets the same labels."""
    own = recognizer.meta.get("streaming", {}).get("label_thresholds", {})
    score = lambda x: recognizer.probabilities_from_mfcc(x, xla=True)  # noqa: E731
    try:
        config = replace(config, label_thresholds={**own, **(config.label_thresholds or {})})
        detector = StreamingDetector(score, recognizer.labels, recognizer.features, config)
    except ValueError as exc:  # a threshold for a label the model does not report
        raise SpeechRNNError(str(exc), recognizer.model_dir) from None
    score(np.zeros((1, *recognizer.features.shape), np.float32))  # compile before the audio starts
    return detector


def status_line(detector: StreamingDetector) -> None:
    level = detector.level
    bars = int(max(0, min(30, (level + 60) / 2)))
    sys.stderr.write(f"\rlistening {detector.stream_time:7.1f}s  level {'#' * bars:<30} {level:6.1f} dBFS")
    sys.stderr.flush()
