"""Scoring a long recording against a truth list (speechrnn.stream_eval), `speechrnn score-stream`,
and the detector's posterior recording and replay.

The scoring rule is checked on hand-made detections and truths with exact figures. The rest is
real: the shipped model, real validation-split recordings (speakers it never trained on) laid into
a short stream over the dataset's own noise, and the real CLI in subprocesses. The CLI verb must
stream the file exactly as `listen --input` does, so its detections are compared with that
command's, and its figures with score_stream applied to them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_cli
from data_prep.audio import fix_length, load_audio, write_wav
from data_prep.dataset import BACKGROUND_DIR, SpeechCommands
from data_prep.errors import SpeechRNNError
from speechrnn.stream_eval import (
    StreamScore,
    TruthEvent,
    format_score,
    parse_truth,
    read_truth,
    score_stream,
    write_truth,
)
from speechrnn.streaming import Detection, StreamConfig, replay_posteriors

COMMANDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SR = 16000


# -- scoring, by hand ----------------------------------------------------------------------------

def det(time: float, label: str, score: float = 0.9) -> Detection:
    return Detection(time, label, score)


TRUTH = [
    TruthEvent("yes", 1.0, 1.5),
    TruthEvent("no", 4.0, 4.5),
    TruthEvent("up", 8.0, 8.25),
    TruthEvent("bird", 12.0, 12.5),  # another word: not a command
    TruthEvent("_speech_", 20.0, 23.0),  # a sentence
]


def test_every_detection_is_a_hit_or_a_false_alarm_of_one_cause():
    detections = [
        det(1.75, "yes"),  # hit, 250 ms after the word's end
        det(2.0, "yes"),  # the same word again: a repeat
        det(4.25, "down"),  # on "no", the wrong label
        det(5.25, "no"),  # hit, 750 ms after the end (the window runs to end + 1 s)
        det(9.5, "up"),  # 1.25 s after "up" ended: too late, and on no event
        det(12.6, "left"),  # on another word
        det(21.0, "stop"),  # during a sentence
        det(30.0, "go"),  # nothing listed there
    ]
    score = score_stream(detections, TRUTH, duration_s=360.0, commands=COMMANDS)  # 0.1 h
    f = score.to_dict(details=True)
    assert f["counts"] == {"minutes": 6.0, "command_words": 3, "detections": 8, "matched": 2, "missed": 1,
                           "false_alarms": 6}
    assert f["recall"] == round(2 / 3, 4) and f["precision"] == 0.25
    assert f["false_alarms_by_cause"] == {"wrong_label_on_command": 1, "repeat_on_command": 1,
                                          "on_non_command": 2, "outside_events": 2}
    assert f["false_alarms_per_hour"] == 60.0
    assert f["false_alarms_per_hour_on_command"] == 20.0
    assert f["false_alarms_per_hour_no_command"] == 40.0
    assert sorted(h.latency_ms for h in score.hits) == [250.0, 750.0]
    assert f["latency_median_ms"] == 500.0
    assert f["per_label_counts"] == {"no": "1/1", "up": "0/1", "yes": "1/1"}
    assert f["per_label_recall"] == {"no": 1.0, "up": 0.0, "yes": 1.0}
    assert f["false_alarms_by_label"] == {"yes": 1, "down": 1, "up": 1, "left": 1, "stop": 1, "go": 1}
    assert f["misses"] == [{"label": "up", "start": 8.0, "end": 8.25, "detected_as": None}]
    assert f["misses_by_cause"] == {"no_detection": 1}
    events = {fa["time"]: (fa["cause"], fa["event"]) for fa in f["false_alarm_list"]}
    assert events == {2.0: ("repeat_on_command", "yes"), 4.25: ("wrong_label_on_command", "no"),
                      9.5: ("outside_events", None), 12.6: ("on_non_command", "bird"),
                      21.0: ("on_non_command", "_speech_"), 30.0: ("outside_events", None)}


def test_the_match_window_runs_from_the_word_start_to_one_second_after_its_end():
    truth = [TruthEvent("yes", 1.0, 1.5)]
    for time, found in [(0.99, False), (1.0, True), (2.5, True), (2.51, False)]:
        score = score_stream([det(time, "yes")], truth, 60.0, COMMANDS)
        assert (len(score.hits), len(score.false_alarms)) == ((1, 0) if found else (0, 1)), time
    later = score_stream([det(2.0, "yes")], truth, 60.0, COMMANDS, match_after_end_s=0.25)
    assert later.recall == 0.0 and later.false_alarms[0].cause == "outside_events"


def test_a_wrong_label_on_a_word_is_a_miss_by_wrong_label_and_a_false_alarm():
    score = score_stream([det(4.3, "go")], [TruthEvent("no", 4.0, 4.5)], 36.0, COMMANDS)
    f = score.to_dict(details=True)
    assert f["recall"] == 0.0 and f["precision"] == 0.0
    assert f["misses"][0]["detected_as"] == ["go"] and f["misses_by_cause"] == {"wrong_label": 1}
    assert f["false_alarms_per_hour_on_command"] == 100.0 and f["false_alarms_per_hour_no_command"] == 0.0


def test_two_words_of_one_label_close_together_are_each_matched_once():
    truth = [TruthEvent("yes", 1.0, 1.5), TruthEvent("yes", 2.0, 2.5)]
    # 2.2 s fits both windows and goes to the earlier word; 2.6 s then fits only the second.
    score = score_stream([det(2.6, "yes"), det(2.2, "yes")], truth, 60.0, COMMANDS)
    assert [(h.word.start, h.detection.time) for h in score.hits] == [(1.0, 2.2), (2.0, 2.6)]
    assert score.recall == 1.0 and not score.false_alarms


def test_latency_only_where_the_end_of_the_word_is_known():
    truth = [TruthEvent("yes", 1.0, 1.5), TruthEvent("no", 4.0, 5.0, end_known=False)]
    score = score_stream([det(1.625, "yes"), det(4.5, "no")], truth, 60.0, COMMANDS)
    assert score.recall == 1.0
    assert list(score.latencies_ms) == [125.0]  # not -500 ms from the whole-clip "no"


def test_no_commands_spoken_gives_no_recall_and_all_false_alarms_with_no_command():
    truth = [TruthEvent("_speech_", 0.5, 3.5), TruthEvent("_speech_", 4.0, 7.0)]
    score = score_stream([det(2.0, "right"), det(50.0, "no")], truth, 1800.0, COMMANDS)
    f = score.to_dict()
    assert f["recall"] is None and f["precision"] == 0.0 and f["latency_median_ms"] is None
    assert f["false_alarms_per_hour"] == f["false_alarms_per_hour_no_command"] == 4.0
    assert f["false_alarms_by_label"] == {"right": 1, "no": 1}
    assert "no command spoken (4/h)" in format_score(score)


def test_pooled_scores_add_counts_and_hours():
    one = score_stream([det(1.75, "yes"), det(30, "go")], TRUTH, 360.0, COMMANDS)
    two = score_stream([det(4.75, "no")], TRUTH, 720.0, COMMANDS)
    pooled = StreamScore.pooled([one, two]).to_dict()
    assert pooled["counts"]["command_words"] == 6 and pooled["counts"]["matched"] == 2
    assert pooled["counts"]["minutes"] == 18.0 and pooled["false_alarms_per_hour"] == 3.3  # 1 in 0.3 h
    assert pooled["per_label_counts"] == {"no": "1/2", "up": "0/2", "yes": "1/2"}


def test_scoring_refuses_a_stream_without_duration():
    with pytest.raises(ValueError):
        score_stream([], TRUTH, 0.0, COMMANDS)


# -- the truth file -------------------------------------------------------------------------------

def test_truth_file_round_trip_comments_blank_lines_and_any_order(tmp_path):
    path = tmp_path / "truth.csv"
    path.write_text("# a stream\nlabel,start,end\n\nno, 4.0, 4.5\nyes,1,1.5\n# later\n_speech_,20,23\n")
    events = read_truth(path)
    assert events == [TruthEvent("yes", 1.0, 1.5), TruthEvent("no", 4.0, 4.5), TruthEvent("_speech_", 20.0, 23.0)]
    assert [e.line for e in events] == [5, 4, 7]
    write_truth(tmp_path / "again.csv", events)
    assert read_truth(tmp_path / "again.csv") == events
    assert (tmp_path / "again.csv").read_text().splitlines()[:2] == ["label,start,end", "yes,1.000,1.500"]


@pytest.mark.parametrize("text, problem", [
    ("", "empty truth file"),
    ("word,begin,finish\nyes,1,2\n", "line 1: the header must be label,start,end"),
    ("label,start,end\nyes,1,2\nno,3\n", "line 3: expected 3 fields"),
    ("label,start,end\nyes,1,2,3\n", "line 2: expected 3 fields"),
    ("label,start,end\n,1,2\n", "line 2: empty label"),
    ("label,start,end\nyes,1,2\n\nno,three,4\n", "line 4: start and end must be seconds"),
    ("label,start,end\nyes,2,1\n", "line 2: need 0 <= start < end"),
    ("label,start,end\nyes,-1,1\n", "line 2: need 0 <= start < end"),
    ("label,start,end\nyes,nan,1\n", "line 2: need 0 <= start < end"),
])
def test_a_malformed_truth_file_names_the_file_and_line(text, problem):
    with pytest.raises(SpeechRNNError) as err:
        parse_truth(text, "truth.csv")
    assert str(err.value).startswith(f"truth.csv: {problem}"), err.value


# -- a real stream --------------------------------------------------------------------------------

WORDS = ("yes", "left", "stop", "down")  # played, one every 2.5 s
OTHER = "bird"  # a word the model does not report


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = REPO / "models" / "default"
    if not (path / "assets" / "speechrnn.json").exists():
        pytest.fail(f"no shipped model at {path}")
    return path


@pytest.fixture(scope="module")
def stream(shared_data, tmp_path_factory) -> tuple[Path, Path, list[TruthEvent]]:
    """A 15 s wav: quiet pink noise (its validation part) with the first validation clip of each of
    WORDS and of OTHER, and the truth file listing them, plus a "go" that was never spoken."""
    folder = tmp_path_factory.mktemp("stream")
    dataset = SpeechCommands.open(shared_data)
    first = {w: next(c.path for c in dataset.clips if c.word == w and c.split == "validation") for w in (*WORDS, OTHER)}
    noise = load_audio(shared_data / BACKGROUND_DIR / "pink_noise.flac", SR)
    audio = np.resize(noise[int(0.8 * len(noise)) : int(0.9 * len(noise))], 15 * SR).astype(np.float32)
    audio *= 0.003 / float(np.sqrt(np.mean(audio**2)))
    truth = []
    for i, word in enumerate((*WORDS, OTHER)):
        start = 1.0 + 2.5 * i
        clip = fix_length(load_audio(first[word], SR), SR)
        audio[int(start * SR) : int(start * SR) + SR] += clip
        loud = np.flatnonzero(np.abs(clip) > 0.1 * np.abs(clip).max())  # the word within its 1 s clip
        truth.append(TruthEvent(word, round(start + loud[0] / SR, 3), round(start + (loud[-1] + 1) / SR, 3)))
    truth.append(TruthEvent("go", 13.8, 14.2))  # listed, never spoken: a miss
    wav, csv_path = folder / "stream.wav", folder / "truth.csv"
    write_wav(wav, audio)
    write_truth(csv_path, truth)
    return wav, csv_path, truth


@pytest.fixture(scope="module")
def cli_runs(model_dir, stream, tmp_path_factory):
    """`score-stream --json --plot`, `score-stream` (text) and `listen --input --json` on the stream,
    started together (each pays for TensorFlow's import and the XLA compile)."""
    wav, truth, _ = stream
    png = tmp_path_factory.mktemp("plot") / "timeline.png"
    cli = [sys.executable, "-c", "from speechrnn.cli import main; main()"]
    procs = {
        "json": subprocess.Popen([*cli, "score-stream", str(model_dir), str(wav), str(truth), "--json", "--plot", str(png)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "text": subprocess.Popen([*cli, "score-stream", str(model_dir), str(wav), str(truth)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "listen": subprocess.Popen([*cli, "listen", str(model_dir), "--input", str(wav), "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stdout, stderr)
    return out, png


def test_score_stream_runs_the_listen_path_and_scores_it(cli_runs, stream):
    (runs, _), (_, _, truth) = cli_runs, stream
    for name, (code, _, stderr) in runs.items():
        assert code == 0, f"{name}: {stderr}"
        assert "Traceback" not in stderr
    report = json.loads(runs["json"][1])
    listened = [json.loads(line) for line in runs["listen"][1].splitlines()]
    assert report["detections"] == listened  # the same code path, the same detections
    expected = score_stream([Detection(**d) for d in listened], truth, report["seconds"], COMMANDS).to_dict(details=True)
    for key in ("latency_median_ms", "latency_p90_ms"):  # from unrounded detection times in the CLI
        assert (report[key] is None) == (expected[key] is None) and abs((report[key] or 0) - (expected[key] or 0)) <= 1
    assert {k: report[k] for k in expected if not k.startswith("latency")} == {
        k: v for k, v in expected.items() if not k.startswith("latency")}
    assert report["seconds"] == 15.0 and report["counts"]["command_words"] == 5
    assert report["per_label_counts"]["go"] == "0/1"  # listed, never spoken
    assert report["counts"]["matched"] >= 2, report  # a trained model finds clean words over quiet noise
    assert report["config"]["threshold"] == StreamConfig().threshold
    text = runs["text"][1]
    assert text.startswith(f"recall {report['recall']:.3f} ({report['counts']['matched']} of 5 commands found)"), text
    assert f"= {report['false_alarms_per_hour']:g} per hour" in text


def test_score_stream_writes_the_timeline_png(cli_runs, model_dir):
    runs, png = cli_runs
    from PIL import Image

    from speechrnn.timeline import COLOURS, FALSE_ALARM

    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (1600, round(100 * (1.0 + 1.45 * 1)))  # one 30 s row for 15 s of audio
        pixels = np.asarray(image.convert("RGB"), np.int32).reshape(-1, 3)

    def drawn(hex_colour: str) -> int:
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - rgb).sum(1) < 40).sum())

    report = json.loads(runs["json"][1])
    commands = [label for label in (model_dir / "assets" / "labels.txt").read_text().split() if label[0] != "_"]
    for label in {d["label"] for d in report["detections"]}:  # a detected command's posterior curve and marker
        assert drawn(COLOURS[commands.index(label)]) > 50, label
    assert drawn(FALSE_ALARM) > 20  # "go missed", in red


def test_score_stream_usage_and_input_errors(tmp_path, stream):
    wav, truth, _ = stream
    bad = tmp_path / "bad.csv"
    bad.write_text("label,start,end\nyes,1.0,1.5\nno,4.0\n")
    late = tmp_path / "late.csv"
    late.write_text("label,start,end\nyes,1.0,1.5\nno,16.0,16.5\n")
    cases = [
        ((str(wav), str(bad)), 1, f"error: {bad}: line 3: expected 3 fields (label,start,end), got 2: 'no,4.0'"),
        ((str(wav), str(late)), 1, f"error: {late}: line 3: no starts at 16 s, after the end of the audio (15.00 s)"),
        ((str(tmp_path / "missing.wav"), str(truth)), 1, f"error: {tmp_path / 'missing.wav'}: no such file"),
        ((str(wav), str(tmp_path / "none.csv")), 1, f"error: {tmp_path / 'none.csv'}: cannot read the truth file"),
        ((str(wav), str(truth), "--plot", str(tmp_path / "no" / "t.png")), 1, "error: "),
        ((str(wav),), 2, "give [MODEL] AUDIO TRUTH.csv"),
    ]
    for args, code, message in cases:
        result = run_cli("score-stream", *args, timeout=300)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        if code == 1:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- recording and replaying the posteriors -------------------------------------------------------

def test_recording_posteriors_changes_no_detection_and_a_replay_reproduces_them(model_dir, stream):
    from speechrnn.recognizer import Recognizer
    from speechrnn.stream_eval import stream_file

    wav, _, _ = stream
    recognizer = Recognizer(model_dir)
    # A low threshold and no refractory period, so that there are detections to compare.
    config = StreamConfig(threshold=0.3, refractory_ms=0.0)
    plain = stream_file(recognizer, wav, config)
    recorded = stream_file(recognizer, wav, config, record_posteriors=True)
    assert recorded.detections == plain.detections and len(plain.detections) >= 3

    times, raw, smoothed = recorded.trace.arrays()
    assert len(times) == raw.shape[0] == smoothed.shape[0] == recorded.hops_scored
    assert raw.shape[1] == len(recognizer.labels) and np.allclose(raw.sum(1), 1.0, atol=1e-4)
    assert times[0] == pytest.approx(1.0) and np.allclose(np.diff(times), 0.2)  # the first full second, then every hop
    hops = round(config.smoothing_ms / config.hop_ms)
    k = len(times) // 2
    assert np.allclose(smoothed[k], raw[k - hops + 1 : k + 1].mean(0), atol=1e-6)
    for d in recorded.detections:  # a detection's score is the smoothed posterior of its hop
        hop = int(np.argmin(np.abs(times - d.time)))
        assert times[hop] == pytest.approx(d.time) and smoothed[hop, recognizer.labels.index(d.label)] == pytest.approx(d.score)
        assert d.score >= recorded.trace.thresholds[d.label]

    assert recorded.trace.end_time == pytest.approx(sf.info(str(wav)).duration)  # set when the input ended
    assert times[-1] > recorded.trace.end_time  # the last hops score the input followed by quiet
    replayed = replay_posteriors(times, raw, recognizer.labels, recorded.config, end_time=recorded.trace.end_time)
    assert replayed == recorded.detections
    # Other thresholds without scoring the audio again: one command's raised above its best score.
    peaks = {d.label: float(smoothed[:, recognizer.labels.index(d.label)].max()) for d in replayed}
    label = min(peaks, key=peaks.get)
    assert peaks[label] < 0.999
    stricter = replace(recorded.config, label_thresholds={**recorded.config.label_thresholds, label: peaks[label] + 1e-3})
    without = replay_posteriors(times, raw, recognizer.labels, stricter, end_time=recorded.trace.end_time)
    assert label not in [d.label for d in without] and without
    with pytest.raises(ValueError, match="not recorded every"):
        replay_posteriors(times, raw, recognizer.labels, replace(recorded.config, hop_ms=100.0))
