"""Benchmark: featurising the shared Speech Commands data with data_prep (prints one JSON object).

Every figure comes from a fresh subprocess (this script re-run with ``--child MODE``), so import,
numba JIT and cache-loading costs are counted where they really occur.

    .venv/bin/python bench/features.py [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "speech_commands"


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def child(mode: str, data: Path, cache: str, workers: int) -> dict:
    """Runs inside the fresh process; times are measured from before data_prep is imported."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from data_prep.dataset import Example, SpeechCommands
    from data_prep.extract import featurize
    from data_prep.features import FeatureConfig, mfcc

    config = FeatureConfig()
    dataset = SpeechCommands.open(data)
    out: dict = {"open_s": time.perf_counter() - t0}
    if mode == "first":  # librosa's first MFCC call: numba loads (or compiles) its kernels here
        from data_prep.audio import load_audio

        wave = load_audio(dataset.clips[0].path, config.sample_rate)
        t1 = time.perf_counter()
        mfcc(wave, config)
        out["first_call_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        mfcc(wave, config)
        out["second_call_s"] = time.perf_counter() - t1
        return out
    examples = [Example(c.path, c.word, c.split, c.word, c.speaker) for c in dataset.clips]
    if mode == "workers":  # warm librosa first, so only the thread pool differs between runs
        mfcc(np.zeros(config.clip_samples, np.float32), config)
    t1 = time.perf_counter()
    kwargs = {"cache_dir": cache or None, "use_cache": bool(cache), "show_progress": False, "workers": workers}
    result = featurize(examples, config, **kwargs)
    t2 = time.perf_counter()
    import librosa

    out.update(
        {
            "featurize_s": t2 - t1,
            "total_s": t2 - t0,  # imports + dataset index + featurize, as a fresh CLI run would see
            "clips": len(result.examples),
            "errors": len(result.errors),
            "from_cache": result.from_cache,
            "shape": list(result.features.shape[1:]),
            "librosa": librosa.__version__,
        }
    )
    return out


def run_child(mode: str, data: Path, cache: str = "", workers: int = 2, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--cache", cache, "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode:
        sys.exit(f"child {mode} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    info(f"{mode} workers={workers} cache={cache or '-'}: {json.dumps(result)}")
    return result


def r2(x: float) -> float:
    return round(x, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if args.child:
        print(json.dumps(child(args.child, data, args.cache, args.workers)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        numba_cold = run_child("first", data, env={"NUMBA_CACHE_DIR": os.path.join(tmp, "numba")})
        run_child("first", data)  # fills the default numba cache if it lacks anything
        numba_warm = run_child("first", data)
        cold = run_child("featurize", data, cache=os.path.join(tmp, "cache"))
        cached = run_child("featurize", data, cache=os.path.join(tmp, "cache"))
        w1 = [run_child("workers", data, workers=1)["featurize_s"] for _ in range(2)]
        w2 = [run_child("workers", data, workers=2)["featurize_s"] for _ in range(2)]
    clips = cold["clips"]
    report = {
        "data": str(data),
        "clips": clips,
        "errors": cold["errors"],
        "frames_x_coefficients": cold["shape"],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "librosa": cold["librosa"],
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR") or "default (__pycache__ beside librosa)",
        "librosa_first_call_s": {
            "empty_numba_cache": r2(numba_cold["first_call_s"]),
            "warm_numba_cache": r2(numba_warm["first_call_s"]),
            "second_call_s": round(numba_warm["second_call_s"], 4),
        },
        "dataset_open_s": r2(cold["open_s"]),
        "cold_numba_cache": "warm",
        "cold_s": r2(cold["total_s"]),
        "cold_featurize_only_s": r2(cold["featurize_s"]),
        "cold_clips_per_s": round(clips / cold["total_s"]),
        "cached_s": r2(cached["total_s"]),
        "cached_featurize_only_s": r2(cached["featurize_s"]),
        "cached_from_cache": cached["from_cache"],
        "cached_clips_per_s": round(clips / cached["total_s"]),
        "workers_1_s": r2(min(w1)),
        "workers_2_s": r2(min(w2)),
        "workers_runs_s": {"1": [r2(x) for x in w1], "2": [r2(x) for x in w2]},
        "note": "*_s = fresh process: imports + dataset index + featurize; workers_* = featurize only, "
        "no feature cache, librosa warmed first; best of 2",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
