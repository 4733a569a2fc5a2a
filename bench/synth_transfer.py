"""How well does synthetic speech alone teach a word to recognise real people?

"on" and "off" have 21 real clips each in the shared folder, too few to compare synthesis
settings on. Here every real on/off clip is kept out of training (the recipe's holdout takes all
their training speakers), so the model learns on/off from espeak-ng speech only and is scored
on all 42 real clips (plus every other unseen class). Each row changes one thing:

  - spellings: the default synthesis ("off" also as "awf", "ahf"; "on" as "awn", "ahn";
    statement/command/question endings), with the recipe's room and microphone augmentation
  - plain: `data synth --plain` (one spelling, no endings), same augmentation
  - no room: spellings, without the reverb and tilt augmentation

    python bench/synth_transfer.py [--seeds 0] [--epochs 8] [--max-per-label 300]

Same budget, seed and splits for every row (2x BiGRU-64). Prints JSON rows and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, SHARED, cli  # noqa: E402

ROWS = {
    "spellings + endings (default synthesis), room/mic augmentation": ("spellings", True),
    "plain synthesis (one spelling, no endings), room/mic augmentation": ("plain", True),
    "spellings + endings, no room/mic augmentation": ("spellings", False),
}


def ensure_synth(cache: Path, kind: str, env: dict) -> list[str]:
    folders = []
    for name, words, per_word, seed in (("all", None, 250, 1), ("onoff", "on,off", 750, 2)):
        out = cache / ("synth" if kind == "spellings" else "synth-plain") / name
        if not (out / "synth.json").exists():
            args = ["data", "synth", "--out", str(out), "--per-word", str(per_word), "--noise-from", str(SHARED),
                    "--seed", str(seed)] + (["--words", words] if words else []) + (["--plain"] if kind == "plain" else [])
            result = cli(*args, env=env)
            if result.returncode:
                sys.exit(result.stderr)
        folders += ["--train-only", str(out)]
    return folders


def recipe(work: Path, room: bool) -> Path:
    config = json.loads((REPO / "recipes" / "default.json").read_text())
    config["task"]["holdout_fraction"] = 1.0  # no real on/off clip trains
    if not room:
        config["augment"].update(reverb_probability=0.0, eq_probability=0.0)
    path = work / f"recipe-{'room' if room else 'noroom'}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def run_row(name: str, seed: int, args, work: Path, cache: Path, env: dict) -> dict:
    kind, room = ROWS[name]
    slug = f"{kind}-{'room' if room else 'noroom'}-s{seed}"
    run, model = work / slug, work / f"{slug}-model"
    started = time.time()
    result = cli("train", "--config", str(recipe(work, room)), "--data", str(SHARED), *ensure_synth(cache, kind, env),
                 "--out", str(run), "--epochs", str(args.epochs), "--max-per-label", str(args.max_per_label),
                 "--patience", "100", "--seed", str(seed), "--units", "64", "--export", str(model), env=env)
    if result.returncode:
        sys.exit(f"{name}: training failed: {result.stderr[-2000:]}")
    report = json.loads(cli("evaluate", str(model), str(SHARED), "--split", "unseen", "--json", env=env).stdout)
    per = report["per_class"]
    row = {"row": name, "seed": seed, "train_seconds": round(time.time() - started, 1),
           "accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"]}
    for word in ("on", "off"):
        hits = round(per[word]["recall"] * per[word]["support"])
        row[word] = {"recall": per[word]["recall"], "hits": f"{hits}/{per[word]['support']}",
                     "recall_95ci": [round(x, 2) for x in per[word]["recall_95ci"]]}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| synthetic speech (no real on/off in training) | seed | on recall (all 21 real clips) | "
             "off recall (all 21) | accuracy, all unseen | class-balanced |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[w]['hits']} = {r[w]['recall']:.2f} ({r[w]['recall_95ci'][0]:.2f}-{r[w]['recall_95ci'][1]:.2f})"
                 for w in ("on", "off")]
        lines.append(f"| {r['row']} | {r['seed']} | {cells[0]} | {cells[1]} | {r['accuracy']:.3f} | "
                     f"{r['balanced_accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-per-label", type=int, default=300)
    parser.add_argument("--work", default=None, help="folder for runs (default: the cache)")
    args = parser.parse_args()
    cache = Path(os.environ.get("SPEECHRNN_CACHE") or Path.home() / ".cache" / "speechrnn")
    env = {**os.environ, "SPEECHRNN_CACHE": str(cache)}
    work = Path(args.work or cache / "synth-transfer")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ROWS:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_row(name, seed, args, work, cache, env))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"epochs": args.epochs, "max_per_label": args.max_per_label, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
