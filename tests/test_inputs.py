"""Inputs people really have (issue 17): real clips from ../shared transformed the way users' files
go wrong, through the shipped model (read-only) and the real CLI: samples far outside [-1, 1],
long recordings, a word at the very end of a stream (file end and Ctrl-C), file names that are
not UTF-8, truncated files, link loops, a model folder given without files."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_cli
from data_prep.audio import fix_length, load_audio

MODEL = REPO / "models" / "default"
CLI = "from speechrnn.cli import main; main()"
YES = "yes/004ae714_nohash_0.flac"  # a real "yes" whose speech fills most of its second


@pytest.fixture(scope="module")
def clips(shared_data) -> dict[str, np.ndarray]:
    noise = load_audio(shared_data / "_background_noise_" / "pink_noise.flac")
    noise = noise[int(0.8 * len(noise)) :]  # its validation part
    return {"yes": fix_length(load_audio(shared_data / YES), 16000),
            "quiet": (noise / np.sqrt(np.mean(noise**2)) * 0.003).astype(np.float32)}  # about -50 dBFS


def with_word(clips, seconds: float, at: float) -> np.ndarray:
    """``seconds`` of faint noise with the "yes" clip added at ``at`` seconds."""
    audio = np.resize(clips["quiet"], int(seconds * 16000)).copy()
    start = int(at * 16000)
    audio[start : start + 16000] += clips["yes"][: len(audio) - start]
    return audio


@pytest.fixture(scope="module")
def files(tmp_path_factory, clips) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inputs")
    made = {name: base / f"{name}.wav" for name in ("good", "loud", "louder", "truncated", "long", "loop")}
    yes = clips["yes"].astype(np.float64)
    sf.write(made["good"], clips["yes"], 16000)
    sf.write(made["loud"], (yes * 32767).astype(np.float32), 16000, subtype="FLOAT")  # int16 values as float
    sf.write(made["louder"], (yes * 1e20).astype(np.float32), 16000, subtype="FLOAT")
    data = made["good"].read_bytes()
    made["truncated"].write_bytes(data[: 44 + (len(data) - 44) * 3 // 4])  # the header still says 1 s
    sf.write(made["long"], with_word(clips, 65.0, 40.0), 16000)
    made["loop"].symlink_to(base / "loop-again.wav")
    (base / "loop-again.wav").symlink_to(made["loop"])
    # Names that are not valid UTF-8 (Latin-1 bytes), as argv hands them to Python.
    made["latin1"] = Path(os.fsdecode(bytes(base) + b"/caf\xe9_yes.wav"))
    sf.write(os.fsencode(made["latin1"]), clips["yes"], 16000)
    made["latin1_text"] = Path(os.fsdecode(bytes(base) + b"/notes_\xff.wav"))
    with open(os.fsencode(made["latin1_text"]), "wb") as fh:
        fh.write(b"this is not audio\n" * 30)
    return made


def run_with_terminal(*args: str, timeout: float = 600) -> tuple[int, bytes, str]:
    """The CLI with stderr on a pseudo-terminal (as in an interactive shell): exit, stdout, stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        seen += data
    out, _ = proc.communicate(timeout=timeout)
    os.close(master)
    return proc.returncode, out, seen.decode(errors="surrogateescape")


def test_classify_what_people_have(files):
    """One batch: each file gets its answer or its one error, the JSON is valid, exit 1. Samples far
    outside [-1, 1] are refused (never a NaN), a name that is not UTF-8 classifies, a truncated WAV
    is classified with a warning, an hour-long-style recording shows its progress on a terminal."""
    order = ["good", "loud", "louder", "latin1", "latin1_text", "truncated", "loop", "long"]
    status, out, terminal = run_with_terminal("classify", str(MODEL), *(str(files[k]) for k in order), "--json")
    assert status == 1, terminal
    assert b"NaN" not in out and "Traceback" not in terminal
    objects = [json.loads(line) for line in out.decode("ascii").splitlines()]  # json.dumps escapes the names
    assert [Path(o["path"]) for o in objects] == [files[k] for k in order]  # surrogate escapes round-trip
    got = dict(zip(order, objects, strict=True))
    for name in ("good", "latin1", "truncated", "long"):
        assert got[name]["label"] == "yes", (name, got[name])
    for name in ("loud", "louder"):
        assert got[name]["error"].startswith("samples reach ") and "far outside [-1, 1]" in got[name]["error"]
    assert got["latin1_text"]["error"] == "cannot decode audio (Format not recognised)"
    assert got["loop"]["error"] == "symbolic link loop (too many levels of symbolic links)"
    assert (f"warning: {files['truncated']}: the file ends early: its header announces 1.00 s of audio, "
            "it holds 0.75 s (truncated?)") in terminal
    assert f"classifying {files['long']}: 1:05 of 1:05 (100%)" in terminal


def test_classify_text_names_files_as_they_are(files):
    """Text output: the file names are the bytes on disk, also when they are not UTF-8; each failure is
    one `error: <file>: <problem>` line on stderr."""
    names = [files[k] for k in ("latin1", "latin1_text", "loud", "good")]
    result = subprocess.run([sys.executable, "-c", CLI, "classify", str(MODEL), *map(str, names)],
                            capture_output=True, timeout=600)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(b"\t")[:2] for line in lines] == [[bytes(names[0]), b"yes"], [bytes(names[3]), b"yes"]]
    assert result.stderr.splitlines() == [
        b"error: " + bytes(names[1]) + b": cannot decode audio (Format not recognised)",
        b"error: " + bytes(names[2]) + b": samples reach 1.12e+04, far outside [-1, 1] (integer sample values "
        b"stored as float?); scale the audio to [-1, 1]"]


def test_a_model_folder_without_files_is_bad_usage():
    """`classify models/default` (the model, no file): exit 2 at once, before TensorFlow is loaded."""
    script = textwrap.dedent(f"""
        import sys
        from speechrnn.cli import main
        try:
            main(["classify", {str(MODEL)!r}])
        except SystemExit as done:
            print("tensorflow" in sys.modules, done.code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "2"], result.stderr
    assert f"{MODEL} is a model folder: give the audio files to classify after it" in result.stderr


@pytest.fixture(scope="module")
def recognizer():
    from speechrnn.recognizer import Recognizer

    return Recognizer(MODEL)


def test_long_recordings_in_bounded_memory(recognizer, clips, tmp_path):
    """A recording 8x longer costs no more memory (numpy's allocations, traced): the windows are scored
    a batch at a time while the file is decoded a few seconds at a time; the word in it is found, and
    progress comes with every block."""
    peaks, answers, progress = {}, {}, []
    for seconds in (12, 96):
        path = tmp_path / f"{seconds}s.wav"
        sf.write(path, with_word(clips, seconds, seconds * 0.6), 16000)
        recognizer.classify_files([path])  # warm: the first call builds the graph's batch shape
        tracemalloc.start()
        result = recognizer.classify_files([path], progress=lambda *args: progress.append(args))[0]
        peaks[seconds] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        answers[seconds] = result.label
    assert answers == {12: "yes", 96: "yes"}
    # Holding every window, as before, took 23 MB and 136 MB here; the windows of 96 s alone are 60 MB.
    assert peaks[96] < 1.5 * peaks[12], peaks
    done = [done for path, done, total in progress if path.endswith("96s.wav")]
    assert len(done) >= 10 and done == sorted(done) and done[-1] == pytest.approx(96.0)
    assert all(total == pytest.approx(96.0) for path, _, total in progress if path.endswith("96s.wav"))


def word_at_the_end(clips) -> np.ndarray:
    """1 s of faint noise, then a real "yes" that the input ends with (1.98 s in all)."""
    return with_word(clips, 1.98, 1.0)


def test_a_word_at_the_very_end_of_a_file_is_detected(clips, tmp_path):
    """The file ends while "yes" is still being said: the detector finishes scoring what it has
    (before, nothing was detected without another second of quiet)."""
    path = tmp_path / "end.wav"
    sf.write(path, word_at_the_end(clips), 16000)
    result = run_cli("listen", str(MODEL), "--input", str(path), "--json")
    assert result.returncode == 0, result.stderr
    detections = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(d["label"], d["time"]) for d in detections] == [("yes", 1.98)]  # stamped at the end of the input
    assert "listened 2.0s: 1 detections (yes)" in result.stderr


def test_a_word_just_before_ctrl_c_is_detected(recognizer, clips):
    """Ctrl-C (a real SIGINT) while the listener waits for audio, or while it is scoring: it ends
    cleanly, with every chunk it was given scored and the word said just before it reported."""
    from speechrnn.microphone import detector_for, run_listener
    from speechrnn.streaming import StreamConfig

    audio = word_at_the_end(clips)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as when run from a terminal
    try:
        for when in ("waiting", "scoring"):
            detector = detector_for(recognizer, StreamConfig())
            score, ended = detector.score_fn, []

            def interrupting_score(window, score=score, ended=ended, when=when):
                if when == "scoring" and ended and len(ended) == 1:
                    ended.append("sent")
                    os.kill(os.getpid(), signal.SIGINT)  # held until this chunk is done
                return score(window)

            detector.score_fn = interrupting_score

            def microphone(ended=ended, when=when):
                for start in range(0, len(audio) - 8000, 800):  # 50 ms chunks, then the last 0.5 s at once
                    yield audio[start : min(start + 800, len(audio) - 8000)]
                ended.append("last")
                yield audio[len(audio) - 8000 :]
                if when == "waiting":
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)  # no more audio comes; Ctrl-C must end the wait
                pytest.fail(f"SIGINT ({when}) did not stop the listener")

            found = []
            stats = run_listener(detector, microphone(), found.append)
            assert [(d.label, round(d.time, 3)) for d in found] == [("yes", 1.98)], when
            assert stats.seconds == pytest.approx(len(audio) / 16000), when  # no chunk cut short
            if when == "scoring":
                assert ended == ["last", "sent"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_listen_refuses_out_of_range_audio_and_names_a_bad_file_once(files):
    loud = run_cli("listen", str(MODEL), "--input", str(files["loud"]))
    assert loud.returncode == 1
    assert loud.stderr.splitlines()[0] == (f"error: {files['loud']}: samples reach 407, far outside [-1, 1] "
                                          "(integer sample values stored as float?); scale the audio to [-1, 1]")
    assert "Warning" not in loud.stderr and "overflow" not in loud.stderr and loud.stdout == ""
    text = subprocess.run([sys.executable, "-c", CLI, "listen", str(MODEL), "--input", str(files["latin1_text"])],
                          capture_output=True, timeout=600)
    assert text.returncode == 1
    assert text.stderr == b"error: " + bytes(files["latin1_text"]) + b": cannot decode audio (Format not recognised)\n"
