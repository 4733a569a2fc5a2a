"""Turn a recipe file plus command-line options into a TrainConfig."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_prep.augment import AugmentConfig
from data_prep.dataset import COMMANDS, TaskConfig
from data_prep.errors import SpeechRNNError
from speechrnn.runconfig import TrainConfig

MODEL_OPTIONS = ("cell", "layers", "units", "bidirectional", "pooling", "dropout")


def load_recipe(path: str, given: dict | None = None) -> TrainConfig:
    """The TrainConfig of a recipe file, with ``given`` (fields from the command line, e.g. the
    negatives folders a recipe's negatives_fraction needs) set before it is checked."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise SpeechRNNError(f"not valid JSON ({exc})", path) from None
    base = TrainConfig(data=[]).to_dict()
    for key, value in data.items():
        if key.startswith("_"):
            continue  # comments
        if key not in base:
            raise SpeechRNNError(f"unknown recipe key {key!r}", path)
        base[key] = {**base[key], **value} if isinstance(base[key], dict) else value
    base.update({k: v for k, v in (given or {}).items() if v is not None})
    try:
        return TrainConfig.from_dict(base)
    except (TypeError, ValueError) as exc:
        raise SpeechRNNError(f"invalid recipe ({exc})", path) from None


def make_train_config(recipe, data, train_only, words, no_augment, options: dict) -> TrainConfig:
    given = {k: options.get(k) for k in ("negatives", "negatives_fraction")}
    config = load_recipe(recipe, given) if recipe else TrainConfig(data=[])
    if data:
        config.data = list(data)
    if train_only:
        config.train_only = list(train_only)
    if not config.data:
        raise SpeechRNNError("no training data: give --data DIR")
    if words:
        config.task = dataclasses.replace(config.task, words=tuple(w.strip() for w in words.split(",") if w.strip()))
    elif not config.task.words:
        config.task = TaskConfig(COMMANDS)
    model_changes = {k: options.pop(k) for k in MODEL_OPTIONS if options.get(k) is not None}
    try:
        config.model = dataclasses.replace(config.model, **model_changes)
    except ValueError as exc:
        raise SpeechRNNError(str(exc)) from None
    if no_augment:
        config.augment = AugmentConfig.off()
        config.model = dataclasses.replace(config.model, time_masks=0, freq_masks=0)
    for key, value in options.items():
        if value is not None:
            setattr(config, key, value)
    try:
        config.__post_init__()
    except ValueError as exc:
        raise SpeechRNNError(str(exc)) from None
    return config
