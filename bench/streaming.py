"""Benchmark: streaming keyword detection on a long generated stream with known word times.

Builds a stream at 16 kHz from real clips the model never trained on (the dataset's validation
split plus the task's "holdout" split), over continuous real background noise cut from the
non-training part (0.8-1.0) of each `_background_noise_` recording. Every 2.5-3.5 s it inserts
a command word (75%) or a distractor: another word of the dataset, or nothing. The stream is
written to a wav and run through the same path as `speechrnn listen --input` (detector_for +
run_listener + file_chunk_source); detections are matched to the ground truth and the figures
are printed as one JSON object (progress goes to stderr).

    .venv/bin/python bench/streaming.py [--model DIR] [--minutes 6] [--sweep 100,150,200,250]
                                        [--thresholds 0.5,0.6,0.7,0.8,0.9] [--memory]

--thresholds re-runs the stream at the first hop with each threshold (the trade-off between
recall and false alarms); its rows are summaries only.

--seeds 0,1,2 instead scores several independent streams with one setting and pools them (one
6-minute stream holds ~90 commands, so one or two words move its recall by a point):

    .venv/bin/python bench/streaming.py --seeds 0,1,2 [--threshold 0.7] [--hop-ms 200]

Matching: a detection matches a command word when the labels agree and its time lies in
[word_start, word_end + 1 s]; each word is matched at most once. Anything else is a false alarm,
and the targets count them all; false_alarms_per_hour_no_command counts only those where no command
was spoken (in noise alone or on another word), leaving out a wrong label on a real command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.audio import fix_length, load_audio  # noqa: E402
from data_prep.dataset import HOLDOUT, NOISE_REGIONS, SpeechCommands, TaskConfig  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
DEFAULT_MODEL = REPO / "models" / "default"
RATE = 16000
MATCH_AFTER_END_S = 1.0  # a detection may come up to this long after the word ends
TARGETS = {"recall_min": 0.90, "false_alarms_per_hour_max": 10.0, "latency_median_ms_max": 500.0,
           "cpu_percent_one_core_max": 5.0}
# Noise may come from the validation and testing regions only, never the part training cuts from.
NOISE_REGION = (NOISE_REGIONS["validation"][0], NOISE_REGIONS["testing"][1])
FADE_S = 0.05  # cross-fade at noise loop points and noise changes, so they make no clicks


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the stream


@dataclass
class Event:
    kind: str  # "command", "unknown" or "nothing"
    label: str  # the command (task label), the spoken word for unknown, "" for nothing
    clip_start: float  # seconds; the 1 s clip starts here in the stream
    word_start: float = 0.0
    word_end: float = 0.0
    path: str = ""
    split: str = ""
    peak_dbfs: float = -120.0
    snr_db: float = 0.0  # word RMS over the noise RMS around it
    noise: str = ""
    extent_from_energy: bool = True  # False: no clear energy extent, the whole clip counts as the word


@dataclass
class NoiseSegment:
    start: float
    end: float
    file: str
    level_db: float  # noise RMS relative to the median speech peak


@dataclass
class Stream:
    samples: np.ndarray
    events: list[Event]
    noise: list[NoiseSegment]
    reference_peak: float
    clip_sources: Counter = field(default_factory=Counter)
    reused_clips: int = 0

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE

    def commands(self) -> list[Event]:
        return [e for e in self.events if e.kind == "command"]


def word_extent(clip: np.ndarray, below_peak_db: float = 40.0, above_floor_db: float = 10.0,
                bridge_s: float = 0.15, min_range_db: float = 15.0) -> tuple[float, float, bool]:
    """Start and end (seconds inside the clip) of the word, from 20 ms frame energies every 10 ms.

    A frame is voiced when it is within 40 dB of the loudest frame and at least 10 dB above the
    clip's own floor (its 10th-percentile frame): many clips carry room noise within 40 dB of the
    peak, and -40 dB alone would mark the whole second. The word is the run of voiced frames around
    the loudest one, bridging gaps up to 150 ms (the closure in "stop", a weak "f" in "off").
    A clip whose loudest frame is less than 15 dB over its floor (speech buried in its own noise,
    ~2% of clips) has no energy extent: the whole clip is the word, and the third value is False.
    """
    hop, win = RATE // 100, RATE // 50
    n = 1 + max(0, len(clip) - win) // hop
    energy = np.array([np.sqrt(np.mean(clip[i * hop : i * hop + win] ** 2)) for i in range(n)])
    db = 20 * np.log10(np.maximum(energy, 1e-9))
    floor = float(np.percentile(db, 10))
    if db.max() - floor < min_range_db:
        return 0.0, len(clip) / RATE, False
    voiced = db >= max(db.max() - below_peak_db, floor + above_floor_db)
    bridge = round(bridge_s * 100)
    first = last = int(np.argmax(db))
    while (earlier := np.flatnonzero(voiced[max(0, first - bridge) : first])).size:
        first = max(0, first - bridge) + int(earlier[0])
    while (later := np.flatnonzero(voiced[last + 1 : last + 1 + bridge])).size:
        last = last + 1 + int(later[-1])
    return first * hop / RATE, (last * hop + win) / RATE, True


def crossfade_concat(pieces: list[np.ndarray], fade: int) -> np.ndarray:
    """Join pieces end to start, overlapping ``fade`` samples with an equal-power cross-fade."""
    out = pieces[0].astype(np.float32)
    ramp = np.linspace(0, np.pi / 2, fade, dtype=np.float32)
    fade_in, fade_out = np.sin(ramp), np.cos(ramp)
    for piece in pieces[1:]:
        if len(out) < fade or len(piece) < fade:
            out = np.concatenate([out, piece])
            continue
        mixed = out[-fade:] * fade_out + piece[:fade] * fade_in
        out = np.concatenate([out[:-fade], mixed, piece[fade:]])
    return out


def looped(region: np.ndarray, length: int, start: int, fade: int) -> np.ndarray:
    """``length`` samples of ``region`` played from ``start`` and looped with cross-fades."""
    pieces, total = [region[start:]], len(region) - start
    while total < length + fade:
        pieces.append(region)
        total += len(region) - fade
    return crossfade_concat(pieces, fade)[:length]


class ClipPool:
    """Draws clips without replacement, reshuffling when a pool is used up (counted as reuse)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.pools: dict[str, list] = {}
        self.order: dict[str, list[int]] = {}
        self.reused = 0

    def add(self, key: str, items: list) -> None:
        self.pools.setdefault(key, []).extend(items)

    def draw(self, key: str):
        if not self.order.get(key):
            if key in self.order:
                self.reused += 1
            self.order[key] = list(self.rng.permutation(len(self.pools[key])))
        return self.pools[key][self.order[key].pop()]


def build_stream(data: Path, task: TaskConfig, minutes: float, seed: int, command_fraction: float = 0.75,
                 unknown_share: float = 2 / 3, noise_db: tuple[float, float] = (-35.0, -20.0),
                 gap_s: tuple[float, float] = (2.5, 3.5), noise_change_s: float = 30.0) -> Stream:
    rng = np.random.default_rng(seed)
    dataset = SpeechCommands.open(data)
    words = set(task.words)
    commands = [e for e in dataset.examples(task, "validation") if e.label in words and not e.is_cut]
    commands += dataset.examples(task, HOLDOUT)
    unknown = [c for c in dataset.clips if c.split == "validation" and c.word not in words]
    if not commands:
        raise SystemExit(f"{data}: no validation or holdout clips of the task's words {sorted(words)}")
    if not dataset.noise_files:
        raise SystemExit(f"{data}: no _background_noise_ folder")
    pool = ClipPool(rng)
    for ex in commands:
        pool.add(ex.label, [ex])
    pool.add("_unknown_", unknown)
    labels = sorted({ex.label for ex in commands})  # balanced: each label equally likely

    total = int(minutes * 60 * RATE)
    events: list[Event] = []
    t = 1.5  # the detector scores nothing before its first full second
    while t + 1.5 <= total / RATE:
        draw = rng.random()
        if draw < command_fraction:
            ex = pool.draw(labels[rng.integers(len(labels))])
            events.append(Event("command", ex.label, t, path=str(ex.path), split=ex.split))
        elif unknown and draw < command_fraction + (1 - command_fraction) * unknown_share:
            clip = pool.draw("_unknown_")
            events.append(Event("unknown", clip.word, t, path=str(clip.path), split=clip.split))
        else:
            events.append(Event("nothing", "", t))
        t += rng.uniform(*gap_s)

    speech = np.zeros(total, np.float32)
    for event in events:
        if not event.path:
            continue
        clip = fix_length(load_audio(event.path, RATE), RATE)
        start = int(round(event.clip_start * RATE))
        speech[start : start + RATE] += clip
        s, e, event.extent_from_energy = word_extent(clip)
        event.word_start, event.word_end = event.clip_start + s, event.clip_start + e
        event.peak_dbfs = float(20 * np.log10(max(1e-9, float(np.abs(clip).max()))))
    peaks = [10 ** (e.peak_dbfs / 20) for e in events if e.path]
    reference = float(np.median(peaks)) if peaks else 0.3

    # Continuous noise, a new recording and level every ~30 s, looped from its held-out region.
    fade = int(FADE_S * RATE)
    regions: dict[Path, np.ndarray] = {}
    for path in dataset.noise_files:
        audio = load_audio(path, RATE)
        region = audio[int(len(audio) * NOISE_REGION[0]) : int(len(audio) * NOISE_REGION[1])]
        regions[path] = region / max(1e-9, float(np.sqrt(np.mean(region**2))))  # unit RMS
    segments: list[NoiseSegment] = []
    pieces = []
    position = 0
    while position < total:
        length = min(total - position, int(rng.uniform(0.8, 1.2) * noise_change_s * RATE))
        path = dataset.noise_files[rng.integers(len(dataset.noise_files))]
        level = float(rng.uniform(*noise_db))
        region = regions[path]
        piece = looped(region, length + fade, int(rng.integers(len(region))), fade)
        pieces.append(piece * np.float32(reference * 10 ** (level / 20)))
        segments.append(NoiseSegment(position / RATE, (position + length) / RATE, path.name, round(level, 1)))
        position += length
    noise = crossfade_concat(pieces, fade)[:total]

    for event in events:
        if not event.path:
            continue
        a, b = int(event.word_start * RATE), int(event.word_end * RATE)
        word_rms = np.sqrt(np.mean(speech[a:b] ** 2))
        noise_rms = np.sqrt(np.mean(noise[a:b] ** 2))
        event.snr_db = round(float(20 * np.log10(max(word_rms, 1e-9) / max(noise_rms, 1e-9))), 1)
        event.noise = next(s.file for s in segments if s.start <= event.word_start < s.end)
    samples = np.clip(speech + noise, -1.0, 1.0).astype(np.float32)
    sources = Counter(e.split for e in events if e.path)
    return Stream(samples, events, segments, reference, sources, pool.reused)


def write_pcm16(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), samples, RATE, subtype="PCM_16", format="WAV")


def write_looped(path: Path, samples: np.ndarray, seconds: float) -> None:
    """``seconds`` of ``samples`` repeated, written block by block (an hour never sits in memory)."""
    import soundfile as sf

    remaining = int(seconds * RATE)
    with sf.SoundFile(str(path), "w", RATE, 1, subtype="PCM_16", format="WAV") as out:
        while remaining > 0:
            block = samples[:remaining]
            out.write(block)
            remaining -= len(block)


# ----------------------------------------------------------------------------- matching


def no_command(causes: Counter) -> int:
    """False alarms with no command spoken at all (noise alone, another word): what a user hears as
    the spotter firing by itself; the others are a wrong label on a real command."""
    return causes["in_noise_only"] + causes["on_unknown_word"]


def match(stream: Stream, detections: list[dict]) -> dict:
    truths = stream.commands()
    matched: dict[int, dict] = {}  # truth index -> detection
    false_alarms: Counter = Counter()
    fa_list = []
    for det in sorted(detections, key=lambda d: d["time"]):
        t = det["time"]
        hit = next((i for i, e in enumerate(truths) if i not in matched and e.label == det["label"]
                    and e.word_start <= t <= e.word_end + MATCH_AFTER_END_S), None)
        if hit is not None:
            matched[hit] = det
            continue
        near = [e for e in stream.events if e.path and e.word_start <= t <= e.word_end + MATCH_AFTER_END_S]
        if near and near[0].kind == "command" and near[0].label == det["label"]:
            why = "repeat_on_matched_word"
        elif near and near[0].kind == "command":
            why = f"wrong_label_on_command ({near[0].label})"
        elif near:
            why = f"on_unknown_word ({near[0].label})"
        else:
            why = "in_noise_only"
        false_alarms[why.split(" ")[0]] += 1
        fa_list.append({**det, "cause": why})

    # Latency only where the word's end is known (not the whole-clip fallback of word_extent).
    latencies = np.array([matched[i]["time"] - truths[i].word_end for i in matched
                          if truths[i].extent_from_energy]) * 1000
    per_label: dict[str, dict] = {}
    for i, e in enumerate(truths):
        row = per_label.setdefault(e.label, {"words": 0, "detected": 0})
        row["words"] += 1
        row["detected"] += i in matched
    misses = []
    for i, e in enumerate(truths):
        if i in matched:
            continue
        other = [d["label"] for d in detections if e.word_start <= d["time"] <= e.word_end + MATCH_AFTER_END_S]
        misses.append({"time": round(e.word_start, 2), "label": e.label, "detected_as": other or None,
                       "whole_clip_extent": not e.extent_from_energy,
                       "snr_db": e.snr_db, "peak_dbfs": round(e.peak_dbfs, 1), "noise": e.noise,
                       "clip": str(Path(e.path).relative_to(Path(e.path).parents[1]))})
    hours = stream.seconds / 3600
    n_fa = sum(false_alarms.values())
    hit_snr = [truths[i].snr_db for i in matched]
    return {
        "recall": round(len(matched) / len(truths), 4) if truths else None,
        "precision": round(len(matched) / len(detections), 4) if detections else None,
        "f1": round(2 * len(matched) / (len(truths) + len(detections)), 4) if truths or detections else None,
        "false_alarms_per_hour": round(n_fa / hours, 1),
        "latency_median_ms": round(float(np.median(latencies)), 0) if len(latencies) else None,
        "latency_p90_ms": round(float(np.percentile(latencies, 90)), 0) if len(latencies) else None,
        "counts": {"command_words": len(truths), "detections": len(detections), "matched": len(matched),
                   "missed": len(truths) - len(matched), "false_alarms": n_fa},
        "per_label_recall": {k: round(v["detected"] / v["words"], 3) for k, v in sorted(per_label.items())},
        "per_label_counts": {k: f"{v['detected']}/{v['words']}" for k, v in sorted(per_label.items())},
        "misses_by_cause": dict(Counter("wrong_label" if m["detected_as"] else "no_detection" for m in misses)),
        "median_snr_db": {"detected": round(float(np.median(hit_snr)), 1) if hit_snr else None,
                          "missed": round(float(np.median([m["snr_db"] for m in misses])), 1) if misses else None},
        "false_alarms_by_cause": dict(false_alarms),
        "false_alarms_per_hour_no_command": round(no_command(false_alarms) / hours, 1),
        "misses": misses,
        "false_alarm_list": fa_list,
        "latencies_ms": [round(float(x), 1) for x in latencies],  # for pooling; not printed
    }


def targets_met(figures: dict) -> dict:
    def ok(value, limit, lower_is_better=True):
        return None if value is None else (value <= limit if lower_is_better else value >= limit)

    return {
        f"recall >= {TARGETS['recall_min']:.0%}": ok(figures["recall"], TARGETS["recall_min"], False),
        f"false alarms/h <= {TARGETS['false_alarms_per_hour_max']:g}": ok(
            figures["false_alarms_per_hour"], TARGETS["false_alarms_per_hour_max"]),
        f"median latency <= {TARGETS['latency_median_ms_max']:g} ms": ok(
            figures["latency_median_ms"], TARGETS["latency_median_ms_max"]),
        f"CPU <= {TARGETS['cpu_percent_one_core_max']:g}% of one core": ok(
            figures["cpu_percent_one_core"], TARGETS["cpu_percent_one_core_max"]),
    }


# ----------------------------------------------------------------------------- running


def stream_config(hop_ms: float, args: argparse.Namespace, threshold: float | None = None):
    import dataclasses

    from speechrnn.streaming import StreamConfig

    threshold = args.threshold if threshold is None else threshold
    changes = {k: v for k, v in dict(hop_ms=hop_ms, threshold=threshold, smoothing_ms=args.smoothing_ms,
                                     refractory_ms=args.refractory_ms).items() if v is not None}
    return dataclasses.replace(StreamConfig(), **changes)


def run_in_process(recognizer, wav: Path, config) -> tuple[list[dict], dict]:
    """The `listen --input` path: detector_for + file_chunk_source + run_listener, CPU-timed."""
    from speechrnn.microphone import detector_for, file_chunk_source, run_listener

    detector = detector_for(recognizer, config)  # compiles the scorer once, outside the timed part
    wall = time.perf_counter()
    stats = run_listener(detector, file_chunk_source(wav), lambda d: None)
    wall = time.perf_counter() - wall
    timing = {"cpu_seconds": round(stats.cpu_seconds, 2), "wall_seconds": round(wall, 2),
              "cpu_percent_one_core": round(100 * stats.cpu_seconds / stats.seconds, 2),
              "faster_than_realtime": round(stats.seconds / wall, 1), "hops_scored": detector.hops_scored,
              "label_thresholds": detector.config.label_thresholds}  # the model's own, or those given
    return [d.to_json() for d in stats.detections], timing


def cli_command(model: str, wav: Path, config, extra: tuple[str, ...] = ("--json",)) -> list[str]:
    exe = Path(sys.executable).with_name("speechrnn")
    base = [str(exe)] if exe.exists() else [sys.executable, "-c", "from speechrnn.cli import main; main()"]
    return [*base, "listen", model, "--input", str(wav), "--hop-ms", str(config.hop_ms), "--threshold",
            str(config.threshold), "--smoothing-ms", str(config.smoothing_ms), "--refractory-ms",
            str(config.refractory_ms), *extra]


def run_cli(model: str, wav: Path, config) -> list[dict]:
    proc = subprocess.run(cli_command(model, wav, config), capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"speechrnn listen failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]


def compare_detections(a: list[dict], b: list[dict]) -> dict:
    same = len(a) == len(b) and all(
        x["label"] == y["label"] and abs(x["time"] - y["time"]) < 1e-3 and abs(x["score"] - y["score"]) < 2e-3
        for x, y in zip(a, b, strict=False))
    out: dict = {"in_process": len(a), "cli": len(b), "identical": same}
    if not same:
        out["max_score_difference"] = max((abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=False)
                                           if x["label"] == y["label"]), default=None)
        out["first_difference"] = next(([x, y] for x, y in zip(a, b, strict=False)
                                        if x["label"] != y["label"] or abs(x["time"] - y["time"]) >= 1e-3),
                                       None)
    return out


def offline_check(recognizer, stream: Stream, misses: list[dict]) -> None:
    """For each missed word, what the plain (non-streaming) model says on the best 1 s window."""
    for miss in misses:
        event = next(e for e in stream.commands() if round(e.word_start, 2) == miss["time"])
        a = int(max(0.0, event.clip_start - 0.5) * RATE)
        b = int(min(stream.seconds, event.clip_start + 1.5) * RATE)
        probs = recognizer.probabilities(recognizer.windows(stream.samples[a:b]))
        k = recognizer.labels.index(event.label)
        best = probs[int(np.argmax(probs[:, k]))]
        miss["best_window_p_true"] = round(float(best[k]), 3)
        miss["best_window_top"] = recognizer.labels[int(np.argmax(best))]


# ----------------------------------------------------------------------------- memory


def rss_kb(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (KeyError, ValueError):
        return None


def watch_memory(cmd: list[str], marker_s: float | None = 60.0, poll_s: float = 0.5) -> dict:
    """Run a listener process; poll its RSS; note the RSS when its output passes ``marker_s`` of audio.

    Progress comes from its --json detections (their stream times), read as they are printed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    progress = {"stream_s": 0.0, "detections": 0}
    lines: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                progress["stream_s"] = json.loads(line)["time"]
                progress["detections"] += 1

    def read_stderr() -> None:
        lines.extend(proc.stderr)

    threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float, int]] = []  # (wall s, stream s, RSS kB)
    at_marker = None
    hwm = 0
    while proc.poll() is None:
        now = rss_kb(proc.pid)
        if now:
            samples.append((time.monotonic() - start, progress["stream_s"], now[0]))
            hwm = max(hwm, now[1])
            if at_marker is None and marker_s is not None and progress["stream_s"] >= marker_s:
                at_marker = now[0]
        time.sleep(poll_s)
    for thread in threads:
        thread.join(timeout=5)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {''.join(lines)[-2000:]}")
    final = samples[-1][2] if samples else None
    mb = lambda kb: None if kb is None else round(kb / 1024, 1)  # noqa: E731
    out = {"wall_seconds": round(time.monotonic() - start, 1), "rss_mb_at_end": mb(final), "peak_rss_mb": mb(hwm),
           "detections": progress["detections"],
           "rss_timeline [wall s, stream s, MB]": [[round(w), round(s), mb(r)]
                                                    for w, s, r in samples[:: max(1, len(samples) // 8)]]}
    if marker_s is not None:
        out["rss_mb_after_first_minute"] = mb(at_marker)
    return out


def memory_check(model: str, stream: Stream, config, tmp: Path, speed: float) -> dict:
    minute, hour = tmp / "minute.wav", tmp / "hour.wav"
    write_looped(minute, stream.samples, 60)
    info("writing the 60-minute PCM_16 wav (115 MB) ...")
    write_looped(hour, stream.samples, 3600)
    info(f"memory: 2 listener runs; the hour one takes ~{3600 / max(speed, 1e-6) / 60:.0f} min at the measured speed")
    try:
        one = watch_memory(cli_command(model, minute, config), marker_s=None)
        info(f"1-minute file: end RSS {one['rss_mb_at_end']} MB")
        long = watch_memory(cli_command(model, hour, config))
        info(f"60-minute file: RSS {long['rss_mb_after_first_minute']} MB after 1 min, {long['rss_mb_at_end']} MB at end")
    finally:
        minute.unlink(missing_ok=True)
        hour.unlink(missing_ok=True)

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    first = ratio(long["rss_mb_at_end"], long["rss_mb_after_first_minute"])
    whole = ratio(long["rss_mb_at_end"], one["rss_mb_at_end"])
    return {
        "listen_1_minute_file": one,
        "listen_60_minute_file": long,
        "hour_end_vs_its_first_minute": first,
        "hour_end_vs_1_minute_file_end": whole,
        "within_5_percent": all(r is not None and abs(r - 1) <= 0.05 for r in (first, whole)),
        "whole_hour_as_float32_mb": round(3600 * RATE * 4 / 2**20, 1),  # what loading the file at once would add
    }


# ----------------------------------------------------------------------------- main


def best_hop(runs: list[dict]) -> float | None:
    """Most targets met, then the best F1 (recall and false alarms together), then least CPU."""
    if not runs:
        return None
    key = lambda r: (sum(bool(v) for v in r["targets_met"].values()), r["figures"]["f1"] or 0,  # noqa: E731
                     -r["figures"]["cpu_percent_one_core"])
    return max(runs, key=key)["config"]["hop_ms"]


def pooled_seeds(args: argparse.Namespace, recognizer, task, noise_db: tuple[float, float]) -> dict:
    """One setting over several streams: per-stream figures and the pooled counts."""
    from speechrnn.streaming import StreamConfig

    config = stream_config(args.hop_ms or StreamConfig().hop_ms, args)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, words, matched, false_alarms, seconds, cpu = [], 0, 0, 0, 0.0, 0.0
    latencies: list[float] = []
    labels: dict[str, list[int]] = {}
    causes: Counter = Counter()
    misses: Counter = Counter()
    for seed in seeds:
        info(f"seed {seed}: building a {args.minutes:g}-minute stream ...")
        stream = build_stream(Path(args.data), task, args.minutes, seed, noise_db=noise_db)
        with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
            wav = Path(tmp) / "stream.wav"
            write_pcm16(wav, stream.samples)
            detections, timing = run_in_process(recognizer, wav, config)
        f = match(stream, detections)
        c = f["counts"]
        words += c["command_words"]
        matched += c["matched"]
        false_alarms += c["false_alarms"]
        seconds += stream.seconds
        cpu += timing["cpu_seconds"]
        causes.update(f["false_alarms_by_cause"])
        misses.update(f["misses_by_cause"])
        latencies += f["latencies_ms"]
        for label, text in f["per_label_counts"].items():
            a, b = (int(x) for x in text.split("/"))
            row = labels.setdefault(label, [0, 0])
            row[0] += a
            row[1] += b
        info(f"seed {seed}: recall {f['recall']}, false alarms {c['false_alarms']}")
        keep = ("recall", "precision", "false_alarms_per_hour", "false_alarms_per_hour_no_command",
                "latency_median_ms", "counts",
                "per_label_counts", "false_alarms_by_cause", "misses_by_cause")
        per_seed.append({"seed": seed, **{k: f[k] for k in keep},
                         **({"misses": f["misses"], "false_alarm_list": f["false_alarm_list"]} if args.details else {})})
    return {
        "model": str(args.model),
        "config": {**config.to_dict(), "label_thresholds": timing["label_thresholds"]},
        "noise_db_re_median_speech_peak": list(noise_db),
        "seeds": seeds,
        "pooled": {
            "minutes": round(seconds / 60, 1),
            "command_words": words,
            "matched": matched,
            "recall": round(matched / words, 4) if words else None,
            "false_alarms": false_alarms,
            "false_alarms_per_hour": round(false_alarms / (seconds / 3600), 1),
            "latency_median_ms": round(float(np.median(latencies)), 0) if latencies else None,
            "cpu_percent_one_core": round(100 * cpu / seconds, 2),
            "per_label_counts": {k: f"{a}/{b}" for k, (a, b) in sorted(labels.items())},
            "false_alarms_by_cause": dict(causes),
            "false_alarms_per_hour_no_command": round(no_command(causes) / (seconds / 3600), 1),
            "misses_by_cause": dict(misses),
        },
        "targets": TARGETS,
        "per_seed": per_seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=6.0, help="length of the generated stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: one setting over several streams, pooled")
    parser.add_argument("--sweep", default=None, help="comma-separated hops in ms, e.g. 100,150,200,250")
    parser.add_argument("--hop-ms", type=float, default=None, help="one hop (default: StreamConfig's)")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--thresholds", default=None, help="comma-separated thresholds to sweep at the first hop")
    parser.add_argument("--smoothing-ms", type=float, default=None)
    parser.add_argument("--refractory-ms", type=float, default=None)
    parser.add_argument("--noise-db", default="-35,-20", help="noise RMS range, dB relative to the median speech peak")
    parser.add_argument("--no-cli-check", action="store_true", help="skip running `speechrnn listen` once")
    parser.add_argument("--memory", action="store_true", help="also the 1-minute vs 60-minute RSS check (slow)")
    parser.add_argument("--save", default=None, help="folder to keep stream.wav and truth.json in")
    parser.add_argument("--details", action="store_true", help="list every miss and false alarm")
    args = parser.parse_args()

    from data_prep.features import mfcc
    from speechrnn.recognizer import Recognizer
    from speechrnn.streaming import StreamConfig

    recognizer = Recognizer(args.model)
    # librosa's first MFCC call loads numba kernels (seconds of CPU): a one-off start-up cost of
    # `listen`, kept out of the per-second-of-audio figure and reported on its own.
    warm = time.process_time()
    mfcc(np.zeros(recognizer.features.clip_samples, np.float32), recognizer.features)
    warm = time.process_time() - warm
    task = TaskConfig.from_dict(recognizer.meta["task"])
    noise_db = tuple(sorted(float(x) for x in args.noise_db.split(",")))
    if args.seeds:
        print(json.dumps(pooled_seeds(args, recognizer, task, noise_db), indent=2))
        return
    info(f"building a {args.minutes:g}-minute stream (seed {args.seed}) ...")
    stream = build_stream(Path(args.data), task, args.minutes, args.seed, noise_db=noise_db)
    kinds = Counter(e.kind for e in stream.events)
    hops = [float(h) for h in args.sweep.split(",")] if args.sweep else [args.hop_ms or StreamConfig().hop_ms]

    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp_name:
        tmp = Path(args.save) if args.save else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        wav = tmp / "stream.wav"
        write_pcm16(wav, stream.samples)
        if args.save:
            truth = {"events": [asdict(e) for e in stream.events], "noise": [asdict(s) for s in stream.noise]}
            (tmp / "truth.json").write_text(json.dumps(truth, indent=1))
        runs = []
        for hop in hops:
            config = stream_config(hop, args)
            info(f"streaming {stream.seconds:.0f} s with hop {hop:g} ms ...")
            detections, timing = run_in_process(recognizer, wav, config)
            figures = match(stream, detections)
            figures.pop("latencies_ms")
            figures.update(timing)
            info(f"hop {hop:g} ms: recall {figures['recall']}, false alarms/h {figures['false_alarms_per_hour']}, "
                 f"CPU {timing['cpu_percent_one_core']}% of a core, {timing['faster_than_realtime']}x real time")
            # The detector averages round(smoothing / hop) hops, so the sweep changes the smoothing span too.
            smoothing_hops = max(1, round(config.smoothing_ms / config.hop_ms))
            runs.append({"config": {**config.to_dict(), "label_thresholds": figures.pop("label_thresholds")},
                         "smoothing_hops": smoothing_hops, "figures": figures, "targets_met": targets_met(figures),
                         "detections": detections})
        threshold_rows = []
        for threshold in [float(t) for t in args.thresholds.split(",")] if args.thresholds else []:
            config = stream_config(hops[0], args, threshold)
            detections, timing = run_in_process(recognizer, wav, config)
            figures = match(stream, detections)
            info(f"threshold {threshold:g}: recall {figures['recall']}, false alarms/h {figures['false_alarms_per_hour']}")
            threshold_rows.append({"threshold": threshold, **{k: figures[k] for k in (
                "recall", "precision", "false_alarms_per_hour", "false_alarms_per_hour_no_command",
                "latency_median_ms", "counts", "false_alarms_by_cause", "misses_by_cause")}})
        default_run = runs[0]
        offline_check(recognizer, stream, default_run["figures"]["misses"])
        cli = None
        if not args.no_cli_check:
            config = stream_config(hops[0], args)
            info(f"running `speechrnn listen --input` once (hop {hops[0]:g} ms) to compare ...")
            cli = compare_detections(default_run["detections"], run_cli(args.model, wav, config))
        memory = None
        if args.memory:
            memory = memory_check(args.model, stream, stream_config(hops[0], args), Path(tmp_name),
                                  default_run["figures"]["faster_than_realtime"])

    for run in runs:
        run.pop("detections")
        if not args.details and run is not default_run:
            run["figures"].pop("misses")
            run["figures"].pop("false_alarm_list")
    report = {
        "model": str(args.model),
        "data": str(args.data),
        "seed": args.seed,
        "stream": {
            "seconds": round(stream.seconds, 1),
            "events": dict(kinds),
            "clips_by_split": dict(stream.clip_sources),
            "clip_pools_reshuffled": stream.reused_clips,
            "noise_db_re_median_speech_peak": list(noise_db),
            "median_speech_peak_dbfs": round(20 * np.log10(stream.reference_peak), 1),
            "noise_segments": len(stream.noise),
            "median_word_snr_db": float(np.median([e.snr_db for e in stream.commands()])),
            "command_words_without_energy_extent": sum(not e.extent_from_energy for e in stream.commands()),
            "match_window": f"[word_start, word_end + {MATCH_AFTER_END_S:g} s]",
        },
        "targets": TARGETS,
        "runs": runs,
        "threshold_sweep": threshold_rows or None,
        "best_hop_ms": best_hop(runs),
        "best_hop_rule": "most targets met, then F1, then least CPU",
        "cli_matches_in_process": cli,
        "memory": memory,
        "first_mfcc_call_cpu_seconds": round(warm, 2),
        "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_note": f"process_time of all threads over the listener run; {os.cpu_count()} CPUs, "
                    f"load average {os.getloadavg()[0]:.1f} at the end",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
