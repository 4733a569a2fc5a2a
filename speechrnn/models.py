"""Stacked (bi)LSTM/GRU keyword classifiers, built by name from a ModelConfig.

Input: MFCC frames [batch, frames, coefficients]. Inside the model: per-coefficient
normalisation with training-set statistics (so exported models need no outside
preprocessing), SpecAugment-style masking while training, the recurrent stack, a pooling head
(last state, mean over time, or attention) and a softmax over the task's labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from speechrnn.tfutil import import_tf

import_tf()
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

CELLS = {"gru": layers.GRU, "lstm": layers.LSTM}
POOLINGS = ("last", "mean", "attention")


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "gru"
    layers: int = 2
    units: int = 64
    bidirectional: bool = True
    dropout: float = 0.2  # between recurrent layers and before the classifier
    pooling: str = "attention"
    time_masks: int = 2  # SpecAugment while training: masks of up to time_mask_frames frames
    time_mask_frames: int = 10
    freq_masks: int = 2  # and of up to freq_mask_bins coefficients
    freq_mask_bins: int = 5
    # Per-utterance mean normalisation: subtract each window's own mean of every coefficient over
    # time (cepstral mean normalisation), which removes a fixed channel or voice colouring.
    utterance_norm: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.layers < 1 or self.units < 1:
            raise ValueError("layers and units must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**data)

    @property
    def name(self) -> str:
        kind = "bi" if self.bidirectional else ""
        return f"{self.layers}x{kind}{self.cell}{self.units}-{self.pooling}"


class SpecAugment(layers.Layer):
    """Zero random time and frequency stripes of the (normalised) features, only while training."""

    def __init__(self, time_masks: int, time_width: int, freq_masks: int, freq_width: int, seed: int = 0, **kw):
        super().__init__(**kw)
        self.masks = [(1, time_width)] * time_masks + [(2, freq_width)] * freq_masks
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or not self.masks:
            return x
        batch, frames, bins = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
        keep = ops.ones_like(x)
        for axis, width in self.masks:
            size = frames if axis == 1 else bins
            w = keras.random.randint((batch, 1, 1), 0, width + 1, seed=self.seed_generator)
            start = keras.random.randint((batch, 1, 1), 0, ops.maximum(size - width, 1), seed=self.seed_generator)
            pos = ops.reshape(ops.arange(size), (1, -1, 1) if axis == 1 else (1, 1, -1))
            inside = ops.logical_and(pos >= start, pos < start + w)
            keep = keep * ops.cast(ops.logical_not(inside), x.dtype)
        return x * keep


class UtteranceNorm(layers.Layer):
    """Cepstral mean normalisation: [batch, frames, coeff] minus its mean over frames."""

    def call(self, x):
        return x - ops.mean(x, axis=1, keepdims=True)


class GradientReversal(layers.Layer):
    """Identity going forward; multiplies the gradient by -strength going back (Ganin and
    Lempitsky, 2015, "Unsupervised domain adaptation by backpropagation"). Features trained
    through it learn to make a domain classifier fail. ``strength`` is a variable the trainer ramps."""

    def build(self, input_shape):
        self.strength = self.add_weight(shape=(), initializer="zeros", trainable=False, name="strength")

    def call(self, x):
        import tensorflow as tf

        strength = self.strength

        @tf.custom_gradient
        def reverse(y):
            return tf.identity(y), lambda dy: -strength * dy

        return reverse(x)


FEATURE_LAYER = "features"  # the pooled utterance representation the classifier and domain heads share


def with_domain_head(model: keras.Model, num_domains: int, units: int = 64, seed: int = 0) -> keras.Model:
    """A training-only model: the classifier's outputs plus a domain classifier (e.g. real vs
    synthetic speech) on the shared features, joined through a gradient-reversal layer.

    Returns keras.Model(inputs -> [probabilities, domain probabilities]); the classifier's layers
    are shared, so training this trains ``model``, and ``model`` alone is what gets exported.
    """
    feats = model.get_layer(FEATURE_LAYER).output
    x = GradientReversal(name="gradient_reversal")(feats)
    x = layers.Dense(units, activation="relu", name="domain_hidden",
                     kernel_initializer=keras.initializers.GlorotUniform(seed + 200))(x)
    domain = layers.Dense(num_domains, activation="softmax", name="domain",
                          kernel_initializer=keras.initializers.GlorotUniform(seed + 201))(x)
    return keras.Model(model.inputs, [model.output, domain], name=f"{model.name}-dann")


class AttentionPooling(layers.Layer):
    """Weighted mean over time with learned softmax weights: lets the model find the word."""

    def build(self, input_shape):
        self.score = layers.Dense(1, name="score")
        self.score.build(input_shape)

    def call(self, x):
        weights = ops.softmax(self.score(x), axis=1)
        return ops.sum(weights * x, axis=1)


def build_model(
    config: ModelConfig,
    input_shape: tuple[int, int],
    num_labels: int,
    mean: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    seed: int = 0,
) -> keras.Model:
    """The classifier. ``mean``/``variance`` are per-coefficient training-set statistics."""
    n_coeff = input_shape[1]
    mean = np.zeros(n_coeff, np.float32) if mean is None else np.asarray(mean, np.float32)
    variance = np.ones(n_coeff, np.float32) if variance is None else np.asarray(variance, np.float32)
    inputs = keras.Input(shape=input_shape, name="mfcc")
    x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(inputs)
    if config.utterance_norm:
        x = UtteranceNorm(name="utterance_norm")(x)
    x = SpecAugment(config.time_masks, config.time_mask_frames, config.freq_masks, config.freq_mask_bins,
                    seed=seed, name="spec_augment")(x)
    cell = CELLS[config.cell]
    for i in range(config.layers):
        last = i == config.layers - 1
        rnn = cell(config.units, return_sequences=not (last and config.pooling == "last"), name=f"{config.cell}_{i}")
        x = (layers.Bidirectional(rnn, name=f"bi{config.cell}_{i}") if config.bidirectional else rnn)(x)
        if config.dropout and not last:
            x = layers.Dropout(config.dropout, seed=seed + i)(x)
    if config.pooling == "mean":
        x = layers.GlobalAveragePooling1D(name="mean_pool")(x)
    elif config.pooling == "attention":
        x = AttentionPooling(name="attention_pool")(x)
    x = layers.Identity(name=FEATURE_LAYER)(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, seed=seed + 100)(x)
    outputs = layers.Dense(num_labels, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=config.name)
