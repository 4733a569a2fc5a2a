"""Benchmark: training speed and memory, model alone vs with the input pipeline, and at scale.

    .venv/bin/python bench/train.py [--config recipes/default.json] [--data DIR] [--train-only DIR]
                                    [--max-per-label 300] [--epochs 4] [--steps N]
    .venv/bin/python bench/train.py --scale N [--workers 1|2] [--epochs 2] [--keep DIR]

Prints one JSON object.

Without --scale (the recipe on a capped subset of the shared clips, in this process):
  feature_generation  the BatchStream's work alone: reading, augmenting and featurising chunks of
                      epoch 1 (``TrainingData.features``), i.e. what its thread must keep up with.
  model_only          the Trainer's compiled train step (speechrnn.train.build_training + make_steps)
                      on one epoch's features precomputed in memory, plus the validation pass.
  pipeline            the real ``speechrnn.train.Trainer`` for ``--epochs`` epochs in a temporary run
                      folder; per-epoch ``seconds`` and ``input_wait_seconds`` (how long the loop
                      waited for features) from its history.csv, and the batch thread's CPU time.
  ratio               steady-state pipeline epoch / model-only epoch (target <= 1.10); model-only is
                      measured before and after the Trainer run and averaged (the machine's load drifts).

With --scale N: an N-clip dataset made of the shared clips linked (symlinks, no new audio on disk)
under new speaker ids, copy after copy, split by the dataset's own speaker-hash rule (so ~80% of
the clips are training-split, as in the real dataset); then the real ``speechrnn train`` CLI in
``--workers`` processes (2: MultiWorkerMirroredStrategy on 127.0.0.1, same global batch), each
sharing one cache folder that starts empty, so the run builds the waveform store and feature
cache as a first run on a new dataset does. Reported: each process's peak resident memory (getrusage of the
finished child), time to the first epoch, per-epoch seconds and input waits, the waveform store's
size on disk, and the model-only step time on a bounded sample for the "input pipeline within 10%
of the model step" comparison.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.dataset import BACKGROUND_DIR, SpeechCommands  # noqa: E402
from speechrnn import train as train_module  # noqa: E402
from speechrnn.runconfig import TrainConfig  # noqa: E402
from speechrnn.tfutil import import_tf  # noqa: E402
from speechrnn.train import BatchStream, Trainer, TrainingData, build_training, make_steps  # noqa: E402
from speechrnn.training_setup import make_train_config  # noqa: E402

DEFAULT_RECIPE = REPO / "recipes" / "default.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
TARGET_RATIO = 1.10
SAMPLE_CLIPS = 2048  # features timed, and trained on, for the model-only figure


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def rss_mb() -> dict:
    status = Path("/proc/self/status").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mb": r(fields["VmRSS"] / 1024, 1), "peak_rss_mb": r(fields["VmHWM"] / 1024, 1)}


# --- feature generation alone ----------------------------------------------------------------
def time_feature_generation(data: TrainingData, epoch: int, clips: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """``TrainingData.features`` on the first ``clips`` positions of an epoch, in the stream's chunks.

    One-off costs (librosa's filterbank, the first soxr call) are paid first, on two clips."""
    order = data.epoch_order(epoch)
    data.features(epoch, order, np.arange(2))
    positions = np.arange(min(clips, len(order)))
    xs, ys = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(positions), train_module.CHUNK_CLIPS):
        x, y, _ = data.features(epoch, order, positions[start : start + train_module.CHUNK_CLIPS])
        xs.append(x)
        ys.append(y)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "clips": len(positions),
        "seconds": r(total),
        "cpu_s": r(cpu),
        "clips_per_s": r(len(positions) / total, 1),
        "epoch_s_estimate": r(data.epoch_size * total / len(positions)),
    }, np.concatenate(xs), np.concatenate(ys)


# --- model only ------------------------------------------------------------------------------
def time_model_only(cfg: TrainConfig, data: TrainingData, x: np.ndarray, y: np.ndarray, steps: int,
                    warmup_steps: int) -> dict:
    """The Trainer's own model, optimizer and compiled step (speechrnn.train) on features in memory,
    cycling over them for ``steps`` steps; the epoch estimate scales to the epoch's size."""
    import keras

    norm = {"mean": x.mean(axis=(0, 1)).tolist(), "variance": x.var(axis=(0, 1)).tolist()}
    model, trained, optimizer, _ = build_training(cfg, len(data.labels), norm, data.epoch_size)
    train_step, predict = make_steps(model, trained, optimizer, cfg)
    no_domain = np.full(len(y), -1, np.int32)
    bs = cfg.batch_size
    starts = list(range(0, len(x) - bs + 1, bs)) or [0]

    def step(start: int):
        sl = slice(start, start + bs)
        n = len(y[sl])
        return train_step(x[sl], y[sl], no_domain[sl], np.array([0, n], np.int32), np.float32(n), np.float32(0))

    t0 = time.perf_counter()
    for start in starts[:warmup_steps]:  # traces the step once (input_signature: one trace for all batches)
        step(start)
    warmup_s = time.perf_counter() - t0
    predict(data.val_x[:512])
    keras.utils.set_random_seed(cfg.seed * 1000 + 1)
    losses, samples = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(steps):
        start = starts[k % len(starts)]
        losses.append(float(step(start)[0]))
        samples += len(y[start : start + bs])
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(data.val_x), 512):
        predict(data.val_x[i : i + 512]).numpy()
    val_s, val_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "parameters": int(model.count_params()),
        "warmup_steps": warmup_steps,
        "warmup_s": r(warmup_s),
        "steps": steps,
        "samples": samples,
        "train_s": r(train_s),
        "samples_per_s": r(samples / train_s, 1),
        "validation_predict_s": r(val_s),
        "epoch_s": r(train_s / samples * data.epoch_size + val_s),
        "epoch_cpu_s": r(train_cpu / samples * data.epoch_size + val_cpu),
        "loss_finite": bool(np.all(np.isfinite(losses))),
    }


# --- the real Trainer, in this process -------------------------------------------------------
def run_trainer(cfg: TrainConfig, run_dir: Path) -> dict:
    """The Trainer as it is; its BatchStream is only watched (a subclass that keeps the instance)."""
    streams: list[BatchStream] = []

    class WatchedStream(BatchStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(self)

    original = train_module.BatchStream
    train_module.BatchStream = WatchedStream
    t0 = time.perf_counter()
    try:
        summary = Trainer(cfg, run_dir, report=info, show_progress=False).run()
    finally:
        train_module.BatchStream = original
    wall = time.perf_counter() - t0
    stream = streams[0]
    epochs = [{"epoch": int(row["epoch"]), "seconds": float(row["seconds"]),
               "input_wait_s": float(row["input_wait_seconds"]),
               "batch_thread_cpu_s": r(stream.thread_cpu_seconds.get(int(row["epoch"]), float("nan")))}
              for row in read_history(run_dir)]
    return {"epochs": epochs, "wall_s": r(wall), "best_val_accuracy": r(summary["best_val_accuracy"], 4)}


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def subset_report(args, cfg: TrainConfig) -> dict:
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    data = TrainingData(cfg, show_progress=False)
    load_s = time.perf_counter() - t0
    steps_per_epoch = math.ceil(data.epoch_size / cfg.batch_size)
    info(f"{len(data.train_examples)} training clips, {data.epoch_size} per epoch, {len(data.val_examples)} "
         f"validation; loaded in {load_s:.1f} s")
    features, x, y = time_feature_generation(data, 1, data.epoch_size)
    info(f"feature generation: {json.dumps(features)}")
    model_only = time_model_only(cfg, data, x, y, args.steps or steps_per_epoch, args.warmup_steps)
    info(f"model only: {json.dumps(model_only)}")
    report: dict = {
        "config": args.config, "model": cfg.model.name, "parameters": model_only["parameters"],
        "batch_size": cfg.batch_size, "data": cfg.data, "train_only": cfg.train_only,
        "max_per_label": cfg.max_per_label, "train_clips": len(data.train_examples),
        "epoch_size": data.epoch_size, "steps_per_epoch": steps_per_epoch,
        "validation_clips": len(data.val_examples), "training_data_load_s": r(load_s),
        "feature_generation": {**features, "note": "TrainingData.features over all of epoch 1 in the stream's "
                                                   "chunks, in the main thread, nothing else running here"},
        "model_only": {**model_only, "note": "Trainer's train_step on epoch 1's features in memory; epoch_s = "
                                             "per-sample train time x epoch size + the validation pass"},
    }
    if not args.skip_trainer:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            pipeline = run_trainer(cfg, Path(tmp) / "run")
        after = time_model_only(cfg, data, x, y, args.steps or steps_per_epoch, args.warmup_steps)
        info(f"model only, after the Trainer: {json.dumps(after)}")
        report["model_only_after_trainer"] = {k: after[k] for k in ("train_s", "samples_per_s", "epoch_s")}
        model_epoch_s = (model_only["epoch_s"] + after["epoch_s"]) / 2
        steady = [e["seconds"] for e in pipeline["epochs"][1:]]
        steady_s = float(np.mean(steady))
        report["pipeline"] = {
            **pipeline,
            "steady_state_epochs": [e["epoch"] for e in pipeline["epochs"][1:]],
            "steady_state_epoch_s": r(steady_s),
            "note": "real Trainer, temp run folder; seconds from history.csv (training loop + waits for features + "
                    "validation pass); epoch 1 also traces the train step and starts with an empty queue",
        }
        report["model_only_epoch_s_mean_before_after"] = r(model_epoch_s)
        report["ratio_pipeline_to_model_only"] = r(steady_s / model_epoch_s)
        report["ratio_first_epoch_to_model_only"] = r(pipeline["epochs"][0]["seconds"] / model_epoch_s)
        report["target_ratio"] = TARGET_RATIO
        report["meets_target"] = steady_s / model_epoch_s <= TARGET_RATIO
    report["load_average_before"] = [r(v, 2) for v in load_before]
    return report


# --- at scale --------------------------------------------------------------------------------
def build_scaled_dataset(source: Path, out: Path, clips: int) -> dict:
    """An N-clip Speech Commands folder of symlinks to ``source``'s clips: copy k of a clip is spoken
    by speaker sha1("k:<speaker>")[:8], so the speaker-hash rule splits the copies as it would new
    people. No split lists: the rule decides. The background noise is linked as it is. Each copy
    takes the clips in a fixed random order, so a last partial copy samples every word alike."""
    ds = SpeechCommands.open(source)
    out.mkdir(parents=True)
    (out / BACKGROUND_DIR).mkdir()
    for path in ds.noise_files:
        (out / BACKGROUND_DIR / path.name).symlink_to(path)
    made, copy = 0, 0
    words = set()
    while made < clips:
        # each copy in its own fixed order, so that a partial copy is a fair sample of every word
        for k in np.random.default_rng(copy).permutation(len(ds.clips)):
            clip = ds.clips[k]
            if made == clips:
                break
            speaker = hashlib.sha1(f"{copy}:{clip.speaker}".encode()).hexdigest()[:8]
            folder = out / clip.word
            if clip.word not in words:
                folder.mkdir(exist_ok=True)
                words.add(clip.word)
            rest = clip.path.name.split("_nohash_", 1)[1]
            (folder / f"{speaker}_nohash_{rest}").symlink_to(clip.path)
            made += 1
        copy += 1
    (out / "README.md").write_text(f"{clips} links to the clips of {source} (bench/train.py --scale)\n")
    return {"clips": made, "copies": copy, "source_clips": len(ds.clips)}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cli_workers(workers: int, train_args: list[str], run_dir: Path, cache: Path) -> list[dict]:
    """`speechrnn train` in ``workers`` processes; each one's peak RSS (from wait4's rusage) and times."""
    ports = free_ports(workers)
    procs = []
    for i in range(workers):
        env = {**os.environ, "SPEECHRNN_CACHE": str(cache)}  # shared, as local workers would
        args = list(train_args)
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                           "task": {"type": "worker", "index": i}})
            args += ["--strategy", "multiworker"]
        out = run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-worker{i}")
        procs.append((time.perf_counter(), subprocess.Popen(
            [sys.executable, "-c", "from speechrnn.cli import main; main()", "train", "--out", str(out), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)))
    results = [None] * workers

    def wait(i: int) -> None:
        started, proc = procs[i]
        lines, first_epoch_at = [], None
        for line in proc.stderr:  # the CLI reports on stderr, one line per epoch
            lines.append(line.rstrip())
            if first_epoch_at is None and "epoch   1/" in line:
                first_epoch_at = time.perf_counter() - started
            info(f"worker {i}: {line.rstrip()}")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        results[i] = {"worker": i, "exit_code": proc.returncode, "wall_s": r(time.perf_counter() - started),
                      "peak_rss_mb": r(usage.ru_maxrss / 1024, 1),
                      "first_epoch_done_s": r(first_epoch_at) if first_epoch_at else None,
                      "stderr_tail": lines[-3:] if proc.returncode else []}

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def scale_report(args, cfg: TrainConfig) -> dict:
    load_before = os.getloadavg()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dataset = work / f"speech_commands_x{args.scale}"
        t0 = time.perf_counter()
        built = build_scaled_dataset(Path(cfg.data[0]), dataset, args.scale) if not dataset.exists() else None
        link_s = time.perf_counter() - t0
        recipe = work / "recipe.json"
        cfg_scaled = TrainConfig.from_dict({**cfg.to_dict(), "data": [str(dataset)], "train_only": [],
                                            "max_per_label": 0, "epochs": args.epochs})
        recipe.write_text(json.dumps(cfg_scaled.to_dict()))
        run_dir = work / f"run-{args.workers}w"
        for old in work.glob(f"run-{args.workers}w*"):
            shutil.rmtree(old)
        cache = work / f"cache-{args.workers}w"
        if cache.exists():
            shutil.rmtree(cache)  # cold: every worker builds its store and feature cache, as on a new dataset
        info(f"{args.scale} clips linked in {link_s:.1f} s; training with {args.workers} worker(s), {args.epochs} epochs")
        workers = run_cli_workers(args.workers, ["--config", str(recipe)], run_dir, cache)
        failed = [w for w in workers if w["exit_code"] != 0]
        if failed:
            raise SystemExit(f"training failed: {failed}")
        history = read_history(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        stores = [p for p in (cache / "waveforms").iterdir() if p.is_dir()]
        store_bytes = sum(f.stat().st_size for s in stores for f in s.iterdir())
        report: dict = {
            "scale": args.scale, "dataset": built or "reused", "link_s": r(link_s), "workers": args.workers,
            "config": args.config, "model": cfg.model.name, "batch_size": cfg.batch_size,
            "train_clips": summary["train_clips"], "validation_clips": summary["val_clips"],
            "epochs": [{"epoch": int(row["epoch"]), "seconds": float(row["seconds"]),
                        "input_wait_s": float(row["input_wait_seconds"])} for row in history],
            "processes": workers,
            "peak_rss_mb_max": max(w["peak_rss_mb"] for w in workers),
            "float32_waveforms_mb": r(summary["train_clips"] * cfg.features.clip_samples * 4 / 2**20, 1),
            "waveform_store_mb_on_disk": r(store_bytes / 2**20, 1),
            "best_val_accuracy": summary["best_val_accuracy"],
            "note": "each process's peak RSS is getrusage's ru_maxrss of the finished child (the CLI itself); "
                    "first_epoch_done_s counts start-up (TensorFlow import, hashing, building the waveform store, "
                    "validation features, normalisation) plus epoch 1",
        }
        if not args.skip_model_only:
            # the model-only reference on a bounded sample (the store and feature cache are warm now)
            os.environ["SPEECHRNN_CACHE"] = str(cache)
            t0 = time.perf_counter()
            data = TrainingData(cfg_scaled, show_progress=False)
            warm_s = time.perf_counter() - t0
            features, x, y = time_feature_generation(data, 1, SAMPLE_CLIPS)
            model_only = time_model_only(cfg_scaled, data, x, y, args.steps or len(x) // cfg.batch_size,
                                         args.warmup_steps)
            steady = [e["seconds"] for e in report["epochs"][1:]] or [report["epochs"][0]["seconds"]]
            report.update({
                "warm_training_data_load_s": r(warm_s),
                "feature_generation_sample": features,
                "model_only_sample": model_only,
                "ratio_first_epoch_to_model_only": r(report["epochs"][0]["seconds"] / model_only["epoch_s"]),
                "ratio_steady_epoch_to_model_only": r(float(np.mean(steady)) / model_only["epoch_s"]),
                "rss_after_model_only_in_bench_process": rss_mb(),
            })
        report["load_average_before"] = [r(v, 2) for v in load_before]
        return report
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe (TrainConfig JSON)")
    parser.add_argument("--data", action="append", help=f"Speech Commands folder (repeatable) [{DEFAULT_DATA}]")
    parser.add_argument("--train-only", action="append", default=[], help="train-only folder (repeatable)")
    parser.add_argument("--negatives", action="append", default=[],
                        help="running-speech folder for the recipe's negatives_fraction (repeatable; none: 0)")
    parser.add_argument("--max-per-label", type=int, default=300, help="cap training clips per label (0: all)")
    parser.add_argument("--epochs", type=int, default=None, help="Trainer epochs [4; with --scale 2]")
    parser.add_argument("--steps", type=int, default=0, help="model-only steps (default: one epoch's, or the sample's)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed model-only steps first")
    parser.add_argument("--skip-trainer", action="store_true", help="only feature generation and model-only")
    parser.add_argument("--scale", type=int, default=0, help="train on an N-clip dataset of linked shared clips")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1, help="with --scale: local worker processes")
    parser.add_argument("--keep", default=None, help="with --scale: work folder to keep (dataset links, caches, run)")
    parser.add_argument("--skip-model-only", action="store_true", help="with --scale: no model-only reference")
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.scale else 4)
    if args.epochs < 2 and not args.skip_trainer and not args.scale:
        parser.error("--epochs must be at least 2 (epoch 1 is not steady state)")

    # the recipe's running-speech windows only with --negatives folders (the data path of real clips otherwise)
    negatives = {"negatives": args.negatives} if args.negatives else {"negatives_fraction": 0.0}
    cfg = make_train_config(args.config, args.data or [str(DEFAULT_DATA)], args.train_only, None, False,
                            {"max_per_label": 0 if args.scale else args.max_per_label, "epochs": args.epochs,
                             **negatives})
    info(f"{cfg.model.name}, batch {cfg.batch_size}; load average {os.getloadavg()}")
    report = scale_report(args, cfg) if args.scale else subset_report(args, cfg)
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "memory_gb": r(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "tensorflow": import_tf().__version__,
        "load_average_after": [r(v, 2) for v in os.getloadavg()],
        "bench_process_peak_rss_mb": r(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
