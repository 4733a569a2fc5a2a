"""Audio sources for the streaming detector: the microphone (sounddevice/PortAudio) and files.

Both hand 16 kHz float32 chunks to the same StreamingDetector, through `run_listener`.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
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
    except KeyboardInterrupt:
        # Ctrl-C: the audio captured before it is handed over, then the stream ends like any other
        # (run_listener throws KeyboardInterrupt in here when Ctrl-C came while it was busy).
        _stop(stream)
        while True:
            try:
                block = chunks.get_nowait()
            except queue.Empty:
                break
            yield resampler.resample_chunk(block) if resampler else block
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    finally:
        _stop(stream)


def _stop(stream) -> None:
    try:
        stream.abort()
        stream.close()
    except Exception:  # noqa: BLE001 - closing a device that has vanished (or closed already) may fail too
        pass


def file_chunk_source(path, chunk_ms: float = 50.0, realtime: bool = False,
                      duration: float | None = None) -> Iterator[np.ndarray]:
    """A file streamed in microphone-sized chunks; as fast as possible unless ``realtime``.

    Decoded block by block (and resampled with a streaming resampler), so an hour-long file
    costs no more memory than a minute-long one. Problems with the file raise the project error
    (opening ones at once, before the first chunk).
    """
    from data_prep.audio import stream_audio

    _, blocks = stream_audio(path, 16000, chunk_ms / 1000)
    return _paced(blocks, realtime, duration)


def _paced(blocks: Iterator[np.ndarray], realtime: bool, duration: float | None) -> Iterator[np.ndarray]:
    limit = int(duration * 16000) if duration is not None else None
    sent = 0
    start = time.monotonic()
    for chunk in blocks:
        if limit is not None:
            chunk = chunk[: limit - sent]
        if len(chunk):
            if realtime:
                delay = start + (sent + len(chunk)) / 16000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sent += len(chunk)
            yield chunk
        if limit is not None and sent >= limit:
            break


class _HeldInterrupt:
    """Ctrl-C (SIGINT) that arrives while the detector works on a chunk is held until the chunk is
    done, so the detector's state is never left half-updated; at any other moment (waiting for
    audio, printing) it raises KeyboardInterrupt at once, as usual. Only where Python's own
    handler is in place, in the main thread; elsewhere this changes nothing."""

    def __init__(self):
        self.holding = False
        self.pending = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.holding:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> _HeldInterrupt:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _captured(source: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """After Ctrl-C: what the source has captured already (the microphone's queue); a file has none."""
    throw = getattr(source, "throw", None)
    if throw is None:
        return
    try:
        yield throw(KeyboardInterrupt)
        yield from source
    except (KeyboardInterrupt, StopIteration):
        return


def run_listener(detector: StreamingDetector, source: Iterator[np.ndarray],
                 on_detection: Callable[[Detection], None], on_status: Callable[[StreamingDetector], None] | None = None,
                 stats: ListenStats | None = None) -> ListenStats:
    """Pump a source through the detector until it ends or Ctrl-C (which ends it cleanly), then
    let the detector finish scoring what it has: a command in the last second is reported too.

    On Ctrl-C the audio the source has already captured is scored first (see _HeldInterrupt and
    _captured). A source's error (the project error: a vanished device, a damaged file) propagates.
    """
    stats = stats or ListenStats()
    cpu0 = time.process_time()
    last_status = 0.0
    try:
        with _HeldInterrupt() as interrupt:
            try:
                for chunk in source:
                    interrupt.holding = True
                    try:
                        found = detector.push(chunk)
                    finally:
                        interrupt.holding = False
                    for detection in found:
                        on_detection(detection)
                    if interrupt.pending:
                        raise KeyboardInterrupt
                    if on_status and time.monotonic() - last_status > 0.1:
                        on_status(detector)
                        last_status = time.monotonic()
            except KeyboardInterrupt:
                interrupt.holding = True  # stopping now: a second Ctrl-C must not cut the ending short
                for chunk in _captured(source):
                    for detection in detector.push(chunk):
                        on_detection(detection)
            interrupt.holding = True
            for detection in detector.finish():
                on_detection(detection)
    finally:
        stats.seconds = detector.samples_seen / detector.features.sample_rate
        stats.detections = list(detector.detections)
        stats.cpu_seconds = time.process_time() - cpu0
    return stats


def detector_for(recognizer, config: StreamConfig) -> StreamingDetector:
    """A detector scoring MFCC windows with the recognizer's backend: the LiteRT interpreter at batch 1,
    or on the SavedModel its XLA-compiled MFCC signature (compiled once up front).

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
