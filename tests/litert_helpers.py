"""Real clips as MFCC, and the Keras model of an export rebuilt from its SavedModel, for the LiteRT tests.

The Keras model is rebuilt from the SavedModel: its architecture from the metadata, its weights from
the SavedModel's variables (named by their Keras paths), the normalisation statistics from the
constants its `mfcc` signature captured; the rebuilt model must give the SavedModel's probabilities
on real clips (else the tests fail here).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data_prep.audio import fix_length, load_audio
from data_prep.dataset import SpeechCommands, TaskConfig
from data_prep.features import FeatureConfig, mfcc


def real_mfcc(shared_data: Path, task: TaskConfig, split: str, count: int, config: FeatureConfig) -> np.ndarray:
    """MFCC [count, 98, 40] of ``count`` real clips of a split, spread over its examples (no silence cuts)."""
    examples = [ex for ex in SpeechCommands.open(shared_data).examples(task, split) if not ex.is_cut]
    chosen = examples[:: max(1, len(examples) // count)][:count]
    return mfcc(np.stack([fix_length(load_audio(ex.path), config.clip_samples) for ex in chosen]), config)


def keras_model_of(export: Path, clips: np.ndarray):
    """The Keras model of an export, rebuilt from its SavedModel, held to it on ``clips`` (MFCC)."""
    from speechrnn.models import ModelConfig, build_model
    from speechrnn.tfutil import import_tf

    tf = import_tf()
    meta = json.loads((export / "assets" / "speechrnn.json").read_text())
    features = FeatureConfig.from_dict(meta["features"])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})
    loaded = tf.saved_model.load(str(export))  # kept: its signatures hold only weak references
    signature = loaded.signatures["mfcc"]
    variables = {v.name.removesuffix(":0"): v.numpy() for v in signature.variables}
    statistics = [c.numpy().reshape(-1) for c in signature.captured_inputs if c.dtype == tf.float32 and
                  c.shape.as_list() == [1, 1, features.n_mfcc]]
    expected = signature(mfcc=tf.constant(clips))["probabilities"].numpy()
    for mean, variance in (statistics, statistics[::-1]):  # which captured constant is which: the one that fits
        model = build_model(config, features.shape, len(meta["labels"]), mean, variance)
        model.set_weights([variables[w.path] for w in model.weights])
        if np.abs(model.predict(clips, verbose=0) - expected).max() < 1e-5:
            return config, model
    raise AssertionError(f"could not rebuild {export}'s Keras model from its SavedModel")
