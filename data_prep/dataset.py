"""Speech Commands layout: index the clips, assign splits, build task examples.

Layout: ``<word>/<speaker>_nohash_<n>.(wav|flac|...)``, ``_background_noise_/*.wav``, and
optionally ``validation_list.txt`` / ``testing_list.txt`` (paths relative to the root).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError

log = logging.getLogger(__name__)

COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
BACKGROUND_DIR = "_background_noise_"
SPLITS = ("training", "validation", "testing")
HOLDOUT = "holdout"  # training-split speakers of scarce words, set aside for an honest evaluation
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff"}
# The dataset's own rule (TensorFlow speech_commands input_data.which_set).
MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
# Which part of each background-noise recording each split may cut from, so validation
# silence and noise never share audio with training.
NOISE_REGIONS = {"training": (0.0, 0.8), "validation": (0.8, 0.9), "testing": (0.9, 1.0)}


def speaker_of(path: str | os.PathLike) -> str:
    """``ffd2ba2f_nohash_3.wav`` -> ``ffd2ba2f`` (the part the dataset hashes)."""
    return re.sub(r"_nohash_.*$", "", Path(path).name)


def split_by_hash(path: str | os.PathLike, validation_percentage: float = 10.0, testing_percentage: float = 10.0) -> str:
    """The dataset's speaker-hash rule: sha1(speaker) mod 2^27 as a percentage."""
    # surrogateescape: a file name that is not valid UTF-8 hashes as the bytes it is on disk
    hashed = hashlib.sha1(speaker_of(path).encode("utf-8", "surrogateescape")).hexdigest()
    percentage = (int(hashed, 16) % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


@dataclass(frozen=True)
class Clip:
    path: Path
    word: str
    speaker: str
    split: str


@dataclass(frozen=True)
class TaskConfig:
    """What the model is asked: which words are labels, and how much silence/unknown to add."""

    words: tuple[str, ...] = COMMANDS
    silence_fraction: float = 0.1  # silence examples per split, as a fraction of the word examples
    unknown_fraction: float = 0.1  # unknown-word examples per split, same
    seed: int = 59185
    # Scarce words (on/off have 15 training clips) whose training-split speakers are partly set
    # aside, by a speaker hash, as the "holdout" split: never trained on, evaluated with validation.
    holdout_words: tuple[str, ...] = ()
    holdout_fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "holdout_words", tuple(self.holdout_words))
        if not self.words:
            raise SpeechRNNError("the task needs at least one word")
        if len(set(self.words)) != len(self.words):
            raise SpeechRNNError(f"duplicate words in the task: {', '.join(self.words)}")

    @property
    def labels(self) -> list[str]:
        extra = ([SILENCE] if self.silence_fraction > 0 else []) + ([UNKNOWN] if self.unknown_fraction > 0 else [])
        return extra + list(self.words)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "silence_fraction": self.silence_fraction,
                "unknown_fraction": self.unknown_fraction, "seed": self.seed,
                "holdout_words": list(self.holdout_words), "holdout_fraction": self.holdout_fraction}

    @classmethod
    def from_dict(cls, data: dict) -> TaskConfig:
        return cls(tuple(data["words"]), data["silence_fraction"], data["unknown_fraction"], data["seed"],
                   tuple(data.get("holdout_words", ())), data.get("holdout_fraction", 0.5))

    def is_held_out(self, clip: Clip) -> bool:
        if clip.split != "training" or clip.word not in self.holdout_words:
            return False
        digest = hashlib.sha1(f"holdout:{clip.speaker}".encode("utf-8", "surrogateescape")).hexdigest()
        return int(digest, 16) % 1000 < self.holdout_fraction * 1000


@dataclass(frozen=True)
class Example:
    """One training/evaluation item. Silence examples cut ``path`` (a noise file) at offset*gain."""

    path: Path
    label: str
    split: str
    word: str = ""
    speaker: str = ""
    offset: int = -1  # >= 0 only for silence cut from background noise
    gain: float = 1.0

    @property
    def is_cut(self) -> bool:
        return self.offset >= 0


def _read_list(root: Path, name: str) -> set[str] | None:
    path = root / name
    if not path.exists():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".")


@dataclass
class SpeechCommands:
    """An indexed Speech Commands-style folder."""

    root: Path
    clips: list[Clip] = field(default_factory=list)
    noise_files: list[Path] = field(default_factory=list)
    split_source: str = "hash"
    _warned: set[str] = field(default_factory=set, repr=False, compare=False)  # each warning once per dataset

    @classmethod
    def open(cls, root: str | os.PathLike) -> SpeechCommands:
        root = Path(root)
        if not root.is_dir():
            raise SpeechRNNError("not a folder (expected a Speech Commands-style dataset)", root)
        validation = _read_list(root, "validation_list.txt")
        testing = _read_list(root, "testing_list.txt")
        from_lists = validation is not None or testing is not None
        validation, testing = validation or set(), testing or set()
        clips = []
        for word_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            word = word_dir.name
            if word == BACKGROUND_DIR or word.startswith("."):
                continue
            for path in sorted(word_dir.iterdir()):
                if not path.is_file() or not _is_audio(path):
                    continue
                rel = f"{word}/{path.name}"
                if from_lists:
                    split = "validation" if rel in validation else "testing" if rel in testing else "training"
                else:
                    split = split_by_hash(path)
                clips.append(Clip(path, word, speaker_of(path), split))
        noise_dir = root / BACKGROUND_DIR
        noise = sorted(p for p in noise_dir.iterdir() if p.is_file() and _is_audio(p)) if noise_dir.is_dir() else []
        if not clips:
            raise SpeechRNNError(
                "no clips found: expected <word>/<speaker>_nohash_<n>.wav (or .flac) sub-folders", root
            )
        return cls(root, clips, noise, "lists" if from_lists else "hash")

    @classmethod
    def union(cls, datasets: list[SpeechCommands]) -> SpeechCommands:
        """Several folders as one: their clips (each keeping its own folder's split) and noise.

        Unknown-word and silence sampling then draw from the pooled clips, so a second folder rich
        in unknown words (e.g. digits) adds to the unknown class in proportion to the pool.
        """
        if len(datasets) == 1:
            return datasets[0]
        sources = {d.split_source for d in datasets}
        return cls(datasets[0].root, [c for d in datasets for c in d.clips],
                   list(dict.fromkeys(p for d in datasets for p in d.noise_files)),
                   sources.pop() if len(sources) == 1 else "mixed")

    @property
    def words(self) -> list[str]:
        return sorted({c.word for c in self.clips})

    def word_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
        for clip in self.clips:
            counts[clip.split][clip.word] += 1
        return {s: dict(sorted(c.items())) for s, c in counts.items()}

    def examples(self, task: TaskConfig, split: str, noise_lengths: dict[Path, int] | None = None,
                 all_unknown: bool = False) -> list[Example]:
        """The task's examples for one split: its words, plus sampled unknown and silence.

        Fixed for a given task seed: the same folder always gives the same list. all_unknown:
        every clip of a word outside the task is an unknown example (no sampling).
        """
        if split == HOLDOUT:
            return [Example(c.path, c.word, HOLDOUT, c.word, c.speaker) for c in self.clips if task.is_held_out(c)]
        if split not in SPLITS:
            raise SpeechRNNError(f"unknown split {split!r}; choose one of {', '.join((*SPLITS, HOLDOUT))}")
        rng = np.random.default_rng([task.seed, SPLITS.index(split)])
        words = set(task.words)
        in_split = [c for c in self.clips if c.split == split and not task.is_held_out(c)]
        examples = [Example(c.path, c.word, split, c.word, c.speaker) for c in in_split if c.word in words]
        n_words = len(examples)
        if task.unknown_fraction > 0:
            pool = [c for c in in_split if c.word not in words]
            n_unknown = len(pool) if all_unknown else min(len(pool), math.ceil(n_words * task.unknown_fraction))
            if pool and n_unknown:
                picks = rng.choice(len(pool), size=n_unknown, replace=False)
                examples += [Example(pool[i].path, UNKNOWN, split, pool[i].word, pool[i].speaker) for i in sorted(picks)]
            elif n_words:
                log.warning("%s: no words outside the task in the %s split; no %s examples", self.root, split, UNKNOWN)
        if task.silence_fraction > 0 and n_words:
            examples += self.silence_examples(math.ceil(n_words * task.silence_fraction), split, rng, noise_lengths)
        return examples

    def silence_examples(
        self, count: int, split: str, rng: np.random.Generator, noise_lengths: dict[Path, int] | None = None,
        clip_samples: int = 16000,
    ) -> list[Example]:
        """``count`` one-second cuts of the background noise, from this split's region of each file.

        Gains are log-uniform over about 40 dB, and one in ten is digital near-silence, because real
        "silence" ranges from a quiet room to a running tap.
        """
        if not self.noise_files:
            if SILENCE not in self._warned:
                self._warned.add(SILENCE)
                folder = self.root / BACKGROUND_DIR
                what = "the folder holds no audio files" if folder.is_dir() else "no such folder"
                log.warning("%s: %s; no %s examples (1 s cuts of background noise)", folder, what, SILENCE)
            return []
        if noise_lengths is None:
            noise_lengths = noise_file_lengths(self.noise_files)
        lo, hi = NOISE_REGIONS[split]
        out = []
        for _ in range(count):
            path = self.noise_files[rng.integers(len(self.noise_files))]
            n = noise_lengths[path]
            start, stop = int(n * lo), max(int(n * lo) + 1, int(n * hi) - clip_samples)
            offset = int(rng.integers(start, stop))
            gain = 0.0 if rng.random() < 0.1 else float(10 ** rng.uniform(-2.0, 0.0))
            out.append(Example(path, SILENCE, split, "", "", offset, gain))
        return out


def noise_file_lengths(paths: list[Path], sample_rate: int = 16000) -> dict[Path, int]:
    """Length in samples at sample_rate of each noise file (from the header, no decoding)."""
    import soundfile as sf

    out = {}
    for path in paths:
        try:
            info = sf.info(str(path))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file
            raise SpeechRNNError(f"cannot read background noise ({exc})", path) from None
        out[path] = int(info.frames * sample_rate / info.samplerate)
    return out


def label_for_folder(name: str, labels: list[str]) -> str:
    """Flat test folders: a folder named after a label is that label; any other word is unknown."""
    return name if name in labels else UNKNOWN


def flat_folder_examples(root: str | os.PathLike, labels: list[str]) -> list[Example]:
    """A flat test folder: each sub-folder is a label (``yes/``, ``_silence_/``, ``_unknown_/``, or any
    other word, which counts as ``_unknown_``)."""
    root = Path(root)
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name == BACKGROUND_DIR:
            continue
        label = label_for_folder(sub.name, labels)
        for path in sorted(sub.rglob("*")):
            if path.is_file() and _is_audio(path):
                out.append(Example(path, label, "testing", sub.name, speaker_of(path)))
    if not out:
        raise SpeechRNNError("no audio files in label sub-folders (expected e.g. yes/, _silence_/)", root)
    return out


def is_dataset_folder(root: str | os.PathLike) -> bool:
    root = Path(root)
    return any((root / n).exists() for n in ("validation_list.txt", "testing_list.txt", BACKGROUND_DIR))


def label_counts(examples: list[Example]) -> dict[str, int]:
    counts = defaultdict(int)
    for ex in examples:
        counts[ex.label] += 1
    return dict(sorted(counts.items()))


def training_clip_counts(task: TaskConfig, data: list[SpeechCommands],
                         train_only: list[SpeechCommands] = ()) -> Counter:
    """Clips per word that training would use: the training split of ``data`` (less held-out
    speakers) and every clip of ``train_only`` folders."""
    counts: Counter = Counter()
    for dataset in data:
        counts.update(c.word for c in dataset.clips if c.split == "training" and not task.is_held_out(c))
    for dataset in train_only:
        counts.update(c.word for c in dataset.clips)
    return counts


def words_without_clips(task: TaskConfig, data: list[SpeechCommands], train_only: list[SpeechCommands] = ()) -> str | None:
    """None when every word of the task has training clips; else what is missing, in words, with the
    nearest words the folders do have: "no training clips of 'noo' (did you mean 'no'?)"."""
    counts = training_clip_counts(task, data, train_only)
    there = sorted({w for dataset in [*data, *train_only] for w in dataset.words})
    missing = []
    for word in task.words:
        if counts[word]:
            continue
        near = difflib.get_close_matches(word, there, n=2)
        missing.append(repr(word) + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))
    return f"no training clips of {', '.join(missing)}" if missing else None
