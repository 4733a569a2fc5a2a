"""LiteRT (TFLite) models of an export, from the same weights as its SavedModel.

The trained Keras model runs its recurrences in a ``tf.while_loop``: converted as it is, a dynamic
batch needs TensorFlow's TensorList ops (Flex: TensorFlow itself at run time), and a batch of 1
gives a WHILE loop of builtin ops that ran a clip in 3.8 ms here. So the network is written out
again, for inference only, as a plain graph of builtin ops (2.8 ms here, and it batches):

- each recurrence is unrolled over the fixed number of MFCC frames (98 for 1 s), one direction
  at a time; a layer's input projection for every frame is one matrix product before the steps,
  so a step is its recurrent products and ~9 elementwise ops;
- layers that act only while training (SpecAugment, dropout, the domain head) are left out;
  Normalization, UtteranceNorm, attention/mean/last pooling and the softmax are as in Keras;
- the batch dimension stays free (the interpreter resizes it: 1 for listening, 64 for files).

litert_models holds the float32 model to the Keras model on real clips at export (no export with
a model that differs); tests hold it to the SavedModel within 1e-4. An ensemble is written the
same way, its members' graphs side by side and their probabilities averaged.

int8: post-training quantisation (float32 in and out), by default of the weights with activations
quantised per call ("dynamic"); "calibrated" quantises the activations too, with ranges from real
training clips (see convert for what each measured). Kept only when its top-1 answer agrees with
the float model's on at least INT8_MIN_AGREEMENT of the real unseen clips it is checked on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from data_prep.errors import SpeechRNNError
from speechrnn.models import FEATURE_LAYER, ModelConfig
from speechrnn.tfutil import import_tf, silenced_stderr

log = logging.getLogger(__name__)
INT8_MIN_AGREEMENT = 0.99
FLOAT_TOLERANCE = 1e-4  # largest difference in any probability, LiteRT float32 against Keras


@dataclass
class Member:
    """One trained network, as plain arrays: what inference_function needs of it."""

    config: ModelConfig
    mean: np.ndarray  # [coefficients], Normalization layer
    scale: np.ndarray  # [coefficients], max(sqrt(variance), epsilon)
    layers: list[dict]  # per recurrent layer: {"directions": [(kernel, recurrent_kernel, bias), ...]}
    attention: tuple[np.ndarray, np.ndarray] | None  # score kernel [features, 1], bias [1]
    dense: tuple[np.ndarray, np.ndarray]  # kernel [features, labels], bias [labels]


def member_of(model, config: ModelConfig) -> Member:
    """The arrays of a model built by speechrnn.models.build_model(config)."""
    import keras

    norm = model.get_layer("normalize")
    mean = np.asarray(norm.mean, np.float32).reshape(-1)
    scale = np.maximum(np.sqrt(np.asarray(norm.variance, np.float32).reshape(-1)), keras.backend.epsilon())
    layers = []
    for i in range(config.layers):
        layer = model.get_layer(f"bi{config.cell}_{i}" if config.bidirectional else f"{config.cell}_{i}")
        rnns = [layer.forward_layer, layer.backward_layer] if config.bidirectional else [layer]
        directions = []
        for rnn in rnns:
            cell = rnn.cell
            if cell.activation.__name__ != "tanh" or cell.recurrent_activation.__name__ != "sigmoid" \
                    or not cell.use_bias or (config.cell == "gru" and not cell.reset_after):
                raise SpeechRNNError(f"cannot write {rnn.name} for LiteRT: only the cells build_model makes")
            directions.append(tuple(np.asarray(w, np.float32) for w in (cell.kernel, cell.recurrent_kernel, cell.bias)))
        layers.append({"directions": directions})
    attention = None
    if config.pooling == "attention":
        score = model.get_layer("attention_pool").score
        attention = (np.asarray(score.kernel, np.float32), np.asarray(score.bias, np.float32))
    dense = model.get_layer("probabilities")
    model.get_layer(FEATURE_LAYER)  # the classifier head sits on the pooled features (raises if not)
    return Member(config, mean.astype(np.float32), scale.astype(np.float32), layers, attention,
                  (np.asarray(dense.kernel, np.float32), np.asarray(dense.bias, np.float32)))


def _direction(tf, seq, weights: tuple, cell: str, frames: int) -> list:
    """One direction of a recurrent layer over [batch, frames, n_in], unrolled: its states
    [batch, units], one per step in the order the direction reads the frames."""
    kernel, recurrent, bias = weights
    units = recurrent.shape[0]
    if cell == "gru":
        # Keras GRU (reset_after): z, r = sigmoid(x W + b_in + h U + b_rec); hh = tanh(x W_h + b_in_h
        # + r * (h U_h + b_rec_h)); h = z h + (1 - z) hh. The recurrent biases of z and r are
        # constants added either way, so they join the input projection; that of hh stays inside r * ().
        in_bias = bias[0] + np.concatenate([bias[1][: 2 * units], np.zeros(units, np.float32)])
        rec_h_bias = bias[1][2 * units :]
        sig = 2
    else:
        # Keras LSTM, gates i, f, c, o: c = f c + i tanh(x W_c + h U_c + b_c); h = o tanh(c). The
        # columns are put in the order i, f, o, c so that the three sigmoid gates are contiguous.
        def reorder(w):
            return np.concatenate([w[..., g * units : (g + 1) * units] for g in (0, 1, 3, 2)], axis=-1)

        kernel, recurrent, in_bias = reorder(kernel), reorder(recurrent), reorder(bias)
        sig = 3
    n_in = kernel.shape[0]
    # Every frame's input projection in one product, before the loop.
    x = tf.reshape(tf.matmul(tf.reshape(seq, [-1, n_in]), kernel) + in_bias.astype(np.float32),
                   [-1, frames, kernel.shape[1]])
    x_sig = tf.unstack(x[:, :, : sig * units], axis=1)
    x_tanh = tf.unstack(x[:, :, sig * units :], axis=1)
    rec_sig, rec_tanh = recurrent[:, : sig * units], recurrent[:, sig * units :]
    states = []
    h = c = None
    for t in range(frames):
        if cell == "gru":
            if h is None:  # h = 0 before the first frame: no recurrent products
                z, r = tf.split(tf.sigmoid(x_sig[t]), 2, axis=-1)
                hh = tf.tanh(x_tanh[t] + r * rec_h_bias)
                h = hh - z * hh
            else:
                z, r = tf.split(tf.sigmoid(x_sig[t] + tf.matmul(h, rec_sig)), 2, axis=-1)
                hh = tf.tanh(x_tanh[t] + r * (tf.matmul(h, rec_tanh) + rec_h_bias))
                h = hh + z * (h - hh)
        else:
            if h is None:
                i, _, o = tf.split(tf.sigmoid(x_sig[t]), 3, axis=-1)
                c = i * tf.tanh(x_tanh[t])
            else:
                i, f, o = tf.split(tf.sigmoid(x_sig[t] + tf.matmul(h, rec_sig)), 3, axis=-1)
                c = f * c + i * tf.tanh(x_tanh[t] + tf.matmul(h, rec_tanh))
            h = o * tf.tanh(c)
        states.append(h)
    return states


NORMALISE = "normalise"  # the name scope of the ops the int8 model keeps in float32 (see convert)


def _member_probabilities(tf, mfcc, member: Member, frames: int, scope: str):
    config = member.config
    with tf.name_scope(f"{scope}{NORMALISE}"):
        x = (mfcc - member.mean) / member.scale
        if config.utterance_norm:
            x = x - tf.reduce_mean(x, axis=1, keepdims=True)
    for i, layer in enumerate(member.layers):
        forward = _direction(tf, x, layer["directions"][0], config.cell, frames)
        backward = _direction(tf, tf.reverse(x, axis=[1]), layer["directions"][1], config.cell, frames) \
            if config.bidirectional else None
        if i == len(member.layers) - 1 and config.pooling == "last":
            # Keras' final states: the forward one after the last frame, the backward one after the first.
            x = forward[-1] if backward is None else tf.concat([forward[-1], backward[-1]], axis=-1)
            break
        x = tf.stack(forward, axis=1)
        if backward is not None:  # Keras' sequence output: [forward(t), backward(t)]
            x = tf.concat([x, tf.reverse(tf.stack(backward, axis=1), axis=[1])], axis=-1)
    if config.pooling == "mean":
        x = tf.reduce_mean(x, axis=1)
    elif config.pooling == "attention":
        kernel, bias = member.attention
        scores = tf.reshape(tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), kernel) + bias, [-1, frames, 1])
        x = tf.reduce_sum(tf.nn.softmax(scores, axis=1) * x, axis=1)
    kernel, bias = member.dense
    return tf.nn.softmax(tf.matmul(x, kernel) + bias, axis=-1)


def inference_function(members: list[Member], shape: tuple[int, int]):
    """A tf.function: MFCC [batch, frames, coefficients] float32 -> probabilities [batch, labels]
    (the mean of the members' for an ensemble), built from constants only."""
    tf = import_tf()
    frames, coeffs = shape

    @tf.function(input_signature=[tf.TensorSpec([None, frames, coeffs], tf.float32, name="mfcc")])
    def probabilities(mfcc):
        out = [_member_probabilities(tf, mfcc, m, frames, f"member{i}_" if len(members) > 1 else "")
               for i, m in enumerate(members)]
        return out[0] if len(out) == 1 else tf.add_n(out) / float(len(out))

    return probabilities


INT8_KINDS = ("dynamic", "calibrated")
QUANTIZATION = {
    "dynamic": "dynamic range: int8 weights; activations quantised on the fly for each call (float32 in and out)",
    "calibrated": "full integer: int8 weights and activations with ranges calibrated on real training clips, the input "
                  "normalisation in float32 (float32 in and out)",
}


def convert(function, int8: str | None = None, calibration: np.ndarray | None = None) -> bytes:
    """The LiteRT flatbuffer of ``function`` with builtin ops only: float32 (``int8`` None), or
    int8-quantised after training (INT8_KINDS):

    "dynamic": int8 weights, activations quantised per call from their actual range. On the
      shipped model's weights: the float32 model's top-1 label on 1,000 of 1,000 real unseen clips
      (largest probability difference 0.023), batch-1 0.72 ms against float32's 2.7 ms.
    "calibrated": int8 weights and activations, their ranges calibrated on ``calibration`` (MFCC
      [n, frames, coefficients] of real training clips), the per-coefficient input normalisation
      kept in float32 (quantising raw MFCC, about -700 to +250 for c0 and tens for the others, to
      256 levels of one scale blurred all but c0: 98.2% agreement instead of 99.4%). Batch-1
      0.65 ms, but the 98 quantised recurrent steps flip near ties: 99.4% agreement on those 1,000
      clips, 98.5% on 400 others, so it is not the default.
    """
    tf = import_tf()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    if int8 is None:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        with silenced_stderr():  # the converter's own progress lines and warnings
            return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8 == "dynamic":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        with silenced_stderr():
            return converter.convert()
    if int8 != "calibrated" or calibration is None or not len(calibration):
        raise ValueError(f"int8 must be one of {INT8_KINDS}, calibrated with clips")

    def representative():
        for clip in calibration:
            yield [np.asarray(clip[None], np.float32)]

    from ai_edge_litert.interpreter import Interpreter

    with silenced_stderr():
        float_model = Interpreter(model_content=convert(function))
    names = [float_model._get_tensor_details(i, 0)["name"] for op in float_model._get_ops_details() for i in op["outputs"]]
    keep_float = [name for name in names if any(part.endswith(NORMALISE) for part in name.replace(";", "/").split("/"))]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    with silenced_stderr():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float))
        return debugger.get_nondebug_quantized_model()


def litert_models(models: list, configs: list[ModelConfig], shape: tuple[int, int], reference,
                  check: np.ndarray, calibration: np.ndarray | None = None,
                  int8: str = "dynamic") -> tuple[dict[str, bytes], dict]:
    """The LiteRT models of trained Keras ``models`` (several: their mean), and what to record of them.

    ``reference``: the Keras model whose answers they must give (the ensemble model for several);
    ``check``: MFCC [n, frames, coefficients] of real clips the run kept out of training, on which
    the float32 model must give the reference's probabilities within FLOAT_TOLERANCE (else
    SpeechRNNError: the export is not written) and the int8 model the float32 model's top-1 label on
    INT8_MIN_AGREEMENT of them (else it is left out, and the metadata says why); ``int8``: which
    quantisation (convert), "calibrated" on ``calibration`` (MFCC of real training clips).
    Returns ({"float32": bytes, "int8": bytes (when kept)}, metadata under "litert").
    """
    from speechrnn.litert_model import LiteRTModel

    check = np.asarray(check, np.float32)
    if not len(check):
        raise SpeechRNNError("no real unseen clips to check the LiteRT models on (none of the run's validation "
                             "clips could be read)")
    function = inference_function([member_of(m, c) for m, c in zip(models, configs, strict=True)], shape)
    files = {"float32": convert(function)}
    expected = np.asarray(reference.predict(check, batch_size=256, verbose=0))
    got = LiteRTModel(files["float32"], "the LiteRT float32 model")(check)
    difference = float(np.abs(got - expected).max())
    if difference > FLOAT_TOLERANCE:
        raise SpeechRNNError(f"the LiteRT model does not give the Keras model's probabilities (largest difference "
                             f"{difference:.3g} on {len(check)} clips, allowed {FLOAT_TOLERANCE:g}); please report this")
    meta = {"float32": {"input": ["batch", *shape], "output": ["batch", "labels"],
                        "max_abs_difference_from_keras": difference, "checked_on_clips": len(check)}}
    if int8 == "calibrated" and (calibration is None or not len(calibration)):
        meta["int8_skipped"] = "no real training clips to calibrate it on"
        return files, meta
    try:
        quantized = convert(function, int8, None if calibration is None else np.asarray(calibration, np.float32))
    except Exception as exc:  # noqa: BLE001 - the float32 model stands on its own; say why there is no int8 one
        meta["int8_skipped"] = f"its conversion failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
        log.warning("no int8 LiteRT model: %s", meta["int8_skipped"])
        return files, meta
    answers = LiteRTModel(quantized, "the LiteRT int8 model")(check)
    agreement = float(np.mean(answers.argmax(1) == got.argmax(1)))
    if agreement < INT8_MIN_AGREEMENT:
        meta["int8_skipped"] = (f"its top-1 label agreed with the float32 model's on {agreement:.1%} of {len(check)} "
                                f"unseen real clips, below {INT8_MIN_AGREEMENT:.0%}")
        log.warning("no int8 LiteRT model: %s", meta["int8_skipped"])
        return files, meta
    files["int8"] = quantized
    meta["int8"] = {"input": ["batch", *shape], "output": ["batch", "labels"], "quantization": QUANTIZATION[int8],
                    **({"calibration_clips": len(calibration)} if int8 == "calibrated" else {}),
                    "top1_agreement_with_float32": agreement,
                    "max_abs_difference_from_float32": float(np.abs(answers - got).max()),
                    "checked_on_clips": len(check)}
    return files, meta
