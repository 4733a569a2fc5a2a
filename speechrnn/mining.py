"""Hard-negative mining: run a model over long streams that hold no command, keep the windows it
fires on, and train on them as _unknown_ (``speechrnn train --negatives MINED``); repeat.

Sources are folders of recordings (e.g. `speechrnn data sentences`) and the training split of
dataset folders (their words outside the task: real unknown-word clips). Each source is laid out
as one long stream in a seeded order, clips separated by 100-600 ms of silence, optionally over
real background noise at a drawn signal-to-noise ratio, and pushed through the same
StreamingDetector `listen` uses. At every detection the windows scored in the smoothing span
before it (the last second of audio at each of those hops) are written as one-second clips.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from data_prep.audio import load_audio, write_wav
from data_prep.augment import active_rms
from data_prep.dataset import AUDIO_EXTENSIONS, NOISE_REGIONS, SpeechCommands, TaskConfig
from data_prep.errors import SpeechRNNError
from data_prep.extract import progress
from data_prep.files import staged_folder
from speechrnn.streaming import StreamConfig

log = logging.getLogger(__name__)
MINED = "mined"  # the folder the windows are written into


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
                   and not p.name.startswith(".") and "_background_noise_" not in p.parts)
    if not files:
        raise SpeechRNNError("no audio files to mine", folder)
    return files


def _dataset_unknown_files(folder: Path, task: TaskConfig) -> list[Path]:
    """The training split's clips of words outside the task (never validation or testing clips)."""
    dataset = SpeechCommands.open(folder)
    files = [c.path for c in dataset.clips if c.split == "training" and c.word not in task.words]
    if not files:
        raise SpeechRNNError("no training-split clips of words outside the task", folder)
    return files


def build_stream(files: list[Path], rng: np.random.Generator, sample_rate: int, max_seconds: float,
                 noise: list[np.ndarray], snr_db: tuple[float, float]) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Files in a random order, 100-600 ms apart, up to max_seconds, over looped noise if any.

    Returns the stream and (start second, path) of each file placed in it."""
    pieces, placed, total = [], [], 0
    for i in rng.permutation(len(files)):
        try:
            audio = load_audio(files[i], sample_rate)
        except SpeechRNNError as err:
            log.warning("skipped: %s", err)
            continue
        gap = np.zeros(int(rng.uniform(0.1, 0.6) * sample_rate), np.float32)
        placed.append(((total + len(gap)) / sample_rate, str(files[i])))
        pieces += [gap, audio]
        total += len(gap) + len(audio)
        if total >= max_seconds * sample_rate:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if noise and len(stream):
        source = noise[int(rng.integers(len(noise)))]
        reps = int(np.ceil(len(stream) / len(source))) + 1
        start = int(rng.integers(len(source)))
        bed = np.tile(source, reps)[start : start + len(stream)]
        level = active_rms(stream, sample_rate) * 10 ** (-rng.uniform(*snr_db) / 20)
        stream = stream + bed * np.float32(level / max(1e-9, float(np.sqrt(np.mean(bed**2)))))
    return np.clip(stream, -1, 1).astype(np.float32), placed


def mine_negatives(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    folders: list[str] = (),
    datasets: list[str] = (),
    minutes_per_source: float = 30.0,
    noise_from: str | os.PathLike | None = None,
    snr_db: tuple[float, float] = (10.0, 25.0),
    threshold: float = 0.5,
    seed: int = 0,
    show_progress: bool = True,
    backend: str | None = None,
) -> dict:
    """Mine false alarms of MODEL on command-free streams into OUT/mined/*.wav (one-second windows).

    ``threshold`` (over every command, below the model's own; default 0.5) also catches near misses.
    OUT appears complete or not at all; OUT/mined.json lists every window's source, time and label.
    Raises SpeechRNNError for a missing model, an empty source or an occupied OUT.
    """
    from speechrnn.microphone import detector_for
    from speechrnn.recognizer import Recognizer

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpeechRNNError("already exists and is not empty; pick another folder or delete it", out)
    if not folders and not datasets:
        raise SpeechRNNError("nothing to mine: give --from FOLDER or --from-dataset DATASET")
    recognizer = Recognizer(model, backend)
    task = TaskConfig.from_dict(recognizer.meta["task"]) if "task" in recognizer.meta else TaskConfig()
    rate = recognizer.features.sample_rate
    sources = [(str(f), _folder_files(Path(f))) for f in folders]
    sources += [(f"{d} (training-split unknown words)", _dataset_unknown_files(Path(d), task)) for d in datasets]
    noise = []
    if noise_from is not None:
        lo, hi = NOISE_REGIONS["training"]
        for path in SpeechCommands.open(noise_from).noise_files:
            audio = load_audio(path, rate)
            noise.append(audio[int(len(audio) * lo) : int(len(audio) * hi)])
    config = replace(StreamConfig(), threshold=threshold,
                     label_thresholds={label: threshold for label in task.words})
    hops_back = max(1, round(config.smoothing_ms / config.hop_ms))
    hop = int(config.hop_ms / 1000 * rate)
    records, fired, seconds = [], Counter(), 0.0
    with staged_folder(out) as tmp:
        (tmp / MINED).mkdir()
        for k, (name, files) in enumerate(sources):
            rng = np.random.default_rng([seed, k])
            stream, placed = build_stream(files, rng, rate, minutes_per_source * 60, noise, snr_db)
            seconds += len(stream) / rate
            detector = detector_for(recognizer, config)
            chunk = rate // 20
            with progress(range(0, len(stream), chunk), f"mining {Path(name.split(' ')[0]).name}", show_progress) as bar:
                for start in bar:
                    for det in detector.push(stream[start : start + chunk]):
                        fired[det.label] += 1
                        end = int(round(det.time * rate))
                        for back in range(hops_back):
                            stop = end - back * hop
                            if stop - rate < 0:
                                break
                            clip = f"m{k}{len(records):06d}_nohash_0.wav"
                            write_wav(tmp / MINED / clip, stream[stop - rate : stop], rate)
                            starts = [s for s, _ in placed]
                            source = placed[max(0, int(np.searchsorted(starts, stop / rate)) - 1)][1] if placed else ""
                            records.append({"clip": clip, "source": source, "stream": name,
                                            "end_s": round(stop / rate, 3), "label": det.label,
                                            "score": round(det.score, 4)})
        summary = {"model": str(recognizer.model_dir), "threshold": threshold, "seed": seed,
                   "minutes_per_source": minutes_per_source, "snr_db": list(snr_db) if noise else None,
                   "stream_seconds": round(seconds, 1), "detections": sum(fired.values()),
                   "false_alarms_per_hour": round(sum(fired.values()) / max(seconds, 1e-9) * 3600, 1),
                   "by_label": dict(fired.most_common()), "windows": len(records)}
        (tmp / "mined.json").write_text(json.dumps({**summary, "sources": [n for n, _ in sources],
                                                    "clips": records}, indent=1))
    return summary
