"""Export a run as a TensorFlow SavedModel that needs neither speechrnn nor librosa to run.

Signatures (XLA-compiled twins ``waveform_xla`` and ``mfcc_xla`` live in the ``xla/`` sub-export,
so a one-shot load reads a graph a quarter the size):
  serving_default(waveform: float32 [batch, samples] at 16 kHz)
      -> probabilities [batch, labels], label (string) [batch], score [batch]
      The clip is zero-padded or cropped to the model's clip length, then MFCC is computed in
      the graph with the same mel matrix and DCT as data_prep.features (held equal by a test).
  mfcc(mfcc: float32 [batch, frames, coefficients]) -> the same outputs.
Assets (plain files): assets/labels.txt and assets/speechrnn.json (FeatureConfig, task, model
config, training summary, validation metrics), written before the folder is renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError
from data_prep.features import LOG_FLOOR, FeatureConfig, mfcc_constants
from speechrnn import __version__
from speechrnn.tfutil import import_tf

log = logging.getLogger(__name__)
FORMAT = "speechrnn-export"
META_FILE = "speechrnn.json"
XLA_DIR = "xla"  # a second SavedModel inside the export: the XLA-compiled signatures


def tf_mfcc(tf, waveform, config: FeatureConfig, constants: dict):
    """[batch, samples] -> [batch, frames, n_mfcc]; the TensorFlow twin of data_prep.features.mfcc."""
    frames = tf.signal.frame(waveform, config.window_samples, config.hop_samples)
    spectrum = tf.signal.rfft(frames * constants["window"], fft_length=[config.window_samples])
    power = tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))
    mel = tf.tensordot(power, constants["mel"], axes=1)
    log_mel = 10.0 * tf.math.log(tf.maximum(mel, LOG_FLOOR)) / np.log(10.0).astype(np.float32)
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
    wave_spec = tf.TensorSpec([None, None], tf.float32, name="waveform")
    mfcc_spec = tf.TensorSpec([None, frames, coeffs], tf.float32, name="mfcc")

    def features(waveform):
        n = tf.shape(waveform)[1]
        waveform = tf.pad(waveform[:, :clip], [[0, 0], [0, tf.maximum(0, clip - n)]])
        return tf_mfcc(tf, tf.ensure_shape(waveform, [None, clip]), config, consts)

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
            return self._outputs(probs_of_mfcc(features(waveform)))

        @tf.function(input_signature=[mfcc_spec])
        def classify_mfcc(self, mfcc):
            return self._outputs(probs_of_mfcc(mfcc))

    return SpeechRNNModule()


def _is_export(path: Path) -> bool:
    return (path / "saved_model.pb").exists() and (path / "assets" / META_FILE).exists()


def write_export(model, labels: list[str], config: FeatureConfig, out: str | os.PathLike, metadata: dict) -> Path:
    """Save atomically: a temp sibling folder is filled, then renamed to ``out``.

    A killed export leaves at most a hidden ``.<name>.tmp-*`` folder, never a folder that
    looks like a complete model. An existing export at ``out`` is replaced; any other
    non-empty folder is refused.
    """
    tf = import_tf()
    out = Path(out)
    if out.exists() and not (out.is_dir() and (_is_export(out) or not any(out.iterdir()))):
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
        meta = {"format": FORMAT, "format_version": 1, "speechrnn_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "labels": labels,
                "features": config.to_dict(), **metadata}
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


def validation_metrics(model, run_dir: Path, labels: list[str]) -> dict:
    """Accuracy and per-label recall of the exported weights on real clips it never trained on:
    the validation split, and ("unseen") validation plus the held-out speakers of scarce words."""
    from data_prep.dataset import HOLDOUT, SpeechCommands
    from data_prep.extract import featurize
    from speechrnn.evaluate import metrics_from_predictions
    from speechrnn.runconfig import TrainConfig

    config = TrainConfig.load(run_dir / "config.json")
    dataset = SpeechCommands.union([SpeechCommands.open(folder) for folder in config.data])  # as training pools them
    groups = {split: dataset.examples(config.task, split) for split in ("validation", HOLDOUT)}
    feats = featurize(groups["validation"] + groups[HOLDOUT], config.features, show_progress=False)
    if not len(feats.features):
        return {}
    predicted = model.predict(feats.features, batch_size=256, verbose=0).argmax(1)
    truth = np.array([labels.index(ex.label) for ex in feats.examples])
    is_validation = np.array([ex.split == "validation" for ex in feats.examples])
    out = {}
    for name, rows in (("validation", is_validation), ("unseen", np.ones_like(is_validation))):
        if name == "unseen" and is_validation.all():
            continue
        report = metrics_from_predictions(truth[rows], predicted[rows], labels)
        out[name] = {k: report[k] for k in ("accuracy", "accuracy_95ci", "balanced_accuracy", "examples", "per_class")}
    return out


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
                label_thresholds: dict[str, float] | None = None) -> Path:
    """Export one run, or several as one model that averages their probabilities (an ensemble).

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
    metadata = {
        "task": config.task.to_dict(),
        "model": model_meta,
        "training": training,
        "metrics": validation_metrics(model, run_dirs[0], labels),
    }
    if label_thresholds:
        metadata["streaming"] = {"label_thresholds": dict(label_thresholds)}
    return write_export(model, labels, config.features, out, metadata)
