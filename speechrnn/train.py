"""Training: Adam with gradient clipping, warm-up + cosine schedule, early stopping, atomic
checkpoints and exact resume, on one device, several local devices or several workers.

A run folder holds: config.json, labels.txt, normalization.json, checkpoints/{last,best}.npz,
history.csv (with the largest and median global gradient norm before clipping, per epoch),
curves.png, train.log, summary.json and export_data.npz. With several workers, only the chief writes it.

What export needs of the data is recorded here, so that exporting needs only the run folder:
export_data.npz lists the clips the run kept out of training (the whole validation split and the
held-out speakers of scarce words: "unseen") with their labels, and holds the MFCC of real training
clips (for `export --int8 calibrated`) and of unseen clips (checks of the LiteRT models); each checkpoint holds
its probabilities on the unseen clips and the metrics they give (the metrics an export carries).

Each epoch's data (order, oversampling, augmentation) and Keras' seeds are derived from
(seed, epoch), and each clip's augmentation from (seed, epoch, its position in the epoch), so a
run resumed after a kill sees exactly the data an unbroken run would, and N workers together
train on exactly the batches one worker would.

Distributed training (``strategy``, see speechrnn.distribute): ``batch_size`` is the global batch.
Each step's global batch (positions [step*B, (step+1)*B) of the epoch's order) is cut into one
contiguous slice per replica; a worker reads, augments and featurises only its replicas' slices.
Each replica's loss is its share of the global batch's mean (sum over its slice / global batch
size), so the gradients summed over replicas (one all-reduce) are the global batch's gradient; its
global norm is clipped and applied on every replica alike. Learning rate, schedule and step count
are the single-worker recipe's: N workers reproduce one worker's run, up to the order of floating-
point additions and the dropout and SpecAugment draws inside the model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.audio import load_audio
from data_prep.augment import augment, stream_context
from data_prep.dataset import HOLDOUT, NOISE_REGIONS, SILENCE, SPLITS, UNKNOWN, SpeechCommands, words_without_clips
from data_prep.errors import SpeechRNNError
from data_prep.extract import example_key, featurize, progress
from data_prep.features import mfcc_batched
from data_prep.waveforms import open_store
from speechrnn.distribute import Distribution, cluster_from_env, make_distribution, pack, unpack
from speechrnn.evaluate import checkpoint_metrics
from speechrnn.models import build_model, with_domain_head
from speechrnn.runconfig import TrainConfig, write_json_atomic, write_text_atomic
from speechrnn.tfutil import import_tf

import_tf()
import keras  # noqa: E402

log = logging.getLogger(__name__)
HISTORY_FIELDS = [
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
    "grad_norm_max", "grad_norm_median", "clipped_fraction", "seconds",
    "domain_loss", "domain_accuracy", "reversal_strength", "input_wait_seconds",
]
REAL, SYNTHETIC, NO_DOMAIN = 0, 1, -1  # domain labels for domain-adversarial training
EXPORT_DATA = "export_data.npz"
# Real clips recorded for export: training clips to calibrate a fully int8 LiteRT model on (`export
# --int8 calibrated`; with 512 the shipped model's agreed with its float one on 99.4-99.8% of unseen
# clips, with 256 on 99.3%), and unseen ones to check the LiteRT models on.
CALIBRATION_CLIPS, CHECK_CLIPS = 512, 256
NORM_CLIPS = 20_000  # the normalisation statistics come from (up to) this many clips of epoch 0
CHUNK_CLIPS = 512  # clips a worker reads, augments and featurises at a time
QUEUE_CHUNKS = 3  # chunks made ahead of the training loop (memory: ~CHUNK_CLIPS x 16 kB each)


class TrainingData:
    """Training examples and cached validation features.

    The training waveforms live in an int16 cache file (data_prep.waveforms), read a chunk at a
    time and augmented afresh each epoch, so memory does not grow with the corpus; validation
    features are computed once and cached on disk by content (data_prep.extract).
    """

    def __init__(self, config: TrainConfig, show_progress: bool = True, cache_dir: str | os.PathLike | None = None):
        self.config = config
        task, fc = config.task, config.features
        noise_files, extra = [], []
        # The --data folders are pooled, so unknown words and silence are sampled from all of them.
        real = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.data])
        train, val = real.examples(task, "training"), real.examples(task, "validation")
        noise_files += real.noise_files
        if config.train_only:  # pooled too: a folder of synthetic unknown words joins the others' commands
            synthetic = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.train_only])
            for split in (*SPLITS, HOLDOUT):  # every clip of a train-only folder trains
                extra += synthetic.examples(task, split, all_unknown=config.train_only_unknown == "all")
            noise_files += synthetic.noise_files
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
        self.store, errors = open_store(train, fc, cache_dir, show_progress)
        for err in errors:
            log.error("%s", err)
        kept = self.store.kept
        self.train_examples = [train[i] for i in kept]
        self.train_labels = np.array([index[ex.label] for ex in self.train_examples], np.int32)
        self.train_is_real = kept < n_real  # from --data, not --train-only
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
        valf = featurize(val, fc, cache_dir=cache_dir, show_progress=show_progress)
        self.val_examples = valf.examples
        self.val_x = valf.features
        self.val_y = np.array([index[ex.label] for ex in valf.examples], np.int32)
        # The clips an export's metrics are on: the whole validation split (not capped by
        # max_per_label) and the held-out speakers, after the validation clips when they are the same.
        whole_val = real.examples(task, "validation")
        unseen_val = valf if whole_val == val else featurize(whole_val, fc, cache_dir=cache_dir,
                                                             show_progress=show_progress)
        held = featurize(real.examples(task, HOLDOUT), fc, cache_dir=cache_dir, show_progress=show_progress)
        self.unseen_examples = unseen_val.examples + held.examples
        self.unseen_x = np.concatenate([unseen_val.features, held.features])
        self.unseen_y = np.array([index[ex.label] for ex in self.unseen_examples], np.int32)
        self.unseen_is_validation = np.array([ex.split == "validation" for ex in self.unseen_examples], bool)
        extra_errors = [] if unseen_val is valf else unseen_val.errors
        self.skipped = list(dict.fromkeys(str(err) for err in [*errors, *valf.errors, *extra_errors, *held.errors]))
        examples_per_epoch = len(self._epoch_indices(np.random.default_rng(0)))
        self.negatives_count = round(config.negatives_fraction * examples_per_epoch) if self.negatives else 0
        self.epoch_size = examples_per_epoch + self.negatives_count
        # What every worker must agree on: the same clips, by content, in the same order.
        negatives = f"negatives:{[len(n) for n in self.negatives]}:{self.negatives_real}"
        self.digest = hashlib.sha1("\n".join([self.store.digest, *valf.keys, negatives]).encode()).hexdigest()[:20]

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

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The examples (row numbers) of one epoch in training order [epoch_size], deterministic in
        (seed, epoch). Rows from len(train_labels) on stand for windows of the negatives."""
        rng = np.random.default_rng([self.config.seed, epoch])
        order = self._epoch_indices(rng)
        if self.negatives_count:
            n = len(self.train_labels)
            order = rng.permutation(np.concatenate([order, np.arange(n, n + self.negatives_count)]))
        return order

    def domains(self, order: np.ndarray) -> np.ndarray:
        """The domain of each row of an epoch order [n]; windows of the negatives have none (they
        train the classifier, not the real-versus-synthetic head)."""
        out = np.full(len(order), NO_DOMAIN, np.int32)
        clips = order < len(self.train_labels)
        out[clips] = self.train_domain[order[clips]]
        return out

    def features(self, epoch: int, order: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Augmented MFCC features [n, frames, n_mfcc], labels [n] and domains [n] (REAL, SYNTHETIC,
        NO_DOMAIN) of the examples at ``positions`` of ``order`` (= epoch_order(epoch)).

        Each clip's augmentation is drawn from its own generator, seeded by (seed, epoch, position):
        the same clip at the same position comes out the same whichever worker makes it, alone or
        with its neighbours."""
        cfg, rate = self.config, self.config.features.sample_rate
        positions = np.asarray(positions, np.int64)
        rows = order[positions]
        rngs = [np.random.default_rng([cfg.seed, epoch, int(p)]) for p in positions]
        negative = rows >= len(self.train_labels)
        clips = rows[~negative]
        waves = np.zeros((len(rows), cfg.features.clip_samples), np.float32)
        labels = np.full(len(rows), self.labels.index(UNKNOWN) if UNKNOWN in self.labels else 0, np.int32)
        domains = np.full(len(rows), NO_DOMAIN, np.int32)
        waves[~negative] = self.store.read(clips)
        labels[~negative], domains[~negative] = self.train_labels[clips], self.train_domain[clips]
        for k in np.flatnonzero(negative):  # running speech with no command: a window, _unknown_, no domain
            waves[k], _ = cut_window(self.negatives, self.negatives_real, cfg.features.clip_samples, rngs[k])
        if cfg.augment.context_probability > 0:  # words as a sliding window meets them in a stream
            is_word = np.zeros(len(self.train_labels) + self.negatives_count, bool)
            is_word[self.word_rows] = True
            chosen = [k for k in np.flatnonzero(~negative & is_word[rows])
                      if rngs[k].random() < cfg.augment.context_probability]
            neighbours = [int(self.word_rows[rngs[k].integers(len(self.word_rows))]) for k in chosen]
            if chosen:
                others = self.store.read(np.array(neighbours))
                for k, j, other in zip(chosen, neighbours, others, strict=True):
                    waves[k], labels[k] = stream_context(waves[k], other, int(labels[k]), int(self.train_labels[j]),
                                                         rngs[k], self.is_command, self.labels.index(UNKNOWN), rate)
        waves = augment(waves, self.noise, cfg.augment, rngs, rate)
        return mfcc_batched(waves, cfg.features), labels, domains


def load_negatives(folders: list[str], sample_rate: int, show_progress: bool = True
                   ) -> tuple[list[np.ndarray], list[bool]]:
    """Every audio file under the folders (recordings with no command in them), as int16 at
    sample_rate, and whether each is real speech (a folder without a synth.json record)."""
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
        synthetic = (root / "synth.json").exists() or (root / "mined.json").exists()
        with progress(files, f"loading negatives from {root.name}", show_progress) as bar:
            for path in bar:
                try:
                    audio = load_audio(path, sample_rate)
                except SpeechRNNError as err:
                    log.error("%s", err)
                    continue
                waves.append(np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16))
                real.append(not synthetic)
    return waves, real


def cut_window(recordings: list[np.ndarray], real: list[bool], length: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, bool]:
    """One window of ``length`` samples (float32) at a random place in the recordings (int16 or
    float), a recording chosen in proportion to its duration (so a one-second mined window weighs
    a third of a three-second sentence; a shorter one is zero-padded), and whether it came from
    real speech."""
    sizes = np.array([max(1, len(r)) for r in recordings], np.float64)
    r = int(rng.choice(len(recordings), p=sizes / sizes.sum()))
    rec = recordings[r]
    start = int(rng.integers(0, max(1, len(rec) - length + 1)))
    out = np.zeros(length, np.float32)
    piece = rec[start : start + length]
    out[: len(piece)] = piece / np.float32(32767) if rec.dtype == np.int16 else piece
    return out, real[r]


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
    calibration = mfcc_batched(data.store.read(calibration_rows), data.config.features)
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


def recorded_metrics(checkpoint: Path) -> dict | None:
    """The metrics a checkpoint recorded (None for checkpoints of runs trained before they did)."""
    if not checkpoint.exists():
        return None
    with np.load(checkpoint) as ck:
        return json.loads(str(ck["metrics"])) if "metrics" in ck else None


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


def replica_cuts(n: int, replicas: int) -> np.ndarray:
    """Where a global batch of ``n`` examples is cut into ``replicas`` contiguous slices [replicas + 1]
    (as numpy.array_split: the first n % replicas slices get one example more; some may be empty)."""
    q, r = divmod(n, replicas)
    return np.concatenate([[0], np.cumsum([q + 1] * r + [q] * (replicas - r))]).astype(np.int64)


@dataclass
class Step:
    """One training step's inputs for this worker: its replicas' slices of the global batch, back to
    back (x [n, frames, n_mfcc], y [n], domain [n]), where each local replica's slice starts
    (bounds [local replicas + 1]), and the global batch's size and number of examples with a domain."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    bounds: np.ndarray
    batch_total: float
    domain_total: float

    def args(self) -> tuple:
        return (self.x, self.y, self.domain, self.bounds, np.float32(self.batch_total), np.float32(self.domain_total))


@dataclass
class _Chunk:
    epoch: int
    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    starts: np.ndarray  # [steps + 1]: where each step's examples start in x
    bounds: list[np.ndarray]
    totals: list[int]
    domain_totals: list[int]


class BatchStream:
    """This worker's share of every epoch's batches, made in a background thread a few chunks
    (QUEUE_CHUNKS x CHUNK_CLIPS clips) ahead of the training loop, across epoch boundaries.

    ``wait_seconds[epoch]`` is how long the training loop waited for features in that epoch,
    ``thread_cpu_seconds[epoch]`` the CPU time the thread spent making them, and
    ``domain_counts[epoch]`` how many of the epoch's examples (all workers') have a domain label.
    """

    def __init__(self, data: TrainingData, dist: Distribution, batch_size: int, first_epoch: int, last_epoch: int):
        self.data, self.batch_size = data, batch_size
        self.replicas, self.local = dist.num_replicas, dist.local_replicas
        self.first_epoch, self.last_epoch = first_epoch, last_epoch
        self.steps_per_epoch = math.ceil(data.epoch_size / batch_size)
        local_batch = math.ceil(batch_size * len(self.local) / self.replicas)
        self.steps_per_chunk = max(1, CHUNK_CLIPS // max(1, local_batch))
        self.wait_seconds: dict[int, float] = defaultdict(float)
        self.thread_cpu_seconds: dict[int, float] = defaultdict(float)
        self.domain_counts: dict[int, int] = {}
        self._queue: queue.Queue = queue.Queue(QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-stream", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        data, B, E = self.data, self.batch_size, self.data.epoch_size
        lo_rep, hi_rep = self.local.start, self.local.stop
        try:
            for epoch in range(self.first_epoch, self.last_epoch + 1):
                c0 = time.thread_time()
                order = data.epoch_order(epoch)
                has_domain = data.domains(order) >= 0
                self.domain_counts[epoch] = int(has_domain.sum())
                for s0 in range(0, self.steps_per_epoch, self.steps_per_chunk):
                    positions, starts, bounds, totals, domain_totals = [], [0], [], [], []
                    for step in range(s0, min(self.steps_per_epoch, s0 + self.steps_per_chunk)):
                        lo, hi = step * B, min(E, (step + 1) * B)
                        cuts = replica_cuts(hi - lo, self.replicas)
                        positions.append(np.arange(lo + cuts[lo_rep], lo + cuts[hi_rep]))
                        starts.append(starts[-1] + len(positions[-1]))
                        bounds.append((cuts[lo_rep : hi_rep + 1] - cuts[lo_rep]).astype(np.int32))
                        totals.append(hi - lo)
                        domain_totals.append(int(has_domain[lo:hi].sum()))
                    x, y, d = data.features(epoch, order, np.concatenate(positions))
                    self.thread_cpu_seconds[epoch] += time.thread_time() - c0
                    if not self._put(_Chunk(epoch, x, y, d, np.array(starts), bounds, totals, domain_totals)):
                        return
                    c0 = time.thread_time()
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop, which re-raises it
            self._put(exc)

    def batches(self, epoch: int) -> _EpochBatches:
        """The epoch's steps, in order (epochs must be asked for in order, from first_epoch)."""
        return _EpochBatches(self, epoch)

    def _next_chunk(self, epoch: int) -> _Chunk:
        t0 = time.perf_counter()
        while True:
            if not self._thread.is_alive() and self._queue.empty():
                raise RuntimeError("the batch thread ended early")
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        self.wait_seconds[epoch] += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        if item.epoch != epoch:
            raise RuntimeError(f"batch thread is at epoch {item.epoch}, the training loop at {epoch}")
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class _EpochBatches:
    def __init__(self, stream: BatchStream, epoch: int):
        self.stream, self.epoch = stream, epoch

    def __len__(self) -> int:
        return self.stream.steps_per_epoch

    def __iter__(self) -> Iterator[Step]:
        done = 0
        while done < self.stream.steps_per_epoch:
            chunk = self.stream._next_chunk(self.epoch)
            for k in range(len(chunk.totals)):
                part = slice(chunk.starts[k], chunk.starts[k + 1])
                yield Step(chunk.x[part], chunk.y[part], chunk.domain[part], chunk.bounds[k],
                           chunk.totals[k], chunk.domain_totals[k])
            done += len(chunk.totals)


def save_npz_atomic(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_weights_npz(path, prefix: str = "model") -> list[np.ndarray]:
    """A checkpoint's arrays saved under ``prefix`` ("model", "trained" or "opt"); ``path`` may be a file object."""
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


def reversal_strength(cfg: TrainConfig, epoch: int) -> float:
    """Gradient-reversal strength for an epoch: Ganin and Lempitsky's ramp 2/(1+exp(-10p)) - 1 over
    the training progress p (0 at the start, ~1 by the middle), times cfg.domain_adversarial."""
    progress = (epoch - 1) / max(1, cfg.epochs - 1)
    return float(cfg.domain_adversarial * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0))


if not hasattr(keras.optimizers.Adam, "_all_reduce_sum_gradients"):  # pragma: no cover - a Keras upgrade
    raise ImportError("this Keras no longer has TFOptimizer._all_reduce_sum_gradients; "
                      "speechrnn.train.SummedGradientsAdam must be revisited")


class SummedGradientsAdam(keras.optimizers.Adam):
    """Adam that is given gradients already summed over replicas, and clipped on that sum.

    Keras' TensorFlow optimizer sums gradients over replicas itself, after clipping each replica's
    share (keras/src/backend/tensorflow/optimizer.py), so with more than one replica global-norm
    clipping would clip partial gradients, not the batch's. Our train step sums them first (one
    all-reduce), clips the sum, and this optimizer applies it as it is. With one replica it is Adam.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def build_training(cfg: TrainConfig, num_labels: int, norm: dict, epoch_size: int):
    """The model, the model trained (itself, or with a domain head), its Adam optimizer (warm-up +
    cosine schedule; clipping happens in the train step) and the schedule. Call inside the
    strategy's scope for distributed training."""
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
    optimizer = SummedGradientsAdam(learning_rate=schedule)
    optimizer.build(trained.trainable_variables)
    return model, trained, optimizer, schedule


def make_steps(model, trained, optimizer, cfg: TrainConfig, dist: Distribution | None = None):
    """Compiled (train_step, predict).

    ``train_step(*Step.args())`` runs one step on every local replica and returns the global
    batch's classification loss (mean), the global norm of its gradient before clipping, its
    number of correct predictions, and the domain head's loss and correct count (zeros without
    one); the same numbers on every worker. ``predict(x)`` gives the exported model's
    probabilities [n, labels] for MFCC frames x [n, frames, n_mfcc], on this worker alone.
    """
    tf = import_tf()
    dist = dist or Distribution("default", tf.distribute.get_strategy())
    strategy, first = dist.strategy, dist.local_replicas.start
    spec_x = tf.TensorSpec([None, *cfg.features.shape], tf.float32)
    spec_y = tf.TensorSpec([None], tf.int32)
    scalar = tf.TensorSpec([], tf.float32)
    adversarial = trained is not model
    variables = trained.trainable_variables

    def replica_step(x, y, domain, bounds, batch_total, domain_total):
        ctx = tf.distribute.get_replica_context()
        j = ctx.replica_id_in_sync_group - first
        x, y, domain = x[bounds[j] : bounds[j + 1]], y[bounds[j] : bounds[j + 1]], domain[bounds[j] : bounds[j + 1]]
        with tf.GradientTape() as tape:
            if adversarial:
                probs, domain_probs = trained(x, training=True)
            else:
                probs = trained(x, training=True)
            # This replica's share of the global batch's mean: the shares sum to the mean.
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, probs)) / batch_total
            total = loss
            domain_loss, domain_correct = tf.constant(0.0), tf.constant(0.0)
            if adversarial:  # the mean over the global batch's examples that have a domain (not silence)
                has = tf.cast(domain >= 0, tf.float32)
                known = tf.maximum(domain, 0)
                per = keras.losses.sparse_categorical_crossentropy(known, domain_probs)
                domain_loss = tf.reduce_sum(per * has) / tf.maximum(domain_total, 1.0)
                hit = tf.cast(tf.equal(tf.argmax(domain_probs, -1, output_type=tf.int32), known), tf.float32)
                domain_correct = tf.reduce_sum(hit * has)
                total = loss + domain_loss
        grads = tape.gradient(total, variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        grads, loss, correct, domain_loss, domain_correct = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, [grads, loss, correct, domain_loss, domain_correct])
        norm = tf.linalg.global_norm(grads)
        if cfg.clipnorm > 0:
            grads, _ = tf.clip_by_global_norm(grads, cfg.clipnorm, use_norm=norm)
        elif cfg.clipvalue > 0:
            grads = [tf.clip_by_value(g, -cfg.clipvalue, cfg.clipvalue) for g in grads]
        optimizer.apply(grads, variables)
        return loss, norm, correct, domain_loss, domain_correct

    @tf.function(input_signature=[spec_x, spec_y, spec_y, spec_y, scalar, scalar])
    def train_step(x, y, domain, bounds, batch_total, domain_total):
        out = strategy.run(replica_step, args=(x, y, domain, bounds, batch_total, domain_total))
        return tuple(strategy.experimental_local_results(v)[0] for v in out)

    @tf.function(input_signature=[spec_x])
    def predict(x):
        return model(x, training=False)

    return train_step, predict


def _collective_failure(message: str) -> str:
    """The informative part of TensorFlow's message for a failed collective operation."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for line in lines:
        if "aborted by:" in line:
            return line.split("aborted by:", 1)[1].strip()[:160]
    for line in lines:
        if not line.startswith(("Graph execution error", "Detected at node", "File ", "[[")):
            return line[:160]
    return "a collective operation failed"


class Trainer:
    """Trains a run folder, on the strategy named by ``strategy`` (speechrnn.distribute.STRATEGIES).

    With ``multiworker``, every worker runs a Trainer; the chief (worker 0) prepares and writes the
    run folder and sends the others its config, normalisation and, on resume, its last checkpoint,
    so the other workers need no copy of the run folder (only the data, at the same paths).
    """

    def __init__(self, config: TrainConfig | None, run_dir: str | os.PathLike,
                 report: Callable[[str], None] | None = None, show_progress: bool = True,
                 strategy: str = "default", epochs: int | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.report = report or log.info
        self.show_progress = show_progress
        self.strategy = strategy
        self.cluster = cluster_from_env(strategy)  # checks TF_CONFIG before anything slow happens
        self.epochs = epochs  # on resume: a new number of epochs
        self.dist: Distribution | None = None

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    # --- run folder -------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir, report=None, show_progress=True, epochs: int | None = None,
               strategy: str = "default") -> Trainer:
        """A Trainer that continues the run in ``run_dir``. With ``multiworker`` its config is read
        (by the chief) only once the workers are connected."""
        trainer = cls(None, run_dir, report, show_progress, strategy, epochs)
        if trainer.cluster is None:
            trainer.config = trainer._load_config()
        return trainer

    def _load_config(self) -> TrainConfig:
        config = TrainConfig.load(self.run_dir / "config.json")
        if self.epochs:
            config.epochs = self.epochs
        return config

    def _prepare_run_dir(self, resume: bool) -> None:
        if not resume and (self.run_dir / "config.json").exists():
            raise SpeechRNNError("already holds a run: pass --resume to continue it, or choose another --out",
                                 self.run_dir)
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.config.save(self.run_dir / "config.json")
        write_text_atomic(self.run_dir / "labels.txt", "\n".join(self.config.task.labels) + "\n")

    # --- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Train to the end (or early stop) and return the summary. Raises SpeechRNNError for
        anything the user can fix, including a worker lost mid-run (then every worker must be
        started again with --resume)."""
        if self.config is not None:  # a resumed non-chief worker gets its config from the chief
            check_words_have_clips(self.config)  # before TensorFlow loads and the run folder is made
        tf = import_tf()
        if self.cluster is not None:
            self.report(f"{self.cluster.task} of {len(self.cluster.workers)} workers ({self.cluster.address}): "
                        "waiting for the others")
        self.dist = dist = make_distribution(self.strategy, self.cluster)
        handler = None
        lost = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError, tf.errors.FailedPreconditionError, tf.errors.InternalError)
        try:
            cfg, state, norm, checkpoint = self._handshake(dist, resume)
            if dist.is_chief:
                handler = logging.FileHandler(self.run_dir / "train.log")
                logging.getLogger("speechrnn").addHandler(handler)
            return self._run(cfg, state, norm, checkpoint, dist)
        except lost as exc:
            if dist.num_workers == 1:
                raise
            raise SpeechRNNError(
                f"lost contact with another worker ({_collective_failure(exc.message)}): start every worker again "
                "with the same command and --resume; training goes on after the last epoch the chief saved") from None
        finally:
            if handler is not None:
                logging.getLogger("speechrnn").removeHandler(handler)
                handler.close()

    def _handshake(self, dist: Distribution, resume: bool):
        """The chief prepares the run folder and reads what a resumed run needs; every worker gets
        the chief's config, training state, normalisation and checkpoint (bytes), or its error."""
        header, checkpoint, error = {}, b"", None
        if dist.is_chief:
            try:
                if self.config is None:
                    self.config = self._load_config()
                self._prepare_run_dir(resume)
                state_path = self.run_dir / "checkpoints" / "last.npz"
                if resume and state_path.exists():
                    checkpoint = state_path.read_bytes()
                    with np.load(io.BytesIO(checkpoint)) as ck:
                        header["state"] = json.loads(str(ck["state"]))
                    self.report(f"resuming {self.run_dir} after epoch {header['state']['epoch']}")
                elif resume:
                    self.report(f"nothing to resume in {self.run_dir}: starting from epoch 1")
                norm_path = self.run_dir / "normalization.json"
                if norm_path.exists():
                    header["norm"] = json.loads(norm_path.read_text())
                header["config"] = self.config.to_dict()
            except SpeechRNNError as err:
                error, header, checkpoint = err, {"error": str(err)}, b""
            if dist.num_workers > 1:
                dist.broadcast(pack(header, checkpoint))
            if error is not None:
                raise error
        else:
            header, checkpoint = unpack(dist.broadcast(None))
            if "error" in header:
                raise SpeechRNNError(f"the chief stopped: {header['error']}")
            if self.config is not None and self.config.to_dict() != header["config"]:
                mine, chief = self.config.to_dict(), header["config"]
                differ = sorted(k for k in chief if mine.get(k) != chief[k])
                log.warning("this worker's training options differ from the chief's in %s: the chief's are used",
                            ", ".join(differ))
            self.config = TrainConfig.from_dict(header["config"])
        state = header.get("state") or {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "wait": 0,
                                        "history": []}
        if dist.num_workers > 1:
            self.report(f"{dist.describe}: connected")
        return self.config, state, header.get("norm"), checkpoint

    def _normalization(self, data: TrainingData, dist: Distribution) -> dict:
        """Per-coefficient mean and variance of epoch 0's augmented features (up to NORM_CLIPS clips:
        seeded, so a resumed run or another worker gets the same), each worker computing a share."""
        order = data.epoch_order(0)
        mine = np.array_split(np.arange(min(len(order), NORM_CLIPS)), dist.num_workers)[dist.worker_index]
        n = data.config.features.n_mfcc
        sums = np.zeros(2 * n + 1)
        for start in range(0, len(mine), CHUNK_CLIPS):
            x, _, _ = data.features(0, order, mine[start : start + CHUNK_CLIPS])
            flat = x.reshape(-1, n).astype(np.float64)
            sums += np.concatenate([flat.sum(0), np.square(flat).sum(0), [len(flat)]])
        sums = dist.sum(sums)
        mean = sums[:n] / sums[-1]
        return {"mean": mean.tolist(), "variance": np.maximum(sums[n : 2 * n] / sums[-1] - mean**2, 0.0).tolist()}

    def _run(self, cfg: TrainConfig, state: dict, norm: dict | None, checkpoint: bytes, dist: Distribution) -> dict:
        started = time.time()
        data, error = None, None
        try:
            data = TrainingData(cfg, self.show_progress)
        except SpeechRNNError as err:
            error = err
        dist.agree(error, "load its training data")
        chief_digest = dist.broadcast(data.digest.encode() if dist.is_chief else None).decode()
        dist.agree(None if chief_digest == data.digest else SpeechRNNError(
            "this worker's training or validation clips differ from the chief's: every worker needs the same "
            "files at the same paths"), "load the chief's training data")
        labels = data.labels
        if norm is None:
            norm = self._normalization(data, dist)
            if dist.is_chief:
                write_json_atomic(self.run_dir / "normalization.json", norm)
        if dist.is_chief and not (self.run_dir / EXPORT_DATA).exists():
            write_export_data(self.run_dir / EXPORT_DATA, data, cfg.seed)
        best_metrics = recorded_metrics(self.run_dir / "checkpoints" / "best.npz") if dist.is_chief else None
        first_epoch = state["epoch"] + 1
        # The first epoch's batches are made while the model is built and its step traced.
        stream = BatchStream(data, dist, cfg.batch_size, first_epoch, cfg.epochs) if first_epoch <= cfg.epochs else None
        stopped_early = False
        try:
            with dist.strategy.scope():
                model, trained, optimizer, schedule = build_training(cfg, len(labels), norm, data.epoch_size)
            if checkpoint:
                model.set_weights(load_weights_npz(io.BytesIO(checkpoint), "model"))
                if trained is not model:
                    trained.set_weights(load_weights_npz(io.BytesIO(checkpoint), "trained"))
                opt_values = load_weights_npz(io.BytesIO(checkpoint), "opt")
                for var, value in zip(optimizer.variables, opt_values, strict=True):
                    var.assign(value)
            train_step, predict = make_steps(model, trained, optimizer, cfg, dist)
            reversal = trained.get_layer("gradient_reversal") if trained is not model else None
            val_rows = np.array_split(np.arange(len(data.val_x)), dist.num_workers)[dist.worker_index]
            n_params = int(model.count_params())
            self.report(f"{cfg.model.name}: {n_params:,} parameters; {len(data.train_examples)} training clips "
                        f"({data.epoch_size} per epoch with oversampling"
                        + (f" and {data.negatives_count} windows of {len(data.negatives)} negatives recordings"
                           if data.negatives_count else "")
                        + f"), {len(data.val_examples)} validation; labels: {' '.join(labels)}")
            for epoch in range(first_epoch, cfg.epochs + 1):
                if state["wait"] >= cfg.patience:
                    stopped_early = True
                    break
                t0 = time.time()
                keras.utils.set_random_seed(cfg.seed * 1000 + epoch)
                if reversal is not None:
                    reversal.strength.assign(reversal_strength(cfg, epoch))
                losses, norms, correct, domain_losses, domain_correct = [], [], 0.0, [], 0.0
                show = self.show_progress and sys.stderr.isatty()
                with progress(stream.batches(epoch), f"epoch {epoch}/{cfg.epochs}", show) as bar:
                    for step in bar:
                        loss, gnorm, ok, dloss, dok = train_step(*step.args())
                        losses.append(float(loss))
                        norms.append(float(gnorm))
                        correct += float(ok)
                        domain_losses.append(float(dloss))
                        domain_correct += float(dok)
                if not np.all(np.isfinite(losses)):
                    raise SpeechRNNError(f"training diverged at epoch {epoch} (loss is not finite); try --clipnorm 1 "
                                         "or a lower --lr", self.run_dir)
                val_loss_sum, val_correct = 0.0, 0
                for i in range(0, len(val_rows), 512):
                    rows = val_rows[i : i + 512]
                    probs = predict(data.val_x[rows]).numpy()
                    val_loss_sum -= float(np.sum(np.log(np.maximum(probs[np.arange(len(rows)), data.val_y[rows]], 1e-12))))
                    val_correct += int(np.sum(probs.argmax(1) == data.val_y[rows]))
                val_loss_sum, val_correct = dist.sum([val_loss_sum, val_correct])
                val_loss, val_acc = float(val_loss_sum / len(data.val_x)), float(val_correct / len(data.val_x))
                norms_arr = np.array(norms)
                row = {
                    "epoch": epoch, "loss": float(np.mean(losses)), "accuracy": correct / data.epoch_size,
                    "val_loss": val_loss, "val_accuracy": val_acc,
                    "learning_rate": float(schedule(int(optimizer.iterations.numpy()))),
                    "grad_norm_max": float(norms_arr.max()), "grad_norm_median": float(np.median(norms_arr)),
                    "clipped_fraction": float(np.mean(norms_arr > cfg.clipnorm)) if cfg.clipnorm > 0 else 0.0,
                    "seconds": round(time.time() - t0, 2),
                    "domain_loss": float(np.mean(domain_losses)) if reversal is not None else "",
                    "domain_accuracy": domain_correct / max(1, stream.domain_counts[epoch]) if reversal is not None else "",
                    "reversal_strength": round(reversal_strength(cfg, epoch), 4) if reversal is not None else "",
                    "input_wait_seconds": round(stream.wait_seconds[epoch], 2),
                }
                state["history"].append(row)
                improved = val_acc > state["best_val_accuracy"]
                if improved:
                    state.update(best_val_accuracy=val_acc, best_epoch=epoch, wait=0)
                else:
                    state["wait"] += 1
                state["epoch"] = epoch
                if dist.is_chief:  # the chief scores every unseen clip: the metrics an export carries
                    unseen = np.concatenate([predict(data.unseen_x[i : i + 512]).numpy()
                                             for i in range(0, len(data.unseen_x), 512)] or
                                            [np.zeros((0, len(labels)), np.float32)]).astype(np.float32)
                    metrics = checkpoint_metrics(unseen, data.unseen_y, data.unseen_is_validation, labels)
                    record = {"unseen_probabilities": unseen, "metrics": np.array(json.dumps(metrics))}
                    self._save_checkpoints(model, trained, optimizer, state, improved, record)
                    if improved:
                        best_metrics = metrics
                domain = (f"  domain acc {row['domain_accuracy']:.3f} (reversal {row['reversal_strength']:.2f})"
                          if reversal is not None else "")
                self.report(
                    f"{'' if dist.is_chief else f'[worker {dist.worker_index}] '}"
                    f"epoch {epoch:3d}/{cfg.epochs}  loss {row['loss']:.3f}  acc {row['accuracy']:.3f}  "
                    f"val_loss {val_loss:.3f}  val_acc {val_acc:.3f}{' *' if improved else '  '}  "
                    f"grad-norm max {row['grad_norm_max']:.2f} median {row['grad_norm_median']:.2f}  "
                    f"lr {row['learning_rate']:.2e}  {row['seconds']:.0f}s{domain}"
                )
            else:
                stopped_early = state["epoch"] < cfg.epochs
        finally:
            if stream is not None:
                stream.close()
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
            "negatives": cfg.negatives,
            "skipped": data.skipped,  # "<file>: <reason>" of every clip that could not be read (left out)
            "metrics": best_metrics,  # the best checkpoint's, as its export carries them
            "grad_norm_max": max(r["grad_norm_max"] for r in state["history"]) if state["history"] else None,
            "strategy": dist.name,
            "workers": dist.num_workers,
            "replicas": dist.num_replicas,
            "seconds_this_session": round(time.time() - started, 1),
        }
        if dist.is_chief:
            self._plot_curves(state["history"])
            write_json_atomic(self.run_dir / "summary.json", summary)
            self.report(f"best validation accuracy {summary['best_val_accuracy']:.4f} at epoch "
                        f"{summary['best_epoch']}; run folder: {self.run_dir}")
        dist.finish()
        return summary

    def _save_checkpoints(self, model, trained, optimizer, state: dict, improved: bool, record: dict) -> None:
        if improved:
            save_npz_atomic(self.run_dir / "checkpoints" / "best.npz",
                            {**_arrays("model", model.get_weights()), "epoch": np.array(state["epoch"]), **record})
        save_npz_atomic(self.run_dir / "checkpoints" / "last.npz", {
            **_arrays("model", model.get_weights()),
            **(_arrays("trained", trained.get_weights()) if trained is not model else {}),
            **_arrays("opt", [v.numpy() for v in optimizer.variables]),
            "state": np.array(json.dumps(state)),
            **record,
        })
        self._write_history(state["history"])

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
