"""`speechrnn info`: what an exported model is and how well it did."""

from __future__ import annotations

import json
from pathlib import Path

from speechrnn.export_format import (
    LITERT,
    LITERT_INT8,
    TF,
    available_backends,
    choose_backend,
    default_model_dir,
    read_metadata,
)


def model_size_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


def describe_backends(meta: dict, path: Path) -> str:
    """The backends an export offers (classify/listen/evaluate --backend), the default first marked."""
    default = choose_backend(meta, None, path)
    litert = meta.get("litert", {})
    what = {LITERT: "LiteRT float32, no TensorFlow", TF: "the SavedModel, TensorFlow"}
    if "int8" in litert:
        what[LITERT_INT8] = (f"LiteRT int8, top-1 as float32 on {litert['int8']['top1_agreement_with_float32']:.1%} "
                             "of the unseen clips checked")
    parts = [f"{name} ({what[name]}{', default' if name == default else ''})" for name in available_backends(meta)]
    if "float32" not in litert:
        parts.append("no LiteRT model (an older export: export the run again for one)")
    elif "int8_skipped" in litert:
        parts.append(f"no int8 model ({litert['int8_skipped']})")
    return "; ".join(parts)


def describe_model(model_dir: str | None, as_json: bool = False) -> str:
    """A model's description (text, or JSON with its path and size); SpeechRNNError if the folder
    is not an export whose graphs match its metadata (read_metadata)."""
    path = Path(model_dir) if model_dir else default_model_dir()
    meta = read_metadata(path)
    if as_json:
        return json.dumps({**meta, "path": str(path), "size_bytes": model_size_bytes(path)}, indent=2)
    model, training = meta.get("model", {}), meta.get("training", {})
    feats = meta["features"]
    lines = [
        f"model       {path} ({model_size_bytes(path) / 1e6:.2f} MB on disk)",
        f"labels      {' '.join(meta['labels'])}",
        f"network     {model.get('name', '?')}, {model.get('parameters', 0):,} parameters",
        f"features    MFCC {feats['n_mfcc']} x {feats['n_mels']} mels, window {feats['window_ms']} ms, "
        f"hop {feats['hop_ms']} ms, {feats['sample_rate']} Hz, {feats['clip_seconds']} s clips",
    ]
    for i, run in enumerate(training.get("members", [training])):  # an ensemble lists each member's run
        lines.append(f"{'trained' if i == 0 else '':<12}{run.get('epochs_run', '?')} epochs (best {run.get('best_epoch', '?')}), "
                     f"{run.get('train_clips', '?')} training clips" + (f"; created {meta.get('created', '?')}" if i == 0 else ""))
    rate = feats["sample_rate"] / 1000
    scores = ("any length: 1 s windows every 100 ms, the most confident non-silence one" if meta.get("format_version", 1) >= 2
              else "the first second only (an older export: export the run again for any length)")
    lines.append(f"signature   serving_default: float32 waveform [batch, samples], mono, {rate:g} kHz, in [-1, 1]; "
                 f"{scores}")
    lines.append(f"backends    {describe_backends(meta, path)}")
    own = meta.get("streaming", {}).get("label_thresholds")
    if own:
        lines.append("listen      own thresholds " + ", ".join(f"{k} {v:g}" for k, v in own.items())
                     + " (the other commands: listen --threshold)")
    for name, metrics in meta.get("metrics", {}).items():
        if metrics.get("accuracy") is None:
            continue
        recalls = {k: v["recall"] for k, v in metrics.get("per_class", {}).items() if v.get("recall") is not None}
        worst = min(recalls, key=recalls.get) if recalls else None
        balanced = metrics.get("balanced_accuracy")
        lines.append(f"{name:<12}accuracy {metrics['accuracy']:.4f} on {metrics.get('examples', '?')} clips"
                     + (f" (class-balanced {balanced:.4f})" if balanced is not None else "")
                     + (f"; lowest recall {worst} {recalls[worst]:.3f}" if worst else ""))
    return "\n".join(lines)
