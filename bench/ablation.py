"""Ablation: what matters for generalising to new speakers. Prints JSON rows and a Markdown table.

Every row trains with the same budget (epochs, clips per label, batch size), seeds and splits,
from recipes/default.json with one change, through the real `speechrnn train` CLI; then it is
exported and evaluated on the real clips no row trained on (`--split unseen`: the shared
validation speakers plus the held-out on/off speakers). Columns: accuracy (mean and spread over
seeds), lowest per-class recall, parameters, size on disk, batch-1 latency (XLA signature),
largest gradient norm seen before clipping, and whether a run diverged.

    python bench/ablation.py [--seeds 0,1] [--epochs 8] [--max-per-label 300] [--rows a,b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "speech_commands"
BASE = ["--units", "64"]
ROWS = {
    "baseline (2x BiGRU-64, clip 1.0, synth, aug)": [],
    "LSTM instead of GRU": ["--cell", "lstm"],
    "forward-only (not bidirectional)": ["--unidirectional"],
    "1 layer": ["--layers", "1"],
    "3 layers": ["--layers", "3"],
    "no gradient clipping": ["--clipnorm", "0"],
    "no synthetic speech": ["@nosynth"],
    "no augmentation": ["--no-augment"],
    "lr x5, clipping on": ["--lr", "0.015"],
    "lr x5, no clipping": ["--lr", "0.015", "--clipnorm", "0"],
}


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from speechrnn.cli import main; main()", *args],
                          capture_output=True, text=True, env=env)


def ensure_synth(cache: Path, env: dict) -> list[str]:
    folders = []
    for name, words, per_word, seed in (("all", None, 250, 1), ("onoff", "on,off", 750, 2)):
        out = cache / "synth" / name
        if not (out / "synth.json").exists():
            args = ["data", "synth", "--out", str(out), "--per-word", str(per_word), "--noise-from", str(SHARED),
                    "--seed", str(seed)] + (["--words", words] if words else [])
            result = cli(*args, env=env)
            if result.returncode:
                sys.exit(result.stderr)
        folders.append(str(out))
    return folders


def latency_ms(model: Path) -> float:
    code = f"""
import time, numpy as np
from speechrnn.tfutil import import_tf
tf = import_tf()
fn = tf.saved_model.load({str(model / "xla")!r}).signatures["mfcc_xla"]
x = tf.constant(np.random.default_rng(0).standard_normal((1, 98, 40)).astype("float32") * 10)
for _ in range(20): fn(mfcc=x)
times = []
for _ in range(200):
    t = time.perf_counter(); fn(mfcc=x)["probabilities"].numpy(); times.append(time.perf_counter() - t)
print(sorted(times)[len(times) // 2] * 1000)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def run_row(name: str, extra: list[str], seed: int, args, synth: list[str], work: Path, env: dict) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())[:40].strip("-")
    run, model = work / f"{slug}-s{seed}", work / f"{slug}-s{seed}-model"
    train_only = [] if "@nosynth" in extra else [a for folder in synth for a in ("--train-only", folder)]
    flags = [a for a in extra if not a.startswith("@")]
    started = time.time()
    result = cli("train", "--config", str(REPO / "recipes" / "default.json"), "--data", str(SHARED), *train_only,
                 "--out", str(run), "--epochs", str(args.epochs), "--max-per-label", str(args.max_per_label),
                 "--patience", "100", "--seed", str(seed), *BASE, *flags, "--export", str(model), env=env)
    row = {"row": name, "seed": seed, "train_seconds": round(time.time() - started, 1)}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    row["grad_norm_max"] = summary.get("grad_norm_max")
    if result.returncode:
        row.update(diverged="diverged" in result.stderr, error=result.stderr.strip().splitlines()[-1])
        return row
    report = json.loads(cli("evaluate", str(model), str(SHARED), "--split", "unseen", "--json", env=env).stdout)
    recalls = {k: v["recall"] for k, v in report["per_class"].items() if v["recall"] is not None}
    worst = min(recalls, key=recalls.get)
    meta = json.loads((model / "assets" / "speechrnn.json").read_text())
    row.update(
        diverged=False, accuracy=report["accuracy"], examples=report["examples"], lowest_recall=recalls[worst],
        lowest_recall_label=worst, parameters=meta["model"]["parameters"],
        size_mb=round(sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 1e6, 2),
        latency_ms=round(latency_ms(model), 2), model=str(model),
    )
    return row


def table(rows: list[dict]) -> str:
    lines = ["| variant | accuracy (unseen speakers) | lowest class recall | parameters | size MB | batch-1 ms | "
             "max grad norm | diverged |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["row"] for r in rows):
        group = [r for r in rows if r["row"] == name]
        ok = [r for r in group if not r.get("error")]
        acc = [r["accuracy"] for r in ok]
        spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
        low = [r["lowest_recall"] for r in ok]
        labels = "/".join(sorted({r["lowest_recall_label"] for r in ok}))
        first = ok[0] if ok else group[0]
        norms = [r["grad_norm_max"] for r in group if r.get("grad_norm_max") is not None]
        lines.append(
            f"| {name} | {statistics.mean(acc):.3f}{spread} (n={len(acc)}) | "
            f"{statistics.mean(low):.3f} ({labels}) | {first.get('parameters', '-'):,} | {first.get('size_mb', '-')} | "
            f"{first.get('latency_ms', '-')} | {max(norms) if norms else float('nan'):.1f} | "
            f"{sum(bool(r.get('diverged')) for r in group)}/{len(group)} |" if acc else
            f"| {name} | failed | | | | | | {sum(bool(r.get('diverged')) for r in group)}/{len(group)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-per-label", type=int, default=300)
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) to run")
    parser.add_argument("--work", default=None, help="folder for runs (default: the cache)")
    parser.add_argument("--report", nargs="+", metavar="ABLATION_JSON",
                        help="no training: merge these ablation.json files (e.g. two seed runs), fill in missing "
                             "latencies from their saved models, print the table")
    args = parser.parse_args()
    if args.report:
        rows = [row for path in args.report for row in json.loads(Path(path).read_text())]
        for row in rows:
            missing = row.get("latency_ms") is None or math.isnan(row["latency_ms"])
            if missing and row.get("model"):
                row["latency_ms"] = round(latency_ms(Path(row["model"])), 2)
        print(json.dumps(rows, indent=1))
        print(table(sorted(rows, key=lambda r: list(ROWS).index(r["row"]) if r["row"] in ROWS else 99)))
        return
    cache = Path(os.environ.get("SPEECHRNN_CACHE") or Path.home() / ".cache" / "speechrnn")
    env = {**os.environ, "SPEECHRNN_CACHE": str(cache)}
    work = Path(args.work or cache / "ablation")
    work.mkdir(parents=True, exist_ok=True)
    synth = ensure_synth(cache, env)
    names = list(ROWS)
    picked = [names[int(i)] for i in args.rows.split(",")] if args.rows else names
    rows = []
    for name in picked:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_row(name, ROWS[name], seed, args, synth, work, env)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    (work / "ablation.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"epochs": args.epochs, "max_per_label": args.max_per_label, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
