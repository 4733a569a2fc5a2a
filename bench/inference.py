"""Benchmark: an export's LiteRT backends side by side with its SavedModel (prints one JSON object).

    .venv/bin/python bench/inference.py --model DIR [--data DIR] [--backends litert,litert-int8,tf]

Per backend (`--backend` of classify/listen/evaluate), with issue 15's targets:
  cli_one_file    `speechrnn classify MODEL FILE --backend B`, wall time with start-up, median of --runs,
                  each run alternated with a bare `python -c 'import tensorflow'` (and the other
                  backends' runs) so that all see the same machine: <= 1.0 s and <= 0.2x that import.
  cli_throughput  `speechrnn classify MODEL f1..fN --json --backend B` on N (--files, 1,000) real
                  files, wall time with start-up: >= 500 files/s.
  latency_batch1  one clip's MFCC in, probabilities out, as `listen` calls it every hop
                  (Recognizer.probabilities_from_mfcc; the XLA signature for tf), after warm-up: <= 1 ms.
                  Beside it: the MFCC of one hop's new frames (numpy), and classify_files in process.
  listen_long     `speechrnn listen MODEL --input REC --json --backend B` of --listen-minutes (60) of
                  real background noise with real words in it, as fast as it goes: peak RSS (wait4)
                  <= 200 MB and no growth (RSS sampled through the run: the last sample against the
                  one a quarter in); CPU <= 2% of one core at the default hop, i.e. CPU seconds per
                  second of audio, start-up excluded by subtracting a one-minute run's.
  accuracy        on the model's unseen real clips (evaluate's --split unseen of --data): accuracy per
                  backend, and how many clips each labels unlike the SavedModel: LiteRT float32
                  identical to the SavedModel, int8 within 0.5 point.
  long_classify   (--long-minutes, default off) `speechrnn classify` of a long recording: wall, peak RSS.

Every measurement runs in a fresh subprocess (this script re-run with --child), so the parent never
imports TensorFlow. --quick shrinks everything for a check that the script works (not for figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / "models" / "default"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
TARGETS = {"cli_one_file_s": 1.0, "cli_one_file_vs_import_tf": 0.2, "cli_files_per_s": 500.0, "batch1_ms": 1.0,
           "listen_peak_rss_mb": 200.0, "listen_cpu_percent": 2.0, "int8_accuracy_points": 0.5}


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def summary_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {"median_ms": r(np.median(ms)), "p90_ms": r(np.percentile(ms, 90)), "min_ms": r(ms.min()), "calls": len(ms)}


# --- inputs ----------------------------------------------------------------------------------
def pick_files(data: Path, n: int) -> list[Path]:
    """The first ``n`` clips of the validation list, then training clips (sorted) if it is short."""
    chosen: list[Path] = []
    listed = data / "validation_list.txt"
    if listed.exists():
        for line in listed.read_text().splitlines():
            path = data / line.strip()
            if line.strip() and path.is_file():
                chosen.append(path)
    seen = set(chosen)
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if len(chosen) >= n:
            break
        for path in sorted(folder.iterdir()):
            if path not in seen and path.suffix.lower() in {".wav", ".flac"}:
                chosen.append(path)
    if len(chosen) < n:
        sys.exit(f"only {len(chosen)} audio files in {data}, need {n}")
    return chosen[:n]


def speechrnn_exe() -> str:
    exe = Path(sys.executable).parent / "speechrnn"
    if not exe.exists():
        sys.exit(f"no speechrnn console script beside {sys.executable}; install the package (make setup)")
    return str(exe)


def write_recording(path: Path, data: Path, minutes: float, words: list[Path]) -> list[float]:
    """``minutes`` of the dataset's white and pink noise (their validation parts, looped, -40 dBFS RMS)
    with the real ``words`` spread evenly through it; written a minute at a time. Returns where each
    word starts, in seconds."""
    import soundfile as sf

    from data_prep.audio import load_audio

    recordings = [load_audio(p) for p in sorted((data / "_background_noise_").glob("*_noise.flac"))]
    noise = np.concatenate([x[int(0.8 * len(x)) : int(0.9 * len(x))] for x in recordings])
    noise = (noise / np.sqrt(np.mean(noise**2)) * 0.01).astype(np.float32)
    clips = [load_audio(w) for w in words]
    total = int(minutes * 60 * 16000)
    starts = [int(total * (i + 1) / (len(clips) + 1)) for i in range(len(clips))]
    with sf.SoundFile(str(path), "w", 16000, 1, "PCM_16") as out:
        for start in range(0, total, 60 * 16000):
            block = np.resize(np.roll(noise, -start % len(noise)), min(60 * 16000, total - start)).copy()
            for at, clip in zip(starts, clips, strict=True):
                if start <= at < start + len(block):
                    block[at - start : at - start + len(clip)] += clip[: len(block) - (at - start)]
            out.write(np.clip(block, -1, 1))
    return [s / 16000 for s in starts]


# --- children (fresh processes) --------------------------------------------------------------
def child_latency(model: Path, backend: str, clip: Path, calls: int, warmup: int, files: list[Path]) -> dict:
    from data_prep.audio import fix_length, load_audio
    from data_prep.features import mfcc
    from speechrnn.recognizer import Recognizer
    from speechrnn.streaming import StreamConfig

    t0 = time.perf_counter()
    rec = Recognizer(model, backend)
    out: dict = {"load_s": r(time.perf_counter() - t0)}
    wave = fix_length(load_audio(clip, rec.features.sample_rate), rec.features.clip_samples)
    feats = mfcc(wave, rec.features)[None]

    def timed_calls(call) -> dict:
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            call()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return {**summary_ms(times), "first_call_ms": r(first * 1000, 1)}

    xla = backend == "tf"  # what listen calls: the compiled signature on the SavedModel
    out["mfcc_in"] = timed_calls(lambda: rec.probabilities_from_mfcc(feats, xla=xla))
    # The streaming detector's own feature work per hop: MFCC of the frames the new audio completes.
    hop_frames = round(StreamConfig().hop_ms / rec.features.hop_ms)
    hop_samples = (hop_frames - 1) * rec.features.hop_samples + rec.features.window_samples
    out["mfcc_of_one_hop"] = timed_calls(lambda: mfcc(wave[:hop_samples], rec.features))
    out["waveform_in"] = timed_calls(lambda: rec.probabilities(wave[None]))
    if files:
        rec.classify_files(files[:64])
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            rec.classify_files(files)
            runs.append(time.perf_counter() - t0)
        out["classify_files_in_process"] = {"files": len(files), "files_per_s": r(len(files) / min(runs), 1)}
    return out


def child_accuracy(model: Path, backend: str, data: Path, save: Path) -> dict:
    """The unseen clips' predicted labels (saved to ``save``) and the truth, as evaluate reads them."""
    from data_prep.dataset import TaskConfig
    from data_prep.extract import WaveformLoader
    from speechrnn.evaluate import evaluation_examples
    from speechrnn.recognizer import Recognizer

    rec = Recognizer(model, backend)
    task = TaskConfig.from_dict(rec.meta["task"]) if "task" in rec.meta else TaskConfig()
    examples = evaluation_examples(data, rec.labels, task, "unseen")
    waves, kept, _ = WaveformLoader(rec.features).load_many(examples)
    predicted = rec.probabilities(waves).argmax(1)
    truth = np.array([rec.labels.index(examples[i].label) for i in kept])
    np.save(save, np.stack([truth, predicted]))
    return {"clips": len(kept)}


def run_child(args: argparse.Namespace, mode: str, backend: str, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--backend-child", backend, "--model", str(args.model),
           "--data", str(args.data), "--calls", str(args.calls), "--warmup", str(args.warmup), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"child {mode} ({backend}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- subprocess timings ----------------------------------------------------------------------
def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - start, proc


def classify_cmd(model: Path, backend: str, files: list[Path], as_json: bool) -> list[str]:
    return [speechrnn_exe(), "classify", str(model), *map(str, files), "--backend", backend,
            *(["--json"] if as_json else [])]


def cli_runs(model: Path, backends: list[str], files: list[Path], runs: int) -> dict:
    """One-file and N-file classify runs of every backend and a bare TensorFlow import, alternated."""
    import_tf = [sys.executable, "-c", "import tensorflow"]
    timed(import_tf)  # untimed warm-ups: the libraries into the page cache
    for backend in backends:
        timed(classify_cmd(model, backend, files[:1], True))
    walls: dict = {"import_tensorflow": [], **{b: {"one": [], "many": []} for b in backends}}
    for i in range(runs):
        walls["import_tensorflow"].append(timed(import_tf)[0])
        for backend in backends:
            for key, chosen in (("one", files[:1]), ("many", files)):
                wall, proc = timed(classify_cmd(model, backend, chosen, key == "many"))
                if proc.returncode or (key == "many" and len(proc.stdout.splitlines()) != len(chosen)):
                    sys.exit(f"classify ({backend}, {len(chosen)} files) failed (exit {proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
                walls[backend][key].append(wall)
        info(f"run {i + 1}/{runs}: import tensorflow {walls['import_tensorflow'][-1]:.2f} s; " + "; ".join(
            f"{b}: 1 file {walls[b]['one'][-1]:.2f} s, {len(files)} files {walls[b]['many'][-1]:.2f} s"
            for b in backends))
    return walls


def measured(cmd: list[str], sample_every: float = 0.5) -> dict:
    """Wall time, CPU time and peak RSS (wait4, this child alone), RSS sampled meanwhile, and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample():
            status = Path(f"/proc/{proc.pid}/status")
            while not done.wait(sample_every):
                try:
                    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
                except (OSError, StopIteration):
                    continue
                samples.append((time.perf_counter() - start, int(line.split()[1]) / 1024))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": r(wall, 2), "cpu_s": r(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_mb": r(usage.ru_maxrss / 1024, 1), "exit": proc.returncode, "rss_samples": samples,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def long_runs(model: Path, backends: list[str], data: Path, minutes: float, verb: str) -> dict:
    """`listen --input` (or `classify`) of one minute and of ``minutes`` of noise with words in it."""
    words = [data / w / sorted(p.name for p in (data / w).iterdir())[0] for w in ("yes", "stop", "left")]
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        files = {}
        for name, length in (("one_minute", 1.0), ("long", minutes)):
            files[name] = (Path(tmp) / f"{name}.wav", length)
            starts = write_recording(files[name][0], data, length, words)
            info(f"wrote {length:g} min ({files[name][0].stat().st_size / 1e6:.0f} MB), words at "
                 + ", ".join(f"{s:.0f} s" for s in starts))
        for backend in backends:
            runs = {}
            for name, (path, length) in files.items():
                cmd = ([speechrnn_exe(), "listen", str(model), "--input", str(path), "--json", "--backend", backend]
                       if verb == "listen" else classify_cmd(model, backend, [path], True))
                run = measured(cmd)
                if run["exit"]:
                    sys.exit(f"{verb} of {length:g} min ({backend}) failed (exit {run['exit']}):\n{run['stderr'][-3000:]}")
                rss = [mb for _, mb in run["rss_samples"]]
                runs[name] = {"minutes": length, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                              "peak_rss_mb": run["peak_rss_mb"],
                              "rss_quarter_in_mb": r(rss[len(rss) // 4], 1) if rss else None,
                              "rss_last_sample_mb": r(rss[-1], 1) if rss else None,
                              "answers": [json.loads(x) for x in run["stdout"].splitlines() if x.strip()]}
                info(f"{verb} {backend} {length:g} min: {json.dumps({k: v for k, v in runs[name].items() if k != 'answers'})}")
            long, short = runs["long"], runs["one_minute"]
            audio_s = (long["minutes"] - short["minutes"]) * 60
            out[backend] = {**runs, "peak_rss_ratio_long_to_one_minute": r(long["peak_rss_mb"] / short["peak_rss_mb"]),
                            "rss_growth_mb": r(long["rss_last_sample_mb"] - long["rss_quarter_in_mb"], 1)
                            if long["rss_quarter_in_mb"] is not None else None,
                            "cpu_percent_of_one_core": r(100 * (long["cpu_s"] - short["cpu_s"]) / audio_s, 2)
                            if audio_s > 0 else None}
    return out


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Speech Commands folder (real clips)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every one the model offers)")
    parser.add_argument("--files", type=int, default=1000, help="files per classify throughput run")
    parser.add_argument("--calls", type=int, default=500, help="timed batch-1 calls")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls after the first")
    parser.add_argument("--runs", type=int, default=5, help="alternated runs of each CLI timing (median)")
    parser.add_argument("--listen-minutes", type=float, default=60.0, help="length of the listen --input recording (0: skip)")
    parser.add_argument("--long-minutes", type=float, default=0.0, help="length of a recording to classify (0: skip)")
    parser.add_argument("--skip-accuracy", action="store_true", help="leave out the accuracy on the unseen clips")
    parser.add_argument("--quick", action="store_true",
                        help="a check that the script works: 50 files, 1 run, 100 calls, a 2-minute listen")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--backend-child", help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files-list", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model, args.data = args.model.resolve(), args.data.resolve()
    if args.child == "latency":
        files = [Path(x) for x in args.files_list.read_text().splitlines()] if args.files_list else []
        print(json.dumps(child_latency(args.model, args.backend_child, args.clip, args.calls, args.warmup, files)))
        return
    if args.child == "accuracy":
        print(json.dumps(child_accuracy(args.model, args.backend_child, args.data, args.save)))
        return
    if args.quick:
        args.files, args.runs, args.calls, args.warmup = 50, 1, 100, 10
        args.listen_minutes = min(args.listen_minutes, 2.0)

    from speechrnn.export_format import available_backends, read_metadata  # no TensorFlow

    meta = read_metadata(args.model)
    offered = available_backends(meta)
    backends = args.backends.split(",") if args.backends else offered
    missing = [b for b in backends if b not in offered]
    if missing:
        sys.exit(f"{args.model} has no {', '.join(missing)} backend; it offers {', '.join(offered)}")
    files = pick_files(args.data, args.files)
    load_before = os.getloadavg()
    info(f"model {args.model} ({', '.join(backends)}); {len(files)} files from {args.data}; load average {load_before}")
    report: dict = {
        "model": str(args.model), "model_name": meta.get("model", {}).get("name"),
        "parameters": meta.get("model", {}).get("parameters"), "backends": backends, "data": str(args.data),
        "targets": TARGETS,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [r(x, 2) for x in load_before]},
    }

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("\n".join(map(str, files)) + "\n")
        latency = {b: run_child(args, "latency", b, ["--clip", str(files[0]), "--files-list", str(listing)])
                   for b in backends}
        for b in backends:
            info(f"latency {b}: {json.dumps(latency[b]['mfcc_in'])}")
        report["latency_batch1"] = {
            b: {**latency[b], "meets_target": latency[b]["mfcc_in"]["median_ms"] <= TARGETS["batch1_ms"]}
            for b in backends}
        report["latency_batch1"]["note"] = (
            f"one 1 s clip ({files[0].name}): mfcc_in = Recognizer.probabilities_from_mfcc (what listen calls each "
            f"hop; xla for tf), {args.calls} timed calls after the first and {args.warmup} warm-up calls; "
            "mfcc_of_one_hop = data_prep.features.mfcc of the frames one 200 ms hop completes; waveform_in = "
            "Recognizer.probabilities of the clip (MFCC included)")

        if not args.skip_accuracy:
            predictions = {}
            for b in backends:
                save = Path(tmp) / f"{b}.npy"
                run_child(args, "accuracy", b, ["--save", str(save)])
                predictions[b] = np.load(save)
            reference = "tf" if "tf" in predictions else backends[0]
            accuracy = {}
            for b, (truth, predicted) in predictions.items():
                accuracy[b] = {"clips": len(truth), "accuracy": r(np.mean(predicted == truth), 5),
                               "labels_unlike_" + reference: int(np.sum(predicted != predictions[reference][1]))}
            if "tf" in accuracy:
                for b in accuracy:
                    points = 100 * (accuracy[b]["accuracy"] - accuracy["tf"]["accuracy"])
                    accuracy[b]["points_from_tf"] = r(points, 3)
                    accuracy[b]["meets_target"] = (points == 0 if b == "litert" else
                                                   abs(points) <= TARGETS["int8_accuracy_points"])
            report["accuracy"] = {**accuracy, "note": "the model's unseen clips of --data (evaluate --split unseen): "
                                  "validation, testing and held-out speakers"}
            info(f"accuracy: {json.dumps(accuracy)}")

    walls = cli_runs(args.model, backends, files, args.runs)
    import_tf_s = statistics.median(walls["import_tensorflow"])
    report["import_tensorflow_s"] = {"median_s": r(import_tf_s, 2), "runs_s": [r(w, 2) for w in walls["import_tensorflow"]]}
    report["cli_one_file"], report["cli_throughput"] = {}, {}
    for b in backends:
        one, many = statistics.median(walls[b]["one"]), statistics.median(walls[b]["many"])
        report["cli_one_file"][b] = {
            "median_s": r(one, 2), "runs_s": [r(w, 2) for w in walls[b]["one"]], "vs_import_tensorflow": r(one / import_tf_s),
            "meets_target": one <= TARGETS["cli_one_file_s"] and one / import_tf_s <= TARGETS["cli_one_file_vs_import_tf"]}
        report["cli_throughput"][b] = {
            "files": len(files), "wall_s": r(many, 2), "runs_s": [r(w, 2) for w in walls[b]["many"]],
            "files_per_s": r(len(files) / many, 1), "in_process": latency[b].get("classify_files_in_process"),
            "meets_target": len(files) / many >= TARGETS["cli_files_per_s"]}
    report["cli_one_file"]["note"] = ("wall times with start-up, median of --runs; each run alternates a bare "
                                      "`python -c 'import tensorflow'` and every backend's one-file and N-file runs")

    if args.listen_minutes > 0:
        listen = long_runs(args.model, backends, args.data, args.listen_minutes, "listen")
        for row in listen.values():
            row["meets_target"] = (row["long"]["peak_rss_mb"] <= TARGETS["listen_peak_rss_mb"]
                                   and (row["rss_growth_mb"] or 0) <= 5.0
                                   and (row["cpu_percent_of_one_core"] or 0) <= TARGETS["listen_cpu_percent"])
        report["listen_long"] = {**listen, "note": (
            "`speechrnn listen MODEL --input REC --json --backend B` as fast as it goes, default hop (200 ms); peak RSS "
            "from wait4; rss_growth_mb: the last RSS sample minus the one a quarter into the run (sampled every 0.5 s); "
            "cpu_percent_of_one_core: (CPU s of the long run - CPU s of the one-minute run) / (seconds of audio between "
            "them) x 100, i.e. the share of one core listening in real time takes, start-up excluded; no-growth "
            "target taken as <= 5 MB")}
    if args.long_minutes > 0:
        report["long_classify"] = long_runs(args.model, backends, args.data, args.long_minutes, "classify")
    report["machine"]["load_average_after"] = [r(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
