"""Benchmark: inference latency and CLI throughput of an exported model (prints one JSON object).

    .venv/bin/python bench/inference.py [--model DIR (models/default)] [--data DIR]

Figures (targets beside them: batch-1 <= 5 ms, >= 300 files/s through the CLI, one file <= 4 s):
  latency_batch1 batch-1, one 1 s clip, through the SavedModel loaded with plain
                 ``tf.saved_model.load``: its signatures serving_default (plain graph),
                 and from its xla/ sub-export waveform_xla and mfcc_xla (what the streaming loop calls); after warm-up,
                 each call timed on its own including ``.numpy()`` of the probabilities.
  cli_throughput ``speechrnn classify MODEL f1 ... fN --json`` on N real files, one process.
  cli_one_file   ``speechrnn classify MODEL FILE`` wall time, start-up included; and a bare
                 ``python -c "import tensorflow"`` for context.
  long_recording ``speechrnn classify MODEL FILE`` of one hour (--long-minutes) of real background
                 noise with real words in it: wall time, peak RSS of the process (beside a
                 one-minute file's, to show memory does not grow with length) and the answer.
  startup_profile  only when the one-file run misses its target (or --profile always): where a
                 one-file run's time goes (phases timed in a fresh process, -X importtime, cProfile).

Every measurement runs in a fresh subprocess (this script re-run with ``--child MODE``), so the
parent never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
TARGETS = {"batch1_ms": 5.0, "cli_files_per_s": 300.0, "cli_one_file_s": 4.0}


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def summary_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "median_ms": r(np.median(ms)),
        "p90_ms": r(np.percentile(ms, 90)),
        "mean_ms": r(ms.mean()),
        "min_ms": r(ms.min()),
        "calls": len(ms),
    }


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


# --- children (fresh processes) --------------------------------------------------------------
def child_latency(model: Path, clip: Path, calls: int, warmup: int, files: list[Path]) -> dict:
    """Batch-1 latency of each signature of the loaded SavedModel, and via Recognizer for comparison."""
    sys.path.insert(0, str(REPO))
    from data_prep.audio import load_audio
    from data_prep.features import FeatureConfig, mfcc
    from speechrnn.recognizer import Recognizer, read_metadata
    from speechrnn.tfutil import import_tf

    tf = import_tf()
    features = FeatureConfig.from_dict(read_metadata(model)["features"])
    wave = load_audio(clip, features.sample_rate)
    wave = np.pad(wave, (0, max(0, features.clip_samples - len(wave))))[: features.clip_samples][None]
    feats = mfcc(wave[0], features)[None]
    t0 = time.perf_counter()
    loaded = tf.saved_model.load(str(model))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded_xla = tf.saved_model.load(str(model / "xla"))  # the XLA signatures' sub-export
    out: dict = {
        "load_s": r(load_s),
        "load_xla_s": r(time.perf_counter() - t0),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "input": {"clip": str(clip), "waveform": list(wave.shape), "mfcc": list(feats.shape)},
    }
    inputs = {
        "serving_default": ("waveform", tf.constant(wave)),
        "waveform_xla": ("waveform", tf.constant(wave)),
        "mfcc_xla": ("mfcc", tf.constant(feats)),
        "mfcc": ("mfcc", tf.constant(feats)),
    }
    results, probs = {}, {}
    for name, (arg, x) in inputs.items():
        fn = (loaded_xla if name.endswith("_xla") else loaded).signatures[name]
        t0 = time.perf_counter()
        probs[name] = fn(**{arg: x})["probabilities"].numpy()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fn(**{arg: x})["probabilities"].numpy()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(**{arg: x})["probabilities"].numpy()
            times.append(time.perf_counter() - t0)
        results[name] = {**summary_ms(times), "first_call_ms": r(first * 1000, 1)}
    ref = probs["serving_default"]
    out["max_abs_diff_vs_serving_default"] = {k: float(np.abs(v - ref).max()) for k, v in probs.items()}
    out["signatures"] = results
    # The same through the product's Recognizer (numpy in, numpy out): what the CLI/streaming pay.
    rec = Recognizer(model)
    via = {}
    for name, call in {
        "probabilities(xla=False)": lambda: rec.probabilities(wave),
        "probabilities(xla=True)": lambda: rec.probabilities(wave, xla=True),
        "probabilities_from_mfcc(xla=True)": lambda: rec.probabilities_from_mfcc(feats, xla=True),
    }.items():
        for _ in range(warmup + 1):
            call()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        via[name] = summary_ms(times)
    out["via_recognizer"] = via
    if files:  # the CLI's work without its start-up: decode + batched plain-graph inference
        rec.classify_files(files[:64])  # first call at batch 64
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            rec.classify_files(files)
            runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for path in files:
            load_audio(path, features.sample_rate)
        decode = time.perf_counter() - t0
        out["classify_files_in_process"] = {
            "files": len(files),
            "runs_s": [r(x) for x in runs],
            "files_per_s": r(len(files) / min(runs), 1),
            "decode_only_s": r(decode),
        }
    return out


def child_phases(model: Path, clip: Path) -> dict:
    """The steps of `speechrnn classify MODEL FILE`, timed one by one with the same library calls."""
    wall_start, t_start = time.time(), time.perf_counter()
    sys.path.insert(0, str(REPO))
    marks: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        marks[name] = r(now - since)
        return now

    import speechrnn.cli  # noqa: F401 - click, logging, the project's error type

    t = mark("import_speechrnn_cli", t_start)
    import speechrnn.recognizer  # noqa: F401 - numpy, soundfile, soxr, data_prep

    t = mark("import_speechrnn_recognizer", t)
    from speechrnn.tfutil import import_tf

    import_tf()
    t = mark("import_tensorflow", t)
    from speechrnn.recognizer import Recognizer, read_metadata

    read_metadata(model)
    t = mark("read_metadata", t)
    rec = Recognizer(model)  # TF already imported: this is tf.saved_model.load + signatures
    t = mark("saved_model_load", t)
    rec.classify_files([clip])
    t = mark("classify_first_call", t)
    rec.classify_files([clip])
    mark("classify_second_call", t)
    marks["in_process_total"] = r(time.perf_counter() - t_start)
    marks["wall_start"], marks["wall_end"] = wall_start, time.time()
    return marks


def run_child(mode: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--model",
        str(args.model),
        "--data",
        str(args.data),
        "--calls",
        str(args.calls),
        "--warmup",
        str(args.warmup),
        *(extra or []),
    ]
    spawned = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    exited = time.time()
    if proc.returncode:
        sys.exit(f"child {mode} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = r(exited - spawned)
    if "wall_start" in result:  # wall clock is shared between processes; perf_counter is not
        result["before_first_line_s"] = r(result.pop("wall_start") - spawned)
        result["after_last_line_s"] = r(exited - result.pop("wall_end"))
    return result


# --- subprocess timings ----------------------------------------------------------------------
def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - start, proc


def classify_cmd(model: Path, files: list[Path], as_json: bool) -> list[str]:
    return [speechrnn_exe(), "classify", str(model), *map(str, files), *(["--json"] if as_json else [])]


def expected_label(path: Path, labels: list[str]) -> str:
    return path.parent.name if path.parent.name in labels else "_unknown_"


def check_classify(proc: subprocess.CompletedProcess, n: int) -> list[dict]:
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x]
    if proc.returncode or len(lines) != n or errors:
        sys.exit(
            f"classify failed (exit {proc.returncode}, {len(lines)} results, {len(errors)} errors):\n"
            f"{proc.stderr[-3000:]}"
        )
    return lines


def cli_runs(model: Path, files: list[Path], runs: int, labels: list[str]) -> tuple[dict, dict]:
    """One-file and N-file CLI runs, alternated so both see the same (noisy) machine."""
    timed(classify_cmd(model, files[:1], as_json=True))  # untimed warm-up: TF's libraries into the page cache
    one, many, agree = [], [], 0.0
    for i in range(runs):
        wall, proc = timed(classify_cmd(model, files[:1], as_json=False))
        if proc.returncode:
            sys.exit(f"classify one file failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        one.append(wall)
        wall, proc = timed(classify_cmd(model, files, as_json=True))
        lines = check_classify(proc, len(files))
        agree = float(np.mean([x["label"] == expected_label(Path(x["path"]), labels) for x in lines]))
        many.append(wall)
        info(f"run {i + 1}/{runs}: classify 1 file {one[-1]:.2f} s, {len(files)} files {wall:.2f} s")
    return (
        {"median_s": r(statistics.median(one), 2), "runs_s": [r(w, 2) for w in one]},
        {
            "files": len(files),
            "runs_s": [r(w, 2) for w in many],
            "wall_s": r(statistics.median(many), 2),
            "label_agreement": r(agree),
        },
    )


def median_wall(cmd: list[str], runs: int, what: str) -> dict:
    timed(cmd)  # untimed warm-up
    walls = []
    for i in range(runs):
        wall, proc = timed(cmd)
        if proc.returncode:
            sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        walls.append(wall)
        info(f"{what}, run {i + 1}/{runs}: {wall:.2f} s")
    return {"median_s": r(statistics.median(walls), 2), "runs_s": [r(w, 2) for w in walls]}


# --- a long recording -----------------------------------------------------------------------
def write_long_recording(path: Path, data: Path, minutes: float, word: Path) -> float:
    """``minutes`` of the dataset's white and pink noise (their validation parts, looped, -40 dBFS RMS) with
    ``word`` (a real clip) once, two thirds in; written block by block (the bench holds one minute).
    Returns where the word starts, in seconds."""
    import soundfile as sf

    sys.path.insert(0, str(REPO))
    from data_prep.audio import load_audio

    recordings = [load_audio(p) for p in sorted((data / "_background_noise_").glob("*_noise.flac"))]
    noise = np.concatenate([x[int(0.8 * len(x)) : int(0.9 * len(x))] for x in recordings])  # the validation parts
    noise = (noise / np.sqrt(np.mean(noise**2)) * 0.01).astype(np.float32)
    clip = load_audio(word)
    total, at = int(minutes * 60 * 16000), int(minutes * 60 * 16000 * 2 / 3)
    with sf.SoundFile(str(path), "w", 16000, 1, "PCM_16") as out:
        for start in range(0, total, 60 * 16000):
            block = np.resize(np.roll(noise, -start % len(noise)), min(60 * 16000, total - start)).copy()
            if start <= at < start + len(block):
                block[at - start : at - start + len(clip)] += clip[: len(block) - (at - start)]
            out.write(np.clip(block, -1, 1))
    return at / 16000


def measured(cmd: list[str]) -> dict:
    """Wall time, peak resident memory (this child alone, from wait4) and output of a command."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": r(wall, 2), "peak_rss_mb": r(usage.ru_maxrss / 1024, 1), "exit": proc.returncode,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def long_recording(model: Path, data: Path, minutes: float) -> dict:
    word = data / "yes" / sorted(p.name for p in (data / "yes").iterdir())[0]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        runs = {}
        for name, length in (("one_minute", 1.0), ("long", minutes)):
            path = Path(tmp) / f"{name}.wav"
            at = write_long_recording(path, data, length, word)
            info(f"classify {length:g} min of audio ({path.stat().st_size / 1e6:.0f} MB)")
            run = measured(classify_cmd(model, [path], as_json=True))
            if run["exit"]:
                sys.exit(f"classify of {length:g} min failed (exit {run['exit']}):\n{run['stderr'][-3000:]}")
            answer = json.loads(run["stdout"].splitlines()[-1])
            runs[name] = {"minutes": length, "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
                          "label": answer["label"], "score": answer["score"], "word": f"yes at {at:.1f} s"}
            info(f"  {json.dumps(runs[name])}")
    return {**runs, "rss_ratio_long_to_one_minute": r(runs["long"]["peak_rss_mb"] / runs["one_minute"]["peak_rss_mb"]),
            "note": "`speechrnn classify MODEL FILE --json`, one process each, start-up included; peak RSS from "
            "wait4 (ru_maxrss) of that process; the audio: the validation parts of the white and pink noise "
            "recordings, looped, at -40 dBFS RMS, with one real 'yes' two thirds in"}


# --- start-up profile ------------------------------------------------------------------------
def parse_importtime(stderr: str) -> list[dict]:
    """``-X importtime`` lines -> a tree of {name, self_s, cumulative_s, children} (roots in order).

    Children are printed before their parent, one indent level (2 spaces) deeper.
    """
    pending: dict[int, list[dict]] = {}
    roots: list[dict] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        head, cum_us, name = line.split("|", 2)
        self_us = head.split(":", 1)[1]
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        node = {
            "name": name.strip(),
            "self_s": int(self_us) / 1e6,
            "cumulative_s": int(cum_us) / 1e6,
            "children": pending.pop(depth + 1, []),
        }
        if depth == 0:
            roots.append(node)
        else:
            pending.setdefault(depth, []).append(node)
    return roots


def top_imports(roots: list[dict], n: int = 4, children: int = 5) -> list[dict]:
    out = []
    for node in sorted(roots, key=lambda x: -x["cumulative_s"])[:n]:
        kids = sorted(node["children"], key=lambda x: -x["cumulative_s"])[:children]
        out.append(
            {
                "module": node["name"],
                "cumulative_s": r(node["cumulative_s"]),
                "largest_children": {k["name"]: r(k["cumulative_s"]) for k in kids},
            }
        )
    return out


# (label, file path suffix, function name) picked out of the cProfile of one CLI run
PROFILE_POINTS = [
    ("whole CLI run (speechrnn.cli as __main__)", "speechrnn/cli.py", "<module>"),
    ("speechrnn.recognizer module import", "speechrnn/recognizer.py", "<module>"),
    ("import_tf (import tensorflow)", "speechrnn/tfutil.py", "import_tf"),
    ("Recognizer.__init__ (import_tf + saved_model.load)", "speechrnn/recognizer.py", "__init__"),
    ("tf.saved_model.load", "tensorflow/python/saved_model/load.py", "load"),
    ("classify_files", "speechrnn/recognizer.py", "classify_files"),
    ("load_audio", "data_prep/audio.py", "load_audio"),
    ("Recognizer._batched (signature call)", "speechrnn/recognizer.py", "_batched"),
]


def cprofile_points(prof_path: str) -> dict:
    stats = pstats.Stats(prof_path)
    out: dict = {"total_s": r(stats.total_tt)}
    raw = stats.stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    for label, suffix, func in PROFILE_POINTS:
        hits = [v[3] for (file, _, name), v in raw.items() if file.endswith(suffix) and name == func]
        if hits:
            out[label] = r(max(hits))
    return out


def startup_profile(model: Path, clip: Path, args: argparse.Namespace) -> dict:
    python_startup = median_wall([sys.executable, "-c", "pass"], 3, "python -c pass")["median_s"]
    phases = run_child("phases", args, ["--clip", str(clip)])
    info(f"phases: {json.dumps(phases)}")
    fast = run_child("phases-fast-exit", args, ["--clip", str(clip)])
    info(f"phases, ending with os._exit: {json.dumps(fast)}")
    # -X importtime: TensorFlow is imported up front because the CLI imports it with fd 2 pointed
    # at /dev/null (speechrnn.tfutil), which would swallow its importtime lines.
    argv = ["speechrnn", "classify", str(model), str(clip)]
    code = f"import tensorflow, sys; sys.argv = {argv!r}; from speechrnn.cli import main; main()"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=REPO)
    roots = parse_importtime(proc.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        prof = os.path.join(tmp, "classify.prof")
        # The CLI ends with os._exit (no TensorFlow teardown), which would end the process before
        # cProfile writes its file: here it becomes sys.exit, which cProfile.run catches.
        profiled = (
            f"import cProfile, os, runpy, sys; sys.argv = ['speechrnn', 'classify', {str(model)!r}, {str(clip)!r}]; "
            "os._exit = sys.exit; "
            f"cProfile.run('runpy.run_module(\"speechrnn.cli\", run_name=\"__main__\")', {prof!r})"
        )
        subprocess.run([sys.executable, "-c", profiled], capture_output=True, text=True, cwd=REPO, check=True)
        points = cprofile_points(prof)
    return {
        "python_startup_s": python_startup,
        "phases_s": phases,
        "phases_ending_with_os_exit_s": {
            k: fast[k] for k in ("in_process_total", "after_last_line_s", "process_wall_s")
        },
        "importtime": {"total_imports_s": r(sum(x["cumulative_s"] for x in roots)), "largest": top_imports(roots)},
        "cprofile_cumulative_s": points,
        "note": "phases_s: a fresh process doing the CLI's steps one by one; before_first_line_s = interpreter "
        "start-up + this script's own imports, after_last_line_s = output + interpreter teardown (TensorFlow's "
        "atexit handlers and module/thread clean-up); phases_ending_with_os_exit_s: the same run ending with "
        "os._exit(0) after flushing; importtime/cProfile add their own overhead, so read them as shares",
    }


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported model folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Speech Commands folder (real clips)")
    parser.add_argument("--files", type=int, default=1000, help="files per CLI throughput run")
    parser.add_argument("--calls", type=int, default=200, help="timed batch-1 calls per signature")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per signature after the first")
    parser.add_argument("--runs", type=int, default=3, help="runs of each CLI / import timing (median)")
    parser.add_argument("--long-minutes", type=float, default=60.0,
                        help="length of the long recording classified (0: skip it)")
    parser.add_argument("--only-long", action="store_true", help="measure the long recording only")
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="profile a one-file CLI run: auto = only when it misses its target",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files-list", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model, args.data = args.model.resolve(), args.data.resolve()
    if args.child:
        clip = args.clip or pick_files(args.data, 1)[0]
        if args.child == "latency":
            files = [Path(x) for x in args.files_list.read_text().splitlines()] if args.files_list else []
            print(json.dumps(child_latency(args.model, clip, args.calls, args.warmup, files)))
            return
        print(json.dumps(child_phases(args.model, clip)), flush=True)
        if args.child == "phases-fast-exit":  # what `os._exit` after the output would save the CLI
            sys.stderr.flush()
            os._exit(0)
        return

    meta_path = args.model / "assets" / "speechrnn.json"
    if not meta_path.exists():
        sys.exit(f"{args.model} is not a speechrnn export (no {meta_path.name}); pass --model DIR")
    meta = json.loads(meta_path.read_text())
    if args.only_long:
        print(json.dumps({"model": str(args.model), "load_average_before": [r(x, 2) for x in os.getloadavg()],
                          "long_recording": long_recording(args.model, args.data, args.long_minutes)}, indent=2))
        return
    files = pick_files(args.data, args.files)
    clip = files[0]
    load_before = os.getloadavg()
    info(f"model {args.model}; {len(files)} files from {args.data}; load average {load_before}")

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("\n".join(map(str, files)) + "\n")
        latency = run_child("latency", args, ["--clip", str(clip), "--files-list", str(listing)])
    info(f"latency: {json.dumps(latency['signatures'])}")
    info(f"classify_files in process: {json.dumps(latency['classify_files_in_process'])}")
    import_tf_wall = median_wall(
        [sys.executable, "-c", "import tensorflow"], args.runs, "python -c 'import tensorflow'"
    )
    one_file, throughput = cli_runs(args.model, files, args.runs, meta["labels"])
    startup = one_file["median_s"]
    wall = throughput["wall_s"]
    work = wall - startup

    sig = latency["signatures"]
    report: dict = {
        "model": str(args.model),
        "model_name": meta.get("model", {}).get("name"),
        "parameters": meta.get("model", {}).get("parameters"),
        "data": str(args.data),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": latency["tensorflow"],
            "load_average_before": [r(x, 2) for x in load_before],
            "load_average_after": [r(x, 2) for x in os.getloadavg()],
        },
        "latency_batch1": {
            "target_ms": TARGETS["batch1_ms"],
            **{
                name: {**sig[name], "meets_target": sig[name]["median_ms"] <= TARGETS["batch1_ms"]}
                for name in ("serving_default", "waveform_xla", "mfcc_xla", "mfcc")
            },
            "via_recognizer": latency["via_recognizer"],
            "saved_model_load_s": latency["load_s"],
            "max_abs_diff_vs_serving_default": latency["max_abs_diff_vs_serving_default"],
            "note": f"one 1 s clip ({clip.name}); {args.calls} timed calls after the first call and {args.warmup} "
            "warm-up calls; each call includes .numpy() of the probabilities; first_call_ms includes tracing/XLA "
            "compilation",
        },
        "cli_throughput": {
            **throughput,
            "files_per_s": r(throughput["files"] / wall, 1),
            "files_per_s_excluding_startup": r(throughput["files"] / work, 1) if work > 0.05 else None,
            "startup_s_subtracted": startup,
            "in_process": latency["classify_files_in_process"],
            "target_files_per_s": TARGETS["cli_files_per_s"],
            "meets_target": throughput["files"] / wall >= TARGETS["cli_files_per_s"],
            "note": "one `speechrnn classify MODEL f1..fN --json` process per run (median wall of runs, alternated "
            "with the one-file runs); 'excluding start-up' subtracts the one-file CLI median wall (start-up + one "
            "clip; null when machine noise exceeds the difference); in_process: Recognizer.classify_files on the "
            "same files in an already started process (2nd/3rd call), and decoding alone",
        },
        "cli_one_file": {
            **one_file,
            "target_s": TARGETS["cli_one_file_s"],
            "meets_target": startup <= TARGETS["cli_one_file_s"],
            "import_tensorflow_s": import_tf_wall,
            "note": "`speechrnn classify MODEL FILE` and `python -c 'import tensorflow'` walls (median), after one "
            "untimed warm-up run",
        },
    }
    if args.long_minutes > 0:
        report["long_recording"] = long_recording(args.model, args.data, args.long_minutes)
    if args.profile == "always" or (args.profile == "auto" and startup > TARGETS["cli_one_file_s"]):
        info("profiling a one-file CLI run")
        report["startup_profile"] = startup_profile(args.model, clip, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
