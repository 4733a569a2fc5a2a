"""Training: Adam with gradient clipping, warm-up + cosine schedule, early stopping, atomic
checkpoints and exact resume.

A run folder holds: config.json, labels.txt, normalization.json, checkpoints/{last,best}.npz,
history.csv (with the largest and median global gradient norm before clipping, per epoch),
curves.png, train.log, summary.json and export_data.npz.

What export needs of the data is recorded here, so that exporting needs only the run folder:
export_data.npz lists the clips the run kept out of training (the whole validation split and the
held-out speakers of scarce words: "unseen") with their labels, and holds the MFCC of real training
clips (for `export --int8 calibrated`) and of unseen clips (checks of the LiteRT models); each checkpoint holds
its probabilities on the unseen clips and the metrics they give (the metrics an export carries).

Each epoch's data (order, oversampling, augmentation) and Keras' seeds are derived from
(seed, epoch), so a run resumed after a kill sees exactly the data an unbroken run would.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_prep.audio import load_audio
from data_prep.augment import augment, in_stream_context
from data_prep.dataset import HOLDOUT, NOISE_REGIONS, SILENCE, SPLITS, UNKNOWN, SpeechCommands, words_without_clips
from data_prep.errors import SpeechRNNError
from data_prep.extract import WaveformLoader, example_key, featurize, progress
from data_prep.features import mfcc_batched
from speechrnn.evaluate import checkpoint_metrics
from speechrnn.models import build_model, with_domain_head
from speechrnn.runconfig import TrainConfig, write_json_atomic, write_text_atomic
from speechrnn.tfutil import import_tf

log = logging.getLogger(__name__)
HISTORY_FIELDS = [
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
    "grad_norm_max", "grad_norm_median", "clipped_fraction", "seconds",
    "domain_loss", "domain_accuracy", "reversal_strength",
]
REAL, SYNTHETIC, NO_DOMAIN = 0, 1, -1  # domain labels for domain-adversarial training
EXPORT_DATA = "export_data.npz"
# Real clips recorded for export: training clips to calibrate a fully int8 LiteRT model on (`export
# --int8 calibrated`; with 512 the shipped model's agreed with its float one on 99.4-99.8% of unseen
# clips, with 256 on 99.3%), and unseen ones to check the LiteRT models on.
CALIBRATION_CLIPS, CHECK_CLIPS = 512, 256


class TrainingData:
    """Training waveforms in memory (augmented afresh each epoch) and cached validation features."""

    def __init__(self, config: TrainConfig, show_progress: bool = True):
        self.config = config
        task, fc = config.task, config.features
        noise_files, extra = [], []
        # The --data folders are pooled, so unknown words and silence are sampled from all of them.
        real = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.data])
        train, val = real.examples(task, "training"), real.examples(task, "validation")
        noise_files += real.noise_files
        for folder in config.train_only:
            ds = SpeechCommands.open(folder)
            for split in (*SPLITS, HOLDOUT):  # every clip of a train-only folder trains
                extra += ds.examples(task, split, all_unknown=config.train_only_unknown == "all")
            noise_files += ds.noise_files
        if config.max_per_label:
            train = _cap_per_label(train, config.max_per_label, config.seed)
            extra = _cap_per_label(extra, config.max_per_label, config.seed + 2)
            val = _cap_per_label(val, config.max_per_label, config.seed + 1)
        n_real = len(train)
        train += extra
        if not train or not val:
            raise SpeechRNNError(
                "need both training and validation examples (check validation_list.txt or the speaker ids)",
                config.data[0] if config.data else None,
            )
        self.labels = task.labels
        index = {label: i for i, label in enumerate(self.labels)}
        # Unreadable clips are left out, each logged as an error; the run goes on (and the CLI exits 1).
        waves, kept, errors = WaveformLoader(fc).load_many(train, "loading training audio" if show_progress else None)
        self.train_examples = [train[i] for i in kept]
        self.train_waves = waves
        self.train_labels = np.array([index[ex.label] for ex in self.train_examples], np.int32)
        self.train_is_real = np.array([i < n_real for i in kept])  # from --data, not --train-only
        # Domain of each example for domain-adversarial training; silence (noise cuts, real in
        # either kind of folder) has none.
        self.train_domain = np.where(self.train_is_real, REAL, SYNTHETIC).astype(np.int32)
        self.train_domain[np.array([ex.label == SILENCE for ex in self.train_examples], bool)] = NO_DOMAIN
        # Noise for mixing: only the training region of each recording.
        lo, hi = NOISE_REGIONS["training"]
        self.noise = []
        for path in dict.fromkeys(noise_files):
            audio = load_audio(path, fc.sample_rate)
            self.noise.append(audio[int(len(audio) * lo) : int(len(audio) * hi)])
        if (config.augment.context_probability > 0 or config.negatives) and not {SILENCE, UNKNOWN} <= set(self.labels):
            raise SpeechRNNError("stream context and negatives need both _silence_ and _unknown_ labels "
                                 "(silence_fraction and unknown_fraction above 0)")
        self.negatives, self.negatives_real = load_negatives(config.negatives, fc.sample_rate, show_progress)
        self.is_command = np.array([label in task.words for label in self.labels])
        self.word_rows = np.flatnonzero(self.train_labels != index[SILENCE]) if SILENCE in index else \
            np.arange(len(self.train_labels))
        valf = featurize(val, fc, show_progress=show_progress)
        self.val_examples = valf.examples
        self.val_x = valf.features
        self.val_y = np.array([index[ex.label] for ex in valf.examples], np.int32)
        # The clips an export's metrics are on: the whole validation split (not capped by
        # max_per_label) and the held-out speakers, after the validation clips when they are the same.
        whole_val = real.examples(task, "validation")
        unseen_val = valf if whole_val == val else featurize(whole_val, fc, show_progress=show_progress)
        held = featurize(real.examples(task, HOLDOUT), fc, show_progress=show_progress)
        self.unseen_after_val = unseen_val is valf
        self.held_x = held.features
        self.unseen_examples = unseen_val.examples + held.examples
        self.unseen_x = np.concatenate([unseen_val.features, held.features])
        self.unseen_y = np.array([index[ex.label] for ex in self.unseen_examples], np.int32)
        self.unseen_is_validation = np.array([ex.split == "validation" for ex in self.unseen_examples], bool)
        extra_errors = [] if unseen_val is valf else unseen_val.errors
        self.skipped = list(dict.fromkeys(str(err) for err in [*errors, *valf.errors, *extra_errors, *held.errors]))
        examples_per_epoch = len(self._epoch_indices(np.random.default_rng(0)))
        self.negatives_count = round(config.negatives_fraction * examples_per_epoch) if self.negatives else 0
        self.epoch_size = examples_per_epoch + self.negatives_count

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """All training examples, plus oversampled copies of scarce labels' real clips, shuffled.

        Balancing counts real (--data) clips only: 1,000 synthetic "off" clips must not hide that
        there are ten real ones, or the model learns espeak-ng's "off" instead of people's.
        A label with no real clips at all is topped up from its synthetic ones.
        """
        real_counts = np.bincount(self.train_labels[self.train_is_real], minlength=len(self.labels))
        floor = int(self.config.balance * np.median(real_counts[real_counts > 0])) if real_counts.any() else 0
        extra = []
        for label in range(len(self.labels)):
            real = np.flatnonzero((self.train_labels == label) & self.train_is_real)
            members = real if len(real) else np.flatnonzero(self.train_labels == label)
            if 0 < len(members) < floor:
                extra.append(rng.choice(members, floor - len(members), replace=True))
        idx = np.concatenate([np.arange(len(self.train_labels)), *extra]) if extra else np.arange(len(self.train_labels))
        return rng.permutation(idx)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, labels and domains (REAL, SYNTHETIC, NO_DOMAIN) of one epoch, deterministic in (seed, epoch)."""
        cfg, rate = self.config, self.config.features.sample_rate
        rng = np.random.default_rng([cfg.seed, epoch])
        idx = self._epoch_indices(rng)
        waves, labels, domains = self.train_waves[idx], self.train_labels[idx], self.train_domain[idx]
        if cfg.augment.context_probability > 0:
            rows = np.flatnonzero(np.isin(idx, self.word_rows))
            waves, labels = in_stream_context(waves, labels, rows, rng, cfg.augment.context_probability,
                                              self.is_command, self.labels.index(UNKNOWN), rate)
        count = self.negatives_count
        if count:
            windows, real = cut_windows(self.negatives, self.negatives_real, count, cfg.features.clip_samples, rng)
            order = rng.permutation(len(idx) + count)
            waves = np.concatenate([waves, windows])[order]
            labels = np.concatenate([labels, np.full(count, self.labels.index(UNKNOWN), np.int32)])[order]
            domains = np.concatenate([domains, np.where(real, REAL, SYNTHETIC).astype(np.int32)])[order]
        waves = augment(waves, self.noise, cfg.augment, rng, rate)
        return mfcc_batched(waves, cfg.features), labels, domains


def load_negatives(folders: list[str], sample_rate: int, show_progress: bool = True
                   ) -> tuple[list[np.ndarray], list[bool]]:
    """Every audio file under the folders (recordings with no command in them), and whether each is
    real speech (a folder without a synth.json record) rather than synthetic."""
    from data_prep.dataset import AUDIO_EXTENSIONS

    waves, real = [], []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise SpeechRNNError("not a folder of running speech (negatives)", root)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise SpeechRNNError("no audio files here (negatives: recordings with no command in them)", root)
        synthetic = (root / "synth.json").exists()
        with progress(files, f"loading negatives from {root.name}", show_progress) as bar:
            for path in bar:
                try:
                    waves.append(load_audio(path, sample_rate))
                    real.append(not synthetic)
                except SpeechRNNError as err:
                    log.warning("skipped: %s", err)
    return waves, real


def cut_windows(recordings: list[np.ndarray], real: list[bool], count: int, length: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows of ``length`` samples at random places in the recordings (chosen in
    proportion to their length; shorter ones are zero-padded), and whether each came from real speech."""
    sizes = np.array([max(1, len(r) - length + 1) for r in recordings], np.float64)
    picks = rng.choice(len(recordings), size=count, p=sizes / sizes.sum())
    out = np.zeros((count, length), np.float32)
    for k, r in enumerate(picks):
        rec = recordings[r]
        start = int(rng.integers(0, max(1, len(rec) - length + 1)))
        piece = rec[start : start + length]
        out[k, : len(piece)] = piece
    return out, np.array([real[r] for r in picks], bool)


def _sample_rows(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` row indices spread evenly over the labels present (sorted)."""
    present = np.unique(labels)
    if not len(present):
        return np.zeros(0, np.int64)
    per_label = max(1, count // len(present))
    rows = [rng.permutation(np.flatnonzero(labels == label))[:per_label] for label in present]
    return np.sort(np.concatenate(rows))[:count]


def write_export_data(path: Path, data: TrainingData, seed: int) -> None:
    """The run's record of what export needs from the data folders (see the module docstring)."""
    rng = np.random.default_rng([seed, 7])
    real_rows = np.flatnonzero(data.train_is_real)
    calibration_rows = real_rows[_sample_rows(data.train_labels[real_rows], CALIBRATION_CLIPS, rng)]
    calibration = mfcc_batched(data.train_waves[calibration_rows], data.config.features)
    check_rows = _sample_rows(data.unseen_y, CHECK_CLIPS, rng)
    save_npz_atomic(path, {
        "labels": np.array(data.labels),
        "unseen_truth": data.unseen_y,
        "unseen_is_validation": data.unseen_is_validation,
        "unseen_keys": np.array([example_key(ex) for ex in data.unseen_examples]),
        # float16 halves the file; the LiteRT checks compare models on the same (rounded) inputs
        "calibration_mfcc": calibration.astype(np.float16),
        "check_mfcc": data.unseen_x[check_rows].astype(np.float16),
    })


def check_words_have_clips(config: TrainConfig) -> None:
    """Refuse, before anything is loaded or written, a task word that no folder has training clips
    of (a typo in --words, an empty word folder): the model would get an output that never saw an
    example. Raises SpeechRNNError naming the words and the nearest ones the folders do have."""
    folders = [*config.data, *config.train_only]
    problem = words_without_clips(config.task, [SpeechCommands.open(f) for f in config.data],
                                  [SpeechCommands.open(f) for f in config.train_only])
    if problem:
        where = "" if len(folders) == 1 else f" in {', '.join(map(str, folders))}"
        raise SpeechRNNError(f"{problem}{where}; every word of --words needs clips in its own <word>/ folder",
                             folders[0] if len(folders) == 1 else None)


def _cap_per_label(examples, cap, seed):
    rng = np.random.default_rng(seed)
    out, seen = [], {}
    for i in rng.permutation(len(examples)):
        ex = examples[i]
        if seen.get(ex.label, 0) < cap:
            seen[ex.label] = seen.get(ex.label, 0) + 1
            out.append(ex)
    return out


class Prefetcher:
    """Computes the next epoch's features in a background thread while this one trains."""

    def __init__(self, data: TrainingData):
        self.data = data
        self._thread = None
        self._result = None
        self._epoch = None

    def start(self, epoch: int) -> None:
        def work():
            try:
                self._result = self.data.epoch(epoch)
            except BaseException as exc:  # noqa: BLE001 - re-raised in get()
                self._result = exc

        self._epoch, self._result = epoch, None
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def get(self, epoch: int):
        if self._epoch != epoch:
            self.start(epoch)
        self._thread.join()
        result, self._epoch = self._result, None
        if isinstance(result, BaseException):
            raise result
        return result


def save_npz_atomic(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_weights_npz(path: Path, prefix: str = "model") -> list[np.ndarray]:
    with np.load(path) as data:
        n = int(data[f"{prefix}_count"])
        return [data[f"{prefix}_{i}"] for i in range(n)]


def _arrays(prefix: str, values: list[np.ndarray]) -> dict:
    return {f"{prefix}_count": np.array(len(values)), **{f"{prefix}_{i}": v for i, v in enumerate(values)}}


def model_from_run(run_dir: str | os.PathLike, checkpoint: str = "best"):
    """Rebuild a run's model and load a checkpoint's weights ("best" or "last")."""
    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir / "config.json")
    norm = json.loads((run_dir / "normalization.json").read_text())
    model = build_model(config.model, config.features.shape, len(config.task.labels), norm["mean"], norm["variance"])
    path = run_dir / "checkpoints" / f"{checkpoint}.npz"
    if not path.exists():
        raise SpeechRNNError(f"no {checkpoint} checkpoint yet: the run has not finished an epoch", run_dir)
    model.set_weights(load_weights_npz(path))
    return config, model


def recorded_metrics(checkpoint: Path) -> dict | None:
    """The metrics a checkpoint recorded (None for checkpoints of runs trained before they did)."""
    if not checkpoint.exists():
        return None
    with np.load(checkpoint) as ck:
        return json.loads(str(ck["metrics"])) if "metrics" in ck else None


def reversal_strength(cfg: TrainConfig, epoch: int) -> float:
    """Gradient-reversal strength for an epoch: Ganin and Lempitsky's ramp 2/(1+exp(-10p)) - 1 over
    the training progress p (0 at the start, ~1 by the middle), times cfg.domain_adversarial."""
    progress = (epoch - 1) / max(1, cfg.epochs - 1)
    return float(cfg.domain_adversarial * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0))


def build_training(cfg: TrainConfig, num_labels: int, norm: dict, epoch_size: int):
    """The model, the model trained (itself, or with a domain head), its Adam optimizer (gradient
    clipping, warm-up + cosine schedule) and the schedule."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model, cfg.features.shape, num_labels, norm["mean"], norm["variance"], cfg.seed)
    trained = with_domain_head(model, 2, seed=cfg.seed) if cfg.domain_adversarial > 0 else model
    steps_per_epoch = math.ceil(epoch_size / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate * 0.1, max(1, total_steps - warmup), alpha=0.01,
        warmup_target=cfg.learning_rate, warmup_steps=warmup,
    )
    optimizer = keras.optimizers.Adam(
        learning_rate=schedule,
        global_clipnorm=cfg.clipnorm if cfg.clipnorm > 0 else None,
        clipvalue=cfg.clipvalue if cfg.clipnorm <= 0 and cfg.clipvalue > 0 else None,
    )
    optimizer.build(trained.trainable_variables)
    return model, trained, optimizer, schedule


def make_steps(model, trained, optimizer, cfg: TrainConfig):
    """Compiled (train_step, predict). train_step(x, y, domain) returns the classification loss,
    the global gradient norm before clipping (the optimizer clips inside apply), the number of
    correct predictions, and the domain head's loss and correct count (zeros without one)."""
    tf = import_tf()
    import keras

    spec_x = tf.TensorSpec([None, *cfg.features.shape], tf.float32)
    spec_y = tf.TensorSpec([None], tf.int32)
    adversarial = trained is not model

    @tf.function(input_signature=[spec_x, spec_y, spec_y])
    def train_step(x, y, domain):
        with tf.GradientTape() as tape:
            if adversarial:
                probs, domain_probs = trained(x, training=True)
            else:
                probs = trained(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probs))
            total = loss
            domain_loss, domain_correct = tf.constant(0.0), tf.constant(0.0)
            if adversarial:  # the mean over examples that have a domain (not silence)
                has = tf.cast(domain >= 0, tf.float32)
                known = tf.maximum(domain, 0)
                per = keras.losses.sparse_categorical_crossentropy(known, domain_probs)
                domain_loss = tf.reduce_sum(per * has) / tf.maximum(tf.reduce_sum(has), 1.0)
                hit = tf.cast(tf.equal(tf.argmax(domain_probs, -1, output_type=tf.int32), known), tf.float32)
                domain_correct = tf.reduce_sum(hit * has)
                total = loss + domain_loss
        grads = tape.gradient(total, trained.trainable_variables)
        norm = tf.linalg.global_norm(grads)
        optimizer.apply(grads, trained.trainable_variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return loss, norm, correct, domain_loss, domain_correct

    @tf.function(input_signature=[spec_x])
    def predict(x):
        return model(x, training=False)

    return train_step, predict


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, report: Callable[[str], None] | None = None,
                 show_progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir)
        self.report = report or log.info
        self.show_progress = show_progress

    # --- run folder -------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir, report=None, show_progress=True, epochs: int | None = None) -> Trainer:
        config = TrainConfig.load(Path(run_dir) / "config.json")
        if epochs:
            config.epochs = epochs
        return cls(config, run_dir, report, show_progress)

    def _prepare_run_dir(self, resume: bool) -> None:
        if not resume and (self.run_dir / "config.json").exists():
            raise SpeechRNNError("already holds a run: pass --resume to continue it, or choose another --out",
                                 self.run_dir)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.config.save(self.run_dir / "config.json")
        write_text_atomic(self.run_dir / "labels.txt", "\n".join(self.config.task.labels) + "\n")

    # --- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        check_words_have_clips(self.config)  # before TensorFlow loads and the run folder is made
        import_tf()
        import keras

        cfg = self.config
        self._prepare_run_dir(resume)
        self._log_handler = logging.FileHandler(self.run_dir / "train.log")
        logging.getLogger("speechrnn").addHandler(self._log_handler)
        try:
            return self._run(keras, cfg, resume)
        finally:
            logging.getLogger("speechrnn").removeHandler(self._log_handler)
            self._log_handler.close()

    def _run(self, keras, cfg: TrainConfig, resume: bool) -> dict:
        started = time.time()
        data = TrainingData(cfg, self.show_progress)
        labels = data.labels
        prefetch = Prefetcher(data)
        state_path = self.run_dir / "checkpoints" / "last.npz"
        state = {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "wait": 0, "history": []}
        if resume and state_path.exists():
            with np.load(state_path) as ck:
                state = json.loads(str(ck["state"]))
            self.report(f"resuming {self.run_dir} after epoch {state['epoch']}")
        elif resume:
            self.report(f"nothing to resume in {self.run_dir}: starting from epoch 1")
        norm_path = self.run_dir / "normalization.json"
        first_epoch = state["epoch"] + 1
        if norm_path.exists():
            norm = json.loads(norm_path.read_text())
        else:
            x0, _, _ = prefetch.get(0)  # statistics from the first (augmented) epoch: seeded, cheap
            norm = {"mean": x0.mean(axis=(0, 1)).tolist(), "variance": x0.var(axis=(0, 1)).tolist()}
            write_json_atomic(norm_path, norm)
        if not (self.run_dir / EXPORT_DATA).exists():
            write_export_data(self.run_dir / EXPORT_DATA, data, cfg.seed)
        if first_epoch <= cfg.epochs:
            prefetch.start(first_epoch)  # the first epoch's features are made while the model is built
        model, trained, optimizer, schedule = build_training(cfg, len(labels), norm, data.epoch_size)
        if resume and state_path.exists():
            model.set_weights(load_weights_npz(state_path, "model"))
            if trained is not model:
                trained.set_weights(load_weights_npz(state_path, "trained"))
            for var, value in zip(optimizer.variables, load_weights_npz(state_path, "opt"), strict=True):
                var.assign(value)
        train_step, predict = make_steps(model, trained, optimizer, cfg)
        reversal = trained.get_layer("gradient_reversal") if trained is not model else None

        n_params = int(model.count_params())
        self.report(f"{cfg.model.name}: {n_params:,} parameters; {len(data.train_examples)} training clips "
                    f"({data.epoch_size} per epoch with oversampling), {len(data.val_examples)} validation; "
                    f"labels: {' '.join(labels)}")
        stopped_early = False
        best_metrics = recorded_metrics(self.run_dir / "checkpoints" / "best.npz")
        for epoch in range(first_epoch, cfg.epochs + 1):
            if state["wait"] >= cfg.patience:
                stopped_early = True
                break
            t0 = time.time()
            x, y, d = prefetch.get(epoch)
            if epoch < cfg.epochs:
                prefetch.start(epoch + 1)
            keras.utils.set_random_seed(cfg.seed * 1000 + epoch)
            if reversal is not None:
                reversal.strength.assign(reversal_strength(cfg, epoch))
            losses, norms, correct, domain_losses, domain_correct = [], [], 0.0, [], 0.0
            batches = range(0, len(x), cfg.batch_size)
            with progress(batches, f"epoch {epoch}/{cfg.epochs}", self.show_progress and sys.stderr.isatty()) as bar:
                for start in bar:
                    batch = slice(start, start + cfg.batch_size)
                    loss, gnorm, ok, dloss, dok = train_step(x[batch], y[batch], d[batch])
                    losses.append(float(loss))
                    norms.append(float(gnorm))
                    correct += float(ok)
                    domain_losses.append(float(dloss))
                    domain_correct += float(dok)
            if not np.all(np.isfinite(losses)):
                raise SpeechRNNError(f"training diverged at epoch {epoch} (loss is not finite); try --clipnorm 1 "
                                     "or a lower --lr", self.run_dir)
            probs = np.concatenate([predict(data.val_x[i : i + 512]).numpy() for i in range(0, len(data.val_x), 512)])
            val_loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(probs)), data.val_y], 1e-12))))
            val_acc = float(np.mean(probs.argmax(1) == data.val_y))
            unseen = self._unseen_probabilities(predict, data, probs)
            record = {"unseen_probabilities": unseen, "metrics": np.array(json.dumps(
                checkpoint_metrics(unseen, data.unseen_y, data.unseen_is_validation, labels)))}
            norms_arr = np.array(norms)
            row = {
                "epoch": epoch, "loss": float(np.mean(losses)), "accuracy": correct / len(x),
                "val_loss": val_loss, "val_accuracy": val_acc,
                "learning_rate": float(schedule(int(optimizer.iterations.numpy()))),
                "grad_norm_max": float(norms_arr.max()), "grad_norm_median": float(np.median(norms_arr)),
                "clipped_fraction": float(np.mean(norms_arr > cfg.clipnorm)) if cfg.clipnorm > 0 else 0.0,
                "seconds": round(time.time() - t0, 2),
                "domain_loss": float(np.mean(domain_losses)) if reversal is not None else "",
                "domain_accuracy": domain_correct / max(1, int(np.sum(d >= 0))) if reversal is not None else "",
                "reversal_strength": round(reversal_strength(cfg, epoch), 4) if reversal is not None else "",
            }
            state["history"].append(row)
            improved = val_acc > state["best_val_accuracy"]
            if improved:
                state.update(best_val_accuracy=val_acc, best_epoch=epoch, wait=0)
                save_npz_atomic(self.run_dir / "checkpoints" / "best.npz",
                                {**_arrays("model", model.get_weights()), "epoch": np.array(epoch), **record})
                best_metrics = json.loads(str(record["metrics"]))
            else:
                state["wait"] += 1
            state["epoch"] = epoch
            save_npz_atomic(state_path, {
                **_arrays("model", model.get_weights()),
                **(_arrays("trained", trained.get_weights()) if trained is not model else {}),
                **_arrays("opt", [v.numpy() for v in optimizer.variables]),
                "state": np.array(json.dumps(state)),
                **record,
            })
            self._write_history(state["history"])
            domain = (f"  domain acc {row['domain_accuracy']:.3f} (reversal {row['reversal_strength']:.2f})"
                      if reversal is not None else "")
            self.report(
                f"epoch {epoch:3d}/{cfg.epochs}  loss {row['loss']:.3f}  acc {row['accuracy']:.3f}  "
                f"val_loss {val_loss:.3f}  val_acc {val_acc:.3f}{' *' if improved else '  '}  "
                f"grad-norm max {row['grad_norm_max']:.2f} median {row['grad_norm_median']:.2f}  "
                f"lr {row['learning_rate']:.2e}  {row['seconds']:.0f}s{domain}"
            )
        else:
            stopped_early = state["epoch"] < cfg.epochs
        self._plot_curves(state["history"])
        summary = {
            "model": cfg.model.name,
            "parameters": n_params,
            "labels": labels,
            "epochs_run": state["epoch"],
            "stopped_early": stopped_early,
            "best_epoch": state["best_epoch"],
            "best_val_accuracy": state["best_val_accuracy"],
            "train_clips": len(data.train_examples),
            "val_clips": len(data.val_examples),
            "data": cfg.data,
            "train_only": cfg.train_only,
            "skipped": data.skipped,  # "<file>: <reason>" of every clip that could not be read (left out)
            "metrics": best_metrics,  # the best checkpoint's, as its export carries them
            "grad_norm_max": max(r["grad_norm_max"] for r in state["history"]) if state["history"] else None,
            "seconds_this_session": round(time.time() - started, 1),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.report(f"best validation accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']}; "
                    f"run folder: {self.run_dir}")
        return summary

    @staticmethod
    def _unseen_probabilities(predict, data: TrainingData, val_probs: np.ndarray) -> np.ndarray:
        def run(x):
            return np.concatenate([predict(x[i : i + 512]).numpy() for i in range(0, len(x), 512)]) if len(x) else \
                np.zeros((0, len(data.labels)), np.float32)

        if data.unseen_after_val:
            return np.concatenate([val_probs, run(data.held_x)]).astype(np.float32)
        return run(data.unseen_x).astype(np.float32)

    def _write_history(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.run_dir / "history.csv", buf.getvalue())

    def _plot_curves(self, rows: list[dict]) -> None:
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        axes[0].plot(ep, [r["loss"] for r in rows], label="training")
        axes[0].plot(ep, [r["val_loss"] for r in rows], label="validation")
        axes[0].set_title("loss")
        axes[1].plot(ep, [r["accuracy"] for r in rows], label="training")
        axes[1].plot(ep, [r["val_accuracy"] for r in rows], label="validation")
        axes[1].set_title("accuracy")
        axes[2].plot(ep, [r["grad_norm_max"] for r in rows], label="max")
        axes[2].plot(ep, [r["grad_norm_median"] for r in rows], label="median")
        if self.config.clipnorm > 0:
            axes[2].axhline(self.config.clipnorm, color="grey", linestyle="--", label="clip norm")
        axes[2].set_yscale("log")
        axes[2].set_title("global gradient norm before clipping")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.run_dir / f".curves.png.tmp-{os.getpid()}"
        fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        os.replace(tmp, self.run_dir / "curves.png")
