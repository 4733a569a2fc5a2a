"""Export a run as a TensorFlow SavedModel that needs neither speechrnn nor librosa to run, and
LiteRT models of the same weights that need no TensorFlow either (speechrnn.litert_export).

Signatures (XLA-compiled twins ``waveform_xla`` and ``mfcc_xla`` live in the ``xla/`` sub-export,
so a one-shot load reads a graph a quarter the size):
  serving_default(waveform: float32 [batch, samples]) -> probabilities [batch, labels],
      label (string) [batch], score [batch]
      The input contract: mono, 16 kHz (the model's FeatureConfig.sample_rate), float32 in
      [-1, 1]. Any length: up to one second is zero-padded to one second; a longer waveform is
      scored in 1 s windows every 100 ms plus one ending at its last sample, and the answer is the
      window with the highest score for a class other than _silence_ (the rule `speechrnn
      classify` applies to files; a test holds them equal). Every row of a batch has the same
      length (pad with zeros). Audio at another rate must be resampled first: the graph cannot
      tell, and 44.1 kHz audio given as 16 kHz is heard 2.8x slower and scored wrongly. Samples
      beyond [-1, 1] give finite, meaningless scores (the features never overflow).
      MFCC is computed in the graph with the same mel matrix and DCT as data_prep.features (held
      equal by a test). The whole waveform is scored in one call: memory grows with its length.
  mfcc(mfcc: float32 [batch, frames, coefficients]) -> the same outputs, for one window each.
LiteRT (litert/): model_float32.tflite, MFCC [batch, frames, coefficients] -> probabilities
[batch, labels], checked at export to give the Keras model's probabilities within 1e-4 on real
unseen clips; model_int8.tflite, its int8-quantised twin, when its top-1 answers agree with the
float model's on at least 99% of them.
Assets (plain files): assets/labels.txt and assets/speechrnn.json (FeatureConfig, task, model
config, training summary, validation metrics, the sha256 of both graphs and of each LiteRT
model), written before the folder is renamed into place. The metrics (and the real clips the
LiteRT models are calibrated and checked on) come from the run folder's record of them
(speechrnn.train), so exporting needs only the run folder; a run trained before runs kept that
record has them computed from its data folders, as before. speechrnn.export_format holds the
format and the checks of a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_prep.dataset import SILENCE
from data_prep.errors import SpeechRNNError
from data_prep.features import DB_PER_OCTAVE, LOG_FLOOR, FeatureConfig, mfcc_constants
from speechrnn import __version__
from speechrnn.export_format import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    LITERT_DIR,
    LITERT_FILES,
    META_FILE,
    WINDOW_HOP_S,
    XLA_DIR,
    file_sha256,
    is_export,
)
from speechrnn.tfutil import import_tf

log = logging.getLogger(__name__)


def tf_mfcc(tf, waveform, config: FeatureConfig, constants: dict):
    """[batch, samples] -> [batch, frames, n_mfcc]; the TensorFlow twin of data_prep.features.mfcc,
    with its scaling of loud rows, so that no finite input overflows."""
    peak = tf.reduce_max(tf.abs(waveform), axis=-1, keepdims=True)
    exponent = tf.where(peak > 1.0, tf.math.ceil(tf.math.log(tf.maximum(peak, 1.0)) / np.log(2.0).astype(np.float32)),
                        tf.zeros_like(peak))
    half = tf.math.floor(exponent / 2.0)  # two factors: TensorFlow flushes subnormal numbers like 2**-128 to zero
    waveform = waveform * tf.pow(2.0, -half) * tf.pow(2.0, half - exponent)
    frames = tf.signal.frame(waveform, config.window_samples, config.hop_samples)
    spectrum = tf.signal.rfft(frames * constants["window"], fft_length=[config.window_samples])
    power = tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))
    mel = tf.tensordot(power, constants["mel"], axes=1)
    floor = tf.maximum(LOG_FLOOR * tf.pow(2.0, -2.0 * exponent), np.finfo(np.float32).tiny)[:, :, None]
    log_mel = 10.0 * tf.math.log(tf.maximum(mel, floor)) / np.log(10.0).astype(np.float32)
    log_mel = log_mel + DB_PER_OCTAVE * exponent[:, :, None]
    return tf.tensordot(log_mel, constants["dct"], axes=1)


def build_export_module(model, labels: list[str], config: FeatureConfig, xla: bool = False):
    """A tf.Module with the two entry points, as plain graphs or XLA-compiled.

    The plain graphs start at once (one-shot classification of files). The XLA ones compile on
    their first call (~1-2 s) and then run a batch-1 clip about 10x faster: what streaming wants.
    They are saved as two SavedModels because save() serialises every function of a module.
    """
    tf = import_tf()
    consts = {k: tf.constant(v) for k, v in mfcc_constants(config).items()}
    clip = config.clip_samples
    frames, coeffs = config.shape
    hop = int(round(config.sample_rate * WINDOW_HOP_S))
    if hop % config.hop_samples:
        raise SpeechRNNError(f"the window hop ({hop} samples) is not a whole number of MFCC hops ({config.hop_samples})")
    frames_per_window_hop = hop // config.hop_samples
    silence = labels.index(SILENCE) if SILENCE in labels else -1
    wave_spec = tf.TensorSpec([None, None], tf.float32, name="waveform")
    mfcc_spec = tf.TensorSpec([None, frames, coeffs], tf.float32, name="mfcc")

    def windows(waveform):
        """[batch, samples] -> [batch, windows, frames, coefficients]: the MFCC of each 1 s window, every
        100 ms from the start, plus one ending at the last sample; up to 1 s: the zero-padded clip."""
        n = tf.shape(waveform)[1]
        length = tf.maximum(n, clip)
        waveform = tf.pad(waveform, [[0, 0], [0, length - n]])
        # Window starts are whole numbers of MFCC hops: one MFCC of the whole waveform serves them all.
        grid = tf.signal.frame(tf_mfcc(tf, waveform, config, consts), frames, frames_per_window_hop, axis=1)

        def with_last():
            last = tf_mfcc(tf, waveform[:, length - clip :], config, consts)[:, None]
            return tf.concat([grid, last], axis=1)

        return tf.cond((length - clip) % hop > 0, with_last, lambda: grid)

    def pick(probs):
        """[batch, windows, labels] -> [batch, labels]: the most confident window whose best class is not
        _silence_, or the most confident window when all are silence."""
        score = tf.reduce_max(probs, axis=-1)
        if silence >= 0:
            is_word = tf.not_equal(tf.argmax(probs, axis=-1, output_type=tf.int32), silence)
            any_word = tf.reduce_any(is_word, axis=-1, keepdims=True)
            score = tf.where(is_word | ~any_word, score, -1.0)
        return tf.gather(probs, tf.argmax(score, axis=-1, output_type=tf.int32), batch_dims=1)

    # One traced copy of the network serves both entry points (the graph file stays small). XLA
    # cannot gather strings: only the probabilities are compiled; labels are looked up after.
    probs_of_mfcc = tf.function(lambda x: model(x, training=False), jit_compile=xla)

    class SpeechRNNModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.labels = tf.constant(labels)

        def _outputs(self, probs):
            index = tf.argmax(probs, axis=-1, output_type=tf.int32)
            return {"probabilities": probs, "label": tf.gather(self.labels, index), "score": tf.reduce_max(probs, -1)}

        @tf.function(input_signature=[wave_spec])
        def classify_waveform(self, waveform):
            """float32 waveform [batch, samples], mono, 16 kHz, in [-1, 1], any length -> probabilities
            [batch, labels], label [batch], score [batch]. Longer than 1 s: 1 s windows every 100 ms
            (and one ending at the last sample), the answer from the most confident window whose best
            class is not _silence_ (as `speechrnn classify`). Other rates must be resampled first."""
            x = windows(waveform)
            batch, count = tf.shape(x)[0], tf.shape(x)[1]
            probs = probs_of_mfcc(tf.reshape(x, [-1, frames, coeffs]))
            return self._outputs(pick(tf.reshape(probs, [batch, count, len(labels)])))

        @tf.function(input_signature=[mfcc_spec])
        def classify_mfcc(self, mfcc):
            """float32 MFCC frames [batch, frames, coefficients] of one 1 s window each -> the same outputs."""
            return self._outputs(probs_of_mfcc(mfcc))

    return SpeechRNNModule()


def write_export(model, labels: list[str], config: FeatureConfig, out: str | os.PathLike, metadata: dict,
                 litert: tuple[dict[str, bytes], dict] | None = None) -> Path:
    """Save atomically: a temp sibling folder is filled, then renamed to ``out``.

    ``litert``: the LiteRT models ({"float32"|"int8": flatbuffer bytes}) and their metadata, as
    speechrnn.litert_export.litert_models makes them; written to litert/ with their sha256.

    A killed export leaves at most a hidden ``.<name>.tmp-*`` folder, never a folder that
    looks like a complete model. An existing export at ``out`` is replaced; any other
    non-empty folder is refused.
    """
    tf = import_tf()
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_export(out) or not any(out.iterdir()))):
        raise SpeechRNNError("exists and is not a speechrnn export; choose another output folder", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        plain = build_export_module(model, labels, config)
        tf.saved_model.save(plain, str(tmp), signatures={
            "serving_default": plain.classify_waveform, "mfcc": plain.classify_mfcc,
        })
        xla = build_export_module(model, labels, config, xla=True)
        tf.saved_model.save(xla, str(tmp / XLA_DIR), signatures={
            "serving_default": xla.classify_waveform, "waveform_xla": xla.classify_waveform,
            "mfcc_xla": xla.classify_mfcc,
        })
        assets = tmp / "assets"
        assets.mkdir(exist_ok=True)
        (assets / "labels.txt").write_text("\n".join(labels) + "\n")
        litert_meta = {}
        if litert is not None:
            files, litert_meta = litert[0], dict(litert[1])
            (tmp / LITERT_DIR).mkdir()
            for variant, data in files.items():
                (tmp / LITERT_FILES[variant]).write_bytes(data)
                litert_meta[variant] = {"file": LITERT_FILES[variant], "sha256": hashlib.sha256(data).hexdigest(),
                                        **litert_meta.get(variant, {})}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "speechrnn_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "labels": labels,
                "features": config.to_dict(), **metadata,
                "graph_sha256": {name: file_sha256(tmp / name) for name in GRAPH_FILES},
                **({"litert": litert_meta} if litert_meta else {})}
        (assets / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks completeness
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def metrics_from_data(model, run_dir: Path, labels: list[str]) -> tuple[dict, np.ndarray]:
    """For a run folder without a record of them (trained before runs kept one): the metrics
    (evaluate.checkpoint_metrics) of the exported weights on the clips the run kept out of training,
    read and featurised from its data folders, and those clips' MFCC [n, frames, coefficients]."""
    from data_prep.dataset import HOLDOUT, SpeechCommands
    from data_prep.extract import featurize
    from speechrnn.evaluate import checkpoint_metrics
    from speechrnn.runconfig import TrainConfig

    config = TrainConfig.load(run_dir / "config.json")
    dataset = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.data])  # as training pools them
    examples = dataset.examples(config.task, "validation") + dataset.examples(config.task, HOLDOUT)
    feats = featurize(examples, config.features, show_progress=False)  # logs each unreadable clip
    if not len(feats.features):
        return {}, feats.features
    probabilities = model.predict(feats.features, batch_size=256, verbose=0)
    truth = np.array([labels.index(ex.label) for ex in feats.examples])
    is_validation = np.array([ex.split == "validation" for ex in feats.examples])
    return checkpoint_metrics(probabilities, truth, is_validation, labels), feats.features


def calibration_from_data(run_dir: Path) -> np.ndarray:
    """For a run folder without a record of them: MFCC of up to CALIBRATION_CLIPS real training clips,
    spread over the labels, read from its data folders (int8 calibration)."""
    from data_prep.dataset import SpeechCommands
    from data_prep.extract import WaveformLoader
    from data_prep.features import mfcc_batched
    from speechrnn.runconfig import TrainConfig
    from speechrnn.train import CALIBRATION_CLIPS, _sample_rows

    config = TrainConfig.load(run_dir / "config.json")
    dataset = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.data])
    examples = dataset.examples(config.task, "training")
    labels = np.array([config.task.labels.index(ex.label) for ex in examples])
    chosen = [examples[i] for i in _sample_rows(labels, CALIBRATION_CLIPS, np.random.default_rng([config.seed, 7]))]
    waves, _, _ = WaveformLoader(config.features).load_many(chosen)
    return mfcc_batched(waves, config.features) if len(waves) else np.zeros((0, *config.features.shape), np.float32)


def recorded_export_data(run_dir: Path, checkpoint: str) -> dict | None:
    """What training recorded for export (speechrnn.train.EXPORT_DATA and the checkpoint's
    probabilities on the unseen clips), or None for a run trained before runs recorded it."""
    from speechrnn.train import EXPORT_DATA

    path, ck = run_dir / EXPORT_DATA, run_dir / "checkpoints" / f"{checkpoint}.npz"
    if not path.exists() or not ck.exists():
        return None
    with np.load(ck) as saved:
        if "unseen_probabilities" not in saved:
            return None
        probabilities = saved["unseen_probabilities"]
    with np.load(path) as saved:
        record = {key: saved[key] for key in saved.files}
    if len(probabilities) != len(record["unseen_truth"]):
        return None
    return {**record, "probabilities": probabilities}


def export_data(run_dirs: list[Path], checkpoint: str, model, labels: list[str],
                calibrate: bool = True) -> tuple[dict, np.ndarray, np.ndarray | None, str]:
    """(metrics, MFCC of unseen clips to check the LiteRT models on, MFCC of real training clips to
    calibrate int8 on (when ``calibrate``), where they came from): from the runs' records when every
    run has one (an ensemble's metrics from the mean of its members' recorded probabilities);
    otherwise computed from the first run's data folders as before runs kept a record (which needs
    those folders), with a warning saying so."""
    from speechrnn.evaluate import checkpoint_metrics

    records = [recorded_export_data(r, checkpoint) for r in run_dirs]
    missing = [r for r, rec in zip(run_dirs, records, strict=True) if rec is None]
    if not missing and all(np.array_equal(rec["unseen_keys"], records[0]["unseen_keys"]) for rec in records):
        first = records[0]
        probabilities = np.mean([rec["probabilities"] for rec in records], axis=0)
        metrics = checkpoint_metrics(probabilities, first["unseen_truth"], first["unseen_is_validation"], labels)
        return (metrics, first["check_mfcc"].astype(np.float32), first["calibration_mfcc"].astype(np.float32),
                "recorded by training")
    why = (f"{missing[0]} has no record of its validation results (trained before runs kept one)" if missing
           else "the runs recorded their results on different clips")
    log.warning("%s: computing the metrics from the data folders", why)
    metrics, unseen = metrics_from_data(model, run_dirs[0], labels)
    check = unseen[_spread(len(unseen))]
    return (metrics, check, calibration_from_data(run_dirs[0]) if calibrate else None,
            "computed at export from the data folders")


def _spread(n: int, count: int = 256) -> np.ndarray:  # as speechrnn.train.CHECK_CLIPS
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(int)) if n else np.zeros(0, int)


def training_summary(run_dir: Path) -> dict:
    """summary.json once training has ended; before that, what the last checkpoint knows."""
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    last = run_dir / "checkpoints" / "last.npz"
    if not last.exists():
        return {}
    with np.load(last) as ck:
        state = json.loads(str(ck["state"]))
    return {"epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_accuracy": state["best_val_accuracy"], "finished": False}


FOLDER_KEYS = ("data", "train_only", "negatives")


def portable(training: dict) -> dict:
    """The training record with data folders named, not located: an export must not carry the
    training machine's absolute paths (``/home/me/data/speech_commands`` -> ``speech_commands``)."""
    out = dict(training)
    for key in FOLDER_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [Path(p).name for p in out[key]]
    if isinstance(out.get("run_config"), dict):
        out["run_config"] = portable(out["run_config"])
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "best") -> Path:
    """Export a run folder's best (default) or last checkpoint."""
    return export_runs([run_dir], out, checkpoint)


def ensemble_model(models: list):
    """One Keras model whose output is the mean of the members' probabilities (same MFCC input)."""
    import keras

    inputs = keras.Input(shape=tuple(models[0].input_shape[1:]), name="mfcc")
    # Renamed wrappers: members built from the same recipe share layer and model names.
    outputs = [keras.Model(m.input, m.output, name=f"member_{i}")(inputs) for i, m in enumerate(models)]
    return keras.Model(inputs, keras.layers.Average(name="probabilities")(outputs), name="ensemble")


def _check_members(run_dirs: list[Path], configs: list) -> None:
    """Members must agree on what they classify and on the data split: a member trained on clips
    another one holds out (other split seed, holdout or data) would make "unseen" figures lie."""
    first = configs[0]
    for run_dir, config in zip(run_dirs[1:], configs[1:], strict=True):
        for what, a, b in (("labels", first.task.labels, config.task.labels),
                           ("task (words, split seed, holdout)", first.task.to_dict(), config.task.to_dict()),
                           ("features", first.features.to_dict(), config.features.to_dict()),
                           ("data folders", [Path(x).resolve() for x in first.data], [Path(x).resolve() for x in config.data])):
            if a != b:
                raise SpeechRNNError(f"cannot be averaged with {run_dirs[0]}: its {what} differ", run_dir)


def export_runs(run_dirs: list, out: str | os.PathLike, checkpoint: str = "best",
                label_thresholds: dict[str, float] | None = None, int8: str = "dynamic") -> Path:
    """Export one run, or several as one model that averages their probabilities (an ensemble).

    ``int8``: how its int8 LiteRT model is quantised (speechrnn.litert_export.convert).

    Runs trained on the same data with different augmentation make partly different mistakes; what
    the mean of two did on the streaming benchmark is in README ("The default model").
    """
    from speechrnn.runconfig import TrainConfig
    from speechrnn.train import model_from_run

    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise SpeechRNNError("no run folder given")
    configs = [TrainConfig.load(r / "config.json") for r in run_dirs]
    _check_members(run_dirs, configs)
    config = configs[0]
    for label in label_thresholds or {}:  # checked before the (slow) model loading
        if label not in config.task.words:
            raise SpeechRNNError(f"threshold for {label}: not a command of this model ({', '.join(config.task.words)})",
                                 run_dirs[0])
    members = [model_from_run(r, checkpoint) for r in run_dirs]
    labels = config.task.labels
    described = [{**c.model.to_dict(), "name": c.model.name, "parameters": int(m.count_params())} for c, m in members]
    trained = [portable({**training_summary(r), "checkpoint": checkpoint, "run_config": c.to_dict()})
               for r, (c, _) in zip(run_dirs, members, strict=True)]
    if len(members) == 1:
        model, model_meta, training = members[0][1], described[0], trained[0]
    else:
        model = ensemble_model([m for _, m in members])
        model_meta = {"name": f"mean of {len(members)}: " + " + ".join(d["name"] for d in described),
                      "parameters": int(model.count_params()), "members": described}
        training = {"members": trained, "runs": [str(r) for r in run_dirs]}
    from speechrnn.litert_export import litert_models

    metrics, check, calibration, source = export_data(run_dirs, checkpoint, model, labels, int8 == "calibrated")
    litert = litert_models([m for _, m in members], [c.model for c, _ in members], config.features.shape, model,
                           check, calibration, int8)
    metadata = {
        "task": config.task.to_dict(),
        "model": model_meta,
        "training": training,
        "metrics": metrics,
        "metrics_source": source,
    }
    if label_thresholds:
        metadata["streaming"] = {"label_thresholds": dict(label_thresholds)}
    return write_export(model, labels, config.features, out, metadata, litert)
