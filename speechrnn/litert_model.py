"""A LiteRT model of an export, run by the LiteRT interpreter (PyPI ai-edge-litert).

No TensorFlow here, nor on any path that only classifies or listens with LiteRT: the interpreter
is a small library of its own, and MFCC comes from data_prep.features (numpy and scipy.fft).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError
from speechrnn.tfutil import silenced_stderr

BATCH = 64  # clips per call when there are many (the batch-1 interpreter serves single clips)


class LiteRTModel:
    """MFCC frames [n, frames, coefficients] float32 -> probabilities [n, labels] float32.

    ``model``: a .tflite file (or its bytes) whose input is [batch, frames, coefficients] with a
    free batch dimension, as speechrnn.litert_export writes them. Single clips run on a batch-1
    interpreter with LiteRT's builtin kernels (the fastest for one clip on the machines measured,
    README "Benchmarks"); more run BATCH at a time (the last batch zero-padded) on XNNPACK with
    ``threads`` threads (default: up to 4 cores). Raises SpeechRNNError, naming ``name``, for a
    file that is not a LiteRT model of that shape.
    """

    def __init__(self, model: str | os.PathLike | bytes, name: str | os.PathLike | None = None,
                 threads: int | None = None, labels: int | None = None):
        self.name = str(name if name is not None else model if not isinstance(model, bytes) else "LiteRT model")
        self._source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(Path(model))}
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.quantized = False
        self._interpreters: dict[int, tuple] = {1: self._load(1)}  # loads (and checks) the model now
        interpreter, inp, out = self._interpreters[1]
        shape, out_shape = inp["shape_signature"], out["shape"]
        if len(shape) != 3 or shape[0] != -1 or (labels is not None and int(out_shape[-1]) != labels):
            raise SpeechRNNError(f"not a speechrnn LiteRT model (input {list(shape)}, output {list(out_shape)})", self.name)
        self.frames, self.coefficients = int(shape[1]), int(shape[2])
        self.labels = int(out_shape[-1])
        if any(d["dtype"] == np.int8 for d in interpreter.get_tensor_details()):
            self.quantized = True
            self._interpreters[1] = self._load(1)  # on XNNPACK, see _load

    def _load(self, batch: int) -> tuple:
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise SpeechRNNError("cannot run LiteRT models: the ai-edge-litert package is not installed; install it "
                                 "(pip install ai-edge-litert) or use --backend tf", self.name) from None

        # Measured on this project's machines (README "Benchmarks"): one clip of the float model runs
        # fastest on LiteRT's builtin kernels; batches, and the int8 model, on XNNPACK (its default).
        builtin = batch == 1 and not self.quantized
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else OpResolverType.AUTO
        try:
            with silenced_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter = Interpreter(**self._source, num_threads=1 if batch == 1 else self.threads,
                                          experimental_op_resolver_type=resolver)
                inp = interpreter.get_input_details()[0]
                if batch != 1:
                    interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise SpeechRNNError(f"damaged LiteRT model ({str(exc).strip().splitlines()[0]})", self.name) from None
        return interpreter, interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def _interpreter(self, batch: int) -> tuple:
        if batch not in self._interpreters:
            self._interpreters[batch] = self._load(batch)
        return self._interpreters[batch]

    def __call__(self, mfcc: np.ndarray) -> np.ndarray:
        mfcc = np.asarray(mfcc, np.float32)
        if mfcc.ndim != 3 or mfcc.shape[1:] != (self.frames, self.coefficients):
            raise ValueError(f"expected MFCC [n, {self.frames}, {self.coefficients}], got {list(mfcc.shape)}")
        if len(mfcc) == 1:
            return self._run(1, mfcc)
        out = []
        for start in range(0, len(mfcc), BATCH):
            chunk = mfcc[start : start + BATCH]
            n = len(chunk)
            if n < BATCH:  # one batch shape: one interpreter, allocated once
                chunk = np.concatenate([chunk, np.zeros((BATCH - n, *chunk.shape[1:]), np.float32)])
            out.append(self._run(BATCH, chunk)[:n])
        return np.concatenate(out) if out else np.zeros((0, self.labels), np.float32)

    def _run(self, batch: int, x: np.ndarray) -> np.ndarray:
        interpreter, inp, out = self._interpreter(batch)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()
