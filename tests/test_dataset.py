import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from data_prep.dataset import (
    COMMANDS,
    SILENCE,
    SPLITS,
    UNKNOWN,
    SpeechCommands,
    TaskConfig,
    flat_folder_examples,
    label_counts,
    speaker_of,
    split_by_hash,
    words_without_clips,
)
from data_prep.errors import SpeechRNNError


def test_hash_rule_reproduces_the_shared_split_lists(shared_data):
    dataset = SpeechCommands.open(shared_data)
    assert dataset.split_source == "lists"
    assert len(dataset.clips) == 9403
    listed_validation = set((shared_data / "validation_list.txt").read_text().split())
    assert listed_validation, "the shared folder has a validation list"
    mismatches = [c for c in dataset.clips if split_by_hash(c.path) != c.split]
    assert mismatches == []
    assert sum(c.split == "validation" for c in dataset.clips) == len(listed_validation)


def test_a_speaker_never_crosses_splits(shared_data):
    splits_of = {}
    for clip in SpeechCommands.open(shared_data).clips:
        splits_of.setdefault(clip.speaker, set()).add(clip.split)
    assert all(len(s) == 1 for s in splits_of.values())


def test_speaker_and_hash_rule_known_values():
    assert speaker_of("yes/ffd2ba2f_nohash_3.wav") == "ffd2ba2f"
    # Same speaker, any clip number or extension: same split.
    assert split_by_hash("a/0a7c2a8d_nohash_0.wav") == split_by_hash("b/0a7c2a8d_nohash_4.flac")
    assert {split_by_hash(f"x/{i:08x}_nohash_0.wav") for i in range(200)} == set(SPLITS)


def test_hash_rule_used_without_lists(tmp_path, shared_data):
    for word in ("yes", "bed"):
        (tmp_path / word).mkdir()
        for src in sorted((shared_data / word).iterdir())[:40]:
            (tmp_path / word / src.name).symlink_to(src)
    dataset = SpeechCommands.open(tmp_path)
    assert dataset.split_source == "hash"
    assert all(c.split == split_by_hash(c.path) for c in dataset.clips)


def test_task_examples_standard_twelve(shared_data):
    dataset = SpeechCommands.open(shared_data)
    task = TaskConfig()
    assert task.labels == [SILENCE, UNKNOWN, *COMMANDS]
    train = dataset.examples(task, "training")
    counts = label_counts(train)
    n_words = sum(counts[w] for w in COMMANDS)
    assert counts[SILENCE] == counts[UNKNOWN] == -(-n_words // 10)  # ceil of 10%
    assert {ex.word for ex in train if ex.label == UNKNOWN} <= set(dataset.words) - set(COMMANDS)
    # Silence cuts come from the training region of the noise files only.
    assert all(ex.is_cut and ex.path.parent.name == "_background_noise_" for ex in train if ex.label == SILENCE)
    # Fixed seeds: same list twice; another seed samples other unknowns.
    assert dataset.examples(task, "training") == train
    other = dataset.examples(TaskConfig(seed=1), "training")
    assert other != train and label_counts(other) == counts


def test_configurable_fractions_and_any_word_list(shared_data):
    dataset = SpeechCommands.open(shared_data)
    task = TaskConfig(words=("yes", "no", "bed"), silence_fraction=0.25, unknown_fraction=0.0)
    assert task.labels == [SILENCE, "yes", "no", "bed"]
    counts = label_counts(dataset.examples(task, "validation"))
    assert UNKNOWN not in counts
    assert counts[SILENCE] == -(-(counts["yes"] + counts["no"] + counts["bed"]) // 4)
    all_words = TaskConfig(words=tuple(dataset.words), unknown_fraction=0.0)
    assert len(all_words.labels) == 36  # 35 words + silence


def test_flat_folder_labels(tmp_path, shared_data):
    labels = TaskConfig().labels
    for folder, src in (("yes", "yes"), ("_silence_", "no"), ("marvin", "marvin")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a_nohash_0.flac").symlink_to(next((shared_data / src).iterdir()))
    got = {ex.word: ex.label for ex in flat_folder_examples(tmp_path, labels)}
    assert got == {"yes": "yes", "_silence_": SILENCE, "marvin": UNKNOWN}


def test_not_a_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(SpeechRNNError, match="no clips found"):
        SpeechCommands.open(tmp_path)
    with pytest.raises(SpeechRNNError, match="not a folder"):
        SpeechCommands.open(tmp_path / "missing")


def test_stats_cli_json_and_table(shared_data):
    result = run_cli("data", "stats", str(shared_data), "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert set(table) == set(SPLITS)
    assert table["training"]["on"] == 15 and table["validation"]["off"] == 7
    assert table["testing"] == {}
    words = json.loads(run_cli("data", "stats", str(shared_data), "--json", "--words").stdout)
    assert sum(sum(v.values()) for v in words.values()) == 9403
    text = run_cli("data", "stats", str(shared_data))
    assert "_silence_" in text.stdout and "total" in text.stdout
    bad = run_cli("data", "stats", str(Path("/nonexistent")))
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_names_that_are_not_utf8_get_a_split():
    """The split rule hashes a speaker id as the bytes of its file name; valid UTF-8 as before."""
    raw = os.fsdecode(b"yes/caf\xe9babe_nohash_0.wav")
    assert split_by_hash(raw) in SPLITS
    assert split_by_hash(raw) == split_by_hash(os.fsdecode(b"no/caf\xe9babe_nohash_3.flac"))
    assert split_by_hash("yes/0a7c2a8d_nohash_0.wav") == split_by_hash(os.fsdecode(b"yes/0a7c2a8d_nohash_0.wav"))


def small_dataset(root: Path, shared_data: Path, words: dict[str, int]) -> Path:
    """A Speech Commands-style folder of links to real clips: ``{word: how many}`` (0: an empty folder)."""
    for word, count in words.items():
        (root / word).mkdir(parents=True)
        for src in sorted((shared_data / word).iterdir())[:count]:
            (root / word / src.name).symlink_to(src)
    return root


def test_a_task_word_without_clips_is_named(tmp_path, shared_data):
    dataset = SpeechCommands.open(shared_data)
    assert words_without_clips(TaskConfig(("yes", "no")), [dataset]) is None
    assert words_without_clips(TaskConfig(("yes", "noo")), [dataset]) == "no training clips of 'noo' (did you mean 'no'?)"
    empty_no = SpeechCommands.open(small_dataset(tmp_path / "d", shared_data, {"yes": 30, "no": 0}))
    assert words_without_clips(TaskConfig(("yes", "no")), [empty_no]) == "no training clips of 'no'"
    # Clips in a train-only folder (synthetic speech) count.
    only_no = SpeechCommands.open(small_dataset(tmp_path / "extra", shared_data, {"no": 3}))
    assert words_without_clips(TaskConfig(("yes", "no")), [empty_no], [only_no]) is None


def test_stats_names_a_word_without_clips_and_an_empty_noise_folder_once(tmp_path, shared_data):
    root = small_dataset(tmp_path / "d", shared_data, {"yes": 30, "no": 0, "bed": 30})  # bed: unknown words
    (root / "_background_noise_").mkdir()
    result = run_cli("data", "stats", str(root), "--task-words", "yes,no")
    assert result.returncode == 0, result.stderr
    noise_folder = root / "_background_noise_"
    assert result.stderr.splitlines() == [
        f"warning: {root}: no training clips of 'no'; `speechrnn train` refuses a word without clips",
        f"warning: {noise_folder}: the folder holds no audio files; no _silence_ examples (1 s cuts of background noise)",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert rows["no"] == ["0", "0", "0"] and int(rows["yes"][0]) > 0  # the missing word is a row of zeros
    typo = run_cli("data", "stats", str(shared_data), "--task-words", "yes,noo", "--json")
    assert typo.returncode == 0 and json.loads(typo.stdout)["training"]["yes"] > 0
    assert typo.stderr.strip() == (f"warning: {shared_data}: no training clips of 'noo' (did you mean 'no'?); "
                                   "`speechrnn train` refuses a word without clips")
