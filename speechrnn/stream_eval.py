"""Scoring a long recording against a truth list: recall, precision, false alarms per hour, latency.

TensorFlow's speech_commands example scores its generated stream with `test_streaming_accuracy`;
this is the same idea for any recording with a list of what was said when, and the split that
matters to a user: a false alarm on a real command (the wrong label) is a nuisance, one with no
command spoken at all is the spotter firing by itself.

Three parts:
  * the truth file (a CSV, see TRUTH_FORMAT): parse_truth (text), read_truth, write_truth;
  * scoring, pure (no I/O): score_stream(detections, truth, duration, commands) -> StreamScore;
  * running a file through the `listen --input` code path (detector_for + file_chunk_source +
    run_listener) with the posteriors recorded: stream_file, and score_recording for the CLI's
    `speechrnn score-stream`. The timeline plot is speechrnn.timeline.

Matching. A detection matches a command word when the labels agree and its time lies in
[start, end + match_after_end_s] (default 1 s: the detector reports a word once it has been
heard, usually 0.1-0.5 s after its end); each word is matched at most once, detections in time
order, each to the earliest word it fits. Every other detection is a false alarm, put down to the
earliest listed event whose window [start, end + match_after_end_s] holds it:
  wrong_label_on_command  a command word, but another command reported;
  repeat_on_command       a command word already found (a second detection of one word);
  on_non_command          an event that is not a command (another word, a sentence, a sound);
  outside_events          no listed event (noise, silence, anything the list leaves out).
The first two are false alarms "on a command", the last two "with no command spoken".
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError
from speechrnn.streaming import Detection, PosteriorTrace, StreamConfig

TRUTH_HEADER = ("label", "start", "end")
TRUTH_FORMAT = """\
A truth file is a CSV with the header `label,start,end` and one row per event:
  label  a command the model reports (yes, no, ...) or anything else: another word, a sentence
         (e.g. _speech_), a sound; events that are not commands only explain false alarms;
  start  seconds from the beginning of the recording at which the event begins (>= 0);
  end    seconds at which it ends (> start; the end of the word's sound: latency counts from it).
Blank lines and lines starting with # are ignored; rows may come in any order."""
MATCH_AFTER_END_S = 1.0
CAUSES_ON_COMMAND = ("wrong_label_on_command", "repeat_on_command")
CAUSES_NO_COMMAND = ("on_non_command", "outside_events")


# ----------------------------------------------------------------------------- the truth file


@dataclass(frozen=True)
class TruthEvent:
    """Something that happened in the recording: a command word, or any other event."""

    label: str
    start: float  # seconds from the beginning of the recording
    end: float  # seconds; the end of the word's sound
    end_known: bool = True  # False: ``end`` only bounds the word (e.g. a whole 1 s clip): no latency from it
    line: int | None = field(default=None, compare=False)  # the truth file's line, for messages


def parse_truth(text: str, source: str | os.PathLike = "<truth>") -> list[TruthEvent]:
    """The events of a truth file's TEXT (see TRUTH_FORMAT), sorted by start.

    Raises SpeechRNNError naming ``source`` and the line for a wrong header, a row without three
    fields, an empty label, a time that is not a number, start < 0 or end <= start.
    """
    rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise SpeechRNNError(f"empty truth file; it needs the header {','.join(TRUTH_HEADER)}", source)
    events = []
    for n, line in rows:
        try:
            fields = [f.strip() for f in next(csv.reader([line]))]
        except csv.Error as exc:
            raise SpeechRNNError(f"line {n}: not a CSV row ({exc}): {line.strip()!r}", source) from None
        if n == rows[0][0]:
            if tuple(f.lower() for f in fields) != TRUTH_HEADER:
                raise SpeechRNNError(f"line {n}: the header must be {','.join(TRUTH_HEADER)}, not {line.strip()!r}",
                                     source)
            continue
        if len(fields) != 3:
            raise SpeechRNNError(f"line {n}: expected 3 fields (label,start,end), got {len(fields)}: {line.strip()!r}",
                                 source)
        label, start_text, end_text = fields
        if not label:
            raise SpeechRNNError(f"line {n}: empty label", source)
        try:
            start, end = float(start_text), float(end_text)
        except ValueError:
            raise SpeechRNNError(f"line {n}: start and end must be seconds, not {start_text!r} and {end_text!r}",
                                 source) from None
        if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or end <= start:
            raise SpeechRNNError(f"line {n}: need 0 <= start < end, got start {start_text}, end {end_text}", source)
        events.append(TruthEvent(label, start, end, line=n))
    return sorted(events, key=lambda e: (e.start, e.end))


def read_truth(path: str | os.PathLike) -> list[TruthEvent]:
    """The events of the truth file at PATH (see parse_truth); SpeechRNNError if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpeechRNNError(f"cannot read the truth file ({getattr(exc, 'strerror', None) or exc})", path) from None
    return parse_truth(text, path)


def write_truth(path: str | os.PathLike, events: Iterable[TruthEvent]) -> None:
    """Write EVENTS as a truth file (times to the millisecond), atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TRUTH_HEADER)
    for e in sorted(events, key=lambda e: (e.start, e.end)):
        writer.writerow([e.label, f"{e.start:.3f}", f"{e.end:.3f}"])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(out.getvalue())
    os.replace(tmp, path)


def check_truth_fits(events: Sequence[TruthEvent], duration_s: float, source: str | os.PathLike) -> None:
    """SpeechRNNError if an event starts after the recording ends (a truth list for another file)."""
    for e in events:
        if e.start >= duration_s:
            where = f"line {e.line}: " if e.line is not None else ""
            raise SpeechRNNError(f"{where}{e.label} starts at {e.start:g} s, after the end of the audio "
                                 f"({duration_s:.2f} s): is this the truth list of another recording?", source)


# ----------------------------------------------------------------------------- scoring (pure)


@dataclass(frozen=True)
class Hit:
    word: TruthEvent
    detection: Detection

    @property
    def latency_ms(self) -> float | None:
        """Detection time after the end of the word (ms; negative: before it), if the end is known."""
        return (self.detection.time - self.word.end) * 1000 if self.word.end_known else None


@dataclass(frozen=True)
class Miss:
    word: TruthEvent
    detected_as: tuple[str, ...]  # labels of any detections within the word's window


@dataclass(frozen=True)
class FalseAlarm:
    detection: Detection
    cause: str  # one of CAUSES_ON_COMMAND + CAUSES_NO_COMMAND
    event: TruthEvent | None  # the event it fell on, if any


@dataclass
class StreamScore:
    """The outcome of matching a stream's detections to its truth (see score_stream).

    Pool several streams with StreamScore.pooled: counts add up, latencies are pooled.
    """

    duration_s: float
    hits: list[Hit]
    misses: list[Miss]
    false_alarms: list[FalseAlarm]

    @property
    def hours(self) -> float:
        return self.duration_s / 3600

    @property
    def command_words(self) -> int:
        return len(self.hits) + len(self.misses)

    @property
    def detections(self) -> int:
        return len(self.hits) + len(self.false_alarms)

    @property
    def recall(self) -> float | None:
        """Command words found / command words spoken (None without any)."""
        return len(self.hits) / self.command_words if self.command_words else None

    @property
    def precision(self) -> float | None:
        """Detections that found a word / all detections (None without any)."""
        return len(self.hits) / self.detections if self.detections else None

    def false_alarms_per_hour(self, causes: Iterable[str] | None = None) -> float:
        """False alarms (of the given causes; default all) per hour of audio."""
        causes = None if causes is None else set(causes)
        n = sum(causes is None or fa.cause in causes for fa in self.false_alarms)
        return n / self.hours if self.hours > 0 else float("nan")

    @property
    def latencies_ms(self) -> np.ndarray:
        """Detection time minus word end (ms) of every hit whose word end is known."""
        return np.array([h.latency_ms for h in self.hits if h.latency_ms is not None], np.float64)

    def per_command(self) -> dict[str, tuple[int, int]]:
        """{command: (words found, words spoken)}, for every command spoken."""
        counts: dict[str, list[int]] = {}
        for word, found in [(h.word, 1) for h in self.hits] + [(m.word, 0) for m in self.misses]:
            row = counts.setdefault(word.label, [0, 0])
            row[0] += found
            row[1] += 1
        return {label: (a, b) for label, (a, b) in sorted(counts.items())}

    @classmethod
    def pooled(cls, scores: Iterable[StreamScore]) -> StreamScore:
        scores = list(scores)
        return cls(sum(s.duration_s for s in scores), [h for s in scores for h in s.hits],
                   [m for s in scores for m in s.misses], [f for s in scores for f in s.false_alarms])

    def to_dict(self, details: bool = False) -> dict:
        """The figures as JSON-ready values (rates rounded); ``details`` adds every miss and false alarm."""
        def rounded(x, digits):
            return None if x is None else round(float(x), digits)

        lat = self.latencies_ms
        per = self.per_command()
        causes = Counter(fa.cause for fa in self.false_alarms)
        out = {
            "recall": rounded(self.recall, 4),
            "precision": rounded(self.precision, 4),
            "f1": rounded(2 * len(self.hits) / (self.command_words + self.detections), 4)
            if self.command_words + self.detections else None,
            "false_alarms_per_hour": round(self.false_alarms_per_hour(), 1),
            "false_alarms_per_hour_on_command": round(self.false_alarms_per_hour(CAUSES_ON_COMMAND), 1),
            "false_alarms_per_hour_no_command": round(self.false_alarms_per_hour(CAUSES_NO_COMMAND), 1),
            "latency_median_ms": round(float(np.median(lat)), 0) if len(lat) else None,
            "latency_p90_ms": round(float(np.percentile(lat, 90)), 0) if len(lat) else None,
            "counts": {"minutes": round(self.duration_s / 60, 2), "command_words": self.command_words,
                       "detections": self.detections, "matched": len(self.hits), "missed": len(self.misses),
                       "false_alarms": len(self.false_alarms)},
            "per_label_recall": {k: round(a / b, 3) for k, (a, b) in per.items()},
            "per_label_counts": {k: f"{a}/{b}" for k, (a, b) in per.items()},
            "false_alarms_by_cause": {c: causes[c] for c in CAUSES_ON_COMMAND + CAUSES_NO_COMMAND if causes[c]},
            "false_alarms_by_label": dict(Counter(fa.detection.label for fa in self.false_alarms).most_common()),
            "misses_by_cause": dict(Counter("wrong_label" if m.detected_as else "no_detection" for m in self.misses)),
        }
        if details:
            out["misses"] = [{"label": m.word.label, "start": round(m.word.start, 3), "end": round(m.word.end, 3),
                              "detected_as": list(m.detected_as) or None} for m in self.misses]
            out["false_alarm_list"] = [{**fa.detection.to_json(), "cause": fa.cause,
                                        "event": None if fa.event is None else fa.event.label} for fa in self.false_alarms]
        return out


def score_stream(detections: Iterable[Detection], truth: Iterable[TruthEvent], duration_s: float,
                 commands: Iterable[str], match_after_end_s: float = MATCH_AFTER_END_S) -> StreamScore:
    """Match DETECTIONS (time in s from the stream's start, label, score) to TRUTH (see the module
    docstring for the rule) over a stream of ``duration_s`` seconds.

    ``commands`` are the labels the detector can report: truth events with another label are not
    commands. Pure and deterministic. Raises ValueError for duration_s <= 0 or an event with
    end < start.
    """
    if not duration_s > 0:
        raise ValueError(f"the stream must last some time, not {duration_s} s")
    commands = set(commands)
    events = sorted(truth, key=lambda e: (e.start, e.end))
    if any(e.end < e.start for e in events):
        raise ValueError("a truth event ends before it starts")
    words = [e for e in events if e.label in commands]

    def within(t: float, e: TruthEvent) -> bool:
        return e.start <= t <= e.end + match_after_end_s

    found: dict[int, Detection] = {}
    false_alarms = []
    ordered = sorted(detections, key=lambda d: d.time)
    for det in ordered:
        hit = next((i for i, e in enumerate(words) if i not in found and e.label == det.label and within(det.time, e)),
                   None)
        if hit is not None:
            found[hit] = det
            continue
        event = next((e for e in events if within(det.time, e)), None)
        if event is None:
            cause = "outside_events"
        elif event.label not in commands:
            cause = "on_non_command"
        elif event.label == det.label:
            cause = "repeat_on_command"
        else:
            cause = "wrong_label_on_command"
        false_alarms.append(FalseAlarm(det, cause, event))
    hits = [Hit(words[i], found[i]) for i in sorted(found)]
    misses = [Miss(e, tuple(d.label for d in ordered if within(d.time, e)))
              for i, e in enumerate(words) if i not in found]
    return StreamScore(float(duration_s), hits, misses, false_alarms)


def format_score(score: StreamScore) -> str:
    """A few lines for a person: recall, false alarms per hour by kind, latency, per command."""
    f = score.to_dict()
    c = f["counts"]
    pct = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    on = sum(fa.cause in CAUSES_ON_COMMAND for fa in score.false_alarms)
    lines = [
        (f"recall {pct(f['recall'])} ({c['matched']} of {c['command_words']} commands found), "
         if c["command_words"] else "no command words listed; ")
        + f"precision {pct(f['precision'])} ({c['detections']} detections) in {score.duration_s / 60:.1f} min",
        f"false alarms {c['false_alarms']} = {f['false_alarms_per_hour']:g} per hour: "
        f"{on} on a command ({f['false_alarms_per_hour_on_command']:g}/h), "
        f"{c['false_alarms'] - on} with no command spoken ({f['false_alarms_per_hour_no_command']:g}/h)",
    ]
    if f["latency_median_ms"] is not None:
        lines.append(f"median latency after the word's end {f['latency_median_ms']:+.0f} ms "
                     f"(90th percentile {f['latency_p90_ms']:+.0f} ms)")
    if f["per_label_counts"]:
        lines.append("per command: " + "  ".join(f"{k} {v}" for k, v in f["per_label_counts"].items()))
    if f["false_alarms_by_label"]:
        lines.append("false alarms by label: " + "  ".join(f"{k} {v}" for k, v in f["false_alarms_by_label"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running a file


@dataclass
class StreamRun:
    """One file through the `listen --input` path."""

    detections: list[Detection]
    seconds: float  # audio streamed
    cpu_seconds: float  # process CPU time (all threads) while streaming
    wall_seconds: float
    hops_scored: int
    config: StreamConfig  # with the model's own per-command thresholds laid under the given ones
    trace: PosteriorTrace | None  # every hop's posteriors, when recorded

    def timing(self) -> dict:
        return {"cpu_seconds": round(self.cpu_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
                "cpu_percent_one_core": round(100 * self.cpu_seconds / self.seconds, 2),
                "faster_than_realtime": round(self.seconds / max(self.wall_seconds, 1e-9), 1),
                "hops_scored": self.hops_scored}


def stream_file(recognizer, audio: str | os.PathLike, config: StreamConfig = StreamConfig(),
                record_posteriors: bool = False) -> StreamRun:
    """Stream AUDIO through exactly what `speechrnn listen --input AUDIO` runs (detector_for,
    file_chunk_source, run_listener), as fast as it goes; optionally recording every hop's
    posteriors. The model's compile happens before the timed part. Raises SpeechRNNError for an
    unreadable file or a threshold for a label the model does not report."""
    from speechrnn.microphone import detector_for, file_chunk_source, run_listener

    detector = detector_for(recognizer, config)
    trace = detector.record_posteriors() if record_posteriors else None
    wall = time.perf_counter()
    stats = run_listener(detector, file_chunk_source(audio), lambda d: None)
    wall = time.perf_counter() - wall
    return StreamRun(stats.detections, stats.seconds, stats.cpu_seconds, wall, detector.hops_scored,
                     detector.config, trace)


def commands_of(labels: Iterable[str]) -> list[str]:
    """The labels a detector reports: all but _silence_ and _unknown_."""
    from data_prep.dataset import SILENCE, UNKNOWN

    return [label for label in labels if label not in (SILENCE, UNKNOWN)]


def score_recording(model: str | os.PathLike | None, audio: str | os.PathLike, truth_path: str | os.PathLike,
                    config: StreamConfig = StreamConfig(), plot: str | os.PathLike | None = None,
                    match_after_end_s: float = MATCH_AFTER_END_S) -> tuple[StreamScore, StreamRun]:
    """`speechrnn score-stream`: stream AUDIO with MODEL (None: models/default) as `listen --input`
    does, score the detections against the truth file, and optionally plot the timeline PNG.

    The audio and truth files are checked before the model loads, so a malformed one fails fast.
    Raises SpeechRNNError for a bad model, audio or truth file, or a truth event that starts after
    the audio's end.
    """
    import soundfile as sf

    from data_prep.audio import check_path

    check_path(audio)
    truth = read_truth(truth_path)
    try:
        seconds = sf.info(str(audio)).duration
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise SpeechRNNError(f"cannot decode audio ({exc})", audio) from None
    check_truth_fits(truth, seconds, truth_path)
    from speechrnn.recognizer import Recognizer, default_model_dir, read_metadata

    read_metadata(model or default_model_dir())
    recognizer = Recognizer(model)
    run = stream_file(recognizer, audio, config, record_posteriors=plot is not None)
    score = score_stream(run.detections, truth, run.seconds, commands_of(recognizer.labels), match_after_end_s)
    if plot is not None:
        from speechrnn.timeline import plot_timeline

        plot_timeline(run.trace, score, truth, plot, title=f"{Path(audio).name} - {Path(recognizer.model_dir).name}")
    return score, run
