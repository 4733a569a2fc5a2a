"""Hard-negative mining for real: models/default over a command-free stream (plus one real command
clip it must fire on), windows written as one-second clips that training takes as negatives."""

from __future__ import annotations

import json
import shutil

import numpy as np

from conftest import REPO, run_cli
from data_prep.audio import fix_length, load_audio


def test_mine_writes_the_windows_the_model_fires_on(tmp_path, shared_data):
    source = tmp_path / "talk"
    source.mkdir()
    yes = sorted((shared_data / "yes").glob("*.flac"))[3]
    shutil.copy(yes, source / "a_yes.flac")  # a real command: the model fires on it
    for k, path in enumerate(sorted((shared_data / "bed").glob("*.flac"))[:4]):
        shutil.copy(path, source / f"b_{k}.flac")
    out = tmp_path / "mined"
    result = run_cli("mine", str(REPO / "models" / "default"), "--out", str(out), "--from", str(source),
                     "--minutes", "0.1", "--threshold", "0.5", "--seed", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    record = json.loads((out / "mined.json").read_text())
    clips = sorted((out / "mined").glob("*.wav"))
    assert summary["windows"] == len(clips) == len(record["clips"]) > 0
    assert summary["by_label"].get("yes", 0) >= 1 and summary["detections"] == sum(summary["by_label"].values())
    yes_audio = fix_length(load_audio(yes), 16000)
    similarity = []
    for entry in record["clips"]:
        audio = load_audio(out / "mined" / entry["clip"])
        assert audio.shape == (16000,) and entry["label"] in summary["by_label"]
        if entry["label"] == "yes":  # windows over the real "yes" clip (no noise was asked for)
            assert entry["source"].endswith("a_yes.flac")
            similarity.append(np.correlate(audio, yes_audio, "full").max()
                              / (np.linalg.norm(audio) * np.linalg.norm(yes_audio) + 1e-9))
    assert max(similarity) > 0.9  # the detection's own window holds the whole word
    again = run_cli("mine", str(REPO / "models" / "default"), "--out", str(out), "--from", str(source))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_mine_needs_a_source(tmp_path):
    result = run_cli("mine", "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and result.stderr.startswith("error: nothing to mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("mine", "--out", str(tmp_path / "m"), "--from", str(empty))
    assert result.returncode == 1 and "no audio files to mine" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()

