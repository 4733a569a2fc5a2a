"""Synthesis speed: clips per second of `speechrnn data synth` for each engine (target for Kokoro:
>= 1.5 clips/s on this 2-core machine), wall time with start-up (worker processes loading the
model), and seconds of Kokoro CPU per second of speech for sentences.

    python bench/synth.py [--clips 120] [--workers 2] [--engines kokoro,espeak]

Prints one JSON object. Run it on an otherwise idle machine: synthesis uses every worker's core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.dataset import COMMANDS  # noqa: E402
from data_prep.sentences import no_command_sentences  # noqa: E402
from data_prep.synth import synthesize_dataset, synthesize_sentences  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=120, help="clips per engine (spread over the ten commands)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", default="kokoro,espeak")
    parser.add_argument("--sentences", type=int, default=12, help="Kokoro sentences for the CPU-per-second figure")
    args = parser.parse_args()
    per_word = max(1, args.clips // len(COMMANDS))
    out = {"cores": os.cpu_count(), "workers": args.workers, "clips_per_engine": per_word * len(COMMANDS)}
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        for engine in args.engines.split(","):
            cpu0, t0 = children_cpu(), time.perf_counter()
            summary = synthesize_dataset(Path(tmp) / engine, list(COMMANDS), per_word, seed=5, engine=engine,
                                         workers=args.workers, show_progress=False)
            wall = time.perf_counter() - t0
            out[engine] = {"clips": summary["clips"], "seconds": round(wall, 2),
                           "clips_per_second": round(summary["clips"] / wall, 2),
                           "worker_cpu_seconds": round(children_cpu() - cpu0, 1)}
            print(f"[bench] {engine}: {out[engine]}", file=sys.stderr, flush=True)
        if "kokoro" in args.engines and args.sentences:
            cpu0, t0 = children_cpu(), time.perf_counter()
            summary = synthesize_sentences(Path(tmp) / "talk", no_command_sentences(args.sentences, 3), "kokoro",
                                           seed=3, workers=args.workers, show_progress=False)
            wall = time.perf_counter() - t0
            cpu = children_cpu() - cpu0
            out["kokoro_sentences"] = {"sentences": summary["clips"], "speech_seconds": summary["audio_seconds"],
                                       "seconds": round(wall, 2),
                                       "cpu_seconds_per_speech_second": round(cpu / summary["audio_seconds"], 3),
                                       "speech_seconds_per_wall_second": round(summary["audio_seconds"] / wall, 2)}
    out["target_kokoro_clips_per_second_min"] = 1.5
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
