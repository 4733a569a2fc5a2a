"""Import TensorFlow quietly: at import it prints absl/oneDNN/CUDA lines to stderr that
TF_CPP_MIN_LOG_LEVEL does not silence, and users should not see. LiteRT's C++ runtime and
converter print such lines too (silenced_stderr)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def silenced_stderr():
    """File descriptor 2 points at /dev/null meanwhile (C++ libraries write there directly), and
    Python warnings are ignored. Python errors still surface: an exception propagates after
    stderr is restored. Imports nothing heavy: the LiteRT path uses it without TensorFlow."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tf(keras: bool = True):
    """TensorFlow, imported without its start-up noise.

    keras=False is for processes that only run exported models (classify, listen, evaluate):
    TensorFlow's __init__ eagerly imports Keras 3's optimizers (~1.6 s of a ~3.5 s import) unless
    TF_USE_LEGACY_KERAS is set, in which case it tries the absent tf_keras package and goes on.
    A SavedModel of a tf.Module needs neither; tests/test_pipeline.py checks Keras stays unloaded
    and the outputs are unchanged. Later `import keras` (training, export) still works.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    legacy = os.environ.get("TF_USE_LEGACY_KERAS")
    if not keras and "keras" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # stderr silenced only while the C++ libraries load (Python errors still surface).
    try:
        with silenced_stderr():
            import tensorflow as tf
    finally:
        if legacy is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = legacy
    tf.get_logger().setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl ships with tensorflow
        pass
    return tf
