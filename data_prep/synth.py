"""Synthetic keyword clips, written in the Speech Commands layout, from two engines:

- espeak-ng (formant synthesis): 8 English accents x ~98 voice variants, any speed and pitch;
- Kokoro-82M (neural, data_prep.kokoro): random convex blends of 28 English voicepacks.

Real recordings have too few speakers for rare words; synthesis gives hundreds of distinct
"speakers" for free. One voice is one speaker id, so the dataset's own hash rule keeps a voice
out of more than one split, as it does for real people. A model can learn to tell a synthesiser
from a person, so two engines that sound unlike each other serve better than one.

Synthesis writes into a hidden ``.<out>.partial`` folder beside OUT, one clip at a time
(each atomically), and renames it to OUT when complete: a killed run resumes where it stopped
when started again with the same options.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.audio import fix_length, resample, write_wav
from data_prep.dataset import BACKGROUND_DIR, COMMANDS, SPLITS, split_by_hash
from data_prep.errors import SpeechRNNError
from data_prep.extract import progress

log = logging.getLogger(__name__)

UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")
DEFAULT_WORDS = COMMANDS + UNKNOWN_WORDS
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
INSTALL_HINT = "install it with: sudo apt-get install espeak-ng"
NOISE_SECONDS = 60
MAX_SPEEDUP = 1.3  # beyond this a squeezed word sounds like a chipmunk; crop the rest instead
# What espeak-ng reads for a word. People say "off" as /ɔf/, /ɑf/ or /ɒf/ and "on" likewise, but
# espeak-ng has one vowel per accent for each, so the other spellings give it the vowels it lacks.
SPELLINGS = {"off": ("off", "awf", "ahf"), "on": ("on", "awn", "ahn")}
# A word alone is said as a statement, a command or a question; espeak-ng's intonation follows.
ENDINGS = ("", ".", "!", "?")
ENGINES = ("espeak", "kokoro")
KOKORO_SPEED = (0.8, 1.3)  # Kokoro's speed factor; 1.0 is its natural pace
KOKORO_BRITISH = 0.35  # share of Kokoro clips phonemised as British English (the rest American)
VOCABULARIES = {"unknown": "unknown_words.txt"}


@dataclass(frozen=True)
class ClipSpec:
    """Everything random about one clip, drawn up front so threads cannot change the outcome."""

    word: str
    voice: str  # espeak: "<accent>" or "<accent>+<variant>"; kokoro: a blend "af_heart:0.60+bm_george:0.40"
    speed: float  # espeak: words per minute (-s); kokoro: speed factor
    pitch: int  # espeak: 0-99 (-p); kokoro: unused (0)
    amplitude: int  # espeak: 0-200 (-a); kokoro: unused (0)
    level: float  # peak of the finished clip
    position: float  # 0..1: where in the free space the word starts; < 0: keep the natural length (sentences)
    name: str = ""  # <speaker>_nohash_<n>.wav
    text: str = ""  # what the engine reads (a spelling of word, maybe with punctuation); "" = word
    engine: str = "espeak"
    lang: str = ""  # kokoro: "en-us" or "en-gb" phonemes


def speaker_id(voice: str, engine: str = "espeak") -> str:
    """A stable 8-hex id per voice, shaped like the real dataset's speaker ids."""
    key = voice if engine == "espeak" else f"{engine}:{voice}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]


def vocabulary(name_or_path: str) -> list[str]:
    """A word list: a shipped one by name (``unknown``: ~500 words that are not commands, among
    them the dataset's auxiliary words, digits and words that sound near each command) or a
    text file, one word per line, ``#`` starting a comment."""
    if name_or_path in VOCABULARIES:
        text = resources.files("data_prep").joinpath("vocabulary", VOCABULARIES[name_or_path]).read_text("utf-8")
    else:
        try:
            text = Path(name_or_path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpeechRNNError(f"cannot read the word list ({getattr(exc, 'strerror', None) or exc}); "
                                 f"give a file or one of: {', '.join(VOCABULARIES)}", name_or_path) from None
    words = [w for line in text.splitlines() if (w := line.split("#", 1)[0].strip())]
    if not words:
        raise SpeechRNNError("the word list holds no words", name_or_path)
    return list(dict.fromkeys(words))


def espeak_executable() -> str:
    """The espeak-ng program; SPEECHRNN_ESPEAK overrides it (tests point it at a missing one)."""
    name = os.environ.get("SPEECHRNN_ESPEAK") or "espeak-ng"
    path = shutil.which(name)
    if path is None:
        where = "" if name == "espeak-ng" else f" (SPEECHRNN_ESPEAK={name} is not an executable)"
        raise SpeechRNNError(f"espeak-ng is not installed{where}; {INSTALL_HINT}")
    return path


def speak(
    exe: str, voice: str, text: str, speed: int = 175, pitch: int = 50, amplitude: int = 100
) -> tuple[np.ndarray, int]:
    """Run espeak-ng once; text goes through stdin so a word can never be read as an option."""
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude), "-b", "1", "--stdout"]
    try:
        done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeechRNNError(f"cannot run espeak-ng ({exc}); {INSTALL_HINT}", exe) from None
    if done.returncode != 0 or len(done.stdout) <= 44:
        reason = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}, no audio"
        raise SpeechRNNError(f"espeak-ng failed for voice {voice!r}, text {text!r}: {reason}", exe)
    samples, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=False)
    return samples, int(rate)


@cache
def voice_variants(exe: str) -> tuple[str, ...]:
    """The '+variant' names that really change the voice ("" is the plain accent).

    espeak-ng silently falls back to the plain voice for a variant it cannot use, and some
    variants sound identical (klatt = klatt6 = caleb), so each is probed once and duplicates
    of an earlier voice are dropped: two names with one sound would be one speaker in two splits.
    """
    listing = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=False).stdout
    names = sorted({m.group(1).strip() for m in re.finditer(r"!v/(.+?)(?: {2,}|\(|$)", listing, re.M)})
    candidates = ["", *names]

    def probe(variant: str) -> np.ndarray | None:
        try:
            return speak(exe, f"en-us+{variant}" if variant else "en-us", "seven")[0]
        except SpeechRNNError as err:
            log.info("espeak-ng variant %r fails: %s", variant, err)
            return None

    with ThreadPoolExecutor(4) as pool:
        probes = list(pool.map(probe, candidates))
    kept, seen = [], set()
    for variant, audio in zip(candidates, probes, strict=True):
        digest = None if audio is None else hashlib.sha1(audio.tobytes()).hexdigest()
        if audio is None or np.abs(audio).max() < 1e-3 or digest in seen:
            log.info("espeak-ng variant %r adds no new voice; skipped", variant)
            continue
        seen.add(digest)
        kept.append(variant)
    log.info("espeak-ng: %d usable variants of %d listed", len(kept) - 1, len(names))
    return tuple(kept)


def trim_silence(samples: np.ndarray, sample_rate: int, top_db: float = 30.0) -> np.ndarray:
    """Drop leading/trailing 10 ms frames quieter than top_db below the loudest frame."""
    hop = sample_rate // 100
    frames = np.pad(samples, (0, -len(samples) % hop)).reshape(-1, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    active = np.flatnonzero(rms > rms.max() * 10 ** (-top_db / 20))
    if rms.max() <= 0 or active.size == 0:
        return samples[:0]
    return samples[active[0] * hop : min(len(samples), (active[-1] + 1) * hop)]


def render_clip(exe: str, spec: ClipSpec, sample_rate: int = 16000) -> np.ndarray:
    """One espeak-ng word -> exactly one second at sample_rate, placed and levelled per spec."""
    raw, rate = speak(exe, spec.voice, spec.text or spec.word, int(spec.speed), spec.pitch, spec.amplitude)
    return place_word(raw, rate, spec, sample_rate)


def place_word(raw: np.ndarray, rate: int, spec: ClipSpec, sample_rate: int = 16000) -> np.ndarray:
    """A synthesised word at ``rate`` -> one second at sample_rate: trimmed, placed and levelled per spec."""
    speech = trim_silence(resample(raw, rate, sample_rate), sample_rate)
    if speech.size == 0:
        raise SpeechRNNError(f"{spec.engine} produced silence for {spec.word!r} in voice {spec.voice!r}")
    if spec.position < 0:  # a sentence: as long as it is, with 100 ms of silence either side
        pad = np.zeros(sample_rate // 10, np.float32)
        return np.concatenate([pad, speech * (spec.level / max(float(np.abs(speech).max()), 1e-9)), pad])
    if len(speech) > sample_rate:  # squeeze (raising pitch a little), then crop what still sticks out
        squeezed = max(sample_rate, int(len(speech) / MAX_SPEEDUP))
        speech = fix_length(resample(speech, len(speech), squeezed), sample_rate)
    clip = np.zeros(sample_rate, dtype=np.float32)
    start = int(spec.position * (sample_rate - len(speech)))
    clip[start : start + len(speech)] = speech * (spec.level / max(float(np.abs(speech).max()), 1e-9))
    return clip


def plan_clips(words: list[str], per_word: int, voices: list[str], seed: int, plain: bool = False) -> list[ClipSpec]:
    """Draw every clip's voice and settings. Each word has its own stream (seed, word), so adding
    a word or changing per_word does not reshuffle the other words' voices. plain: every word as
    spelled, no endings (the draws stop where they did before spellings existed)."""
    specs, counts = [], Counter()
    for word in words:
        rng = np.random.default_rng([seed, int(hashlib.sha1(word.encode("utf-8")).hexdigest()[:8], 16)])
        for _ in range(per_word):
            voice = voices[int(rng.integers(len(voices)))]
            speaker = speaker_id(voice)
            name = f"{speaker}_nohash_{counts[word, speaker]}.wav"
            counts[word, speaker] += 1
            speed, pitch, amplitude = (int(rng.integers(lo, hi + 1)) for lo, hi in ((110, 220), (20, 80), (70, 130)))
            level, position = round(float(rng.uniform(0.3, 0.9)), 4), round(float(rng.random()), 4)
            text = ""
            if not plain:
                spellings = SPELLINGS.get(word, (word,))
                text = spellings[int(rng.integers(len(spellings)))] + ENDINGS[int(rng.integers(len(ENDINGS)))]
            specs.append(ClipSpec(word, voice, speed, pitch, amplitude, level, position, name, text))
    return specs


def plan_kokoro_clips(words: list[str], per_word: int, speakers: list[str], seed: int) -> list[ClipSpec]:
    """Draw every Kokoro clip's speaker (a voice blend), speed, accent, ending, level and place.

    Each word has its own random stream, as for espeak-ng."""
    specs, counts = [], Counter()
    for word in words:
        rng = np.random.default_rng([seed, int(hashlib.sha1(word.encode("utf-8")).hexdigest()[:8], 16), 0x6B])
        for _ in range(per_word):
            voice = speakers[int(rng.integers(len(speakers)))]
            speaker = speaker_id(voice, "kokoro")
            name = f"{speaker}_nohash_{counts[word, speaker]}.wav"
            counts[word, speaker] += 1
            speed = round(float(rng.uniform(*KOKORO_SPEED)), 3)
            lang = "en-gb" if rng.random() < KOKORO_BRITISH else "en-us"
            level, position = round(float(rng.uniform(0.3, 0.9)), 4), round(float(rng.random()), 4)
            text = word + ENDINGS[int(rng.integers(len(ENDINGS)))]
            specs.append(ClipSpec(word, voice, speed, 0, 0, level, position, name, text, "kokoro", lang))
    return specs


def write_noise(folder: Path, noise_from: str | os.PathLike | None, seed: int, sample_rate: int) -> list[str]:
    """Copy a real dataset's background noise (silence examples need it), else make white and pink."""
    folder.mkdir()
    if noise_from is not None:
        source = Path(noise_from) / BACKGROUND_DIR
        files = sorted(p for p in source.glob("*") if p.suffix.lower() in (".wav", ".flac") and p.is_file())
        if not files:
            raise SpeechRNNError(f"no .wav/.flac files in {BACKGROUND_DIR}; point --noise-from at a dataset", source)
        for path in files:
            shutil.copyfile(path, folder / path.name)
        return [p.name for p in files]
    rng = np.random.default_rng([seed, 0x6E6F6973])
    white = rng.standard_normal(NOISE_SECONDS * sample_rate)
    spectrum = np.fft.rfft(rng.standard_normal(NOISE_SECONDS * sample_rate))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))  # 1/f power: pink
    spectrum[0] = 0.0  # no DC offset
    pink = np.fft.irfft(spectrum, NOISE_SECONDS * sample_rate)
    for name, noise in (("white_noise.wav", white), ("pink_noise.wav", pink)):
        write_wav(folder / name, (0.1 * noise / noise.std()).astype(np.float32), sample_rate)
    return ["white_noise.wav", "pink_noise.wav"]


def _write_clip(exe: str, spec: ClipSpec, root: Path, sample_rate: int) -> None:
    write_wav(root / spec.word / spec.name, render_clip(exe, spec, sample_rate), sample_rate)


_KOKORO = None  # the worker process's loaded model


def _kokoro_worker_init(folder: str | None) -> None:
    global _KOKORO
    from data_prep.kokoro import KokoroVoice

    _KOKORO = KokoroVoice(folder, threads=1)


def _kokoro_write_clip(spec: ClipSpec, root: Path, sample_rate: int) -> None:
    from data_prep.kokoro import SAMPLE_RATE as KOKORO_RATE

    audio = _KOKORO.speak(spec.text or spec.word, spec.voice, spec.speed, spec.lang)
    write_wav(root / spec.word / spec.name, place_word(audio, KOKORO_RATE, spec, sample_rate), sample_rate)


def _check_words(words: list[str]) -> list[str]:
    words = [w.strip() for w in words]
    for word in words:
        if not word or word[0] in "._" or "/" in word or "\\" in word:
            raise SpeechRNNError(f"{word!r} cannot be a word folder; use plain words like 'yes'")
    if not words or len(set(words)) != len(words):
        raise SpeechRNNError(f"give each word once (got {', '.join(words) or 'none'})")
    return words


def partial_folder(out: Path) -> Path:
    """Where an unfinished synthesis for OUT lives (hidden, beside OUT) until it is complete."""
    return out.parent / f".{out.name}.partial"


def synthesize_dataset(
    out: str | os.PathLike,
    words: list[str],
    per_word: int,
    noise_from: str | os.PathLike | None = None,
    seed: int = 0,
    show_progress: bool = True,
    sample_rate: int = 16000,
    workers: int = 2,
    plain: bool = False,
    engine: str = "espeak",
    speakers: int = 200,
    kokoro_folder: str | os.PathLike | None = None,
) -> dict:
    """Write per_word synthetic clips of each word to out/<word>/, plus split lists and noise.

    engine: "espeak" (espeak-ng; ``plain`` turns off its extra spellings and endings) or "kokoro"
    (``speakers`` random blends of Kokoro's English voicepacks, from ``kokoro_folder``, default
    data_prep.kokoro.kokoro_dir()). ``workers`` threads (espeak-ng runs as a program) or processes
    (Kokoro, one onnxruntime thread each). OUT appears only when complete; a killed run resumes
    from its hidden partial folder when called again with the same arguments. Same seed, same
    engine version: byte-identical files. "seconds" in the summary is the wall-clock time taken.
    Raises SpeechRNNError for a bad word list, an occupied OUT, a missing engine or model.
    """
    began = time.monotonic()
    words, out = _check_words(list(words)), Path(out)
    if engine not in ENGINES:
        raise SpeechRNNError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if per_word < 1 or workers < 1 or speakers < 1:
        raise SpeechRNNError(f"per_word, workers and speakers must be at least 1 (got {per_word}, {workers}, {speakers})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpeechRNNError("already exists and is not empty; pick another folder or delete it", out)
    if engine == "espeak":
        exe = espeak_executable()
        voices = [f"{a}+{v}" if v else a for a in ACCENTS for v in voice_variants(exe)]
        specs = plan_clips(words, per_word, voices, seed, plain)
        record = {"engine": engine, "seed": seed, "words": words, "per_word": per_word, "plain": plain,
                  "sample_rate": sample_rate}
    else:
        from data_prep.kokoro import check_installed, random_blends

        check_installed(kokoro_folder)
        specs = plan_kokoro_clips(words, per_word, random_blends(speakers, seed), seed)
        record = {"engine": engine, "seed": seed, "words": words, "per_word": per_word, "speakers": speakers,
                  "sample_rate": sample_rate}
    partial = _open_partial(out, {**record, "clips": [asdict(s) for s in specs]})
    todo = [s for s in specs if not (partial / s.word / s.name).is_file()]
    if len(todo) < len(specs):
        log.warning("resuming %s: %d of %d clips already written", partial, len(specs) - len(todo), len(specs))
    _render_all(todo, partial, engine, workers, sample_rate, show_progress,
                exe if engine == "espeak" else (None if kokoro_folder is None else str(kokoro_folder)))
    splits = {split: sorted(f"{s.word}/{s.name}" for s in specs if split_by_hash(s.name) == split) for split in SPLITS}
    for split in ("validation", "testing"):
        (partial / f"{split}_list.txt").write_text("".join(f"{rel}\n" for rel in splits[split]))
    shutil.rmtree(partial / BACKGROUND_DIR, ignore_errors=True)
    noise = write_noise(partial / BACKGROUND_DIR, noise_from, seed, sample_rate)
    # what was drawn for each clip, so a clip can be re-made or traced to its voice
    (partial / "synth.json").write_text(json.dumps({**record, "noise": noise, "clips": [asdict(s) for s in specs]},
                                                   indent=1))
    (partial / "plan.json").unlink()
    try:
        if out.is_dir():
            out.rmdir()  # empty when checked above; fails loudly if someone filled it meanwhile
        os.rename(partial, out)
    except OSError as exc:
        raise SpeechRNNError(f"cannot move the finished folder into place ({exc.strerror or exc})", out) from None
    summary = {
        "engine": engine,
        "clips": len(specs),
        "words": words,
        "speakers": len({speaker_id(s.voice, s.engine) for s in specs}),
        "seconds": round(time.monotonic() - began, 2),
        "clips_rendered": len(todo),
        "splits": {k: len(v) for k, v in splits.items()},
    }
    log.info("synthesised %d clips of %d words in %.1f s into %s", len(specs), len(words), summary["seconds"], out)
    return summary


SENTENCES = "sentences"  # the folder sentence synthesis writes into


def plan_sentences(texts: list[str], engine: str, voices: list[str], seed: int) -> list[ClipSpec]:
    """One clip per sentence: a voice (espeak-ng voice or Kokoro blend), a speed and a level each."""
    rng = np.random.default_rng([seed, 0x73706B])
    specs, counts = [], Counter()
    for text in texts:
        voice = voices[int(rng.integers(len(voices)))]
        speaker = speaker_id(voice, engine)
        name = f"{speaker}_nohash_{counts[speaker]}.wav"
        counts[speaker] += 1
        level = round(float(rng.uniform(0.3, 0.9)), 4)
        if engine == "espeak":
            speed, pitch, amplitude = (int(rng.integers(lo, hi + 1)) for lo, hi in ((130, 200), (20, 80), (70, 130)))
            specs.append(ClipSpec(SENTENCES, voice, speed, pitch, amplitude, level, -1.0, name, text))
        else:
            speed = round(float(rng.uniform(0.85, 1.2)), 3)
            lang = "en-gb" if rng.random() < KOKORO_BRITISH else "en-us"
            specs.append(ClipSpec(SENTENCES, voice, speed, 0, 0, level, -1.0, name, text, "kokoro", lang))
    return specs


def synthesize_sentences(
    out: str | os.PathLike, texts: list[str], engine: str = "kokoro", seed: int = 0, speakers: int = 200,
    workers: int = 2, show_progress: bool = True, sample_rate: int = 16000,
    kokoro_folder: str | os.PathLike | None = None, min_voices: int = 1,
) -> dict:
    """Speak each of TEXTS once, at its natural length, into OUT/sentences/<speaker>_nohash_<n>.wav.

    Running speech for training negatives and for false alarms per hour of talk (see
    data_prep.sentences). Same guarantees as synthesize_dataset: deterministic for a seed, OUT
    appears complete or not at all, a killed run resumes. ``synth.json`` records each clip's text.
    """
    began = time.monotonic()
    out = Path(out)
    if engine not in ENGINES or not texts or workers < 1 or speakers < 1:
        raise SpeechRNNError(f"need an engine ({', '.join(ENGINES)}), sentences, and workers/speakers >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpeechRNNError("already exists and is not empty; pick another folder or delete it", out)
    if engine == "espeak":
        exe = espeak_executable()
        voices = [f"{a}+{v}" if v else a for a in ACCENTS for v in voice_variants(exe)]
        engine_arg = exe
    else:
        from data_prep.kokoro import check_installed, random_blends

        check_installed(kokoro_folder)
        voices = random_blends(speakers, seed, min_voices)
        engine_arg = None if kokoro_folder is None else str(kokoro_folder)
    specs = plan_sentences(list(texts), engine, voices, seed)
    record = {"engine": engine, "seed": seed, "sentences": len(specs), "speakers": speakers,
              "sample_rate": sample_rate, "words": [SENTENCES], **({"min_voices": min_voices} if min_voices > 1 else {})}
    partial = _open_partial(out, {**record, "clips": [asdict(s) for s in specs]})
    todo = [s for s in specs if not (partial / s.word / s.name).is_file()]
    if len(todo) < len(specs):
        log.warning("resuming %s: %d of %d sentences already written", partial, len(specs) - len(todo), len(specs))
    _render_all(todo, partial, engine, workers, sample_rate, show_progress, engine_arg)
    seconds = sum(sf.info(str(partial / s.word / s.name)).duration for s in specs)
    (partial / "synth.json").write_text(json.dumps({**record, "audio_seconds": round(seconds, 1),
                                                    "clips": [asdict(s) for s in specs]}, indent=1))
    (partial / "plan.json").unlink()
    if out.is_dir():
        out.rmdir()
    os.rename(partial, out)
    return {"engine": engine, "clips": len(specs), "clips_rendered": len(todo), "audio_seconds": round(seconds, 1),
            "speakers": len({speaker_id(s.voice, engine) for s in specs}),
            "seconds": round(time.monotonic() - began, 2)}


SET_KEYS = {"engine", "words", "vocabulary", "per_word", "seed", "speakers", "plain"}


def synthesize_sets(recipe: str | os.PathLike, out: str | os.PathLike, noise_from: str | os.PathLike | None = None,
                    workers: int = 2, show_progress: bool = True, report=log.info) -> list[dict]:
    """Every set of a synthesis recipe (JSON: {"sets": {name: {engine, words | vocabulary, per_word,
    seed, [speakers], [plain]}}}) into OUT/<name>. A set already complete with the same settings is
    kept; one with other settings is an error (delete it to remake it); an unfinished one resumes."""
    try:
        sets = json.loads(Path(recipe).read_text())["sets"]
        assert isinstance(sets, dict) and sets
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise SpeechRNNError(f"not a synthesis recipe ({type(exc).__name__}: {exc}); expected "
                             '{"sets": {"name": {"engine": ..., "words": [...], "per_word": N, "seed": S}}}',
                             recipe) from None
    summaries = []
    for name, spec in sets.items():
        unknown_keys = set(spec) - SET_KEYS - {"_about"}
        if unknown_keys or ("words" in spec) == ("vocabulary" in spec):
            raise SpeechRNNError(f"set {name!r}: give words or vocabulary, and only {', '.join(sorted(SET_KEYS))}",
                                 recipe)
        words = spec["words"] if "words" in spec else vocabulary(spec["vocabulary"])
        kwargs = {"per_word": spec["per_word"], "seed": spec["seed"], "engine": spec.get("engine", "espeak"),
                  "speakers": spec.get("speakers", 200), "plain": spec.get("plain", False)}
        target = Path(out) / name
        if (target / "synth.json").is_file():
            held = json.loads((target / "synth.json").read_text())
            if any(held.get(k, kwargs.get(k)) != v for k, v in {**kwargs, "words": words}.items()
                   if k in held or k == "words"):
                raise SpeechRNNError(f"holds set {name!r} made with other settings; delete it to remake it", target)
            report(f"{name}: already complete")
            continue
        report(f"{name}: {len(words)} words x {kwargs['per_word']} ({kwargs['engine']})")
        summaries.append({"set": name, **synthesize_dataset(target, words, noise_from=noise_from, workers=workers,
                                                            show_progress=show_progress, **kwargs)})
    return summaries


def _open_partial(out: Path, plan: dict) -> Path:
    """The partial folder for OUT holding PLAN: new, or an unfinished one with the same plan."""
    partial = partial_folder(out)
    if partial.is_dir():
        try:
            held = json.loads((partial / "plan.json").read_text())
        except (OSError, ValueError):
            held = None
        if held != plan:
            raise SpeechRNNError("holds an unfinished synthesis with other settings; repeat its command to finish "
                                 "it, or delete the folder", partial)
        for stale in partial.glob("*/.*.tmp-*"):  # a clip being written when the last run was killed
            stale.unlink(missing_ok=True)
        return partial
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for word in plan["words"]:
        (tmp / word).mkdir()
    (tmp / "plan.json").write_text(json.dumps(plan))
    os.rename(tmp, partial)  # the partial folder exists only with its plan
    return partial


def _render_all(specs: list[ClipSpec], root: Path, engine: str, workers: int, sample_rate: int,
                show_progress: bool, engine_arg) -> None:
    if not specs:
        return
    if engine == "espeak":
        pool = ThreadPoolExecutor(workers)
        submit = lambda spec: pool.submit(_write_clip, engine_arg, spec, root, sample_rate)  # noqa: E731
    else:
        # spawn: a fresh interpreter per worker, whatever threads the parent runs
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_kokoro_worker_init, initargs=(engine_arg,))
        submit = lambda spec: pool.submit(_kokoro_write_clip, spec, root, sample_rate)  # noqa: E731
    try:
        jobs = [submit(spec) for spec in specs]
        with progress(range(len(jobs)), f"synthesising ({engine})", show_progress) as bar:
            for job in as_completed(jobs):
                job.result()
                if hasattr(bar, "update"):
                    bar.update(1)
    finally:
        pool.shutdown(cancel_futures=True)
