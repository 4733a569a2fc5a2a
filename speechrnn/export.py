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
    groups: dict[str, list] = {"validation": [], HOLDOUT: []}
    for folder in config.data:
        dataset = SpeechCommands.open(folder)
        for split in groups:
            groups[split] += dataset.examples(config.task, split)
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


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "best") -> Path:
    """Export a run folder's best (default) or last checkpoint."""
    from speechrnn.train import model_from_run

    run_dir = Path(run_dir)
    config, model = model_from_run(run_dir, checkpoint)
    labels = config.task.labels
    summary = training_summary(run_dir)
    metadata = {
        "task": config.task.to_dict(),
        "model": {**config.model.to_dict(), "name": config.model.name, "parameters": int(model.count_params())},
        "training": {**summary, "checkpoint": checkpoint, "run_config": config.to_dict()},
        "metrics": validation_metrics(model, run_dir, labels),
    }
    return write_export(model, labels, config.features, out, metadata)
