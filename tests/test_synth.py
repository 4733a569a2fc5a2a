"""espeak-ng synthesis with the real program: layout, audio, splits, determinism, errors."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_prep.audio import load_audio
from data_prep.dataset import BACKGROUND_DIR, SpeechCommands, speaker_of
from data_prep.errors import SpeechRNNError
from data_prep.synth import DEFAULT_WORDS, synthesize_dataset

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

WORDS = ["yes", "left", "marvin"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize_dataset(out, WORDS, 6, seed=3, show_progress=False)


def test_default_words_cover_the_task():
    assert {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"} < set(DEFAULT_WORDS)
    assert len(DEFAULT_WORDS) >= 15  # enough non-commands for _unknown_


def test_layout_audio_and_splits(synth_dir):
    out, summary = synth_dir
    assert summary["clips"] == 18 and summary["words"] == WORDS
    assert sum(summary["splits"].values()) == 18
    starts = set()
    for word in WORDS:
        clips = sorted((out / word).glob("*.wav"))
        assert len(clips) == 6, word
        for path in clips:
            assert len(speaker_of(path)) == 8 and "_nohash_" in path.name
            audio = load_audio(path)
            assert audio.shape == (16000,)
            assert np.abs(audio).max() > 0.05
            # the word sits in digital silence, trimmed tight (sound in its first and last 10 ms)
            # and not hollow (sound in its middle half)
            nonzero = np.flatnonzero(audio)
            span = audio[nonzero[0] : nonzero[-1] + 1]
            starts.add(int(nonzero[0]))
            assert 1600 < len(span) <= 16000
            loudest = max(_rms(span[i : i + 160]) for i in range(0, len(span), 160))
            assert _rms(span[:160]) > 0.01 * loudest and _rms(span[-160:]) > 0.01 * loudest
            quarter = len(span) // 4
            assert np.abs(span[quarter:-quarter]).max() > 0.2 * np.abs(span).max()
    assert len(starts) > 9  # placed at random, not always at the same spot
    dataset = SpeechCommands.open(out)
    assert dataset.split_source == "lists" and len(dataset.clips) == 18
    assert set(dataset.words) == set(WORDS)
    splits_of = defaultdict(set)
    for clip in dataset.clips:
        splits_of[clip.speaker].add(clip.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert (out / "validation_list.txt").exists() and (out / "testing_list.txt").exists()
    assert sorted(p.name for p in (out / BACKGROUND_DIR).iterdir()) == ["pink_noise.wav", "white_noise.wav"]
    assert len(load_audio(out / BACKGROUND_DIR / "pink_noise.wav")) == 60 * 16000
    assert not list(out.parent.glob(".data.tmp-*"))  # the temp folder was renamed, not left behind


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synth_dir):
    out, _ = synth_dir
    again = tmp_path / "again"
    synthesize_dataset(again, WORDS, 6, seed=3, show_progress=False, workers=1)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    synthesize_dataset(other, WORDS, 6, seed=4, show_progress=False)
    assert _files(other) != _files(out)


def test_noise_is_copied_from_another_dataset(tmp_path, synth_dir):
    out, _ = synth_dir
    copy = tmp_path / "copy"
    synthesize_dataset(copy, ["go"], 1, noise_from=out, show_progress=False)
    assert _files(copy / BACKGROUND_DIR) == _files(out / BACKGROUND_DIR)
    with pytest.raises(SpeechRNNError, match="--noise-from"):
        synthesize_dataset(tmp_path / "bad", ["go"], 1, noise_from=tmp_path / "copy" / "go", show_progress=False)
    assert not (tmp_path / "bad").exists()


def test_missing_espeak(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHRNN_ESPEAK", str(tmp_path / "nonexistent"))
    with pytest.raises(SpeechRNNError, match="apt-get install espeak-ng"):
        synthesize_dataset(tmp_path / "out", ["yes"], 1, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_espeak_via_cli(tmp_path):
    result = run_cli(
        "data",
        "synth",
        "--out",
        str(tmp_path / "out"),
        "--per-word",
        "1",
        "--words",
        "yes",
        env={"SPEECHRNN_ESPEAK": "/nonexistent"},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "apt-get" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_a_non_empty_out(tmp_path, synth_dir):
    out, _ = synth_dir
    before = _files(out)
    with pytest.raises(SpeechRNNError, match="pick another folder or delete it"):
        synthesize_dataset(out, ["go"], 1, show_progress=False)
    assert _files(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthesize_dataset(empty, ["go"], 2, show_progress=False)["clips"] == 2


@pytest.mark.parametrize("words", [["yes", "yes"], [BACKGROUND_DIR], ["a/b"], []])
def test_bad_words(tmp_path, words):
    with pytest.raises(SpeechRNNError):
        synthesize_dataset(tmp_path / "out", words, 1, show_progress=False)


def test_on_and_off_are_spoken_in_the_vowels_people_use():
    from data_prep.synth import ENDINGS, SPELLINGS, plan_clips

    voices = ["en-us", "en-gb"]
    specs = plan_clips(["off", "yes"], 80, voices, seed=5)
    off_texts = {s.text for s in specs if s.word == "off"}
    assert {t.rstrip("".join(ENDINGS)) for t in off_texts} == set(SPELLINGS["off"])
    assert {t[-1] for t in off_texts if t[-1] in ".!?"} == {".", "!", "?"}
    assert {s.text.rstrip(".!?") for s in specs if s.word == "yes"} == {"yes"}
    plain = plan_clips(["off", "yes"], 80, voices, seed=5, plain=True)
    assert {s.text for s in plain} == {""}  # espeak-ng reads the word itself
    # same voices and settings for the first clip: plain only skips the extra draws
    assert (plain[0].voice, plain[0].speed, plain[0].pitch) == (specs[0].voice, specs[0].speed, specs[0].pitch)


def test_no_command_sentences_and_their_synthesis(tmp_path):
    """Everyday sentences with no command, no inflection and no homophone of one, spoken whole."""
    import json

    from data_prep.sentences import contains_command, no_command_sentences

    texts = no_command_sentences(400, seed=2)
    assert len(set(texts)) == 400 and texts == no_command_sentences(400, seed=2)
    assert all(5 <= len(t.split()) <= 12 and not contains_command(t) for t in texts)
    assert any(t.endswith("?") for t in texts) and any(t.endswith(".") for t in texts)
    heldout = no_command_sentences(400, seed=2, part="heldout")
    assert not set(heldout) & set(texts) and all(not contains_command(t) for t in heldout)
    for bad in ("Turn it on now.", "She left early.", "I know that song.", "Going home?", "Stopped the car."):
        assert contains_command(bad), bad
    out = tmp_path / "talk"
    result = run_cli("data", "sentences", "--out", str(out), "--count", "3", "--engine", "espeak", "--seed", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "synth.json").read_text())
    assert [c["text"] for c in record["clips"]] == texts[:3]
    for clip in record["clips"]:
        audio = load_audio(out / "sentences" / clip["name"])
        assert len(audio) / 16000 > 0.15 * len(clip["text"].split())  # the whole sentence, not a cut
    assert record["audio_seconds"] > 5


def test_synthesis_recipe_makes_each_set_once(tmp_path):
    import json

    recipe = tmp_path / "synth.json"
    recipe.write_text(json.dumps({"sets": {"cmd": {"engine": "espeak", "words": ["yes", "go"], "per_word": 2, "seed": 1},
                                           "unk": {"engine": "espeak", "vocabulary": "unknown", "per_word": 1,
                                                   "seed": 2}}}))
    out = tmp_path / "sets"
    first = run_cli("data", "synth", "--recipe", str(recipe), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(list((out / "cmd").glob("[a-z]*/*.wav"))) == 4 and len(list((out / "unk").glob("[a-z]*/*.wav"))) >= 400
    before = _files(out)
    again = run_cli("data", "synth", "--recipe", str(recipe), "--out", str(out))
    assert again.returncode == 0 and "cmd: already complete" in again.stderr and _files(out) == before
    recipe.write_text(json.dumps({"sets": {"cmd": {"engine": "espeak", "words": ["yes", "go"], "per_word": 3,
                                                   "seed": 1}}}))
    changed = run_cli("data", "synth", "--recipe", str(recipe), "--out", str(out))
    assert changed.returncode == 1 and "made with other settings" in changed.stderr
