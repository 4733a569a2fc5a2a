"""Counts of clips per split and label."""

from __future__ import annotations

import logging
import os

from data_prep.dataset import COMMANDS, SPLITS, SpeechCommands, TaskConfig, label_counts, words_without_clips

log = logging.getLogger(__name__)


def dataset_stats(root: str | os.PathLike, words: list[str] | None = None, by_word: bool = False) -> dict:
    """{split: {label: count}}: the task's examples per split, or raw clips per word.

    A task word with no training clips (which `speechrnn train` refuses) is logged as a warning.
    """
    dataset = SpeechCommands.open(root)
    if by_word:
        return dataset.word_counts()
    task = TaskConfig(tuple(words) if words else COMMANDS)
    problem = words_without_clips(task, [dataset])
    if problem:
        log.warning("%s: %s; `speechrnn train` refuses a word without clips", root, problem)
    return {split: label_counts(dataset.examples(task, split)) for split in SPLITS}
