"""LiteRT models of exports: the network written out for LiteRT gives Keras' numbers for every
architecture the builder makes; on the shipped model's trained weights the float32 model gives the
SavedModel's probabilities and the int8 model its answers, on real clips it never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from litert_helpers import real_mfcc

from conftest import REPO, run_cli
from data_prep.dataset import TaskConfig
from data_prep.features import FeatureConfig

SHIPPED = REPO / "models" / "default"


@pytest.fixture(scope="module")
def task(litert_model) -> TaskConfig:
    return TaskConfig.from_dict(json.loads((litert_model / "assets" / "speechrnn.json").read_text())["task"])


@pytest.fixture(scope="module")
def unseen_mfcc(shared_data, task) -> np.ndarray:
    """400 real validation-split clips (speakers the model never trained on); calibration used
    training clips."""
    return real_mfcc(shared_data, task, "validation", 400, FeatureConfig())


@pytest.mark.parametrize("config", [
    dict(cell="lstm", pooling="mean", utterance_norm=True),
    dict(cell="gru", bidirectional=False, pooling="last"),
    dict(cell="lstm", bidirectional=False, layers=3, pooling="attention"),
    dict(cell="gru", pooling="last", layers=1),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_the_litert_graph_is_the_keras_model(config, shared_data):
    """Random (seeded) weights, real MFCC: LiteRT float32 == Keras within 1e-5, one clip and a batch.
    (The trained 2x BiGRU with attention of the pipeline tests is held to its SavedModel there.)"""
    from speechrnn.litert_export import convert, inference_function, member_of
    from speechrnn.litert_model import LiteRTModel
    from speechrnn.models import ModelConfig, build_model

    rng = np.random.default_rng(0)
    model_config = ModelConfig(units=8, dropout=0.1, **config)
    feats = real_mfcc(shared_data, TaskConfig(), "validation", 20, FeatureConfig())
    model = build_model(model_config, FeatureConfig().shape, 5, feats.mean(axis=(0, 1)), feats.var(axis=(0, 1)), seed=1)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    lite = LiteRTModel(convert(inference_function([member_of(model, model_config)], FeatureConfig().shape)))
    expected = model.predict(feats, verbose=0)
    assert expected.std() > 0.01  # the weights make the clips differ: a wrong graph would show
    np.testing.assert_allclose(lite(feats), expected, atol=1e-5)
    np.testing.assert_allclose(lite(feats[:1]), expected[:1], atol=1e-5)


def test_float32_is_the_saved_model_and_int8_agrees_on_real_clips(litert_model, unseen_mfcc):
    """The shipped model's weights: LiteRT float32 within 1e-4 of the shipped SavedModel; the int8
    model's top-1 label the same on at least 99% of 400 real unseen clips."""
    from speechrnn.recognizer import Recognizer

    saved = Recognizer(SHIPPED, "tf").probabilities_from_mfcc(unseen_mfcc)
    lite = Recognizer(litert_model, "litert")
    int8 = Recognizer(litert_model, "litert-int8")
    float32 = lite.probabilities_from_mfcc(unseen_mfcc)
    np.testing.assert_allclose(float32, saved, atol=1e-4)
    np.testing.assert_allclose(lite.probabilities_from_mfcc(unseen_mfcc[:1]), saved[:1], atol=1e-4)
    quantized = int8.probabilities_from_mfcc(unseen_mfcc)
    agreement = float(np.mean(quantized.argmax(1) == float32.argmax(1)))
    assert agreement >= 0.99, agreement
    assert np.allclose(quantized.sum(1), 1, atol=1e-2) and not np.allclose(quantized, float32, atol=1e-4)  # int8 indeed
    meta = json.loads((litert_model / "assets" / "speechrnn.json").read_text())["litert"]
    assert meta["int8"]["top1_agreement_with_float32"] >= 0.99 and meta["int8"]["quantization"].startswith("dynamic")


def test_int8_calibrated_on_real_training_clips(litert_model, shared_data, task, unseen_mfcc):
    """`export --int8 calibrated`: weights and activations int8, ranges from real training clips,
    the input normalisation left in float32. Less faithful than the default (README): held here to
    97% top-1 agreement with float32 on real unseen clips."""
    from ai_edge_litert.interpreter import Interpreter

    from speechrnn.litert_export import convert
    from speechrnn.litert_model import LiteRTModel

    float_model = LiteRTModel(litert_model / "litert" / "model_float32.tflite")
    function = rebuilt_function(litert_model, unseen_mfcc[:50])
    calibrated = convert(function, "calibrated", real_mfcc(shared_data, task, "training", 256, FeatureConfig()))
    ops = [op["op_name"] for op in Interpreter(model_content=calibrated)._get_ops_details()]
    assert ops[:3] == ["SUB", "MUL", "QUANTIZE"]  # normalised in float32, then int8 throughout
    assert ops.count("FULLY_CONNECTED") > 300 and "DEQUANTIZE" in ops[-3:]
    agreement = np.mean(LiteRTModel(calibrated)(unseen_mfcc).argmax(1) == float_model(unseen_mfcc).argmax(1))
    assert agreement >= 0.97, agreement


def rebuilt_function(export, clips):
    """The LiteRT inference function of an export's network (its Keras model rebuilt from its SavedModel)."""
    from litert_helpers import keras_model_of

    from speechrnn.litert_export import inference_function, member_of

    config, model = keras_model_of(export, clips)
    return inference_function([member_of(model, config)], FeatureConfig().shape)


def test_classify_on_int8_from_the_cli(litert_model, shared_data):
    files = [str(sorted((shared_data / word).iterdir())[2]) for word in ("yes", "stop", "left")]
    answers = {}
    for backend in ("litert", "litert-int8"):
        result = run_cli("classify", str(litert_model), *files, "--json", "--backend", backend)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        answers[backend] = [json.loads(line)["label"] for line in result.stdout.splitlines()]
    assert answers["litert"] == answers["litert-int8"] == ["yes", "stop", "left"]
    info = run_cli("info", str(litert_model))
    assert "litert-int8 (LiteRT int8, top-1 as float32 on" in info.stdout, info.stdout
