"""Training survives a kill: resume continues where it stopped; exports are atomic."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

ARGS = ["--words", "yes,no", "--units", "16", "--layers", "1", "--max-per-label", "40", "--epochs", "4",
        "--batch-size", "16", "--seed", "5", "--clipnorm", "0.05"]


def history(run: Path) -> list[dict]:
    path = run / "history.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from speechrnn.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process ended early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("resume")
    env = {"SPEECHRNN_CACHE": str(base / "cache")}
    killed, unbroken = base / "killed", base / "unbroken"
    proc = start_cli("train", "--data", str(shared_data), "--out", str(killed), *ARGS, env=env)
    wait_for(lambda: len(history(killed)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = history(killed)
    resumed = run_cli("train", "--out", str(killed), "--resume", env=env)
    fresh = run_cli("train", "--data", str(shared_data), "--out", str(unbroken), *ARGS, env=env)
    return {"killed": killed, "unbroken": unbroken, "before": before, "resumed": resumed, "fresh": fresh}


def test_resume_after_kill_ends_where_an_unbroken_run_does(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-2000:]
    assert runs["fresh"].returncode == 0, runs["fresh"].stderr[-2000:]
    assert "resuming" in runs["resumed"].stderr
    resumed, unbroken = history(runs["killed"]), history(runs["unbroken"])
    assert [int(r["epoch"]) for r in resumed] == [1, 2, 3, 4] == [int(r["epoch"]) for r in unbroken]
    killed_at = len(runs["before"])
    assert resumed[:killed_at] == runs["before"]  # completed epochs were kept, not redone
    # Same data, seeds, optimizer state and schedule position: the runs track each other closely.
    for a, b in zip(resumed, unbroken, strict=True):
        assert abs(float(a["learning_rate"]) - float(b["learning_rate"])) < 1e-9
        assert abs(float(a["loss"]) - float(b["loss"])) < 0.05
        assert abs(float(a["val_accuracy"]) - float(b["val_accuracy"])) < 0.1


def test_gradient_norms_are_logged_and_clipping_is_on(runs):
    rows = history(runs["unbroken"])
    for row in rows:
        assert float(row["grad_norm_max"]) >= float(row["grad_norm_median"]) > 0
        assert float(row["clipped_fraction"]) > 0.5  # a 0.05 clip norm clips nearly every step


def test_run_folder_refuses_to_be_overwritten(runs, shared_data):
    again = run_cli("train", "--data", str(shared_data), "--out", str(runs["unbroken"]), *ARGS)
    assert again.returncode == 1 and "already holds a run" in again.stderr


def test_killed_export_leaves_nothing_that_looks_complete(runs, tmp_path):
    out = tmp_path / "model"
    proc = start_cli("export", str(runs["unbroken"]), str(out))
    wait_for(lambda: any(tmp_path.glob(".model.tmp-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = run_cli("export", str(runs["unbroken"]), str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "saved_model.pb").exists() and (out / "assets" / "speechrnn.json").exists()
    assert not list(tmp_path.glob(".model.tmp-*"))
    # Exporting over an existing export replaces it; over anything else is refused.
    assert run_cli("export", str(runs["unbroken"]), str(out)).returncode == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run_cli("export", str(runs["unbroken"]), str(other))
    assert refused.returncode == 1 and "not a speechrnn export" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_gradient_reversal_flips_and_scales_the_gradient():
    from speechrnn.models import GradientReversal
    from speechrnn.tfutil import import_tf

    tf = import_tf()
    layer = GradientReversal()
    x = tf.constant([[1.0, -2.0, 3.0]])
    layer.build(x.shape)
    layer.strength.assign(0.5)
    weights = tf.constant([[2.0, 3.0, -1.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * weights)
    np.testing.assert_array_equal(y.numpy(), x.numpy())  # the identity going forward
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -0.5 * weights.numpy())


def test_domain_adversarial_training_resumes_and_exports_without_its_head(tmp_path, shared_data):
    """Real and espeak-ng speech with a real-vs-synthetic head, stream-context windows and running
    speech as negatives: the head trains (its accuracy is logged), a resumed run carries it on,
    and the export is the plain classifier."""
    from data_prep.sentences import no_command_sentences
    from data_prep.synth import synthesize_dataset, synthesize_sentences

    synth, talk = tmp_path / "synth", tmp_path / "talk"
    synthesize_dataset(synth, ["yes", "no", "marvin", "tree"], 12, seed=1, show_progress=False)
    synthesize_sentences(talk, no_command_sentences(4, 1), "espeak", seed=1, show_progress=False)
    run, export = tmp_path / "run", tmp_path / "export"
    recipe = tmp_path / "recipe.json"  # and words cut as a sliding window meets them, running speech as negatives
    # (a recipe's negatives_fraction with the folders given on the command line, as for the default)
    recipe.write_text(json.dumps({"augment": {"context_probability": 0.5}, "negatives_fraction": 0.25}))
    args = ["--config", str(recipe), "--data", str(shared_data), "--train-only", str(synth), "--words", "yes,no",
            "--units", "16", "--layers", "1", "--max-per-label", "40", "--batch-size", "16", "--seed", "2",
            "--domain-adversarial", "0.5", "--train-only-unknown", "all", "--negatives", str(talk),
            "--out", str(run)]
    first = run_cli("train", *args, "--epochs", "2", env={"SPEECHRNN_CACHE": str(tmp_path / "cache")})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "domain acc" in first.stderr and "(reversal 0.00)" in first.stderr
    assert "windows of 4 negatives recordings" in first.stderr
    resumed = run_cli("train", "--out", str(run), "--resume", "--epochs", "3", "--export", str(export),
                      env={"SPEECHRNN_CACHE": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the ramp 2/(1+exp(-10p))-1 reaches ~1 at the last epoch (p = 1) of each session
    assert [float(r["reversal_strength"]) for r in rows] == [0.0, pytest.approx(0.5, abs=1e-3), pytest.approx(0.5, abs=1e-3)]
    assert all(0 < float(r["domain_accuracy"]) <= 1 and float(r["domain_loss"]) > 0 for r in rows)
    # all 24 synthetic unknown clips (marvin, tree) train, beside the real ones sampled as before
    config = json.loads((run / "config.json").read_text())
    assert config["train_only_unknown"] == "all" and config["domain_adversarial"] == 0.5
    assert config["augment"]["context_probability"] == 0.5 and config["negatives"] == [str(talk)]
    with np.load(run / "checkpoints" / "last.npz") as ck:
        assert int(ck["trained_count"]) > int(ck["model_count"])  # the head's weights are kept for resume
    check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, tensorflow as tf
        m = tf.saved_model.load({str(export)!r})
        sizes = [s for n, s in tf.train.list_variables({str(export / "variables" / "variables")!r}) if s]
        out = m.signatures["mfcc"](tf.zeros([1, 98, 40]))
        print(json.dumps({{"shape": out["probabilities"].shape.as_list(),
                           "values": sum(int(tf.reduce_prod(s)) for s in sizes)}}))
    """)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    exported = json.loads(check.stdout.strip().splitlines()[-1])
    # the classifier's own weights and nothing more (the domain head alone has over 2,000)
    assert exported == {"shape": [1, 4], "values": json.loads((run / "summary.json").read_text())["parameters"]}


def test_unreadable_clips_are_named_left_out_and_exit_1(tmp_path, shared_data):
    """One rule for inputs that fail (README, "Exit status"): a dataset with two unreadable clips
    trains on the rest, names each on one `error:` line, records them in summary.json, exits 1."""
    from data_prep.dataset import split_by_hash

    data = tmp_path / "data"
    for word in ("yes", "no", "bed"):
        (data / word).mkdir(parents=True)
        for src in sorted((shared_data / word).iterdir())[:40]:
            (data / word / src.name).symlink_to(src)
    (data / "_background_noise_").mkdir()
    for src in sorted((shared_data / "_background_noise_").glob("*_noise.flac")):
        (data / "_background_noise_" / src.name).symlink_to(src)
    broken = [n for n in (f"{i:08x}_nohash_0.wav" for i in range(100)) if split_by_hash(n) == "training"][:2]
    (data / "yes" / broken[0]).write_bytes(b"")
    (data / "no" / broken[1]).write_text("not audio\n" * 10)
    run = tmp_path / "run"
    result = run_cli("train", "--data", str(data), "--out", str(run), "--words", "yes,no", "--units", "8", "--layers",
                     "1", "--epochs", "1", "--batch-size", "16", "--no-augment", env={"SPEECHRNN_CACHE": str(tmp_path / "c")})
    assert result.returncode == 1, result.stderr[-3000:]
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert errors == [f"error: {data / 'no' / broken[1]}: cannot decode audio (Format not recognised)",
                      f"error: {data / 'yes' / broken[0]}: cannot decode audio (Format not recognised)"]
    assert "Traceback" not in result.stderr and "trained without 2 unreadable clips" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["skipped"]) == [e.removeprefix("error: ") for e in errors]
    assert summary["epochs_run"] == 1 and (run / "checkpoints" / "best.npz").exists()


def test_a_word_without_training_clips_is_refused_before_training(tmp_path, shared_data):
    result = run_cli("train", "--data", str(shared_data), "--out", str(tmp_path / "run"), "--words", "yes,noo")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {shared_data}: no training clips of 'noo' (did you mean 'no'?); every word of --words needs clips "
        "in its own <word>/ folder"]
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once the typo is fixed


def test_synthetic_unknown_words_are_pooled_and_sampled_like_real_ones(tmp_path, shared_data):
    """A folder of synthetic unknown words beside a folder of synthetic commands: "sampled" draws
    unknown_fraction x the pooled commands from it (per-folder sampling would draw none), "all" takes every one."""
    from data_prep.dataset import TaskConfig
    from data_prep.synth import synthesize_dataset
    from speechrnn.runconfig import TrainConfig
    from speechrnn.train import TrainingData

    data = tmp_path / "data"
    for word in ("yes", "no", "bed"):
        (data / word).mkdir(parents=True)
        for src in sorted((shared_data / word).iterdir())[:30]:
            (data / word / src.name).symlink_to(src)
    commands, vocabulary = tmp_path / "commands", tmp_path / "vocabulary"
    synthesize_dataset(commands, ["yes", "no"], 20, seed=1, show_progress=False)
    synthesize_dataset(vocabulary, ["marvin", "tree", "cup"], 20, seed=2, show_progress=False)
    counts = {}
    for mode in ("sampled", "all"):
        config = TrainConfig(data=[str(data)], train_only=[str(commands), str(vocabulary)], seed=1,
                             task=TaskConfig(("yes", "no"), unknown_fraction=0.5), train_only_unknown=mode)
        training = TrainingData(config, show_progress=False, cache_dir=tmp_path / "cache")
        synthetic = ~training.train_is_real
        unknown = np.array([ex.label == "_unknown_" for ex in training.train_examples])
        counts[mode] = int(np.sum(synthetic & unknown))
        assert int(np.sum(synthetic & ~unknown & (training.train_labels > 1))) == 40  # every synthetic command
    # half of the 40 pooled commands (each of the four splits rounds up); every one of the 60
    assert 20 <= counts["sampled"] <= 24 and counts["all"] == 60
