"""The streams bench/streaming.py measures on: long 16 kHz recordings with known word times.

Command streams (build_stream): real clips the model never trained on, one every 2.5-3.5 s (a
command 75% of the time, else another word or nothing), over continuous real background noise
from the part of each `_background_noise_` recording that training never cuts from; a new noise
and level every ~30 s.

Talk without commands (build_no_command_stream): everyday sentences that hold none of the
commands (data_prep.sentences), spoken by Kokoro and espeak-ng, made once with `speechrnn data
sentences` (sentence_material), one after another over the same held-out noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.audio import fix_length, load_audio  # noqa: E402
from data_prep.dataset import HOLDOUT, NOISE_REGIONS, SpeechCommands, TaskConfig  # noqa: E402
from speechrnn.stream_eval import TruthEvent  # noqa: E402

RATE = 16000
# Where the command clips and the noise come from: never the training split or the part of the
# noise recordings training cuts from.
CLIPS = {"validation+holdout": (("validation", HOLDOUT), (NOISE_REGIONS["validation"][0], NOISE_REGIONS["testing"][1])),
         "validation": (("validation",), NOISE_REGIONS["validation"]),
         "testing": (("testing",), NOISE_REGIONS["testing"])}
FADE_S = 0.05  # cross-fade at noise loop points and noise changes, so they make no clicks
CACHE = Path(os.environ.get("SPEECHRNN_CACHE") or REPO / ".cache" / "speechrnn") / "bench" / "no-command"
# The no-command material: seeds and Kokoro voice blends of its own (training recipes use others).
SENTENCE_SEEDS = {"kokoro": 901, "espeak": 902}
SECONDS_PER_SENTENCE = 3.6  # measured: Kokoro ~3.0 s, espeak-ng ~2.4 s, plus a 0.9 s pause on average


def info(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Event:
    kind: str  # "command", "unknown" or "nothing"
    label: str  # the command (task label), the spoken word for unknown, "" for nothing
    clip_start: float  # seconds; the 1 s clip starts here in the stream
    word_start: float = 0.0
    word_end: float = 0.0
    path: str = ""
    split: str = ""
    peak_dbfs: float = -120.0
    snr_db: float = 0.0  # word RMS over the noise RMS around it
    noise: str = ""
    extent_from_energy: bool = True  # False: no clear energy extent, the whole clip counts as the word


@dataclass
class NoiseSegment:
    start: float
    end: float
    file: str
    level_db: float  # noise RMS relative to the median speech peak


@dataclass
class Stream:
    samples: np.ndarray
    events: list[Event]
    noise: list[NoiseSegment]
    reference_peak: float
    clip_sources: Counter = field(default_factory=Counter)
    reused_clips: int = 0

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE

    def commands(self) -> list[Event]:
        return [e for e in self.events if e.kind == "command"]

    def truth(self) -> list[TruthEvent]:
        """Every spoken word (commands and others) as score_stream's truth."""
        return [TruthEvent(e.label, e.word_start, e.word_end, e.extent_from_energy) for e in self.events if e.path]


def word_extent(clip: np.ndarray, below_peak_db: float = 40.0, above_floor_db: float = 10.0,
                bridge_s: float = 0.15, min_range_db: float = 15.0) -> tuple[float, float, bool]:
    """Start and end (seconds inside the clip) of the word, from 20 ms frame energies every 10 ms.

    A frame is voiced when it is within 40 dB of the loudest frame and at least 10 dB above the
    clip's own floor (its 10th-percentile frame): many clips carry room noise within 40 dB of the
    peak, and -40 dB alone would mark the whole second. The word is the run of voiced frames around
    the loudest one, bridging gaps up to 150 ms (the closure in "stop", a weak "f" in "off").
    A clip whose loudest frame is less than 15 dB over its floor (speech buried in its own noise,
    ~2% of clips) has no energy extent: the whole clip is the word, and the third value is False.
    """
    hop, win = RATE // 100, RATE // 50
    n = 1 + max(0, len(clip) - win) // hop
    energy = np.array([np.sqrt(np.mean(clip[i * hop : i * hop + win] ** 2)) for i in range(n)])
    db = 20 * np.log10(np.maximum(energy, 1e-9))
    floor = float(np.percentile(db, 10))
    if db.max() - floor < min_range_db:
        return 0.0, len(clip) / RATE, False
    voiced = db >= max(db.max() - below_peak_db, floor + above_floor_db)
    bridge = round(bridge_s * 100)
    first = last = int(np.argmax(db))
    while (earlier := np.flatnonzero(voiced[max(0, first - bridge) : first])).size:
        first = max(0, first - bridge) + int(earlier[0])
    while (later := np.flatnonzero(voiced[last + 1 : last + 1 + bridge])).size:
        last = last + 1 + int(later[-1])
    return first * hop / RATE, (last * hop + win) / RATE, True


def crossfade_concat(pieces: list[np.ndarray], fade: int) -> np.ndarray:
    """Join pieces end to start, overlapping ``fade`` samples with an equal-power cross-fade."""
    out = pieces[0].astype(np.float32)
    ramp = np.linspace(0, np.pi / 2, fade, dtype=np.float32)
    fade_in, fade_out = np.sin(ramp), np.cos(ramp)
    for piece in pieces[1:]:
        if len(out) < fade or len(piece) < fade:
            out = np.concatenate([out, piece])
            continue
        mixed = out[-fade:] * fade_out + piece[:fade] * fade_in
        out = np.concatenate([out[:-fade], mixed, piece[fade:]])
    return out


def looped(region: np.ndarray, length: int, start: int, fade: int) -> np.ndarray:
    """``length`` samples of ``region`` played from ``start`` and looped with cross-fades."""
    pieces, total = [region[start:]], len(region) - start
    while total < length + fade:
        pieces.append(region)
        total += len(region) - fade
    return crossfade_concat(pieces, fade)[:length]


def noise_regions(dataset: SpeechCommands, region: tuple[float, float]) -> dict[Path, np.ndarray]:
    """Each background-noise recording's part ``region`` (fractions of its length), at unit RMS."""
    regions = {}
    for path in dataset.noise_files:
        audio = load_audio(path, RATE)
        part = audio[int(len(audio) * region[0]) : int(len(audio) * region[1])]
        regions[path] = part / max(1e-9, float(np.sqrt(np.mean(part**2))))
    return regions


class ClipPool:
    """Draws clips without replacement, reshuffling when a pool is used up (counted as reuse)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.pools: dict[str, list] = {}
        self.order: dict[str, list[int]] = {}
        self.reused = 0

    def add(self, key: str, items: list) -> None:
        self.pools.setdefault(key, []).extend(items)

    def draw(self, key: str):
        if not self.order.get(key):
            if key in self.order:
                self.reused += 1
            self.order[key] = list(self.rng.permutation(len(self.pools[key])))
        return self.pools[key][self.order[key].pop()]


def build_stream(data: Path, task: TaskConfig, minutes: float, seed: int, command_fraction: float = 0.75,
                 unknown_share: float = 2 / 3, noise_db: tuple[float, float] = (-35.0, -20.0),
                 gap_s: tuple[float, float] = (2.5, 3.5), noise_change_s: float = 30.0,
                 clips: str = "validation+holdout") -> Stream:
    rng = np.random.default_rng(seed)
    dataset = SpeechCommands.open(data)
    words = set(task.words)
    splits, region = CLIPS[clips]
    commands = [e for e in dataset.examples(task, splits[0]) if e.label in words and not e.is_cut]
    for split in splits[1:]:
        commands += dataset.examples(task, split)
    unknown = [c for c in dataset.clips if c.split == splits[0] and c.word not in words]
    if not commands:
        raise SystemExit(f"{data}: no {clips} clips of the task's words {sorted(words)}")
    if not dataset.noise_files:
        raise SystemExit(f"{data}: no _background_noise_ folder")
    pool = ClipPool(rng)
    for ex in commands:
        pool.add(ex.label, [ex])
    pool.add("_unknown_", unknown)
    labels = sorted({ex.label for ex in commands})  # balanced: each label equally likely

    total = int(minutes * 60 * RATE)
    events: list[Event] = []
    t = 1.5  # the detector scores nothing before its first full second
    while t + 1.5 <= total / RATE:
        draw = rng.random()
        if draw < command_fraction:
            ex = pool.draw(labels[rng.integers(len(labels))])
            events.append(Event("command", ex.label, t, path=str(ex.path), split=ex.split))
        elif unknown and draw < command_fraction + (1 - command_fraction) * unknown_share:
            clip = pool.draw("_unknown_")
            events.append(Event("unknown", clip.word, t, path=str(clip.path), split=clip.split))
        else:
            events.append(Event("nothing", "", t))
        t += rng.uniform(*gap_s)

    speech = np.zeros(total, np.float32)
    for event in events:
        if not event.path:
            continue
        clip = fix_length(load_audio(event.path, RATE), RATE)
        start = int(round(event.clip_start * RATE))
        speech[start : start + RATE] += clip
        s, e, event.extent_from_energy = word_extent(clip)
        event.word_start, event.word_end = event.clip_start + s, event.clip_start + e
        event.peak_dbfs = float(20 * np.log10(max(1e-9, float(np.abs(clip).max()))))
    peaks = [10 ** (e.peak_dbfs / 20) for e in events if e.path]
    reference = float(np.median(peaks)) if peaks else 0.3

    # Continuous noise, a new recording and level every ~30 s, looped from its held-out region.
    fade = int(FADE_S * RATE)
    regions = noise_regions(dataset, region)
    segments: list[NoiseSegment] = []
    pieces = []
    position = 0
    while position < total:
        length = min(total - position, int(rng.uniform(0.8, 1.2) * noise_change_s * RATE))
        path = dataset.noise_files[rng.integers(len(dataset.noise_files))]
        level = float(rng.uniform(*noise_db))
        piece = looped(regions[path], length + fade, int(rng.integers(len(regions[path]))), fade)
        pieces.append(piece * np.float32(reference * 10 ** (level / 20)))
        segments.append(NoiseSegment(position / RATE, (position + length) / RATE, path.name, round(level, 1)))
        position += length
    noise = crossfade_concat(pieces, fade)[:total]

    for event in events:
        if not event.path:
            continue
        a, b = int(event.word_start * RATE), int(event.word_end * RATE)
        word_rms = np.sqrt(np.mean(speech[a:b] ** 2))
        noise_rms = np.sqrt(np.mean(noise[a:b] ** 2))
        event.snr_db = round(float(20 * np.log10(max(word_rms, 1e-9) / max(noise_rms, 1e-9))), 1)
        event.noise = next(s.file for s in segments if s.start <= event.word_start < s.end)
    samples = np.clip(speech + noise, -1.0, 1.0).astype(np.float32)
    sources = Counter(e.split for e in events if e.path)
    return Stream(samples, events, segments, reference, sources, pool.reused)


def write_pcm16(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), samples, RATE, subtype="PCM_16", format="WAV")


def write_looped(path: Path, samples: np.ndarray, seconds: float) -> None:
    """``seconds`` of ``samples`` repeated, written block by block (an hour never sits in memory)."""
    import soundfile as sf

    remaining = int(seconds * RATE)
    with sf.SoundFile(str(path), "w", RATE, 1, subtype="PCM_16", format="WAV") as out:
        while remaining > 0:
            block = samples[:remaining]
            out.write(block)
            remaining -= len(block)




def speechrnn_command() -> list[str]:
    exe = Path(sys.executable).with_name("speechrnn")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from speechrnn.cli import main; main()"]



# ----------------------------------------------------------------------------- talk without commands


def sentence_material(minutes: float, speakers: int) -> list[Path]:
    """The sentence folders for MINUTES of talk, half per engine, made with `speechrnn data sentences`
    into CACHE when missing (a killed synthesis resumes when run again)."""
    count = max(2, math.ceil(minutes * 60 / SECONDS_PER_SENTENCE / 2 * 1.1))
    folders = []
    for engine, seed in SENTENCE_SEEDS.items():
        out = CACHE / f"{engine}-heldout-seed{seed}-{count}x{speakers}"
        if not (out / "synth.json").is_file():
            # the grammar's held-out half, and for Kokoro blends of two or three voicepacks: sentences
            # and voices that no training set uses
            cmd = [*speechrnn_command(), "data", "sentences", "--out", str(out), "--count", str(count),
                   "--engine", engine, "--seed", str(seed), "--speakers", str(speakers), "--part", "heldout",
                   *(["--min-voices", "2"] if engine == "kokoro" else [])]
            info(f"making the sentences: {' '.join(cmd)}")
            if subprocess.run(cmd, cwd=REPO, stdout=sys.stderr).returncode:
                raise SystemExit(f"`{' '.join(cmd)}` failed")
        folders.append(out)
    return folders


def build_no_command_stream(folders: list[Path], data: Path, minutes: float, seed: int, wav: Path,
                            snr_db: tuple[float, float] = (10.0, 25.0), level_dbfs: tuple[float, float] = (-28.0, -16.0),
                            pause_s: tuple[float, float] = (0.3, 1.5), scene_s: float = 30.0) -> tuple[list[TruthEvent], dict]:
    """Write MINUTES of the sentences in FOLDERS, shuffled, over held-out real noise, to WAV, ~30 s
    (a scene) at a time: each scene has its own noise recording, speech level (active RMS, dBFS) and
    SNR (speech active RMS over the scene's noise RMS). Scenes change in the pauses. Returns the
    truth (every sentence as a `_speech_` event) and a description with each sentence's text."""
    import soundfile as sf

    from data_prep.augment import active_rms

    rng = np.random.default_rng([seed, 0x6E6F636D])
    sentences = [(folder / "sentences" / clip["name"], clip["text"], clip["engine"], clip["voice"])
                 for folder in folders for clip in json.loads((folder / "synth.json").read_text())["clips"]]
    order = list(rng.permutation(len(sentences)))
    total, t = int(minutes * 60 * RATE), RATE  # a second of noise first
    placed, reused = [], 0  # (start sample, sentence index)
    while True:
        if not order:
            order, reused = list(rng.permutation(len(sentences))), reused + 1
        i = order.pop()
        length = sf.info(str(sentences[i][0])).frames
        if t + length + RATE // 2 > total:
            break
        placed.append((t, i, length))
        t += length + int(rng.uniform(*pause_s) * RATE)
    dataset = SpeechCommands.open(data)
    regions = noise_regions(dataset, CLIPS["validation+holdout"][1])
    fade = int(FADE_S * RATE)
    ramp = np.linspace(0, np.pi / 2, fade, dtype=np.float32)
    truth, described, carry, start = [], [], None, 0
    with sf.SoundFile(str(wav), "w", RATE, 1, subtype="PCM_16", format="WAV") as out:
        while start < total:
            # A scene: the sentences that begin within ~30 s; it ends in the pause after the last.
            target = start + int(rng.uniform(0.8, 1.2) * scene_s * RATE)
            members = [p for p in placed if start <= p[0] < target]
            end = total if not members or members[-1] is placed[-1] else \
                (members[-1][0] + members[-1][2] + placed[placed.index(members[-1]) + 1][0]) // 2
            path = dataset.noise_files[rng.integers(len(dataset.noise_files))]
            level, snr = float(rng.uniform(*level_dbfs)), float(rng.uniform(*snr_db))
            noise = looped(regions[path], end - start + fade, int(rng.integers(len(regions[path]))), fade)
            noise *= np.float32(10 ** ((level - snr) / 20))
            if carry is not None:
                noise[:fade] = carry * np.cos(ramp) + noise[:fade] * np.sin(ramp)
            carry, mix = noise[end - start :], noise[: end - start].copy()
            for at, i, length in members:
                clip = load_audio(sentences[i][0], RATE)[:length]
                s = at - start
                mix[s : s + len(clip)] += clip * np.float32(10 ** (level / 20) / max(active_rms(clip), 1e-9))
                local = float(np.sqrt(np.mean(noise[s : s + len(clip)] ** 2)))
                truth.append(TruthEvent("_speech_", at / RATE, (at + len(clip)) / RATE))
                described.append({"start": round(at / RATE, 3), "text": sentences[i][1], "engine": sentences[i][2],
                                  "voice": sentences[i][3], "noise": path.name, "level_dbfs": round(level, 1),
                                  "snr_db": round(snr, 1), "local_snr_db": round(level - 20 * np.log10(max(local, 1e-9)), 1)})
            out.write(np.clip(mix, -1.0, 1.0))
            start = end
    return truth, {"sentences": described, "sentences_reused": reused}


def kokoro_voices_in_training(voices: set[str]) -> dict:
    """How many of these Kokoro blends recipes/synth.json's Kokoro sets (the default model's
    training speech) also speak with."""
    from data_prep.kokoro import random_blends

    sets = json.loads((REPO / "recipes" / "synth.json").read_text())["sets"].values()
    used = {b for s in sets if s.get("engine") == "kokoro" for b in random_blends(s.get("speakers", 200), s["seed"])}
    shared = sorted(voices & used)
    return {"voices": len(voices), "also_in_recipes_synth_json": len(shared), "shared": shared}
