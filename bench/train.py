"""Benchmark: training speed of the recipe's architecture, model alone vs with the input pipeline.

    .venv/bin/python bench/train.py [--config recipes/default.json] [--data DIR] [--train-only DIR]
                                    [--max-per-label 300] [--epochs 4] [--steps N]

Prints one JSON object:
  feature_generation  ``TrainingData.epoch(e)`` alone (augmentation + MFCC of one epoch), i.e.
                      the work the Prefetcher thread must finish while an epoch trains.
  model_only          the Trainer's train step (speechrnn.train.build_training + make_steps) on
                      one epoch's features precomputed in memory, plus the validation pass.
  pipeline            the real ``speechrnn.train.Trainer`` for ``--epochs`` epochs in a temporary
                      run folder; per-epoch ``seconds`` from its history.csv. The Prefetcher is
                      instrumented (not changed) to record how long the loop waited for features.
  ratio               steady-state pipeline epoch / model-only epoch (target <= 1.10); model-only is
                      measured before and after the Trainer run and averaged (the machine's load
                      drifts). ratio_steady_to_last_epoch compares epochs within the one Trainer run:
                      the last epoch trains with no feature thread running beside it.

Epoch 1 of a Trainer run is not steady state: it waits for its own features (nothing prefetched
them) and traces the train step; the last epoch starts no prefetch. So the steady state is the
mean of epochs 2 .. epochs-1 (hence --epochs >= 3).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.augment import augment  # noqa: E402
from data_prep.features import mfcc_batched  # noqa: E402
from speechrnn import train as train_module  # noqa: E402
from speechrnn.runconfig import TrainConfig  # noqa: E402
from speechrnn.tfutil import import_tf  # noqa: E402
from speechrnn.train import Prefetcher, Trainer, TrainingData, build_training, make_steps  # noqa: E402
from speechrnn.training_setup import make_train_config  # noqa: E402

DEFAULT_RECIPE = REPO / "recipes" / "default.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands"
TARGET_RATIO = 1.10


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


# --- feature generation alone ----------------------------------------------------------------
def time_feature_generation(data: TrainingData, epoch: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """``TrainingData.epoch`` as the Prefetcher runs it, then its two halves timed separately.

    One-off costs (librosa's filterbank in mfcc_constants, first soxr call) are paid first, on
    two clips, as the Trainer pays them in its epoch-0 normalisation pass."""
    cfg = data.config
    warm = augment(data.train_waves[:2], data.noise, cfg.augment, np.random.default_rng(0), cfg.features.sample_rate)
    mfcc_batched(warm, cfg.features)
    t0, c0 = time.perf_counter(), time.process_time()
    x, y, _ = data.epoch(epoch)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    rng = np.random.default_rng([cfg.seed, epoch])  # the same steps as TrainingData.epoch
    idx = data._epoch_indices(rng)
    t0 = time.perf_counter()
    waves = augment(data.train_waves[idx], data.noise, cfg.augment, rng, cfg.features.sample_rate)
    t_aug = time.perf_counter() - t0
    t0 = time.perf_counter()
    mfcc_batched(waves, cfg.features)
    t_mfcc = time.perf_counter() - t0
    figures = {
        "epoch_s": r(total),
        "cpu_s": r(cpu),
        "clips": len(x),
        "clips_per_s": r(len(x) / total, 1),
        "augment_s": r(t_aug),
        "mfcc_s": r(t_mfcc),
    }
    return figures, x, y


# --- model only ------------------------------------------------------------------------------
def time_model_only(
    cfg: TrainConfig, data: TrainingData, x: np.ndarray, y: np.ndarray, steps: int, warmup_steps: int
) -> dict:
    """The Trainer's own model, optimizer and compiled step (speechrnn.train) on in-memory features."""
    import keras

    norm = {"mean": x.mean(axis=(0, 1)).tolist(), "variance": x.var(axis=(0, 1)).tolist()}
    model, trained, optimizer, _ = build_training(cfg, len(data.labels), norm, data.epoch_size)
    train_step, predict = make_steps(model, trained, optimizer, cfg)
    no_domain = np.full(len(y), -1, np.int32)
    bs = cfg.batch_size
    starts = list(range(0, len(x), bs))
    t0 = time.perf_counter()
    for start in starts[:warmup_steps]:  # traces the step once (input_signature: one trace for all batches)
        train_step(x[start : start + bs], y[start : start + bs], no_domain[start : start + bs])
    warmup_s = time.perf_counter() - t0
    predict(data.val_x[:512])
    keras.utils.set_random_seed(cfg.seed * 1000 + 1)
    losses, norms, correct, samples = [], [], 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):  # the Trainer's loop body, cycling over the epoch if steps > one epoch
        start = starts[step % len(starts)]
        loss, gnorm, ok, _, _ = train_step(x[start : start + bs], y[start : start + bs], no_domain[start : start + bs])
        losses.append(float(loss))
        norms.append(float(gnorm))
        correct += float(ok)
        samples += len(x[start : start + bs])
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    probs = np.concatenate([predict(data.val_x[i : i + 512]).numpy() for i in range(0, len(data.val_x), 512)])
    float(np.mean(probs.argmax(1) == data.val_y))
    val_s, val_cpu = time.perf_counter() - t0, time.process_time() - c0
    per_sample = train_s / samples
    return {
        "parameters": int(model.count_params()),
        "warmup_steps": warmup_steps,
        "warmup_s": r(warmup_s),
        "steps": steps,
        "samples": samples,
        "train_s": r(train_s),
        "samples_per_s": r(samples / train_s, 1),
        "validation_predict_s": r(val_s),
        "epoch_s": r(per_sample * len(x) + val_s),
        "epoch_cpu_s": r(train_cpu / samples * len(x) + val_cpu),
        "loss_finite": bool(np.all(np.isfinite(losses))),
    }


# --- the real Trainer, instrumented ----------------------------------------------------------
class _Timeline:
    """Records what the Prefetcher did: feature generation per epoch (in its thread) and waits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generate: dict[int, tuple[float, float]] = {}
        self.wait: dict[int, float] = {}
        self.thread_cpu: dict[int, float] = {}  # CPU of the Prefetcher thread itself per epoch's features
        self.process_cpu_at_get: dict[int, float] = {}  # process CPU when epoch e asks for its features


def instrumented_prefetcher(timeline: _Timeline) -> type:
    class TimedPrefetcher(Prefetcher):
        def __init__(self, data: TrainingData):
            super().__init__(data)
            real_epoch = data.epoch

            def timed_epoch(epoch: int):
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return real_epoch(epoch)
                finally:
                    with timeline.lock:
                        timeline.generate[epoch] = (t0, time.perf_counter())
                        timeline.thread_cpu[epoch] = time.thread_time() - c0

            data.epoch = timed_epoch  # instance attribute: the Prefetcher's thread calls this

        def get(self, epoch: int):
            timeline.process_cpu_at_get[epoch] = time.process_time()
            t0 = time.perf_counter()
            try:
                return super().get(epoch)
            finally:
                timeline.wait[epoch] = time.perf_counter() - t0

    return TimedPrefetcher


def run_trainer(cfg: TrainConfig, run_dir: Path) -> dict:
    timeline = _Timeline()
    original = train_module.Prefetcher
    train_module.Prefetcher = instrumented_prefetcher(timeline)
    t0 = time.perf_counter()
    try:
        summary = Trainer(cfg, run_dir, report=info, show_progress=False).run()
    finally:
        train_module.Prefetcher = original
    wall = time.perf_counter() - t0
    with open(run_dir / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    epochs = []
    for row in history:
        e = int(row["epoch"])
        gen = timeline.generate.get(e + 1)
        cpu_at = timeline.process_cpu_at_get
        epochs.append(
            {
                "epoch": e,
                "seconds": float(row["seconds"]),
                "waited_for_features_s": r(timeline.wait.get(e, float("nan"))),
                "next_epoch_features_generated_s": r(gen[1] - gen[0]) if gen else None,
                "next_epoch_features_thread_cpu_s": r(timeline.thread_cpu[e + 1])
                if e + 1 in timeline.thread_cpu
                else None,
                "process_cpu_s": r(cpu_at[e + 1] - cpu_at[e]) if e in cpu_at and e + 1 in cpu_at else None,
            }
        )
    gen0 = timeline.generate.get(0)
    return {
        "epochs": epochs,
        "wall_s": r(wall),
        "best_val_accuracy": r(summary["best_val_accuracy"], 4),
        "normalization_epoch0_features_s": r(gen0[1] - gen0[0]) if gen0 else None,
    }


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe (TrainConfig JSON)")
    parser.add_argument("--data", action="append", help=f"Speech Commands folder (repeatable) [{DEFAULT_DATA}]")
    parser.add_argument("--train-only", action="append", default=[], help="train-only folder (repeatable)")
    parser.add_argument("--max-per-label", type=int, default=300, help="cap training clips per label (0: all)")
    parser.add_argument("--epochs", type=int, default=4, help="Trainer epochs (>= 3; steady state = 2..epochs-1)")
    parser.add_argument("--steps", type=int, default=0, help="model-only steps (default: one epoch's)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed model-only steps first")
    parser.add_argument("--skip-trainer", action="store_true", help="only feature generation and model-only")
    args = parser.parse_args()
    if args.epochs < 3 and not args.skip_trainer:
        parser.error("--epochs must be at least 3 (epoch 1 and the last epoch are not steady state)")

    cfg = make_train_config(
        args.config,
        args.data or [str(DEFAULT_DATA)],
        args.train_only,
        None,
        False,
        {"max_per_label": args.max_per_label, "epochs": args.epochs},
    )
    load_before = os.getloadavg()
    info(f"{cfg.model.name}, batch {cfg.batch_size}, max_per_label {cfg.max_per_label}; load average {load_before}")

    t0 = time.perf_counter()
    data = TrainingData(cfg, show_progress=False)
    load_s = time.perf_counter() - t0
    steps_per_epoch = math.ceil(data.epoch_size / cfg.batch_size)
    info(
        f"{len(data.train_examples)} training clips, {data.epoch_size} per epoch, {len(data.val_examples)} "
        f"validation; loaded in {load_s:.1f} s"
    )

    features, x, y = time_feature_generation(data, 1)
    info(f"feature generation: {json.dumps(features)}")
    model_only = time_model_only(cfg, data, x, y, args.steps or steps_per_epoch, args.warmup_steps)
    info(f"model only: {json.dumps(model_only)}")

    report: dict = {
        "config": args.config,
        "model": cfg.model.name,
        "parameters": model_only["parameters"],
        "batch_size": cfg.batch_size,
        "data": cfg.data,
        "train_only": cfg.train_only,
        "max_per_label": cfg.max_per_label,
        "train_clips": len(data.train_examples),
        "epoch_size": data.epoch_size,
        "steps_per_epoch": steps_per_epoch,
        "validation_clips": len(data.val_examples),
        "training_data_load_s": r(load_s),
        "feature_generation": {
            **features,
            "note": "TrainingData.epoch(1) alone in the main thread, nothing else "
            "running in this process; augment_s/mfcc_s: its two halves timed separately",
        },
        "model_only": {
            **model_only,
            "note": "Trainer's train_step on epoch 1's features in memory; epoch_s = "
            "per-sample train time x epoch size + the Trainer's validation pass",
        },
    }
    if not args.skip_trainer:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            pipeline = run_trainer(cfg, Path(tmp) / "run")
        # Model-only again, so a machine whose load drifts during the Trainer run is seen on both sides.
        after = time_model_only(cfg, data, x, y, args.steps or steps_per_epoch, args.warmup_steps)
        info(f"model only, after the Trainer: {json.dumps(after)}")
        report["model_only_after_trainer"] = {
            k: after[k] for k in ("train_s", "samples_per_s", "epoch_s", "epoch_cpu_s")
        }
        model_epoch_s = (model_only["epoch_s"] + after["epoch_s"]) / 2
        last = pipeline["epochs"][-1]["seconds"]
        steady = [e["seconds"] for e in pipeline["epochs"][1:-1]]
        steady_s = float(np.mean(steady))
        ratio = steady_s / model_epoch_s
        steady_cpu = float(np.mean([e["process_cpu_s"] for e in pipeline["epochs"][1:-1]]))
        model_epoch_cpu = (model_only["epoch_cpu_s"] + after["epoch_cpu_s"]) / 2
        thread_cpu = float(np.mean([e["next_epoch_features_thread_cpu_s"] for e in pipeline["epochs"][1:-1]]))
        report["pipeline"] = {
            **pipeline,
            "steady_state_epochs": [e["epoch"] for e in pipeline["epochs"][1:-1]],
            "steady_state_epoch_s": r(steady_s),
            "samples_per_s": r(data.epoch_size / (steady_s - model_only["validation_predict_s"]), 1),
            "last_epoch_s_no_prefetch_running": last,
            "note": "real Trainer, temp run folder; seconds from history.csv (training loop + wait for features + "
            "validation pass); samples_per_s excludes the model-only validation time; the last epoch has its features "
            "ready and starts no prefetch, so steady_state_epoch_s - last_epoch_s ~ the cost of the concurrent thread",
        }
        report["model_only_epoch_s_mean_before_after"] = r(model_epoch_s)
        report["ratio_pipeline_to_model_only"] = r(ratio)
        report["ratio_steady_to_last_epoch"] = r(steady_s / last)
        report["cpu"] = {
            "model_only_epoch_cpu_s": r(model_epoch_cpu),
            "pipeline_steady_epoch_cpu_s": r(steady_cpu),
            "feature_thread_cpu_s_per_epoch": r(thread_cpu),
            "ratio_pipeline_to_model_only": r(steady_cpu / model_epoch_cpu),
            "note": "process CPU seconds (all threads), much less sensitive than wall time to other processes "
            "on the machine: the extra work an epoch carries for its background feature thread. Whether it costs "
            "wall time depends on spare cores: pipeline wall >= max(model-only wall, pipeline CPU / cores)",
        }
        report["target_ratio"] = TARGET_RATIO
        report["meets_target"] = ratio <= TARGET_RATIO
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": import_tf().__version__,
        "load_average_before": [r(v, 2) for v in load_before],
        "load_average_after": [r(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
