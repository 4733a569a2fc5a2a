"""The export format: what an exported model folder holds, which backends can run it, and the
checks that its parts are the ones its metadata describes.

One home for these, imported by export (which writes the folder), recognizer (which runs it),
evaluate and info. It needs neither TensorFlow nor LiteRT, so a model is checked before either
loads (and `speechrnn info` stays instant).

A folder (format 3):
  saved_model.pb, variables/    the SavedModel: serving_default (waveform) and mfcc signatures
  xla/                          a second SavedModel: the XLA-compiled waveform_xla and mfcc_xla
  litert/model_float32.tflite   LiteRT: MFCC [batch, frames, coefficients] -> probabilities
  litert/model_int8.tflite      the same, int8-quantised (only when its answers held; see export)
  assets/labels.txt, assets/speechrnn.json   labels; metadata (features, task, model, training,
                                metrics, the sha256 of every graph and LiteRT file)
Formats 1 and 2 have no litert/ (and format 1 no graph sha256s); they run on TensorFlow only.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig

FORMAT = "speechrnn-export"
# 2: serving_default scores any length in windows (1 scored the first second only), and the
# metadata holds the sha256 of both graphs. 3: LiteRT models in litert/.
FORMAT_VERSION = 3
META_FILE = "speechrnn.json"
XLA_DIR = "xla"  # a second SavedModel inside the export: the XLA-compiled signatures
GRAPH_FILES = ("saved_model.pb", f"{XLA_DIR}/saved_model.pb")
WINDOW_HOP_S = 0.1  # a recording longer than a clip is scored in clip-long windows this far apart
LITERT_DIR = "litert"

# Backends, in the order `auto` prefers them: the LiteRT float32 model (same answers as the
# SavedModel, without TensorFlow), its int8 twin (only when asked for), the SavedModel.
LITERT, LITERT_INT8, TF = "litert", "litert-int8", "tf"
BACKENDS = (LITERT, LITERT_INT8, TF)
LITERT_VARIANTS = {LITERT: "float32", LITERT_INT8: "int8"}  # backend -> key under meta["litert"]
LITERT_FILES = {"float32": f"{LITERT_DIR}/model_float32.tflite", "int8": f"{LITERT_DIR}/model_int8.tflite"}


def default_model_dir() -> Path:
    """``models/default`` in the current folder, else the one shipped beside the package."""
    local = Path("models/default")
    if (local / "assets" / META_FILE).exists():
        return local
    return Path(__file__).resolve().parent.parent / "models" / "default"


def available_backends(meta: dict) -> list[str]:
    """The backends an export's metadata offers, in BACKENDS order ("tf" always)."""
    litert = meta.get("litert", {})
    return [b for b in (LITERT, LITERT_INT8) if LITERT_VARIANTS[b] in litert] + [TF]


def choose_backend(meta: dict, requested: str | None, model_dir: str | os.PathLike) -> str:
    """``requested`` (a BACKENDS name), or for None/"auto" the LiteRT float32 model when the export
    has one, else the SavedModel. Raises SpeechRNNError when the export lacks the one requested."""
    offered = available_backends(meta)
    if requested in (None, "auto"):
        return LITERT if LITERT in offered else TF
    if requested not in BACKENDS:
        raise SpeechRNNError(f"unknown backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    if requested not in offered:
        why = ("it was exported before LiteRT models were (format "
               f"{meta.get('format_version', 1)}); export the run again" if requested == LITERT or not meta.get("litert")
               else meta.get("litert", {}).get("int8_skipped", "its export did not write one"))
        raise SpeechRNNError(f"this export has no {requested} model ({why}); it offers: {', '.join(offered)}", model_dir)
    return requested


def read_metadata(model_dir: str | os.PathLike, backend: str | None = "all") -> dict:
    """An export's metadata (assets/speechrnn.json), once the parts ``backend`` runs on are checked
    to be the ones it describes (check_export; "all": every part, None: the default backend's).
    Raises SpeechRNNError naming the folder and the problem."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "assets" / META_FILE
    if not model_dir.exists():
        raise SpeechRNNError("no such model folder", model_dir)
    if not (model_dir / "saved_model.pb").exists() or not meta_path.exists():
        raise SpeechRNNError(f"not a speechrnn export (no saved_model.pb or assets/{META_FILE}); "
                             "make one with `speechrnn export RUN_DIR OUT`", model_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise SpeechRNNError(f"damaged model metadata ({exc})", meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpeechRNNError("not a speechrnn export (unknown metadata format)", model_dir)
    check_export(model_dir, meta, backend if backend == "all" else choose_backend(meta, backend, model_dir))
    return meta


# -- what a folder's parts must be to go with its metadata ----------------------------------------

@lru_cache(maxsize=1)
def _signature_reader():
    """A parser for the part of TensorFlow's SavedModel protobuf that holds the signatures.

    Built from a partial schema (field numbers of tensorflow/core/protobuf/saved_model.proto,
    meta_graph.proto and tensor_shape.proto; every other field is skipped), so checking a folder
    needs neither TensorFlow nor its start-up time.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def message(name, *fields, nested=()):
        out = descriptor_pb2.DescriptorProto(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = out.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        out.nested_type.extend(nested)
        return out

    def entry(value_type):  # a protobuf map<string, V> is, on the wire, a repeated {key = 1, value = 2}
        return message("Entry", ("key", 1, field.TYPE_STRING, optional, None),
                       ("value", 2, field.TYPE_MESSAGE, optional, value_type))

    schema = descriptor_pb2.FileDescriptorProto(name="speechrnn_saved_model_signatures.proto",
                                                package="speechrnn_sigs", syntax="proto3")
    schema.message_type.extend([
        message("Dim", ("size", 1, field.TYPE_INT64, optional, None)),
        message("Shape", ("dim", 2, field.TYPE_MESSAGE, repeated, ".speechrnn_sigs.Dim"),
                ("unknown_rank", 3, field.TYPE_BOOL, optional, None)),
        message("TensorInfo", ("dtype", 2, field.TYPE_INT32, optional, None),
                ("tensor_shape", 3, field.TYPE_MESSAGE, optional, ".speechrnn_sigs.Shape")),
        message("SignatureDef", ("inputs", 1, field.TYPE_MESSAGE, repeated, ".speechrnn_sigs.SignatureDef.Entry"),
                ("outputs", 2, field.TYPE_MESSAGE, repeated, ".speechrnn_sigs.SignatureDef.Entry"),
                nested=[entry(".speechrnn_sigs.TensorInfo")]),
        message("MetaGraphDef", ("signature_def", 5, field.TYPE_MESSAGE, repeated, ".speechrnn_sigs.MetaGraphDef.Entry"),
                nested=[entry(".speechrnn_sigs.SignatureDef")]),
        message("SavedModel", ("meta_graphs", 2, field.TYPE_MESSAGE, repeated, ".speechrnn_sigs.MetaGraphDef")),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("speechrnn_sigs.SavedModel"))


DTYPES = {1: "float32", 3: "int32", 7: "string", 9: "int64"}  # tensorflow/core/framework/types.proto


def saved_model_signatures(data: bytes) -> dict[str, dict[str, dict[str, tuple[str, list[int] | None]]]]:
    """The signatures of a saved_model.pb: {name: {"inputs"|"outputs": {key: (dtype, shape)}}}.

    A shape lists its dimensions (-1 for any size), None when even the rank is unknown. Raises
    ValueError when the bytes are not a SavedModel protobuf.
    """
    from google.protobuf.message import DecodeError

    try:
        saved = _signature_reader().FromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a SavedModel protobuf ({exc})") from None

    def tensors(entries):
        return {e.key: (DTYPES.get(e.value.dtype, f"dtype {e.value.dtype}"),
                        None if e.value.tensor_shape.unknown_rank else [d.size for d in e.value.tensor_shape.dim])
                for e in entries}

    return {sig.key: {"inputs": tensors(sig.value.inputs), "outputs": tensors(sig.value.outputs)}
            for graph in saved.meta_graphs for sig in graph.signature_def}


def expected_signatures(meta: dict) -> dict[str, dict]:
    """What each graph of an export with this metadata provides: {graph file: {signature: (input, shape)}}."""
    features = FeatureConfig.from_dict(meta["features"])
    waveform, mfcc = ("waveform", [-1, -1]), ("mfcc", [-1, *features.shape])
    return {GRAPH_FILES[0]: {"serving_default": waveform, "mfcc": mfcc},
            GRAPH_FILES[1]: {"waveform_xla": waveform, "mfcc_xla": mfcc}}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export(model_dir: str | os.PathLike, meta: dict, backend: str = "all") -> None:
    """Raise the project error unless the folder's graphs, and the LiteRT model ``backend`` runs on
    ("all": every one), are the ones its metadata describes.

    Another TensorFlow model saved over an export keeps the old assets/ (and xla/, litert/): its
    metadata would then describe a model that is no longer there. A file whose sha256 the export
    recorded (formats 2 and 3) must still be exactly that file; the graphs of older exports have
    their signatures checked against the metadata (names, inputs, the number of labels).
    """
    model_dir = Path(model_dir)
    _check_graphs(model_dir, meta)
    names = (LITERT, LITERT_INT8) if backend == "all" else (backend,) if backend in LITERT_VARIANTS else ()
    for name in names:
        variant = meta.get("litert", {}).get(LITERT_VARIANTS[name])
        if variant is None:
            continue
        path = model_dir / variant["file"]
        if not path.is_file():
            raise SpeechRNNError(f"damaged export: no {variant['file']}; export the run again", model_dir)
        if file_sha256(path) != variant["sha256"]:
            raise SpeechRNNError(f"{variant['file']} is not the LiteRT model this export was written with "
                                 "(damaged or replaced); export the run again", model_dir)


def _check_graphs(model_dir: Path, meta: dict) -> None:
    fix = f"the folder holds another model than assets/{META_FILE} describes; export the run again"
    recorded = meta.get("graph_sha256", {})
    for name, wanted in expected_signatures(meta).items():
        path = model_dir / name
        if not path.is_file():
            raise SpeechRNNError(f"damaged export: no {name}; export the run again", model_dir)
        if name in recorded:  # the very graph written (and checked) at export, or not
            if file_sha256(path) != recorded[name]:
                raise SpeechRNNError(f"{name} is not the graph this export was written with: {fix}", model_dir)
            continue
        try:
            found = saved_model_signatures(path.read_bytes())
        except ValueError as exc:
            raise SpeechRNNError(f"damaged export: {name} is {exc}", model_dir) from None
        for signature, (arg, shape) in wanted.items():
            if signature not in found:
                raise SpeechRNNError(f"{name} has no {signature!r} signature (it has: {', '.join(sorted(found)) or 'none'}): "
                                     f"{fix}", model_dir)
            inputs, outputs = found[signature]["inputs"], found[signature]["outputs"]
            if inputs != {arg: ("float32", shape)}:
                raise SpeechRNNError(f"{name}: signature {signature!r} takes {_describe(inputs)}, not {arg} float32 "
                                     f"{shape}: {fix}", model_dir)
            probs = outputs.get("probabilities")
            if probs is None or probs[1] is None or probs[1][-1:] != [len(meta["labels"])]:
                raise SpeechRNNError(f"{name}: signature {signature!r} gives {_describe(outputs)}, not probabilities "
                                     f"of the {len(meta['labels'])} labels: {fix}", model_dir)


def _describe(tensors: dict) -> str:
    return ", ".join(f"{k} {dtype} {shape}" for k, (dtype, shape) in sorted(tensors.items())) or "nothing"


def is_export(path: Path) -> bool:
    return (path / "saved_model.pb").exists() and (path / "assets" / META_FILE).exists()
