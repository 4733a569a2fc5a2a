"""StreamingDetector's logic with scripted posteriors.

The detector's contract with the model is a score function: the last second of MFCC frames
[1, frames, coefficients] in, class probabilities [1, labels] out. Here that function returns
prepared probability vectors, one per call (per hop), so every rule is tested at known times:
smoothing, threshold, refractory period, the never-reported classes, the stream clock, chunk-size
independence and the incremental features.

Timeline (1 s window of 10 ms frames, a 100 ms hop set by TIMELINE): the first call comes once 1 s of
audio is in, and call k at stream time 1.0 + 0.1 k s.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.dataset import SILENCE, UNKNOWN
from data_prep.features import FeatureConfig, mfcc
from speechrnn.streaming import Detection, StreamConfig, StreamingDetector

LABELS = [SILENCE, UNKNOWN, "yes", "no", "up", "down"]
FEATURES = FeatureConfig()
SR = FEATURES.sample_rate
HOP = 1600  # samples per 100 ms hop
TIMELINE = {"hop_ms": 100.0, "smoothing_ms": 300.0, "threshold": 0.7}  # what these tests are written for


def probs(**scores: float) -> np.ndarray:
    """A probability vector: the given labels' scores, the rest on _silence_."""
    p = np.zeros(len(LABELS))
    for label, value in scores.items():
        p[LABELS.index({"silence": SILENCE, "unknown": UNKNOWN}.get(label, label))] = value
    p[0] += 1.0 - p.sum()
    return p


class ScriptedScores:
    """The score function, scripted: call k returns script[k] (silence where there is none).
    Keeps every window it is given."""

    def __init__(self, script: dict[int, np.ndarray] | None = None):
        self.script = script or {}
        self.windows: list[np.ndarray] = []
        self.clock = None  # optional: called at every call, its values kept in .times
        self.times: list[float] = []

    def __call__(self, window: np.ndarray) -> np.ndarray:
        assert window.shape == (1, *FEATURES.shape) and window.dtype == np.float32
        self.windows.append(window[0].copy())
        if self.clock is not None:
            self.times.append(self.clock())
        return self.script.get(len(self.windows) - 1, probs())[None]


def during(hops: range, p: np.ndarray) -> dict[int, np.ndarray]:
    return dict.fromkeys(hops, p)


def hop_time(k: int) -> float:
    return round(1.0 + 0.1 * k, 6)


def audio_for(hops: int, seed: int = 0) -> np.ndarray:
    """Quiet noise just long enough for ``hops`` calls of the score function."""
    return np.random.default_rng(seed).normal(0, 0.01, SR + HOP * (hops - 1)).astype(np.float32)


def detect(script: dict[int, np.ndarray], hops: int, **config) -> tuple[list[Detection], ScriptedScores]:
    scores = ScriptedScores(script)
    detector = StreamingDetector(scores, LABELS, FEATURES, StreamConfig(**{**TIMELINE, **config}))
    found = detector.push(audio_for(hops))
    assert len(scores.windows) == hops == detector.hops_scored
    assert found == detector.detections
    return found, scores


def summary(found: list[Detection]) -> list[tuple[float, str]]:
    return [(round(d.time, 6), d.label) for d in found]


# -- smoothing and threshold ----------------------------------------------------------------------

def test_a_one_hop_spike_is_smoothed_away_a_sustained_score_is_reported():
    spike = {10: probs(yes=1.0)}
    assert detect(spike, 20, smoothing_ms=300)[0] == []  # averaged over 3 hops: 1/3 < 0.7
    assert summary(detect(spike, 20, smoothing_ms=0)[0]) == [(hop_time(10), "yes")]  # unsmoothed it would count

    sustained = during(range(10, 14), probs(yes=0.9))
    found, _ = detect(sustained, 20, smoothing_ms=300)
    # Reported once the 3-hop average reaches 0.7: only at the third hop (0.3, 0.6, 0.9).
    assert summary(found) == [(hop_time(12), "yes")]
    assert found[0].score == pytest.approx(0.9)


def test_smoothing_averages_the_last_hops():
    # 0.6, 0.9, 0.9 -> 0.8 >= 0.7, reported at the third hop with the average as its score.
    script = {5: probs(no=0.6), 6: probs(no=0.9), 7: probs(no=0.9)}
    found, _ = detect(script, 12, smoothing_ms=300)
    assert summary(found) == [(hop_time(7), "no")]
    assert found[0].score == pytest.approx(0.8)
    # Over 5 hops the same never reaches the threshold (max 2.4 / 5).
    assert detect(script, 12, smoothing_ms=500)[0] == []


def test_threshold():
    below = during(range(5, 10), probs(yes=0.65))
    above = during(range(5, 10), probs(yes=0.75))
    assert detect(below, 15)[0] == []
    assert summary(detect(above, 15)[0]) == [(hop_time(7), "yes")]
    assert detect(above, 15, threshold=0.8)[0] == []
    assert summary(detect(below, 15, threshold=0.6)[0]) == [(hop_time(7), "yes")]


def test_a_command_can_have_its_own_threshold():
    up = during(range(5, 10), probs(up=0.8))
    assert summary(detect(up, 15)[0]) == [(hop_time(7), "up")]
    assert detect(up, 15, label_thresholds={"up": 0.85})[0] == []  # "up" now needs more
    yes = during(range(5, 10), probs(yes=0.8))
    assert summary(detect(yes, 15, label_thresholds={"up": 0.85})[0]) == [(hop_time(7), "yes")]  # others do not
    # Lower than the overall one works too: 0.2, 0.4, 0.6 over three hops reaches 0.5 at the third.
    assert summary(detect(during(range(5, 10), probs(down=0.6)), 15, label_thresholds={"down": 0.5})[0]) == [
        (hop_time(7), "down")]
    # A command under its own threshold does not hide one above its: up 0.8 (needs 0.9), no 0.72 (needs 0.7).
    both = during(range(5, 10), probs(up=0.8, no=0.2))
    both.update(during(range(7, 10), probs(up=0.78, no=0.72)))
    found, _ = detect(both, 15, smoothing_ms=0, label_thresholds={"up": 0.9})
    assert summary(found) == [(hop_time(7), "no")]


def test_thresholds_for_labels_the_model_does_not_report_are_refused():
    for bad in ({"sideways": 0.8}, {SILENCE: 0.5}, {UNKNOWN: 0.5}):
        with pytest.raises(ValueError, match="not a command this model reports"):
            StreamingDetector(ScriptedScores(), LABELS, FEATURES, StreamConfig(label_thresholds=bad))
    with pytest.raises(ValueError, match=r"up threshold must be in \(0, 1\]"):
        StreamConfig(label_thresholds={"up": 1.5})


def test_the_best_command_wins():
    found, _ = detect(during(range(5, 9), probs(yes=0.1, up=0.85)), 12)
    assert summary(found) == [(hop_time(7), "up")]


# -- refractory period ----------------------------------------------------------------------------

def test_a_command_held_for_two_seconds_is_reported_once():
    held = during(range(5, 25), probs(yes=0.95))  # 20 hops = 2 s above the threshold
    found, _ = detect(held, 35, refractory_ms=1000)
    assert summary(found) == [(hop_time(7), "yes")], (
        "a command held longer than the refractory period must not be reported again while it lasts")


def test_two_commands_one_and_a_half_seconds_apart_are_both_reported():
    script = {**during(range(5, 8), probs(yes=0.95)), **during(range(20, 23), probs(no=0.95))}
    found, _ = detect(script, 30, refractory_ms=1000)
    assert summary(found) == [(hop_time(7), "yes"), (hop_time(22), "no")]
    assert found[1].time - found[0].time == pytest.approx(1.5)


def test_the_same_command_said_again_after_a_pause_is_reported_again():
    script = {**during(range(5, 8), probs(yes=0.95)), **during(range(20, 23), probs(yes=0.95))}
    found, _ = detect(script, 30, refractory_ms=1000)
    assert summary(found) == [(hop_time(7), "yes"), (hop_time(22), "yes")]


def test_a_command_within_the_refractory_period_is_suppressed():
    script = {**during(range(5, 8), probs(yes=0.95)), **during(range(10, 14), probs(no=0.95))}
    found, _ = detect(script, 25, refractory_ms=1000)
    assert summary(found) == [(hop_time(7), "yes")]  # "no" reached 0.7 at hop 12: 0.5 s later
    found, _ = detect(script, 25, refractory_ms=400)
    assert summary(found) == [(hop_time(7), "yes"), (hop_time(12), "no")]


# -- what is never reported -----------------------------------------------------------------------

@pytest.mark.parametrize("label", [SILENCE, UNKNOWN])
def test_silence_and_unknown_are_never_reported(label):
    script = during(range(0, 30), probs(**{label.strip("_"): 1.0}))
    assert detect(script, 30, smoothing_ms=0, threshold=0.5)[0] == []


def test_a_command_under_a_confident_unknown_is_not_reported():
    assert detect(during(range(0, 20), probs(unknown=0.75, yes=0.25)), 20, threshold=0.5)[0] == []


# -- the stream clock -----------------------------------------------------------------------------

def test_detection_time_is_stream_time():
    """A detection is stamped with the stream time of the hop that made it: the end of the
    newest frame in the window scored, in seconds of audio since the stream began."""
    scores = ScriptedScores(during(range(13, 16), probs(down=0.99)))
    detector = StreamingDetector(scores, LABELS, FEATURES, StreamConfig(**TIMELINE))
    scores.clock = lambda: detector.stream_time
    audio = audio_for(30)
    assert detector.push(audio[: SR - 1]) == [] and scores.windows == []  # not a whole second yet
    seen = []
    for start in range(SR - 1, len(audio), 800):  # 50 ms chunks, as from the microphone
        seen += [(detection, detector.samples_seen) for detection in detector.push(audio[start : start + 800])]
    assert scores.times == pytest.approx([hop_time(k) for k in range(30)])
    assert len(seen) == 1
    detection, samples = seen[0]
    assert detection.time == pytest.approx(scores.times[15]) == pytest.approx(2.5)
    # Reported by the push that completed that hop: its audio reaches at most one chunk further.
    assert 0 <= samples / SR - detection.time < 800 / SR
    assert detection.to_json() == {"time": 2.5, "label": "down", "score": 0.99}
    assert detector.stream_time == pytest.approx(((len(audio) - 480) // 160 * 160 + 480) / SR)


# -- chunk sizes and features ---------------------------------------------------------------------

def speechlike(seconds: float, seed: int = 1) -> np.ndarray:
    """Noise with bursts of tone, so that frames differ and misplaced frames would show."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    envelope = (np.sin(2 * np.pi * 0.7 * t) > 0.3).astype(np.float32)
    tone = np.sin(2 * np.pi * (300 + 200 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return (0.3 * envelope * tone + rng.normal(0, 0.02, n)).astype(np.float32)


def run_in_chunks(audio: np.ndarray, chunk: int, script: dict[int, np.ndarray]):
    scores = ScriptedScores(script)
    detector = StreamingDetector(scores, LABELS, FEATURES, StreamConfig(**TIMELINE))
    found = []
    for start in range(0, len(audio), chunk):
        found += detector.push(audio[start : start + chunk])
    return found, np.stack(scores.windows), detector


def test_chunk_size_does_not_matter():
    audio = speechlike(3.37)  # not a whole number of hops or chunks
    script = {**during(range(3, 6), probs(yes=0.9)), **during(range(16, 20), probs(no=0.8))}
    runs = {chunk: run_in_chunks(audio, chunk, script) for chunk in (1, 160, 1000, 7777, len(audio))}
    reference_found, reference_windows, _ = runs[len(audio)]
    assert summary(reference_found) == [(hop_time(5), "yes"), (hop_time(18), "no")]
    assert len(reference_windows) == 24  # calls at 1.0, 1.1, ... 3.3 s
    for chunk, (found, windows, detector) in runs.items():
        assert found == reference_found, chunk
        assert windows.shape == reference_windows.shape, chunk
        # The same frames in the same places; only float32 rounding of batched FFT/matrix
        # products may differ (~1e-5 on values of tens of dB).
        np.testing.assert_allclose(windows, reference_windows, rtol=1e-5, atol=1e-3, err_msg=f"chunk {chunk}")
        assert detector.samples_seen == len(audio)


def test_each_window_is_the_mfcc_of_the_last_second():
    """Features kept across hops (only new frames computed) equal a full recomputation of the
    last second at every hop."""
    audio = speechlike(2.53, seed=2)
    _, windows, _ = run_in_chunks(audio, 800, {})
    assert len(windows) == 16
    for k, window in enumerate(windows):
        end = int(round(hop_time(k) * SR))  # the newest frame ends exactly here
        expected = mfcc(audio[end - SR : end], FEATURES)
        assert expected.shape == window.shape
        np.testing.assert_allclose(window, expected, rtol=1e-5, atol=1e-3, err_msg=f"hop {k}")


# -- the end of the input -------------------------------------------------------------------------

def test_finish_scores_the_end_of_the_input():
    """A command whose smoothed score would reach the threshold one hop after the input ends: push()
    alone misses it; finish() scores on as if quiet followed and reports it, stamped at the end of
    the input, without counting the quiet as input."""
    script = during(range(10, 14), probs(yes=0.9))  # calls 10, 11 in the input; 12, 13 after its end
    audio = audio_for(12)  # 2.1 s: calls 0-11
    scores = ScriptedScores(script)
    detector = StreamingDetector(scores, LABELS, FEATURES, StreamConfig(**TIMELINE))
    assert detector.push(audio) == []  # 0.0, 0.9, 0.9 averaged: 0.6 < 0.7
    found = detector.finish()
    assert summary(found) == [(2.1, "yes")] and found[0].score == pytest.approx(0.9)
    assert detector.detections == found and detector.samples_seen == len(audio)
    # The quiet goes on until only the last hop of the input is left in the window (9 more calls).
    assert len(scores.windows) == 12 + 9
    assert detector.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        detector.push(audio[:800])
    # A stream shorter than the window is scored too (it never was before).
    short = StreamingDetector(ScriptedScores({0: probs(no=0.95)}), LABELS, FEATURES, StreamConfig(**TIMELINE))
    assert short.push(audio[:8000]) == []
    assert summary(short.finish()) == [(0.5, "no")]
