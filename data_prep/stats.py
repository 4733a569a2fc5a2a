"""Counts of clips per split and label."""

from __future__ import annotations

import os

from data_prep.dataset import COMMANDS, SPLITS, SpeechCommands, TaskConfig, label_counts


def dataset_stats(root: str | os.PathLike, words: list[str] | None = None, by_word: bool = False) -> dict:
    """{split: {label: count}}: the task's examples per split, or raw clips per word."""
    dataset = SpeechCommands.open(root)
    if by_word:
        return dataset.word_counts()
    task = TaskConfig(tuple(words) if words else COMMANDS)
    return {split: label_counts(dataset.examples(task, split)) for split in SPLITS}
