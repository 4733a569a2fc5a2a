"""Import TensorFlow quietly: at import it prints absl/oneDNN/CUDA lines to stderr that
TF_CPP_MIN_LOG_LEVEL does not silence, and users should not see."""

from __future__ import annotations

import logging
import os
import sys


def import_tf():
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # Point fd 2 at /dev/null only while the C++ libraries load; Python errors still surface,
    # because the exception is raised after stderr is restored.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl ships with tensorflow
        pass
    return tf
