"""`speechrnn listen` for real: a trained model, real validation-split recordings (speakers the
model never trained on), the real CLI in subprocesses, and, for the microphone, real PortAudio
capturing in real time from a virtual microphone (a private PulseAudio null sink, see
tests/virtual_mic.py) while the words are played into it.

The listeners run on the model's LiteRT interpreter (no TensorFlow), as `listen` does by default;
each still costs some CPU to start, so the module starts them early and concurrently and collects
them in the tests (see "runs started early" below).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from virtual_mic import running_virtual_mic

from conftest import run_cli
from data_prep.audio import fix_length, load_audio, write_wav
from data_prep.dataset import BACKGROUND_DIR, SpeechCommands
from speechrnn.streaming import StreamConfig

SR = 16000
# Distinct commands, in the order they are played; the ones a keyword spotter gets right most often.
WORDS = ("left", "yes", "stop", "down", "right")
CANDIDATES_PER_WORD = 6
# A microphone delivers a clip at any offset from the 200 ms scoring hops; calibration tries these.
ALIGNMENTS = (0.0, 0.05, 0.10, 0.15)
# A chosen clip is detected on its own, at every alignment, even with this threshold: its
# smoothed score peaks well above the default threshold that the tests then use. (The score a detection
# reports is the first one to reach the threshold, not the peak, so it cannot tell the margin.)
CALIBRATION_THRESHOLD = 0.85
# ... and no other command comes near: with this threshold and no refractory period, nothing but
# its own word is reported around it (the tail of "stop" can sound like "up").
RIVAL_THRESHOLD = 0.45
LEAD_IN, GAP, TAIL = 1.0, 1.5, 1.5  # seconds of (low noise) before, between and after the words
NOISE_RMS = 0.003  # about -50 dBFS of pink noise (its validation part) under everything
STARTUP_TIMEOUT = 180.0  # TensorFlow import + XLA compile, on a machine that is busy training
BACKGROUND_NICE = 5
READY_MARK = "listening on"  # logged with -v once the input stream has started
CLI = "from speechrnn.cli import main; main()"


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The model named by SPEECHRNN_TEST_MODEL, else the shipped model's weights with LiteRT models
    (conftest.litert_model): the listeners run on the LiteRT interpreter, as `listen` does by default."""
    named = os.environ.get("SPEECHRNN_TEST_MODEL")
    if named:
        if not (Path(named) / "assets" / "speechrnn.json").exists():
            pytest.fail(f"SPEECHRNN_TEST_MODEL={named!r} is not an exported model folder", pytrace=False)
        return Path(named)
    return request.getfixturevalue("litert_model")


@pytest.fixture(scope="session")
def virtual_mic():
    """A private PulseAudio server for the session; its PULSE_* variables are set in os.environ
    meanwhile, so every subprocess (PortAudio's ALSA `pulse`/`default` devices) hears it. Two
    sinks: `vmic` (the default input) and `vmic2` (for a client started with its source_env)."""
    with running_virtual_mic(sinks=("vmic", "vmic2"), export_env=True) as mic:
        yield mic


def child_setup(background: bool) -> None:
    """In the listener's process before it starts: Ctrl-C (SIGINT) back to its default. A shell
    that starts a job in the background without job control (`cmd &` in a script) ignores SIGINT
    for it, and Python then never raises KeyboardInterrupt, so the Ctrl-C test would wait forever
    when the test run itself was started that way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if background:
        os.nice(BACKGROUND_NICE)


class CliRun:
    """One `speechrnn` command in a subprocess, started now and collected later; its output goes
    to files, so nothing blocks on a full pipe while it runs for a long time."""

    def __init__(self, folder: Path, name: str, *args: str, env: dict[str, str] | None = None,
                 background: bool = False):
        """``background``: a lower CPU priority, for runs whose result is not waited for soon."""
        self.name = name
        self.args = args
        self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env={**os.environ, **(env or {})},
                                         preexec_fn=lambda: child_setup(background))
        self.started = time.monotonic()
        self.duration: float | None = None  # its --duration, where it has one

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def describe(self) -> str:
        return (f"`speechrnn {' '.join(self.args)}` (exit {self.proc.poll()})\n--- stdout ---\n"
                f"{self.stdout[-2000:]}\n--- stderr ---\n{self.stderr[-3000:]}")

    def wait_for_stderr(self, text: str, timeout: float = STARTUP_TIMEOUT) -> float:
        """Block until stderr shows ``text``; the time it was seen."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} ended before printing {text!r}: {self.describe()}", pytrace=False)
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.name} did not print {text!r} within {timeout:.0f} s: {self.describe()}",
                            pytrace=False)
            time.sleep(0.05)
        return time.monotonic()

    def finish(self, timeout: float = STARTUP_TIMEOUT) -> CliRun:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not end within {timeout:.0f} s: {self.describe()}", pytrace=False)
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def detections(self) -> list[dict]:
        """The JSON lines of `listen --json` (every stdout line must be one)."""
        found = []
        for line in self.stdout.splitlines():
            item = json.loads(line)
            assert set(item) == {"time", "label", "score"}, line
            found.append(item)
        return found


def labels(detections: list[dict]) -> list[str]:
    return [d["label"] for d in detections]


def listen_args(model_dir: Path, *more: str) -> list[str]:
    return ["-v", "listen", str(model_dir), "--json", *more]


# -- the played audio -------------------------------------------------------------------------------

@dataclass
class Placement:
    word: str
    path: Path
    start: float  # seconds into the wav
    end: float
    delay: float = 0.0  # detection time - start, as measured when the clip was chosen


@dataclass
class Sequence:
    wav: Path
    placements: list[Placement]
    seconds: float

    @property
    def words(self) -> list[str]:
        return [p.word for p in self.placements]

    def expected_times(self) -> np.ndarray:
        return np.array([p.start + p.delay for p in self.placements])


def background(shared_data: Path, seconds: float) -> np.ndarray:
    """Quiet pink noise from the validation part (80-90 %) of the dataset's noise recording."""
    noise = load_audio(shared_data / BACKGROUND_DIR / "pink_noise.flac", SR)
    noise = noise[int(0.8 * len(noise)) : int(0.9 * len(noise))]
    noise = np.resize(noise, int(round(seconds * SR)))
    return (noise * (NOISE_RMS / float(np.sqrt(np.mean(noise**2))))).astype(np.float32)


def compose(shared_data: Path, path: Path, items: list[tuple[str, Path, float]]) -> Sequence:
    """A wav with each clip (padded to 1 s) at LEAD_IN + i*(1 s + GAP) + its extra shift."""
    clips = [fix_length(load_audio(clip, SR), SR) for _, clip, _ in items]
    slot = 1.0 + GAP
    seconds = LEAD_IN + len(items) * slot - GAP + TAIL
    audio = background(shared_data, seconds)
    placements = []
    for i, ((word, clip_path, shift), clip) in enumerate(zip(items, clips, strict=True)):
        start = LEAD_IN + i * slot + shift
        at = int(round(start * SR))
        audio[at : at + len(clip)] += clip
        placements.append(Placement(word, clip_path, at / SR, (at + len(clip)) / SR))
    write_wav(path, audio)
    return Sequence(path, placements, len(audio) / SR)


def match(placements: list[Placement], detections: list[dict]) -> list[list[dict]]:
    """The detections made while each clip played or within 1 s after its end."""
    return [[d for d in detections if p.start < d["time"] <= p.end + 1.0] for p in placements]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("listen")


@dataclass
class Calibration:
    candidates: dict[str, list[Path]]
    trial: Sequence
    sure: CliRun  # at CALIBRATION_THRESHOLD
    rivals: CliRun  # at RIVAL_THRESHOLD, no refractory period


@pytest.fixture(scope="module")
def calibration(model_dir, shared_data, workdir) -> Calibration:
    """Start choosing the clips: the first validation-split clips of each word, each at every
    hop alignment in quiet noise, through `listen --input` (the code path under test), once with
    a threshold above the default and once with a low one and no refractory period."""
    dataset = SpeechCommands.open(shared_data)
    candidates = {w: [c.path for c in dataset.clips if c.word == w and c.split == "validation"][:CANDIDATES_PER_WORD]
                  for w in WORDS}
    items = [(w, path, shift) for w in WORDS for path in candidates[w] for shift in ALIGNMENTS]
    trial = compose(shared_data, workdir / "candidates.wav", items)
    common = ("listen", str(model_dir), "--input", str(trial.wav), "--json")
    sure = CliRun(workdir, "calibrate", *common, "--threshold", str(CALIBRATION_THRESHOLD))
    rivals = CliRun(workdir, "calibrate-rivals", *common, "--threshold", str(RIVAL_THRESHOLD), "--refractory-ms", "0")
    yield Calibration(candidates, trial, sure, rivals)
    sure.kill()
    rivals.kill()


@pytest.fixture(scope="module")
def sequence(calibration, model_dir, shared_data, workdir) -> Sequence:
    """The words to play: for each of WORDS, the clip detected most surely on its own (the right
    word once at every alignment even at CALIBRATION_THRESHOLD, and no other command near it even
    at RIVAL_THRESHOLD), laid out one word every 2.5 s."""
    trial = calibration.trial
    found = {}
    for run in (calibration.sure, calibration.rivals):
        run.finish()
        assert run.returncode == 0, run.describe()
        found[run.name] = match(trial.placements, run.detections())
    chosen = []
    for word in WORDS:
        best = None
        for path in calibration.candidates[word]:
            at = [i for i, p in enumerate(trial.placements) if p.path == path]
            sure = [found["calibrate"][i] for i in at]
            rivals = [found["calibrate-rivals"][i] for i in at]
            if (all(len(h) == 1 and h[0]["label"] == word for h in sure)
                    and all(d["label"] == word for h in rivals for d in h)):
                score = min(h[0]["score"] for h in sure)
                delay = statistics.mean(h[0]["time"] - trial.placements[i].start for i, h in zip(at, sure, strict=True))
                if best is None or score > best[0]:
                    best = (score, path, delay)
        if best is None:
            pytest.fail(f"none of the first {CANDIDATES_PER_WORD} validation clips of {word!r} is detected on "
                        f"its own at threshold {CALIBRATION_THRESHOLD} without a rival at {RIVAL_THRESHOLD}: "
                        f"is {model_dir} a trained 12-class model?\n{calibration.sure.stdout}\n"
                        f"{calibration.rivals.stdout}", pytrace=False)
        chosen.append(best)
    played = compose(shared_data, workdir / "words.wav", [(w, c[1], 0.0) for w, c in zip(WORDS, chosen, strict=True)])
    for placement, (_, _, delay) in zip(played.placements, chosen, strict=True):
        placement.delay = delay
    return played


# -- runs started early and collected by their tests ------------------------------------------------
# Each listener spends seconds of CPU importing TensorFlow and compiling; they are started so that
# this overlaps with waiting: the named microphone listener loads while the clips are chosen; the
# timed one, `--input` and the bad device while the named one is played to; the vanishing one
# while the timed one is played to.

@pytest.fixture(scope="module")
def named_listener(virtual_mic, model_dir, workdir) -> CliRun:
    """Listens on `--device PULS` (a part of the ALSA `pulse` device's name) to sink vmic2; it runs
    until it gets SIGINT, so it may start listening long before the words are played."""
    run = CliRun(workdir, "mic-named", *listen_args(model_dir, "--device", "PULS"),
                 env=virtual_mic.source_env("vmic2"))
    yield run
    run.kill()


@pytest.fixture(scope="module")
def timed_listener(sequence, virtual_mic, model_dir, workdir) -> CliRun:
    """Listens on the default input (sink vmic) for --duration: the played file's length + 2 s,
    counted from when it starts listening, which is when the file starts being played."""
    run = CliRun(workdir, "mic-default", *listen_args(model_dir, "--duration", f"{sequence.seconds + 2.0:g}"))
    run.duration = sequence.seconds + 2.0
    yield run
    run.kill()


@pytest.fixture(scope="module")
def input_run(sequence, model_dir, workdir) -> CliRun:
    """`listen --input words.wav` (no microphone)."""
    run = CliRun(workdir, "input", *listen_args(model_dir, "--input", str(sequence.wav)), background=True)
    yield run
    run.kill()


@pytest.fixture(scope="module")
def bad_device_run(model_dir, workdir) -> CliRun:
    """`listen --device 999` (no such device); it loads the model before it finds out."""
    run = CliRun(workdir, "bad-device", "listen", str(model_dir), "--device", "999", "--json", background=True)
    yield run
    run.kill()


@pytest.fixture(scope="module")
def vanishing_mic(model_dir, workdir):
    """A listener on a virtual microphone of its own (not the session's), for killing its server."""
    with running_virtual_mic() as mic:
        run = CliRun(workdir, "mic-vanishing", *listen_args(model_dir), env=mic.env, background=True)
        try:
            yield mic, run
        finally:
            run.kill()


@dataclass
class MicSession:
    timed: CliRun
    named: CliRun
    sequence: Sequence
    ready: dict[str, float]  # when each listener was seen listening (test's clock)
    played: dict[str, float]  # when playback into its sink began (test's clock)


def play_when_listening(virtual_mic, sequence: Sequence, runs: dict[str, tuple[CliRun, str]]):
    """Start playing the words into each listener's sink as soon as that listener listens."""
    ready, played, players = {}, {}, {}
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while len(players) < len(runs):
        for name, (run, sink) in runs.items():
            if name not in players and READY_MARK in run.stderr:
                ready[name] = time.monotonic()
                players[name] = virtual_mic.play(sequence.wav, sink=sink, wait=False)
                played[name] = time.monotonic()
            elif name not in players and (run.proc.poll() is not None or time.monotonic() > deadline):
                pytest.fail(f"{name} listener never started listening: {run.describe()}", pytrace=False)
        time.sleep(0.05)
    return ready, played, players


def wait_played(player, sequence: Sequence) -> None:
    try:
        _, err = player.communicate(timeout=sequence.seconds + 60)
    except subprocess.TimeoutExpired:
        player.kill()
        pytest.fail("paplay did not finish", pytrace=False)
    assert player.returncode == 0, f"paplay failed: {err}"


@pytest.fixture(scope="module")
def mic_session(calibration, virtual_mic, named_listener, sequence, timed_listener, input_run, bad_device_run,
                request) -> MicSession:
    """Play the words into each listener's sink once it listens; SIGINT the named one after its
    playback, once its last word has had time to be detected. (The argument order starts the
    subprocesses in the order described above; input_run and bad_device_run are requested only so
    that they start before this real-time part.)"""
    ready, played, players = play_when_listening(
        virtual_mic, sequence, {"named": (named_listener, "vmic2"), "timed": (timed_listener, "vmic")})
    try:
        request.getfixturevalue("vanishing_mic")  # loads while the words are being played
    except (Exception, pytest.fail.Exception):
        pass  # not this session's business: its own test reports it
    wait_played(players["named"], sequence)
    # No wait for the last word to be scored: at Ctrl-C the listener scores what it has captured
    # (its last word ended TAIL seconds before the file did).
    named_listener.proc.send_signal(signal.SIGINT)
    named_listener.finish()
    wait_played(players["timed"], sequence)
    timed_listener.finish(timeout=timed_listener.duration + STARTUP_TIMEOUT)
    return MicSession(timed_listener, named_listener, sequence, ready, played)


# -- the microphone ---------------------------------------------------------------------------------

def check_backend(run: CliRun) -> None:
    """A model with LiteRT models is listened with on the LiteRT interpreter (logged with -v)."""
    model = Path(run.args[run.args.index("listen") + 1])
    if "litert" in json.loads((model / "assets" / "speechrnn.json").read_text()):
        assert "(backend litert, no TensorFlow)" in run.stderr, run.describe()


def check_heard(run: CliRun, session: MicSession) -> None:
    """The played words, in order, nothing else, at times spaced like the words in the file."""
    detections = run.detections()
    assert labels(detections) == session.sequence.words, run.describe()
    times = np.array([d["time"] for d in detections])
    assert np.all(np.diff(times) > 0), times
    # Stream time = expected time in the file + when playback began in the stream (+ capture lag).
    offsets = times - session.sequence.expected_times()
    assert offsets.max() - offsets.min() < 0.5, f"not spaced like the clips: {times} vs {session.sequence.expected_times()}"
    assert all(StreamConfig().threshold <= d["score"] <= 1.0 for d in detections), detections
    assert "Traceback" not in run.stderr, run.describe()
    check_backend(run)


def test_microphone_hears_the_played_words_and_stops_after_duration(mic_session):
    run = mic_session.timed
    assert run.returncode == 0, run.describe()
    check_heard(run, mic_session)
    # Times count from when the stream began (check_heard holds their spacing to the file's): the
    # file was played into the sink after the listener was seen listening, so no word is stamped
    # before its time in the file; and the stream began after the process started, so none later
    # than that much (plus ~0.3 s of capture lag). Neither bound depends on how busy the machine is.
    offsets = np.array([d["time"] for d in run.detections()]) - mic_session.sequence.expected_times()
    latest = mic_session.played["timed"] - run.started
    assert -0.5 < float(np.median(offsets)) < latest + 1.5, (offsets, latest)
    summary = [line for line in run.stderr.splitlines() if line.startswith("listened ")]
    expected = (f"listened {run.duration:.1f}s: {len(WORDS)} detections "
                f"({', '.join(mic_session.sequence.words)})")
    assert len(summary) == 1 and summary[0].startswith(expected), run.describe()
    assert "listening on 'default' at 16000 Hz" in run.stderr


def test_microphone_by_part_of_its_name_and_ctrl_c(mic_session):
    """`--device PULS` picks the ALSA `pulse` device; SIGINT ends the listener cleanly (exit 0)
    with its summary, after it has heard every word."""
    run = mic_session.named
    assert run.returncode == 0, run.describe()
    check_heard(run, mic_session)
    assert "listening on 'pulse'" in run.stderr, run.describe()
    summary = [line for line in run.stderr.splitlines() if line.startswith("listened ")]
    assert len(summary) == 1 and f"{len(WORDS)} detections" in summary[0], run.describe()
    assert "KeyboardInterrupt" not in run.stderr


# -- a file through the same code path --------------------------------------------------------------

def test_input_file_gives_the_words_at_their_positions(input_run, sequence):
    run = input_run.finish()
    assert run.returncode == 0, run.describe()
    detections = run.detections()
    assert labels(detections) == sequence.words, run.describe()
    for placement, detection in zip(sequence.placements, detections, strict=True):
        # Reported at the end of the word: after the clip began, at most 1 s after the clip ended.
        assert placement.start < detection["time"] <= placement.end + 1.0, (placement, detection)
        # ... and about where the same clip was detected on its own when it was chosen (there with
        # a higher threshold, so up to a few hops later, and at other hop alignments).
        assert abs(detection["time"] - (placement.start + placement.delay)) <= 0.45, (placement, detection)
    assert f"listened {sequence.seconds:.1f}s: {len(WORDS)} detections" in run.stderr, run.describe()
    check_backend(run)


# -- devices and faults ----------------------------------------------------------------------------

def test_devices_lists_the_virtual_microphone(virtual_mic):
    listed = run_cli("devices", timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows and any("pulse" in row for row in rows), listed.stdout
    assert sum(row.startswith("*") for row in rows) == 1, listed.stdout  # one default input
    as_json = run_cli("devices", "--json", timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)
    assert found and all(d["inputs"] >= 1 for d in found)
    assert any(d["name"] == "pulse" for d in found), found


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_bad_device_index_is_a_one_line_error(bad_device_run):
    run = bad_device_run.finish()
    assert run.returncode == 1, run.describe()
    line = one_error_line(run.stderr)
    assert "device" in line and "speechrnn devices" in line, line
    assert run.stdout == ""


def test_missing_or_wrong_model_is_a_clear_error(tmp_path, shared_data):
    clip = min((shared_data / "yes").iterdir())
    missing = run_cli("listen", str(tmp_path / "not-a-model"), "--input", str(clip), timeout=120)
    assert missing.returncode == 1, missing.stderr
    assert "not-a-model: no such model folder" in one_error_line(missing.stderr)
    (tmp_path / "empty").mkdir()
    wrong = run_cli("listen", str(tmp_path / "empty"), "--input", str(clip), timeout=120)
    assert wrong.returncode == 1, wrong.stderr
    assert "not a speechrnn export" in one_error_line(wrong.stderr)


def test_vanishing_microphone_ends_with_an_error(vanishing_mic):
    """The input device's server dies mid-listening: listen must neither hang nor crash with a
    traceback, but stop with `error:` and a non-zero exit. Its own server, not the session's."""
    mic, run = vanishing_mic
    run.wait_for_stderr(READY_MARK)
    time.sleep(0.5)
    assert run.proc.poll() is None, f"it stopped before its device went: {run.describe()}"
    mic.kill_server()
    run.finish()  # a generous limit against a hang only: how soon it notices is the machine's business
    assert run.returncode not in (0, None), run.describe()
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "device" in errors[0], run.describe()
    assert "Traceback" not in run.stderr, run.describe()
