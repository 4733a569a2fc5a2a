"""Every figure a candidate default model is judged by, in one run (one JSON object on stdout).

- offline, on every real clip of both shared folders that no candidate trains on (validation
  speakers of speech_commands and speech_commands_extra, plus the held-out on/off speakers; every
  unknown word among them): accuracy, class-balanced accuracy, recall per class with 95% intervals,
  unknown recall per word;
- command streams (bench/streaming.py): six 6-minute streams in noise (seeds 0-5) and three over
  near-silence (seeds 0-2): recall, false alarms per hour (all / with no command spoken), latency;
- the no-command hour (bench/streaming.py --no-command-minutes 60): false alarms per hour of
  everyday talk in held-out sentences and voices.

    python bench/candidate.py MODEL [--skip-streams] [--skip-no-command] [--no-command-minutes 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "speech_commands"
EXTRA = SHARED.parent / "speech_commands_extra"


def run(cmd: list[str]) -> dict:
    print(f"[candidate] {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def offline(model: str) -> dict:
    report = run([sys.executable, "-m", "speechrnn.cli", "evaluate", model, str(SHARED), str(EXTRA), "--split", "unseen",
                  "--all-unknown", "--json"])
    per = report["per_class"]
    words = report.get("unknown_by_word", {})
    frequent = {w: m for w, m in words.items() if m["support"] >= 10}
    return {
        "accuracy": round(report["accuracy"], 4), "balanced_accuracy": round(report["balanced_accuracy"], 4),
        "examples": report["examples"],
        "recall": {k: [round(v["recall"], 3), v["support"]] for k, v in per.items() if v["support"]},
        "on_off_hits": {w: f"{round(per[w]['recall'] * per[w]['support'])}/{per[w]['support']}" for w in ("on", "off")},
        "unknown_recall_by_word": {w: [round(m["recall"], 3), m["support"]] for w, m in words.items()},
        "lowest_unknown_word_n10": min(frequent.items(), key=lambda kv: kv[1]["recall"])[0] if frequent else None,
        "confusion_off": dict(zip(report["labels"], report["confusion_matrix"][report["labels"].index("off")],
                                  strict=True)),
    }


def streams(model: str, args) -> dict:
    bench = [sys.executable, str(REPO / "bench" / "streaming.py"), "--model", model, "--no-cli-check"]
    out = {}
    noise = run([*bench, "--seeds", "0,1,2,3,4,5"])
    quiet = run([*bench, "--seeds", "0,1,2", "--noise-db=-70,-60"])
    for name, r in (("noise", noise), ("near_silence", quiet)):
        pooled = r["pooled"]
        out[name] = {k: pooled[k] for k in ("recall", "false_alarms_per_hour", "false_alarms_per_hour_no_command",
                                            "latency_median_ms", "per_label_counts", "false_alarms_by_label",
                                            "cpu_percent_one_core")}
        out[name]["commands_found"] = f"{pooled['counts']['matched']}/{pooled['counts']['command_words']}"
        out[name]["false_alarms"] = pooled["counts"]["false_alarms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--skip-no-command", action="store_true")
    parser.add_argument("--no-command-minutes", type=float, default=60.0)
    args = parser.parse_args()
    started = time.time()
    result = {"model": args.model, "offline": offline(args.model)}
    if not args.skip_streams:
        result["streams"] = streams(args.model, args)
    if not args.skip_no_command:
        talk = run([sys.executable, str(REPO / "bench" / "streaming.py"), "--model", args.model,
                    "--no-command-minutes", str(args.no_command_minutes)])
        result["no_command"] = {k: talk.get(k) for k in ("minutes", "sentences", "false_alarms",
                                                          "false_alarms_per_hour", "false_alarms_by_label",
                                                          "false_alarms_by_engine", "kokoro_voices")}
    result["seconds"] = round(time.time() - started)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
