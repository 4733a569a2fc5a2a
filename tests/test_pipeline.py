"""The model pipeline for real: train a tiny model with the CLI, export it, load the SavedModel
back (also where speechrnn cannot be imported), evaluate and classify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import run_cli
from data_prep.audio import fix_length, load_audio
from data_prep.dataset import SpeechCommands, TaskConfig
from data_prep.features import FeatureConfig, mfcc

WORDS = "yes,no,up,down"
TRAIN_ARGS = ["--words", WORDS, "--units", "32", "--max-per-label", "100", "--epochs", "6", "--lr", "0.005",
              "--batch-size", "32", "--seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """A tiny 2x BiGRU-32 on ~100 clips per label for 6 epochs, trained and exported by the CLI."""
    base = tmp_path_factory.mktemp("pipeline")
    run, export = base / "run", base / "export"
    env = {"SPEECHRNN_CACHE": str(base / "cache")}
    result = run_cli("train", "--data", str(shared_data), "--out", str(run), *TRAIN_ARGS,
                     "--export", str(export), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": run, "export": export, "env": env, "stderr": result.stderr, "data": shared_data}


def held_out_clips(shared_data, n=40):
    """Validation-split clips of the test words: speakers the tiny model never trained on."""
    dataset = SpeechCommands.open(shared_data)
    task = TaskConfig(tuple(WORDS.split(",")))
    examples = [ex for ex in dataset.examples(task, "validation") if not ex.is_cut and ex.label in task.words]
    return examples[:: max(1, len(examples) // n)][:n]


def test_run_folder_holds_everything(trained):
    run = trained["run"]
    for name in ("config.json", "labels.txt", "normalization.json", "history.csv", "curves.png", "summary.json",
                 "train.log", "checkpoints/best.npz", "checkpoints/last.npz"):
        assert (run / name).exists(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,grad_norm_max,grad_norm_median")
    assert len(rows) == 7
    config = json.loads((run / "config.json").read_text())
    assert config["features"] == FeatureConfig().to_dict() and config["clipnorm"] == 1.0
    assert "epoch   6/6" in trained["stderr"] and "grad-norm max" in trained["stderr"]
    summary = json.loads((run / "summary.json").read_text())
    history = [dict(zip(rows[0].split(","), r.split(","), strict=True)) for r in rows[1:]]
    best = max(history, key=lambda r: float(r["val_accuracy"]))
    assert summary["best_epoch"] == int(best["epoch"])  # the best checkpoint, not the last, is kept


def test_export_contract(trained):
    export = trained["export"]
    labels = (export / "assets" / "labels.txt").read_text().split()
    assert labels == ["_silence_", "_unknown_", *WORDS.split(",")]
    meta = json.loads((export / "assets" / "speechrnn.json").read_text())
    assert meta["features"] == FeatureConfig().to_dict() and meta["labels"] == labels
    assert meta["training"]["best_epoch"] >= 1 and meta["metrics"]["validation"]["accuracy"] > 0
    assert meta["format_version"] == 3 and meta["metrics_source"] == "recorded by training"
    # The metrics the run recorded at its best checkpoint are the export's.
    assert json.loads((trained["run"] / "summary.json").read_text())["metrics"] == meta["metrics"]
    lite = meta["litert"]["float32"]
    assert lite["file"] == "litert/model_float32.tflite" and lite["max_abs_difference_from_keras"] < 1e-4
    assert lite["checked_on_clips"] > 100 and (export / lite["file"]).stat().st_size > 0
    # int8 is kept only when it agrees with float32 (this 6-epoch model is too unsure of itself for that)
    assert ("int8" in meta["litert"]) != ("int8_skipped" in meta["litert"])
    # data folders are named, never located: no path of the training machine in the export
    assert meta["training"]["data"] == meta["training"]["run_config"]["data"] == ["speech_commands"]
    assert str(trained["data"].parent) not in (export / "assets" / "speechrnn.json").read_text()
    shown = subprocess.run([str(Path(sys.executable).parent / "saved_model_cli"), "show", "--dir", str(export), "--all"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for needed in ("signature_def['serving_default']", "signature_def['mfcc']", "waveform", "probabilities"):
        assert needed in shown.stdout
    xla = subprocess.run([str(Path(sys.executable).parent / "saved_model_cli"), "show", "--dir", str(export / "xla"),
                          "--all"], capture_output=True, text=True, timeout=120)
    assert "signature_def['waveform_xla']" in xla.stdout and "signature_def['mfcc_xla']" in xla.stdout
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    assert size < 5e6


def test_classifying_does_not_load_keras(trained, shared_data):
    """Recognizer imports TensorFlow without Keras (1.6 s of start-up); the answers are the same."""
    clip = str(next((shared_data / "yes").iterdir()))
    script = textwrap.dedent(f"""
        import sys
        from speechrnn.recognizer import Recognizer
        result = Recognizer({str(trained['export'])!r}, "tf").classify_files([{clip!r}])[0]
        print("keras" in sys.modules, result.label, repr(result.score))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, label, score = out.stdout.split()
    assert loaded == "False"
    from speechrnn.recognizer import Recognizer

    with_keras = Recognizer(trained["export"], "tf").classify_files([clip])[0]  # this process has Keras loaded
    assert (with_keras.label, float(score)) == (label, pytest.approx(with_keras.score, abs=1e-6))


def test_saved_model_loads_without_speechrnn_and_matches_the_keras_model(trained, tmp_path):
    examples = held_out_clips(trained["data"], 8)
    waves = np.stack([fix_length(load_audio(ex.path), 16000) for ex in examples])
    np.save(tmp_path / "waves.npy", waves)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        for name in ("speechrnn", "data_prep", "librosa"):
            sys.modules[name] = None  # importing any of them now fails
        import tensorflow as tf
        model = tf.saved_model.load({str(trained['export'])!r})
        waves = np.load({str(tmp_path / 'waves.npy')!r})
        out = model.signatures["serving_default"](waveform=tf.constant(waves))
        np.save({str(tmp_path / 'probs.npy')!r}, out["probabilities"].numpy())
        print(" ".join(label.decode() for label in out["label"].numpy()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (8, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)

    from speechrnn.train import model_from_run

    _, model = model_from_run(trained["run"], "best")
    keras_probs = model.predict(mfcc(waves, FeatureConfig()), verbose=0)
    np.testing.assert_allclose(probs, keras_probs, atol=1e-4)  # librosa features + Keras == in-graph + SavedModel
    labels = result.stdout.split()
    assert labels == [["_silence_", "_unknown_", "yes", "no", "up", "down"][i] for i in keras_probs.argmax(1)]


def real_clips(shared_data, n: int, split: str = "validation") -> np.ndarray:
    """``n`` real one-second clips of a split (the task's labels, silence cuts included)."""
    from data_prep.extract import WaveformLoader

    examples = SpeechCommands.open(shared_data).examples(TaskConfig(tuple(WORDS.split(","))), split)
    chosen = examples[:: max(1, len(examples) // n)][:n]
    return WaveformLoader(FeatureConfig()).load_many(chosen)[0]


def test_litert_gives_the_saved_models_probabilities(trained):
    """The export's LiteRT model (no TensorFlow) and its SavedModel, on real clips: the same network
    within 1e-4 on the same MFCC; from the waveform (numpy MFCC against the graph's) the same labels."""
    from speechrnn.recognizer import Recognizer

    waves = real_clips(trained["data"], 96)
    feats = mfcc(waves, FeatureConfig())
    lite, saved = Recognizer(trained["export"]), Recognizer(trained["export"], "tf")
    assert (lite.backend, saved.backend) == ("litert", "tf")
    np.testing.assert_allclose(lite.probabilities_from_mfcc(feats), saved.probabilities_from_mfcc(feats), atol=1e-4)
    np.testing.assert_allclose(lite.probabilities_from_mfcc(feats[:1]), saved.probabilities_from_mfcc(feats[:1]),
                               atol=1e-4)  # the batch-1 interpreter (listening)
    from_waves = lite.probabilities(waves)
    np.testing.assert_allclose(from_waves, saved.probabilities(waves), atol=2e-3)
    assert np.mean(from_waves.argmax(1) == saved.probabilities(waves).argmax(1)) >= 0.98
    # Longer than a clip: the windows and the choice among them as serving_default makes them.
    quiet = np.zeros(6400, np.float32)
    long = np.concatenate([quiet, waves[0], quiet])[None]
    np.testing.assert_allclose(lite.probabilities(long), saved.probabilities(long), atol=2e-3)


def test_classify_and_listen_on_litert_never_import_tensorflow(trained, tmp_path):
    """In one process: `classify` and a short `listen --input` of an export with LiteRT models, then
    a look at sys.modules: no TensorFlow (nor Keras, librosa). With --backend tf it is there (so the
    look can see it)."""
    waves = real_clips(trained["data"], 3)
    for i, wave in enumerate(waves):
        sf.write(tmp_path / f"clip{i}.wav", wave, 16000)
    sf.write(tmp_path / "stream.wav", np.concatenate([np.zeros(8000, np.float32), *waves]), 16000)
    clips = [str(tmp_path / f"clip{i}.wav") for i in range(3)]
    script = textwrap.dedent("""
        import json, os, sys
        os._exit = sys.exit  # the CLI ends with os._exit: here it returns, to look at sys.modules after
        from speechrnn.cli import main
        backend, export, stream, *clips = sys.argv[1:]
        for args in (["classify", export, *clips, "--json"], ["listen", export, "--input", stream, "--json"]):
            try:
                main([*args, "--backend", backend])
            except SystemExit as done:
                assert not done.code, done.code
            loaded = [name for name in ("tensorflow", "keras", "librosa") if name in sys.modules]
            print(json.dumps({"after": args[0], "loaded": loaded}))
    """)
    answers = {}
    for backend in ("auto", "tf"):
        result = subprocess.run([sys.executable, "-c", script, backend, str(trained["export"]),
                                 str(tmp_path / "stream.wav"), *clips], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        loaded = {line["after"]: line["loaded"] for line in lines if "after" in line}
        answers[backend] = [(line["path"], line["label"]) for line in lines if "path" in line]
        if backend == "auto":
            assert loaded == {"classify": [], "listen": []}, loaded
        else:
            assert "tensorflow" in loaded["classify"] and "tensorflow" in loaded["listen"], loaded
    assert len(answers["auto"]) == 3 and answers["auto"] == answers["tf"]


def test_a_damaged_litert_model_is_one_line(trained, tmp_path):
    """A LiteRT file changed after export: classify and listen refuse the folder in one line; the
    SavedModel (--backend tf) is untouched and still answers; the interpreter's own refusal of a
    file that is not a LiteRT model is one line too."""

    from data_prep.errors import SpeechRNNError
    from speechrnn.litert_model import LiteRTModel

    copy = tmp_path / "model"
    shutil.copytree(trained["export"], copy)
    lite = copy / "litert" / "model_float32.tflite"
    data = bytearray(lite.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    lite.write_bytes(bytes(data))
    clip = tmp_path / "clip.wav"
    sf.write(clip, real_clips(trained["data"], 1)[0], 16000)
    expected = (f"error: {copy}: litert/model_float32.tflite is not the LiteRT model this export was written with "
                "(damaged or replaced); export the run again")
    for args in (["classify", str(copy), str(clip)], ["listen", str(copy), "--input", str(clip)]):
        result = run_cli(*args)
        assert result.returncode == 1 and result.stderr.splitlines() == [expected], (args, result.stderr)
    assert run_cli("classify", str(copy), str(clip), "--backend", "tf").returncode == 0
    lite.write_bytes(bytes(data[:5000]))
    with pytest.raises(SpeechRNNError, match="damaged LiteRT model"):
        LiteRTModel(lite)
    info = run_cli("info", str(copy))
    assert info.returncode == 1 and "is not the LiteRT model this export was written with" in info.stderr


def test_export_needs_only_the_run_folder(trained, tmp_path):
    """A copy of the run whose data folders are gone exports with the metrics the run recorded; a
    copy without the record (a run trained before runs kept one) has them computed from the data
    folders, as before, and says so."""
    moved = tmp_path / "moved"
    shutil.copytree(trained["run"], moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"] = [str(tmp_path / "gone" / "speech_commands")]
    (moved / "config.json").write_text(json.dumps(config))
    result = run_cli("export", str(moved), str(tmp_path / "a"), env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "a" / "assets" / "speechrnn.json").read_text())
    original = json.loads((trained["export"] / "assets" / "speechrnn.json").read_text())
    assert meta["metrics"] == original["metrics"] and meta["metrics_source"] == "recorded by training"

    older = tmp_path / "older"
    shutil.copytree(trained["run"], older)
    (older / "export_data.npz").unlink()
    result = run_cli("export", str(older), str(tmp_path / "b"), env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "has no record of its validation results (trained before runs kept one): computing the metrics" \
        in result.stderr
    meta = json.loads((tmp_path / "b" / "assets" / "speechrnn.json").read_text())
    assert meta["metrics_source"] == "computed at export from the data folders"
    assert set(meta["metrics"]) == set(original["metrics"]) == {"validation"}  # no held-out words in this task
    for split in meta["metrics"]:
        for key in ("accuracy", "examples", "balanced_accuracy"):
            assert meta["metrics"][split][key] == pytest.approx(original["metrics"][split][key], abs=1e-9), (split, key)


def test_in_graph_mfcc_equals_librosa_on_real_clips(shared_data):
    """Tolerance: 2e-3 absolute on coefficients that span about -600..+200 (measured max 3.2e-4)."""
    from data_prep.features import mfcc_constants
    from speechrnn.export import tf_mfcc
    from speechrnn.tfutil import import_tf

    tf = import_tf()
    config = FeatureConfig()
    files = [sorted((shared_data / w).iterdir())[5] for w in ("yes", "off", "happy", "left")]
    files.append(shared_data / "_background_noise_" / "running_tap.flac")
    waves = np.stack([fix_length(load_audio(f), 16000) for f in files] + [np.zeros(16000, np.float32)])
    consts = {k: tf.constant(v) for k, v in mfcc_constants(config).items()}
    in_graph = tf_mfcc(tf, tf.constant(waves), config, consts).numpy()
    np.testing.assert_allclose(in_graph, mfcc(waves, config), rtol=0, atol=2e-3)


def test_xla_signatures_agree_with_plain_ones(trained):
    from speechrnn.recognizer import Recognizer

    rec = Recognizer(trained["export"], "tf")
    waves = np.stack([fix_length(load_audio(ex.path), 16000) for ex in held_out_clips(trained["data"], 3)])
    np.testing.assert_allclose(rec.probabilities(waves, xla=True), rec.probabilities(waves), atol=1e-4)
    np.testing.assert_allclose(rec.probabilities_from_mfcc(mfcc(waves), xla=True), rec.probabilities(waves), atol=1e-4)


def test_metrics_balanced_accuracy_weighs_each_label_equally():
    from speechrnn.evaluate import metrics_from_predictions

    # 8 "yes" all right, 2 "off" both wrong: 80% of clips, but half the labels never recognised.
    truth = np.array([0] * 8 + [1] * 2)
    predicted = np.array([0] * 8 + [0] * 2)
    m = metrics_from_predictions(truth, predicted, ["yes", "off", "up"])
    assert m["accuracy"] == 0.8 and m["balanced_accuracy"] == 0.5  # "up" has no clips: not counted
    assert m["per_class"]["off"]["recall"] == 0.0 and m["per_class"]["up"]["recall"] is None


def test_evaluate_is_clearly_above_chance_on_unseen_speakers(trained, tmp_path):
    plot = tmp_path / "cm.png"
    result = run_cli("evaluate", str(trained["export"]), str(trained["data"]), "--split", "validation", "--json",
                     "--plot", str(plot), env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    # 6 classes, largest class about a quarter of the validation set: chance is at most ~0.25.
    assert report["accuracy"] > 0.45, report["accuracy"]
    recalls = [m["recall"] for m in report["per_class"].values() if m["recall"] is not None]
    assert report["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert np.array(report["confusion_matrix"]).sum() == report["examples"]
    assert set(report["per_class"]) == {"_silence_", "_unknown_", "yes", "no", "up", "down"}
    assert plot.read_bytes()[:4] == b"\x89PNG"
    testing = run_cli("evaluate", str(trained["export"]), str(trained["data"]))
    assert testing.returncode == 1 and "no testing examples" in testing.stderr and "Traceback" not in testing.stderr


def test_evaluate_pools_folders_and_reports_every_unknown_word(trained):
    """Two dataset folders pooled, every unseen unknown-word clip, and recall per unknown word."""
    extra = trained["data"].parent / "speech_commands_extra"
    result = run_cli("evaluate", str(trained["export"]), str(trained["data"]), str(extra), "--split", "validation",
                     "--all-unknown", "--json", env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    validation = [c for folder in (trained["data"], extra) for c in SpeechCommands.open(folder).clips
                  if c.split == "validation"]
    unknown_clips = [c for c in validation if c.word not in WORDS.split(",")]
    by_word = report["unknown_by_word"]
    assert report["per_class"]["_unknown_"]["support"] == len(unknown_clips) == sum(m["support"] for m in by_word.values())
    assert {"eight", "five", "one", "zero", "bed"} <= set(by_word)  # digits from the extra folder
    assert report["per_class"]["down"]["support"] == sum(c.word == "down" for c in validation)
    for m in by_word.values():
        assert 0 <= m["recall"] <= 1 and m["recall_95ci"][0] <= m["recall"] <= m["recall_95ci"][1]


def test_evaluate_flat_folder(trained, tmp_path):
    flat = tmp_path / "flat"
    for folder, src in (("yes", "yes"), ("down", "down"), ("marvin", "marvin"), ("_silence_", None)):
        (flat / folder).mkdir(parents=True)
        if src:
            for f in sorted((trained["data"] / src).iterdir())[:3]:
                (flat / folder / f.name).symlink_to(f)
        else:
            sf.write(flat / folder / "quiet.wav", np.zeros(16000, np.float32), 16000)
    result = run_cli("evaluate", str(trained["export"]), str(flat), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["examples"] == 10
    assert report["per_class"]["_unknown_"]["support"] == 3 and report["per_class"]["_silence_"]["support"] == 1
    assert report["skipped"] == [] and result.stderr == ""

    # Two clips that cannot be read: the report covers the other ten, each failure is one line, exit 1.
    (flat / "yes" / "empty.wav").write_bytes(b"")
    (flat / "down" / "notes.wav").write_text("not audio\n" * 20)
    for args in (["--json"], []):
        result = run_cli("evaluate", str(trained["export"]), str(flat), *args)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert sorted(result.stderr.splitlines()) == [
            f"error: {flat / 'down' / 'notes.wav'}: cannot decode audio (Format not recognised)",
            f"error: {flat / 'yes' / 'empty.wav'}: cannot decode audio (Format not recognised)"]
    assert "accuracy" in result.stdout and "left out 2 unreadable files (named on stderr)" in result.stdout
    report = json.loads(run_cli("evaluate", str(trained["export"]), str(flat), "--json").stdout)
    assert report["examples"] == 10 and len(report["skipped"]) == 2


def _bad_files(tmp: Path) -> dict[str, Path]:
    bad = {
        "empty": tmp / "empty.wav", "not_audio": tmp / "notes.wav", "truncated": tmp / "truncated.wav",
        "nan": tmp / "nan.wav", "directory": tmp / "adir.wav", "missing": tmp / "missing.wav",
    }
    bad["empty"].write_bytes(b"")
    bad["not_audio"].write_text("hello, this is text\n" * 20)
    sf.write(tmp / "full.wav", np.zeros(8000, np.float32), 16000)
    bad["truncated"].write_bytes((tmp / "full.wav").read_bytes()[:30])
    sf.write(bad["nan"], np.array([0.0, np.nan] * 4000, np.float32), 16000, subtype="FLOAT")
    bad["directory"].mkdir()
    return bad


def test_classify_good_and_bad_files(trained, tmp_path):
    good = [ex.path for ex in held_out_clips(trained["data"], 4)]
    # Other rates, channels, bit depths, formats and lengths.
    clip = load_audio(good[0])
    import soxr

    sf.write(tmp_path / "stereo44k.ogg", np.stack([soxr.resample(clip, 16000, 44100)] * 2, axis=1), 44100)
    sf.write(tmp_path / "u8.wav", clip, 16000, subtype="PCM_U8")
    sf.write(tmp_path / "long.wav", np.concatenate([np.zeros(24000), clip, np.zeros(20000)]).astype(np.float32), 16000)
    sf.write(tmp_path / "short.wav", clip[:4000], 16000)
    extra = [tmp_path / n for n in ("stereo44k.ogg", "u8.wav", "long.wav", "short.wav")]
    bad = _bad_files(tmp_path)
    files = [*map(str, good), *map(str, extra), *map(str, bad.values())]
    result = run_cli("classify", str(trained["export"]), *files, "--json", "--top-k", "2")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["path"] for o in objects] == files
    ok = [o for o in objects if "error" not in o]
    assert len(ok) == len(good) + len(extra)
    for o in ok:
        assert o["label"] == o["top"][0][0] and len(o["top"]) == 2 and 0 < o["score"] <= 1
    errors = {Path(o["path"]).name: o["error"] for o in objects if "error" in o}
    assert set(errors) == {p.name for p in bad.values()}
    assert "empty" in errors["empty.wav"] or "decode" in errors["empty.wav"]
    assert "NaN" in errors["nan.wav"] and "directory" in errors["adir.wav"] and "no such file" in errors["missing.wav"]

    text = run_cli("classify", str(trained["export"]), str(good[0]), str(bad["nan"]))
    assert text.returncode == 1
    assert text.stderr.strip() == f"error: {bad['nan']}: the audio contains NaN or Inf samples"
    assert text.stdout.startswith(str(good[0]) + "\t")
    assert run_cli("classify", str(trained["export"]), str(good[0])).returncode == 0


def test_classify_rejects_a_folder_that_is_not_a_model(tmp_path, shared_data):
    clip = str(next((shared_data / "yes").iterdir()))
    result = run_cli("classify", "--model", str(tmp_path), clip)
    assert result.returncode == 1 and "not a speechrnn export" in result.stderr and "Traceback" not in result.stderr


def format_1_copy(export: Path, out: Path) -> Path:
    """A copy of an export as exports were before LiteRT models and graph checksums (format 1)."""
    shutil.copytree(export, out)
    shutil.rmtree(out / "litert")
    meta_path = out / "assets" / "speechrnn.json"
    meta = json.loads(meta_path.read_text())
    for key in ("litert", "graph_sha256", "metrics_source"):
        meta.pop(key, None)
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    return out


def test_info_shows_metrics(trained, tmp_path):
    result = run_cli("info", str(trained["export"]))
    assert result.returncode == 0, result.stderr
    assert "2xbigru32-attention" in result.stdout and "validation  accuracy" in result.stdout
    assert "class-balanced" in result.stdout
    backends = next(line for line in result.stdout.splitlines() if line.startswith("backends"))
    assert backends.startswith("backends    litert (LiteRT float32, no TensorFlow, default); "), backends
    assert "; tf (the SavedModel, TensorFlow)" in backends, backends
    assert json.loads(run_cli("info", str(trained["export"]), "--json").stdout)["size_bytes"] > 0
    shipped = run_cli("info")  # models/default: LiteRT too
    assert "backends    litert (LiteRT float32, no TensorFlow, default); litert-int8" in shipped.stdout, shipped.stdout
    old = format_1_copy(trained["export"], tmp_path / "old")  # an export from before LiteRT
    assert "backends    tf (the SavedModel, TensorFlow, default); no LiteRT model" in run_cli("info", str(old)).stdout
    asked = run_cli("classify", str(old), "--backend", "litert", str(trained["data"] / "yes" / "004ae714_nohash_0.flac"))
    assert asked.returncode == 1 and asked.stderr.startswith("error: ") and len(asked.stderr.splitlines()) == 1
    assert "this export has no litert model (it was exported before LiteRT models were (format 1); export the " \
           "run again); it offers: tf" in asked.stderr
    int8 = run_cli("classify", str(trained["export"]), "--backend", "litert-int8",
                   str(trained["data"] / "yes" / "004ae714_nohash_0.flac"))
    meta = json.loads((trained["export"] / "assets" / "speechrnn.json").read_text())
    if "int8" not in meta["litert"]:  # refused for the reason the export recorded
        assert int8.returncode == 1 and meta["litert"]["int8_skipped"] in int8.stderr


def test_long_file_rule_picks_the_most_confident_non_silence_window(trained):
    from speechrnn.recognizer import Recognizer

    rec = Recognizer(trained["export"])  # labels: _silence_ _unknown_ yes no up down
    windows = rec.windows(np.arange(16000 + 1600 * 3 + 5, dtype=np.float32))
    assert windows.shape == (5, 16000) and windows[-1][-1] == 16000 + 1600 * 3 + 4  # the end is covered
    assert rec.windows(np.ones(7000, np.float32)).shape == (1, 16000)
    probs = np.array([[0.95, 0.01, 0.01, 0.01, 0.01, 0.01],   # confident silence
                      [0.30, 0.10, 0.50, 0.05, 0.05, 0.00],   # yes 0.5
                      [0.10, 0.05, 0.05, 0.70, 0.05, 0.05]])  # no 0.7: the answer
    assert rec.pick_window(probs).argmax() == 3
    only_silence = np.array([[0.6, 0.1, 0.1, 0.1, 0.05, 0.05], [0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    assert rec.pick_window(only_silence)[0] == 0.9


def test_export_of_several_runs_averages_their_probabilities(trained, tmp_path):
    """Two real runs exported as one model: the SavedModel's probabilities are the members' mean."""
    second = tmp_path / "second"
    args = [a for a in TRAIN_ARGS]
    args[args.index("--epochs") + 1], args[args.index("--seed") + 1] = "2", "4"
    result = run_cli("train", "--data", str(trained["data"]), "--out", str(second), *args, env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "mean"
    result = run_cli("export", str(trained["run"]), str(second), str(out), "--threshold", "up=0.9", env=trained["env"])
    assert result.returncode == 0, result.stderr[-3000:]

    from speechrnn.recognizer import Recognizer
    from speechrnn.train import model_from_run

    examples = held_out_clips(trained["data"], 12)
    feats = mfcc(np.stack([fix_length(load_audio(ex.path), 16000) for ex in examples]), FeatureConfig())
    members = [model_from_run(run)[1].predict(feats, verbose=0) for run in (trained["run"], second)]
    assert np.abs(members[0] - members[1]).max() > 0.05  # two different models, so the mean means something
    rec = Recognizer(out)
    np.testing.assert_allclose(rec.probabilities_from_mfcc(feats), np.mean(members, axis=0), atol=1e-4)
    saved = Recognizer(out, "tf")
    np.testing.assert_allclose(saved.probabilities_from_mfcc(feats), np.mean(members, axis=0), atol=1e-4)
    np.testing.assert_allclose(saved.probabilities_from_mfcc(feats[:1], xla=True), np.mean(members, axis=0)[:1], atol=1e-4)
    assert rec.backend == "litert"  # the ensemble's LiteRT model: both members' graphs, averaged
    meta = json.loads((out / "assets" / "speechrnn.json").read_text())
    assert meta["metrics_source"] == "recorded by training"  # from the mean of the members' recorded probabilities
    info = run_cli("info", str(out))
    assert "mean of 2: 2xbigru32-attention + 2xbigru32-attention" in info.stdout
    assert info.stdout.count("epochs (best") == 2 and "own thresholds up 0.9 " in info.stdout

    # The export carries its per-command threshold to `listen`; one given there is laid over it.
    from speechrnn.microphone import detector_for
    from speechrnn.streaming import StreamConfig

    assert json.loads((out / "assets" / "speechrnn.json").read_text())["streaming"] == {"label_thresholds": {"up": 0.9}}
    assert detector_for(rec, StreamConfig()).config.label_thresholds == {"up": 0.9}
    assert detector_for(rec, StreamConfig(label_thresholds={"up": 0.6, "no": 0.8})).config.label_thresholds == {
        "up": 0.6, "no": 0.8}
    clip = str(examples[0].path)
    result = run_cli("listen", str(out), "--input", clip, "--threshold", "left=0.5", env=trained["env"])
    assert result.returncode == 1 and "threshold for left: not a command this model reports" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("listen", str(out), "--input", clip, "--threshold", "up=1.5", env=trained["env"])
    assert result.returncode == 2 and "a threshold is in (0, 1]" in result.stderr

    # A run split differently would have trained on clips the other holds out: refused, one line.
    config = json.loads((second / "config.json").read_text())
    config["task"]["seed"] += 1
    (second / "config.json").write_text(json.dumps(config))
    result = run_cli("export", str(trained["run"]), str(second), str(tmp_path / "refused"), env=trained["env"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "task (words, split seed, holdout) differ" in result.stderr and str(second) in result.stderr
    assert not (tmp_path / "refused").exists()


def word_clip_the_model_knows(rec, shared_data) -> tuple[str, np.ndarray]:
    """A held-out clip of a command that the tiny model, on its own, gives its right label with p > 0.8."""
    for ex in held_out_clips(shared_data, 40):
        wave = fix_length(load_audio(ex.path), 16000)
        probs = rec.probabilities(wave[None])[0]
        if rec.labels[probs.argmax()] == ex.label and probs.max() > 0.8:
            return ex.label, wave
    pytest.fail("the tiny model is sure of none of 40 held-out clips")


def test_serving_default_scores_any_length_like_classify(trained, tmp_path):
    """The exported signature, as a model server calls it (plain tf.saved_model.load): a word in the
    second second of 2.55 s of quiet is found, with the probabilities `classify` gives the same audio
    as a file; up to one second, the zero-padded clip; the XLA twin agrees."""
    import tensorflow as tf

    from speechrnn.recognizer import Recognizer

    rec = Recognizer(trained["export"], "tf")  # classify on the SavedModel, as serving_default scores
    word, clip = word_clip_the_model_knows(rec, trained["data"])
    quiet = load_audio(trained["data"] / "_background_noise_" / "pink_noise.flac")[-48000:] * 0.01
    # 2.55 s, the word at 1.2-2.2 s: windows at 0, 0.1 ... 1.5 s and one ending at the last sample (1.55 s)
    long = np.concatenate([quiet[:19200], clip, quiet[19200:24800]]).astype(np.float32)
    short = clip[:12000]
    loaded = tf.saved_model.load(str(trained["export"]))
    serve = loaded.signatures["serving_default"]
    for wave in (long, short):
        sf.write(tmp_path / "w.wav", wave, 16000, subtype="FLOAT")
        classified = rec.classify_files([tmp_path / "w.wav"], top_k=len(rec.labels))[0]
        expected = np.array([dict(classified.top)[label] for label in rec.labels])
        out = serve(waveform=tf.constant(wave[None]))
        np.testing.assert_allclose(out["probabilities"].numpy()[0], expected, atol=1e-4)
        assert out["label"].numpy()[0].decode() == classified.label == word
    # The first second alone is quiet: scoring only that (what the signature did) would miss the word.
    assert serve(waveform=tf.constant(long[None, :16000]))["label"].numpy()[0].decode() != word
    # A batch of rows of one length: each row its own answer.
    both = serve(waveform=tf.constant(np.stack([long, np.zeros_like(long)])))
    assert [x.decode() for x in both["label"].numpy()] == [word, "_silence_"]
    xla = tf.saved_model.load(str(trained["export"] / "xla")).signatures["waveform_xla"]
    np.testing.assert_allclose(xla(waveform=tf.constant(long[None]))["probabilities"].numpy(),
                               serve(waveform=tf.constant(long[None]))["probabilities"].numpy(), atol=1e-4)


def test_the_export_never_gives_nan_for_finite_input(trained, shared_data):
    """Far outside the [-1, 1] contract (int16 values as float, and beyond), the exported features do
    not overflow: the outputs are finite probabilities (meaningless, but never NaN)."""
    import tensorflow as tf

    clip = fix_length(load_audio(sorted((shared_data / "yes").iterdir())[0]), 16000).astype(np.float64)
    loud = np.stack([clip * s for s in (32767, 1e15, 1e20, 1e30, 3e38 / np.abs(clip).max())]).astype(np.float32)
    serve = tf.saved_model.load(str(trained["export"])).signatures["serving_default"]
    probs = serve(waveform=tf.constant(loud))["probabilities"].numpy()
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(1), 1, atol=1e-5)


def save_other_model(tf, folder: Path, labels: int, frames: tuple[int, int], same_interface: bool) -> None:
    """Another TensorFlow model saved over an export folder (TF keeps the old assets/ and xla/)."""
    class Other(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")])
        def waveform(self, waveform):
            probs = tf.ones([tf.shape(waveform)[0], labels]) / labels
            return {"probabilities": probs, "label": tf.fill([tf.shape(waveform)[0]], "x"), "score": probs[:, 0]}

        @tf.function(input_signature=[tf.TensorSpec([None, *frames], tf.float32, name="mfcc")])
        def mfcc(self, mfcc):
            return self.waveform(tf.reshape(mfcc, [tf.shape(mfcc)[0], -1]))

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="x")])
        def other(self, x):
            return {"y": tf.reduce_sum(x, axis=1)}

    other = Other()
    signatures = ({"serving_default": other.waveform, "mfcc": other.mfcc} if same_interface
                  else {"serving_default": other.other})
    tf.saved_model.save(other, str(folder), signatures=signatures)


def test_an_export_overwritten_by_another_model_is_refused(trained, tmp_path, shared_data):
    """classify, listen and info: one clear error, no traceback, for a copy of an export from before
    graph checksums with another graph saved over it (its metadata is stale: the signatures tell),
    and for a copy of a new export with another graph of the very same interface (its recorded
    sha256 no longer matches)."""
    import tensorflow as tf

    clip = str(sorted((shared_data / "yes").iterdir())[0])
    shipped = format_1_copy(trained["export"], tmp_path / "default")  # an export without graph checksums
    save_other_model(tf, shipped, 6, (98, 40), same_interface=False)
    lookalike = tmp_path / "lookalike"
    shutil.copytree(trained["export"], lookalike)
    assert run_cli("info", str(lookalike)).returncode == 0  # a copy is still the export it was
    save_other_model(tf, lookalike, 6, (98, 40), same_interface=True)
    for folder, problem in ((shipped, "saved_model.pb: signature 'serving_default' takes x float32 [-1, 5], not waveform float32 [-1, -1]"),
                            (lookalike, "saved_model.pb is not the graph this export was written with")):
        expected = (f"error: {folder}: {problem}: the folder holds another model than assets/speechrnn.json "
                    "describes; export the run again")
        for args in (["classify", str(folder), clip, clip], ["listen", str(folder), "--input", clip],
                     ["info", str(folder)]):
            result = run_cli(*args)
            assert result.returncode == 1, (args, result.stderr)
            assert result.stderr.splitlines() == [expected], args
            assert result.stdout == ""
