"""Streaming keyword detection: chunks of 16 kHz samples in, detections out. Pure: no audio I/O.

Per hop (default 200 ms: on bench/streaming.py's 6-minute real stream, hops of 100-250 ms found
66-67 of 91 commands alike, and 200 ms cost 3.4% of one core, 100 ms 5.8%) the detector
  1. computes MFCC only for the frames the new samples complete (frames never depend on audio
     outside them, so the 1 s window's features are kept, not recomputed every hop),
  2. scores the last second of frames with the model,
  3. averages the posteriors of the last few hops (smoothing),
  4. reports the best command whose smoothed score reaches the threshold (its own, where one is
     set per label), unless a detection was made within the refractory period, or this command
     was reported before and its smoothed score has not yet fallen below half its threshold (one
     word stays in the 1 s window for up to a second; it must not fire twice). _silence_ and _unknown_ are never
     reported.
When the input ends (a file's end, --duration, Ctrl-C), finish() scores what is left: the last
second is followed by quiet until the window has moved past it, so a command said just before the
end is not lost.
The microphone (speechrnn.microphone) and files (`listen --input`) are only sources of chunks.

For scoring and plotting a stream, a detector can keep every hop's posteriors
(`record_posteriors`), and `replay_posteriors` runs steps 3-4 again on recorded ones, e.g. with
other thresholds, giving exactly the detections a detector with those settings would have made.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep.dataset import SILENCE, UNKNOWN
from data_prep.features import FeatureConfig, mfcc


@dataclass(frozen=True)
class StreamConfig:
    hop_ms: float = 200.0  # how often the last second is scored
    # Posteriors averaged over this span of hops (four at the default hop), against this threshold.
    # A word keeps its label for most of a second as it crosses the window; a wrong label on part of
    # it, for a hop or two. On bench/streaming.py (streams 0-5 and near-silence 0-2, posteriors
    # replayed for 400-1000 ms x 0.5-0.7) 800 ms at 0.6 found more commands than 400 ms at 0.7 with
    # fewer false alarms in both conditions, ~200 ms later.
    smoothing_ms: float = 800.0
    threshold: float = 0.6  # smoothed score a command must reach
    refractory_ms: float = 1000.0  # after a detection, none for this long
    # Thresholds of single commands, in place of `threshold` for them, e.g. {"up": 0.85}: a label that
    # the scarce words are mistaken for can be made to need more evidence. None: the model's own
    # (an export may carry them, see detector_for); a dict is laid over the model's.
    label_thresholds: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.hop_ms <= 0 or self.smoothing_ms < 0 or self.refractory_ms < 0:
            raise ValueError("hop must be positive; smoothing and refractory not negative")
        if not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        for label, value in (self.label_thresholds or {}).items():
            if not 0 < value <= 1:
                raise ValueError(f"{label} threshold must be in (0, 1], not {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    time: float  # seconds since the stream began at which the detection was made (the end of the newest
    # audio scored, at most the end of the input): usually within a few hundred ms of the end of the
    # word, sometimes just before it
    label: str
    score: float

    def to_json(self) -> dict:
        return {"time": round(self.time, 3), "label": self.label, "score": round(self.score, 4)}


ScoreFn = Callable[[np.ndarray], np.ndarray]  # MFCC [1, frames, coeffs] -> probabilities [1, labels]


@dataclass
class PosteriorTrace:
    """Every hop's posteriors, as a detector saw them (see StreamingDetector.record_posteriors).

    ``times[k]`` is the stream time (seconds) of hop k, the end of the audio it scored; ``raw[k]``
    the model's probabilities for that window and ``smoothed[k]`` their average over the smoothing
    span, the score compared with ``thresholds`` (one per label: the threshold each command must
    reach; _silence_ and _unknown_ are never reported). Each array has one entry per label, in
    ``labels`` order. An hour at the default 200 ms hop is 18,000 hops, a few MB.
    """

    labels: list[str]
    thresholds: dict[str, float]
    times: list[float] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)
    smoothed: list[np.ndarray] = field(default_factory=list)
    # Where the input ended (s), once finish() ran: the hops after it score the input followed by
    # silence, their times run past it, and their detections are stamped at it (see finish()).
    end_time: float | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """times [hops] (s), raw [hops, labels] (the model's dtype), smoothed [hops, labels] (float32)."""
        n = len(self.labels)
        return (np.array(self.times, np.float64), np.array(self.raw).reshape(-1, n),
                np.array(self.smoothed, np.float32).reshape(-1, n))


class StreamingDetector:
    def __init__(self, score_fn: ScoreFn, labels: list[str], features: FeatureConfig = FeatureConfig(),
                 config: StreamConfig = StreamConfig()):
        self.score_fn = score_fn
        self.labels = list(labels)
        self.features = features
        self.config = config
        frames_per_hop = max(1, round(config.hop_ms / features.hop_ms))
        self._frames_per_hop = frames_per_hop
        self._reportable = np.array([label not in (SILENCE, UNKNOWN) for label in self.labels])
        per_label = config.label_thresholds or {}
        commands = [label for label, ok in zip(self.labels, self._reportable, strict=True) if ok]
        unknown = sorted(set(per_label) - set(commands))
        if unknown:
            raise ValueError(f"threshold for {', '.join(unknown)}: not a command this model reports ({', '.join(commands)})")
        self._thresholds = np.array([per_label.get(label, config.threshold) for label in self.labels])
        self._release = self._thresholds / 2  # a reported command is re-armed below half its threshold
        self._window = np.zeros(features.shape, np.float32)  # the last second of MFCC frames, oldest first
        self._frames_seen = 0  # MFCC frames computed since the stream began
        self._frames_at_last_score = 0
        self._tail = np.zeros(0, np.float32)  # samples not yet consumed by a complete frame (+ overlap)
        self._history: deque[np.ndarray] = deque(maxlen=max(1, round(config.smoothing_ms / config.hop_ms)))
        self._last_detection = -np.inf
        self._disarmed: set[int] = set()  # labels reported and not yet fallen below the release level
        self._recent = np.zeros(0, np.float32)  # the newest 100 ms, for the level meter
        self.samples_seen = 0
        self.hops_scored = 0
        self.detections: list[Detection] = []
        self._end_time: float | None = None  # set by finish(): the end of the input, in seconds
        self.trace: PosteriorTrace | None = None  # set by record_posteriors

    def record_posteriors(self) -> PosteriorTrace:
        """Keep every hop's raw and smoothed posteriors from now on, in the returned trace.

        Recording only appends to the trace: the detections are the same with or without it. Memory
        grows with the stream (a few hundred bytes a hop), so a live listener does not record.
        """
        thresholds = {label: float(t) for label, t, ok in zip(self.labels, self._thresholds, self._reportable,
                                                               strict=True) if ok}
        self.trace = PosteriorTrace(list(self.labels), thresholds)
        return self.trace

    @property
    def stream_time(self) -> float:
        """Seconds of audio turned into frames so far (the end of the newest frame)."""
        if self._frames_seen == 0:
            return 0.0
        f = self.features
        return ((self._frames_seen - 1) * f.hop_samples + f.window_samples) / f.sample_rate

    def push(self, samples: np.ndarray) -> list[Detection]:
        """Feed the next chunk (any length, float32 mono at the model's rate); get new detections."""
        if self._end_time is not None:
            raise RuntimeError("push() after finish(): the stream has ended")
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.samples_seen += len(samples)
        self._recent = np.concatenate([self._recent, samples])[-self.features.sample_rate // 10 :]
        return self._feed(samples)

    def finish(self) -> list[Detection]:
        """The input has ended: score what is left; get the last detections (call once).

        The audio is followed by digital silence (zeros, as after every clip shorter than a second
        the model trained on) until only the last hop of the input is left in the window, so a
        command at the very end is scored at the window positions that one more second of quiet
        would have given it. Detections made meanwhile are stamped at most the end of the input.
        """
        if self._end_time is not None:
            return []
        self._end_time = self.samples_seen / self.features.sample_rate
        if self.trace is not None:
            self.trace.end_time = self._end_time
        f = self.features
        quiet = f.clip_samples - self._frames_per_hop * f.hop_samples
        return self._feed(np.zeros(max(0, quiet), np.float32))

    def _feed(self, samples: np.ndarray) -> list[Detection]:
        self._tail = np.concatenate([self._tail, samples])
        f = self.features
        out = []
        while True:
            # Complete frames, at most up to the next scoring point, so every hop is scored.
            due = self._frames_at_last_score + self._frames_per_hop - self._frames_seen
            available = 0 if len(self._tail) < f.window_samples else f.frames_for(len(self._tail))
            n = min(available, max(due, 1))
            if n <= 0:
                break
            new = mfcc(self._tail[: (n - 1) * f.hop_samples + f.window_samples], f)
            self._tail = self._tail[n * f.hop_samples :]
            self._window = np.concatenate([self._window[n:], new]) if n < len(self._window) else new[-len(self._window):]
            self._frames_seen += n
            if self._frames_seen >= len(self._window) and self._frames_seen - self._frames_at_last_score >= self._frames_per_hop:
                self._frames_at_last_score = self._frames_seen
                detection = self._score()
                if detection is not None:
                    out.append(detection)
        return out

    def _score(self) -> Detection | None:
        return self._decide(np.asarray(self.score_fn(self._window[None]))[0], self.stream_time)

    def _decide(self, probs: np.ndarray, now: float) -> Detection | None:
        """Steps 3-4 for one hop: the model's ``probs`` [labels] for the window ending at ``now`` (s)."""
        self.hops_scored += 1
        self._history.append(probs)
        smoothed = np.mean(self._history, axis=0)
        if self.trace is not None:
            self.trace.times.append(now)
            self.trace.raw.append(np.array(probs))  # as the model gave them: a replay is exact
            self.trace.smoothed.append(smoothed.astype(np.float32))
        self._disarmed = {i for i in self._disarmed if smoothed[i] >= self._release[i]}
        armed = self._reportable.copy()
        armed[list(self._disarmed)] = False
        candidates = np.where(armed & (smoothed >= self._thresholds), smoothed, -1.0)
        best = int(np.argmax(candidates))
        # after finish(), the window reaches past the input: a detection is stamped at its end at most
        now = now if self._end_time is None else min(now, self._end_time)
        if candidates[best] < 0:
            return None
        if (now - self._last_detection) * 1000 < self.config.refractory_ms:
            return None
        self._last_detection = now
        self._disarmed.add(best)
        detection = Detection(now, self.labels[best], float(candidates[best]))
        self.detections.append(detection)
        return detection

    @property
    def level(self) -> float:
        """RMS level (dBFS) of the newest 100 ms seen, for a meter."""
        recent = self._recent.astype(np.float64) if len(self._recent) else np.zeros(1)
        return float(20 * np.log10(max(1e-6, float(np.sqrt(np.mean(recent**2))))))


def replay_posteriors(times: np.ndarray, probabilities: np.ndarray, labels: list[str], config: StreamConfig,
                      features: FeatureConfig = FeatureConfig(), end_time: float | None = None) -> list[Detection]:
    """The detections a StreamingDetector with ``config`` makes from recorded model posteriors.

    ``times`` [hops] (s) and ``probabilities`` [hops, labels] are a PosteriorTrace's times and raw
    posteriors (not the smoothed ones); smoothing, thresholds, the refractory period and re-arming
    run exactly as live, so other thresholds can be tried without scoring the audio again.
    ``config.label_thresholds`` is taken as given (detector_for lays an export's own thresholds
    under the configured ones; a trace's ``thresholds`` are the ones that applied). ``end_time``:
    the trace's, where the input ended (detections after it are stamped at it, as live). Raises
    ValueError if the hops are not ``config.hop_ms`` apart (smoothing counts hops), or if a
    threshold names a label the model does not report.
    """
    times = np.asarray(times, np.float64).reshape(-1)
    probabilities = np.asarray(probabilities).reshape(len(times), len(labels))
    detector = StreamingDetector(lambda window: None, labels, features, config)
    detector._end_time = end_time
    hop = detector._frames_per_hop * features.hop_ms / 1000
    if len(times) > 1 and not np.allclose(np.diff(times), hop, atol=1e-6):
        raise ValueError(f"the posteriors were not recorded every {hop * 1000:g} ms (hop_ms {config.hop_ms:g})")
    for now, probs in zip(times, probabilities, strict=True):
        detector._decide(probs, float(now))
    return detector.detections
