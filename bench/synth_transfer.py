"""How well does synthetic speech alone teach a word to recognise real people?

"on" and "off" have 21 real clips each in the shared folder, too few to train on and too few to
compare synthesis settings on. Here every real on/off clip is kept out of training (the recipe's
holdout takes all their training speakers), so the model learns on/off from synthetic speech
only, and is scored on all 42 real clips plus every other unseen real clip (validation speakers
of ../shared/data/speech_commands and speech_commands_extra, every unknown word among them).

Rows (same budget, seeds and splits; recipes/default.json with the changes named):

  espeak-ng / Kokoro / both engines      the synthetic sets of recipes/synth.json for that engine
  both engines + domain-adversarial      a real-vs-synthetic head through gradient reversal
  both engines + utterance mean norm     per-window cepstral mean normalisation in the model
  cross-engine: on/off from X only       both engines for every other word, on/off from engine X
                                         alone; also scored on the OTHER engine's 1,000 on/off
                                         clips: a check with thousands of clips, not 42

Single-engine rows are scored on the other engine's on/off clips too.

    python bench/synth_transfer.py [--seeds 0,1] [--epochs 8] [--max-per-label 300] [--rows 0,3]

Prints one JSON line per run on stderr, then all rows as JSON and a Markdown table (means over seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import REPO, SHARED, cli  # noqa: E402

EXTRA = SHARED.parent / "speech_commands_extra"
ESPEAK, KOKORO = ["espeak-commands", "espeak-unknown"], ["kokoro-commands", "kokoro-unknown"]
BOTH = ESPEAK + KOKORO
ROWS = {
    "both engines": {"sets": BOTH},
    "both engines + domain-adversarial 1.0": {"sets": BOTH, "recipe": {"domain_adversarial": 1.0}},
    "both engines + domain-adversarial 0.3": {"sets": BOTH, "recipe": {"domain_adversarial": 0.3}},
    "espeak-ng": {"sets": ESPEAK, "cross": "kokoro-commands"},
    "Kokoro": {"sets": KOKORO, "cross": "espeak-commands"},
    "cross-engine: on/off from espeak-ng only": {"sets": BOTH, "drop_onoff": "kokoro-commands",
                                                 "cross": "kokoro-commands"},
    "cross-engine: on/off from Kokoro only": {"sets": BOTH, "drop_onoff": "espeak-commands",
                                              "cross": "espeak-commands"},
    "both engines + utterance mean norm": {"sets": BOTH, "recipe": {"model": {"utterance_norm": True}}},
}


def ensure_synth(cache: Path, env: dict) -> Path:
    folder = cache / "synth"
    result = cli("data", "synth", "--recipe", str(REPO / "recipes" / "synth.json"), "--out", str(folder),
                 "--noise-from", str(SHARED), env=env)
    if result.returncode:
        sys.exit(result.stderr)
    return folder


def without_onoff(folder: Path, work: Path) -> Path:
    """A view of a synthetic set without its on/off clips (symbolic links, no copies)."""
    view = work / f"{folder.name}-no-onoff"
    if not view.exists():
        tmp = work / f".{view.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if entry.name not in ("on", "off") and not (tmp / entry.name).exists():
                (tmp / entry.name).symlink_to(entry.resolve())
        tmp.rename(view)
    return view


def recipe(work: Path, changes: dict) -> Path:
    config = json.loads((REPO / "recipes" / "default.json").read_text())
    config["task"]["holdout_fraction"] = 1.0  # no real on/off clip trains
    config["train_only_unknown"] = "all"
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = work / f"recipe-{hashlib.sha1(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:8]}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def run_row(name: str, seed: int, args, work: Path, synth: Path, env: dict) -> dict:
    spec = ROWS[name]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())[:48].strip("-") + f"-s{seed}"
    run, model = work / slug, work / f"{slug}-model"
    folders = [without_onoff(synth / s, work) if s == spec.get("drop_onoff") else synth / s for s in spec["sets"]]
    started = time.time()
    if not (model / "saved_model.pb").exists():
        result = cli("train", "--config", str(recipe(work, spec.get("recipe", {}))), "--data", str(SHARED),
                     "--data", str(EXTRA), *[a for f in folders for a in ("--train-only", str(f))],
                     "--out", str(run), "--epochs", str(args.epochs), "--max-per-label", str(args.max_per_label),
                     "--patience", "100", "--seed", str(seed), "--units", "64", "--export", str(model), env=env)
        if result.returncode:
            sys.exit(f"{name}: training failed: {result.stderr[-2000:]}")
    report = json.loads(cli("evaluate", str(model), str(SHARED), str(EXTRA), "--split", "unseen", "--all-unknown",
                            "--json", env=env).stdout)
    per = report["per_class"]
    row = {"row": name, "seed": seed, "train_seconds": round(time.time() - started, 1),
           "accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
           "examples": report["examples"], "unknown": per["_unknown_"]["recall"],
           "off_heard_as_up": _confused(report, "off", "up")}
    for word in ("on", "off"):
        row[word] = round(per[word]["recall"] * per[word]["support"]), per[word]["support"]
    if spec.get("cross"):
        cross = json.loads(cli("evaluate", str(model), str(synth / spec["cross"]), "--split", "all", "--json",
                               env=env).stdout)["per_class"]
        row["cross_engine"] = {"set": spec["cross"], **{w: round(cross[w]["recall"], 3) for w in ("on", "off", "up")}}
    return row


def _confused(report: dict, truth: str, heard: str) -> int:
    labels = report["labels"]
    return report["confusion_matrix"][labels.index(truth)][labels.index(heard)]


def table(rows: list[dict]) -> str:
    lines = ["| synthetic speech (no real on/off in training) | seeds | accuracy, all unseen | class-balanced | "
             "on (21 real) | off (21 real) | off heard as up | unknown | on / off of the other engine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["row"] for r in rows):
        group = [r for r in rows if r["row"] == name]

        def mean(key, group=group):
            values = [r[key] for r in group]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.3f}{spread}"

        hits = {w: f"{sum(r[w][0] for r in group)}/{sum(r[w][1] for r in group)}" for w in ("on", "off")}
        cross = [r["cross_engine"] for r in group if "cross_engine" in r]
        cross_cell = (f"{statistics.mean(c['on'] for c in cross):.2f} / {statistics.mean(c['off'] for c in cross):.2f}"
                      f" ({cross[0]['set']})" if cross else "")
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in group)} | {mean('accuracy')} | "
                     f"{mean('balanced_accuracy')} | {hits['on']} | {hits['off']} | "
                     f"{sum(r['off_heard_as_up'] for r in group)} | {mean('unknown')} | {cross_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-per-label", type=int, default=300)
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) to run")
    parser.add_argument("--work", default=None, help="folder for runs (default: <cache>/synth-transfer)")
    args = parser.parse_args()
    cache = Path(os.environ.get("SPEECHRNN_CACHE") or Path.home() / ".cache" / "speechrnn")
    env = {**os.environ, "SPEECHRNN_CACHE": str(cache)}
    work = Path(args.work or cache / "synth-transfer")
    work.mkdir(parents=True, exist_ok=True)
    synth = ensure_synth(cache, env)
    names = list(ROWS)
    picked = [names[int(i)] for i in args.rows.split(",")] if args.rows else names
    rows = []
    for name in picked:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_row(name, seed, args, work, synth, env))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"epochs": args.epochs, "max_per_label": args.max_per_label, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
