"""Benchmark: streaming keyword detection on long generated streams with known word times.

The streams (bench/stream_material.py) are written to a wav, run through the same path as
`speechrnn listen --input` (speechrnn.stream_eval.stream_file) and scored by the library behind
`speechrnn score-stream` (speechrnn.stream_eval.score_stream: a detection matches a command word
of its label within [word start, word end + 1 s]; every other detection is a false alarm, on a
command or with no command spoken). One JSON object on stdout; progress on stderr.

Command streams: real unseen clips (validation split + the task's holdout), a word every
2.5-3.5 s (75% commands), over held-out real background noise.

    .venv/bin/python bench/streaming.py [--model DIR] [--minutes 6] [--sweep 100,150,200,250]
                                        [--thresholds 0.5,0.6,0.7,0.8,0.9] [--memory]
    .venv/bin/python bench/streaming.py --seeds 0,1,2,3,4,5 [--threshold 0.7] [--threshold up=0.85]

--thresholds re-runs the stream at the first hop with each threshold (its rows are summaries);
--seeds pools several independent streams with one setting (one 6-minute stream holds ~90
commands); --noise-db=-70,-60 gives near-silence; --clips testing takes the testing split (the
full dataset has one; the shared subset has not).

No-command hour (--no-command-minutes 60): everyday sentences holding none of the commands, half
Kokoro (seed 901, voice blends of its own), half espeak-ng (seed 902), with 0.3-1.5 s pauses over
held-out real noise; every ~30 s a new noise, speech level (-28 to -16 dBFS) and SNR (10-25 dB).
The sentences are made once, with `speechrnn data sentences`, into
$SPEECHRNN_CACHE/bench/no-command/ (Kokoro: ~0.6 s of CPU per second of speech, so an hour takes
~30-60 min). Reports false alarms per hour of talk (the figure wake-word engines publish), which
labels fired and on which sentences.

Calibration (--calibrate): per command, the lowest threshold in 0.50-0.99 at which (and above
which) that command's own false alarms stay within --fa-budget / number of commands per hour, on
validation-split streams (seeds 100-105 unless --seeds), the others at their usual thresholds;
posteriors are recorded once per stream and replayed per threshold. Printed as `--threshold
LABEL=T` arguments for `speechrnn export`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stream_material import (  # noqa: E402
    CLIPS,
    RATE,
    SENTENCE_SEEDS,
    Stream,
    build_no_command_stream,
    build_stream,
    info,
    kokoro_voices_in_training,
    sentence_material,
    speechrnn_command,
    write_looped,
    write_pcm16,
)

from data_prep.dataset import SpeechCommands, TaskConfig  # noqa: E402
from speechrnn.stream_eval import (  # noqa: E402
    MATCH_AFTER_END_S,
    StreamScore,
    commands_of,
    score_stream,
    stream_file,
    write_truth,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
DEFAULT_MODEL = REPO / "models" / "default"
TARGETS = {"recall_min": 0.90, "false_alarms_per_hour_max": 10.0, "latency_median_ms_max": 500.0,
           "cpu_percent_one_core_max": 5.0, "no_command_false_alarms_per_hour_max": 2.0}
CALIBRATION_SEEDS = "100,101,102,103,104,105"  # never the reported streams' 0-5
THRESHOLD_GRID = np.round(np.arange(0.50, 0.995, 0.01), 2)


# ----------------------------------------------------------------------------- running and scoring


def stream_config(hop_ms: float | None, args: argparse.Namespace, threshold: float | None = None):
    """listen's StreamConfig with the bench's --hop-ms/--threshold/--smoothing-ms/--refractory-ms."""
    from speechrnn.streaming import StreamConfig

    overall, per_label = args.threshold
    changes = dict(hop_ms=hop_ms, threshold=overall if threshold is None else threshold,
                   smoothing_ms=args.smoothing_ms, refractory_ms=args.refractory_ms,
                   label_thresholds=per_label or None)
    return dataclasses.replace(StreamConfig(), **{k: v for k, v in changes.items() if v is not None})


def parse_thresholds(values: list[str] | None) -> tuple[float | None, dict[str, float]]:
    """--threshold T and --threshold LABEL=T (repeatable), as listen takes them."""
    overall, per_label = None, {}
    for value in values or []:
        label, _, number = value.rpartition("=")
        if label:
            per_label[label] = float(number)
        else:
            overall = float(number)
    return overall, per_label


def score(stream: Stream, run, commands: list[str]) -> StreamScore:
    return score_stream(run.detections, stream.truth(), stream.seconds, commands)


def figures(stream: Stream, result: StreamScore, details: bool = True) -> dict:
    """score_stream's figures, with each miss's clip, SNR and noise (from the stream's events)."""
    out = result.to_dict(details=details)
    event = {(e.label, e.word_start): e for e in stream.commands()}
    snr = lambda words: round(float(np.median([event[w.label, w.start].snr_db for w in words])), 1) if words else None  # noqa: E731
    out["median_snr_db"] = {"detected": snr([h.word for h in result.hits]), "missed": snr([m.word for m in result.misses])}
    for miss, missed in zip(out.get("misses", []), result.misses, strict=False):
        e = event[missed.word.label, missed.word.start]
        miss.update(whole_clip_extent=not e.extent_from_energy, snr_db=e.snr_db, peak_dbfs=round(e.peak_dbfs, 1),
                    noise=e.noise, clip=str(Path(e.path).relative_to(Path(e.path).parents[1])), clip_start=e.clip_start)
    return out


def targets_met(f: dict) -> dict:
    def ok(value, limit, lower_is_better=True):
        return None if value is None else (value <= limit if lower_is_better else value >= limit)

    return {
        f"recall >= {TARGETS['recall_min']:.0%}": ok(f["recall"], TARGETS["recall_min"], False),
        f"false alarms/h <= {TARGETS['false_alarms_per_hour_max']:g}": ok(
            f["false_alarms_per_hour"], TARGETS["false_alarms_per_hour_max"]),
        f"median latency <= {TARGETS['latency_median_ms_max']:g} ms": ok(
            f["latency_median_ms"], TARGETS["latency_median_ms_max"]),
        f"CPU <= {TARGETS['cpu_percent_one_core_max']:g}% of one core": ok(
            f["cpu_percent_one_core"], TARGETS["cpu_percent_one_core_max"]),
    }


def cli_command(model: str, wav: Path, config, extra: tuple[str, ...] = ("--json",)) -> list[str]:
    thresholds = [a for label, t in (config.label_thresholds or {}).items() for a in ("--threshold", f"{label}={t}")]
    return [*speechrnn_command(), "listen", model, "--input", str(wav), "--hop-ms", str(config.hop_ms), "--threshold",
            str(config.threshold), *thresholds, "--smoothing-ms", str(config.smoothing_ms), "--refractory-ms",
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
        out["first_difference"] = next(([x, y] for x, y in zip(a, b, strict=False)
                                        if x["label"] != y["label"] or abs(x["time"] - y["time"]) >= 1e-3), None)
    return out


def offline_check(recognizer, stream: Stream, misses: list[dict]) -> None:
    """For each missed word, what the plain (non-streaming) model says on the best 1 s window."""
    for miss in misses:
        a = int(max(0.0, miss["clip_start"] - 0.5) * RATE)
        b = int(min(stream.seconds, miss["clip_start"] + 1.5) * RATE)
        probs = recognizer.probabilities(recognizer.windows(stream.samples[a:b]))
        k = recognizer.labels.index(miss["label"])
        best = probs[int(np.argmax(probs[:, k]))]
        miss["best_window_p_true"] = round(float(best[k]), 3)
        miss["best_window_top"] = recognizer.labels[int(np.argmax(best))]


def streamed(recognizer, stream: Stream, config, record: bool = False, keep: Path | None = None):
    """The stream through the `listen --input` path (written to a wav first)."""
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        wav = (keep or Path(tmp)) / "stream.wav"
        write_pcm16(wav, stream.samples)
        return stream_file(recognizer, wav, config, record_posteriors=record)


# ----------------------------------------------------------------------------- memory


def rss_kb(pid: int) -> tuple[int, int] | None:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def watch_memory(cmd: list[str], marker_s: float | None = 60.0, poll_s: float = 0.5) -> dict:
    """Run a listener process; poll its RSS; note the RSS when its output passes ``marker_s`` of audio.

    Progress comes from its --json detections (their stream times), read as they are printed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    progress = {"stream_s": 0.0, "detections": 0}
    errors: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                progress["stream_s"] = json.loads(line)["time"]
                progress["detections"] += 1

    threads = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float, int]] = []  # (wall s, stream s, RSS kB)
    at_marker, hwm = None, 0
    while proc.poll() is None:
        if now := rss_kb(proc.pid):
            samples.append((time.monotonic() - start, progress["stream_s"], now[0]))
            hwm = max(hwm, now[1])
            if at_marker is None and marker_s is not None and progress["stream_s"] >= marker_s:
                at_marker = now[0]
        time.sleep(poll_s)
    for thread in threads:
        thread.join(timeout=5)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {''.join(errors)[-2000:]}")
    mb = lambda kb: None if kb is None else round(kb / 1024, 1)  # noqa: E731
    out = {"wall_seconds": round(time.monotonic() - start, 1), "rss_mb_at_end": mb(samples[-1][2] if samples else None),
           "peak_rss_mb": mb(hwm), "detections": progress["detections"],
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
        long = watch_memory(cli_command(model, hour, config))
    finally:
        minute.unlink(missing_ok=True)
        hour.unlink(missing_ok=True)
    ratio = lambda a, b: None if a is None or b is None else round(a / b, 3)  # noqa: E731
    first = ratio(long["rss_mb_at_end"], long["rss_mb_after_first_minute"])
    whole = ratio(long["rss_mb_at_end"], one["rss_mb_at_end"])
    return {"listen_1_minute_file": one, "listen_60_minute_file": long, "hour_end_vs_its_first_minute": first,
            "hour_end_vs_1_minute_file_end": whole,
            "within_5_percent": all(r is not None and abs(r - 1) <= 0.05 for r in (first, whole)),
            "whole_hour_as_float32_mb": round(3600 * RATE * 4 / 2**20, 1)}  # what loading the file at once would add


# ----------------------------------------------------------------------------- the no-command hour


def no_command_hour(args: argparse.Namespace, recognizer) -> dict:
    folders = sentence_material(args.no_command_minutes, args.no_command_speakers)
    config = stream_config(args.hop_ms, args)
    with tempfile.TemporaryDirectory(prefix="bench-no-command-") as tmp:
        keep = Path(args.save) if args.save else Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        wav = keep / "no_command.wav"
        info(f"building {args.no_command_minutes:g} minutes of talk without commands (seed {args.seed}) ...")
        truth, described = build_no_command_stream(folders, Path(args.data), args.no_command_minutes, args.seed, wav)
        if args.save:
            write_truth(keep / "no_command_truth.csv", truth)
            (keep / "no_command_sentences.json").write_text(json.dumps(described, indent=1))
        info(f"streaming {len(truth)} sentences through the listen --input path ...")
        run = stream_file(recognizer, wav, config)
    result = score_stream(run.detections, truth, run.seconds, commands_of(recognizer.labels))
    f = result.to_dict()
    said = {s["start"]: s for s in described["sentences"]}
    alarms = [{**fa.detection.to_json(), **({k: said[round(fa.event.start, 3)][k] for k in ("text", "engine", "voice")}
                                            if fa.event else {"text": None})} for fa in result.false_alarms]
    sentences = described["sentences"]
    kokoro = {s["voice"] for s in sentences if s["engine"] == "kokoro"}
    return {
        "model": str(args.model), "config": run.config.to_dict(), "seed": args.seed,
        "material": [str(f) for f in folders],
        "minutes": round(run.seconds / 60, 2),
        "sentences": len(sentences), "sentences_reused": described["sentences_reused"],
        "sentences_by_engine": dict(Counter(s["engine"] for s in sentences)),
        "speakers_by_engine": {e: len({s["voice"] for s in sentences if s["engine"] == e}) for e in SENTENCE_SEEDS},
        "kokoro_voices": kokoro_voices_in_training(kokoro),
        "speech_minutes": round(sum(e.end - e.start for e in truth) / 60, 2),
        "median_local_snr_db": float(np.median([s["local_snr_db"] for s in sentences])) if sentences else None,
        "false_alarms": len(result.false_alarms),
        "false_alarms_per_hour": f["false_alarms_per_hour"],
        "false_alarms_by_label": f["false_alarms_by_label"],
        "false_alarms_by_engine": dict(Counter(a.get("engine") for a in alarms)),
        "false_alarm_list": alarms if args.details else alarms[:30],
        "target_false_alarms_per_hour_max": TARGETS["no_command_false_alarms_per_hour_max"],
        **run.timing(),
    }


# ----------------------------------------------------------------------------- calibration


def calibrate(args: argparse.Namespace, recognizer, task, noise_db) -> dict:
    """Per-command thresholds from validation-split streams (see the module docstring)."""
    from speechrnn.streaming import replay_posteriors

    seeds = [int(s) for s in (args.seeds or CALIBRATION_SEEDS).split(",")]
    commands = commands_of(recognizer.labels)
    recorded = []
    for seed in seeds:
        info(f"calibration stream {seed}: {args.minutes:g} minutes of validation-split clips ...")
        stream = build_stream(Path(args.data), task, args.minutes, seed, noise_db=noise_db, clips="validation")
        run = streamed(recognizer, stream, stream_config(args.hop_ms, args), record=True)
        times, raw, _ = run.trace.arrays()
        recorded.append((stream.truth(), times, raw, stream.seconds, run.trace.end_time))
    base = run.config  # the given settings over the model's own per-command thresholds
    hours = sum(r[3] for r in recorded) / 3600
    budget = args.fa_budget / len(commands)

    def replayed(config) -> StreamScore:
        return StreamScore.pooled(score_stream(replay_posteriors(times, raw, recognizer.labels, config,
                                                               end_time=end), truth, seconds, commands)
                                  for truth, times, raw, seconds, end in recorded)

    chosen, rows = {}, {}
    for label in commands:
        best = None
        for t in THRESHOLD_GRID[::-1]:  # from the top down: the lowest threshold with all above it in budget
            result = replayed(dataclasses.replace(base, label_thresholds={**(base.label_thresholds or {}), label: float(t)}))
            own = sum(fa.detection.label == label for fa in result.false_alarms) / hours
            if own > budget:
                break
            found, words = result.per_command().get(label, (0, 0))
            best = (float(t), round(own, 1), f"{found}/{words}")
        chosen[label] = best[0] if best else float(THRESHOLD_GRID[-1])
        rows[label] = {"threshold": chosen[label], "budget_met": best is not None,
                       "own_false_alarms_per_hour": best[1] if best else None, "recall": best[2] if best else None}
        info(f"{label}: threshold {chosen[label]:.2f} ({rows[label]})")
    before = replayed(base).to_dict()
    after = replayed(dataclasses.replace(base, label_thresholds=chosen)).to_dict()
    keep = ("recall", "false_alarms_per_hour", "false_alarms_per_hour_no_command", "latency_median_ms",
            "per_label_counts", "false_alarms_by_label")
    arguments = " ".join(f"--threshold {label}={t:.2f}" for label, t in chosen.items())
    if any(c.split == "testing" for c in SpeechCommands.open(args.data).clips):
        check = f"python bench/streaming.py --clips testing --seeds 0,1,2,3,4,5 {arguments}"
    else:  # e.g. the shared subset, which holds no testing-split speaker
        check = (f"no testing split in {args.data}: the reported streams (seeds 0-5) draw on the same validation "
                 f"clips, in other streams; the no-command hour is independent: python bench/streaming.py "
                 f"--no-command-minutes 60 {arguments}")
    info(f"for `speechrnn export RUN OUT`: {arguments}")
    return {
        "model": str(args.model), "config": base.to_dict(), "streams": {"clips": "validation", "seeds": seeds,
                                                                         "minutes": round(hours * 60, 1)},
        "false_alarm_budget_per_hour": {"all_commands": args.fa_budget, "each_command": round(budget, 2)},
        "rule": "per command, the lowest threshold in 0.50-0.99 at which it and every higher one keep that command's "
                "own false alarms within its budget, the other commands at their usual thresholds",
        "per_command": rows,
        "with_usual_thresholds": {k: before[k] for k in keep},
        "with_chosen_thresholds": {k: after[k] for k in keep},
        "export_arguments": arguments,
        "check": check,
    }


# ----------------------------------------------------------------------------- main


def best_hop(runs: list[dict]) -> float | None:
    """Most targets met, then the best F1 (recall and false alarms together), then least CPU."""
    key = lambda r: (sum(bool(v) for v in r["targets_met"].values()), r["figures"]["f1"] or 0,  # noqa: E731
                     -r["figures"]["cpu_percent_one_core"])
    return max(runs, key=key)["config"]["hop_ms"] if runs else None


def pooled_seeds(args: argparse.Namespace, recognizer, task, noise_db: tuple[float, float]) -> dict:
    """One setting over several streams: per-stream figures and the pooled counts."""
    config = stream_config(args.hop_ms, args)
    commands = commands_of(recognizer.labels)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, results, seconds, cpu = [], [], 0.0, 0.0
    for seed in seeds:
        info(f"seed {seed}: building a {args.minutes:g}-minute stream ...")
        stream = build_stream(Path(args.data), task, args.minutes, seed, noise_db=noise_db, clips=args.clips)
        run = streamed(recognizer, stream, config)
        result = score(stream, run, commands)
        results.append(result)
        seconds += stream.seconds
        cpu += run.cpu_seconds
        f = figures(stream, result, args.details)
        info(f"seed {seed}: recall {f['recall']}, false alarms {f['counts']['false_alarms']}")
        per_seed.append({"seed": seed, **{k: v for k, v in f.items() if k not in ("per_label_recall", "median_snr_db")}})
    return {
        "model": str(args.model),
        "config": run.config.to_dict(),
        "clips": args.clips,
        "noise_db_re_median_speech_peak": list(noise_db),
        "seeds": seeds,
        "pooled": {**StreamScore.pooled(results).to_dict(), "cpu_percent_one_core": round(100 * cpu / seconds, 2)},
        "targets": TARGETS,
        "per_seed": per_seed,
    }


def single_stream(args: argparse.Namespace, recognizer, task, noise_db, warm: float) -> dict:
    from speechrnn.streaming import StreamConfig

    commands = commands_of(recognizer.labels)
    info(f"building a {args.minutes:g}-minute stream (seed {args.seed}) ...")
    stream = build_stream(Path(args.data), task, args.minutes, args.seed, noise_db=noise_db, clips=args.clips)
    hops = [float(h) for h in args.sweep.split(",")] if args.sweep else [args.hop_ms or StreamConfig().hop_ms]
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp_name:
        tmp = Path(args.save) if args.save else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        wav = tmp / "stream.wav"
        write_pcm16(wav, stream.samples)
        if args.save:  # score it again with `speechrnn score-stream MODEL stream.wav truth.csv`
            write_truth(tmp / "truth.csv", stream.truth())
            (tmp / "truth.json").write_text(json.dumps({"events": [asdict(e) for e in stream.events],
                                                        "noise": [asdict(s) for s in stream.noise]}, indent=1))
        runs = []
        for hop in hops:
            info(f"streaming {stream.seconds:.0f} s with hop {hop:g} ms ...")
            run = stream_file(recognizer, wav, stream_config(hop, args))
            f = {**figures(stream, score(stream, run, commands)), **run.timing()}
            info(f"hop {hop:g} ms: recall {f['recall']}, false alarms/h {f['false_alarms_per_hour']}, "
                 f"CPU {f['cpu_percent_one_core']}% of a core, {f['faster_than_realtime']}x real time")
            # The detector averages round(smoothing / hop) hops, so the sweep changes the smoothing span too.
            runs.append({"config": run.config.to_dict(), "smoothing_hops": max(1, round(run.config.smoothing_ms / hop)),
                         "figures": f, "targets_met": targets_met(f), "detections": [d.to_json() for d in run.detections]})
        threshold_rows = []
        for threshold in [float(t) for t in args.thresholds.split(",")] if args.thresholds else []:
            f = score(stream, stream_file(recognizer, wav, stream_config(hops[0], args, threshold)), commands).to_dict()
            info(f"threshold {threshold:g}: recall {f['recall']}, false alarms/h {f['false_alarms_per_hour']}")
            threshold_rows.append({"threshold": threshold, **{k: f[k] for k in (
                "recall", "precision", "false_alarms_per_hour", "false_alarms_per_hour_no_command",
                "latency_median_ms", "counts", "false_alarms_by_cause", "misses_by_cause")}})
        default_run = runs[0]
        offline_check(recognizer, stream, default_run["figures"]["misses"])
        cli = None
        if not args.no_cli_check:
            info(f"running `speechrnn listen --input` once (hop {hops[0]:g} ms) to compare ...")
            cli = compare_detections(default_run["detections"], run_cli(args.model, wav, stream_config(hops[0], args)))
        memory = None
        if args.memory:
            memory = memory_check(args.model, stream, stream_config(hops[0], args), Path(tmp_name),
                                  default_run["figures"]["faster_than_realtime"])
    for run in runs:
        run.pop("detections")
        if not args.details and run is not default_run:
            run["figures"].pop("misses")
            run["figures"].pop("false_alarm_list")
    return {
        "model": str(args.model), "data": str(args.data), "seed": args.seed, "clips": args.clips,
        "stream": {
            "seconds": round(stream.seconds, 1),
            "events": dict(Counter(e.kind for e in stream.events)),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=6.0, help="length of each generated command stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: one setting over several streams, pooled")
    parser.add_argument("--clips", choices=sorted(CLIPS), default="validation+holdout",
                        help="split(s) the command streams' clips and noise come from")
    parser.add_argument("--sweep", default=None, help="comma-separated hops in ms, e.g. 100,150,200,250")
    parser.add_argument("--hop-ms", type=float, default=None, help="one hop (default: StreamConfig's)")
    parser.add_argument("--threshold", action="append", default=None, metavar="T|LABEL=T",
                        help="as listen's: every command's, or one command's (repeatable)")
    parser.add_argument("--thresholds", default=None, help="comma-separated thresholds to sweep at the first hop")
    parser.add_argument("--smoothing-ms", type=float, default=None)
    parser.add_argument("--refractory-ms", type=float, default=None)
    parser.add_argument("--noise-db", default="-35,-20", help="noise RMS range, dB relative to the median speech peak")
    parser.add_argument("--no-cli-check", action="store_true", help="skip running `speechrnn listen` once")
    parser.add_argument("--memory", action="store_true", help="also the 1-minute vs 60-minute RSS check (slow)")
    parser.add_argument("--save", default=None, help="folder to keep the stream's wav and truth (CSV) in")
    parser.add_argument("--details", action="store_true", help="list every miss and false alarm")
    parser.add_argument("--no-command-minutes", type=float, default=None,
                        help="instead: this many minutes of sentences without any command (false alarms per hour)")
    parser.add_argument("--no-command-speakers", type=int, default=50, help="Kokoro voice blends for those sentences")
    parser.add_argument("--calibrate", action="store_true",
                        help="instead: per-command thresholds on validation-split streams (seeds 100-105)")
    parser.add_argument("--fa-budget", type=float, default=TARGETS["false_alarms_per_hour_max"],
                        help="--calibrate: false alarms per hour allowed, over all commands")
    args = parser.parse_args()
    try:
        args.threshold = parse_thresholds(args.threshold)
    except ValueError:
        parser.error("--threshold takes T or LABEL=T")

    from data_prep.features import mfcc
    from speechrnn.recognizer import Recognizer

    recognizer = Recognizer(args.model)
    # librosa's first MFCC call loads numba kernels (seconds of CPU): a one-off start-up cost of
    # `listen`, kept out of the per-second-of-audio figure and reported on its own.
    warm = time.process_time()
    mfcc(np.zeros(recognizer.features.clip_samples, np.float32), recognizer.features)
    warm = time.process_time() - warm
    task = TaskConfig.from_dict(recognizer.meta["task"])
    noise_db = tuple(sorted(float(x) for x in args.noise_db.split(",")))
    if args.no_command_minutes:
        report = no_command_hour(args, recognizer)
    elif args.calibrate:
        report = calibrate(args, recognizer, task, noise_db)
    elif args.seeds:
        report = pooled_seeds(args, recognizer, task, noise_db)
    else:
        report = single_stream(args, recognizer, task, noise_db, warm)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
