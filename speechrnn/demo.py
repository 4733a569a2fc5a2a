"""`make demo`: the main job end to end, in a few minutes.

data (a real Speech Commands folder if given, else espeak-ng synthetic speech) -> train a small
2x BiGRU -> export a SavedModel -> evaluate (confusion matrix PNG) -> classify files ->
stream a recording through the live-listening path. Everything lands in demo-out/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a Speech Commands-style folder (default: synthesise one with espeak-ng)")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return run(args)
    except SpeechRNNError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(args) -> int:
    import soundfile as sf

    from data_prep.audio import fix_length, load_audio
    from data_prep.augment import AugmentConfig
    from data_prep.dataset import SpeechCommands, TaskConfig
    from data_prep.synth import DEFAULT_WORDS, synthesize_dataset
    from speechrnn.evaluate import evaluate, format_report, plot_confusion
    from speechrnn.export import export_run
    from speechrnn.microphone import detector_for, file_chunk_source, run_listener
    from speechrnn.models import ModelConfig
    from speechrnn.recognizer import Recognizer, default_model_dir
    from speechrnn.runconfig import TrainConfig
    from speechrnn.streaming import StreamConfig
    from speechrnn.train import Trainer

    started = time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if args.data:
        data = Path(args.data)
        say(f"data: the real recordings in {data}")
        per_label = 150
    else:
        data = out / "synthetic"
        say("data: no --data given, so espeak-ng speaks the words in many voices")
        summary = synthesize_dataset(data, list(DEFAULT_WORDS), 60, seed=0)
        print(f"wrote {summary['clips']} clips of {len(summary['words'])} words by {summary['speakers']} voices")
        per_label = 0
    dataset = SpeechCommands.open(data)
    print(f"{len(dataset.clips)} clips; per split: "
          + ", ".join(f"{s} {sum(c.values())}" for s, c in dataset.word_counts().items()))

    say(f"train: a small 2x bidirectional GRU for {args.epochs} epochs, gradient clipping at global norm 1.0")
    config = TrainConfig(
        data=[str(data)], task=TaskConfig(), model=ModelConfig(units=48),
        augment=AugmentConfig(), epochs=args.epochs, max_per_label=per_label, learning_rate=4e-3, seed=0,
    )
    run_dir = out / "run"
    Trainer(config, run_dir, report=print).run()

    say("export: a TensorFlow SavedModel with the MFCC inside the graph")
    model_dir = export_run(run_dir, out / "model")
    print(f"{model_dir}: {sum(p.stat().st_size for p in model_dir.rglob('*') if p.is_file()) / 1e6:.2f} MB")

    say("evaluate: on speakers the model never heard (validation split)")
    rec = Recognizer(model_dir)
    report = evaluate(None, data, "validation", recognizer=rec)
    plot_confusion(report, out / "confusion.png")
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"confusion matrix: {out / 'confusion.png'}; training curves: {run_dir / 'curves.png'}")

    say("classify: a few unseen clips")
    task = TaskConfig()
    unseen = [ex for ex in dataset.examples(task, "validation") if ex.label in task.words]
    rng = np.random.default_rng(0)
    picks = [unseen[i] for i in rng.choice(len(unseen), size=min(6, len(unseen)), replace=False)]
    for ex, result in zip(picks, rec.classify_files([ex.path for ex in picks]), strict=True):
        mark = "ok " if result.label == ex.label else "MISS"
        print(f"{mark} {ex.path.parent.name}/{ex.path.name}: heard {result.label!r} ({result.score:.2f})")

    say("listen: the same clips as one recording, through the live streaming path")
    stream = [np.zeros(8000, np.float32)]
    for ex in picks:
        stream += [fix_length(load_audio(ex.path), 16000), np.zeros(12000, np.float32)]
    sf.write(out / "stream.wav", np.concatenate(stream), 16000)
    detector = detector_for(rec, StreamConfig())
    stats = run_listener(detector, file_chunk_source(out / "stream.wav"),
                         lambda d: print(f"{d.time:6.2f}s  {d.label:<6} {d.score:.2f}"))
    print(f"spoken: {' '.join(ex.label for ex in picks)}")
    print(f"heard:  {' '.join(d.label for d in stats.detections) or '(nothing)'}")
    shipped = default_model_dir()
    if (shipped / "saved_model.pb").exists():
        say(f"listen: the same recording with the shipped {shipped} (trained longer on far more speech)")
        detector = detector_for(Recognizer(shipped), StreamConfig())
        stats = run_listener(detector, file_chunk_source(out / "stream.wav"),
                             lambda d: print(f"{d.time:6.2f}s  {d.label:<6} {d.score:.2f}"))
        print(f"heard:  {' '.join(d.label for d in stats.detections) or '(nothing)'}")
    say(f"done in {time.time() - started:.0f} s; everything is in {out}/. Next: speechrnn listen (microphone), "
        "speechrnn classify FILE, make test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
