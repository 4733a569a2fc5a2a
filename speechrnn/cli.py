"""The `speechrnn` command: parses arguments and calls library functions, nothing else."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from data_prep.errors import SpeechRNNError


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

    Train on a Speech Commands-style folder, evaluate, export a TensorFlow SavedModel, classify
    audio files and listen to the microphone.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WarningFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
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
    from data_prep.stats import dataset_stats

    table = dataset_stats(folder, task_words.split(",") if task_words else None, by_word)
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    labels = sorted({label for counts in table.values() for label in counts})
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
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write the dataset into.")
@click.option("--words", default=None, help="Comma-separated words (default: the 10 commands plus a few unknown words).")
@click.option("--per-word", default=200, show_default=True, type=click.IntRange(1), help="Clips per word.")
@click.option("--noise-from", type=click.Path(file_okay=False), default=None,
              help="Copy _background_noise_ from this dataset (default: generate white/pink noise).")
@click.option("--seed", default=0, show_default=True, type=int)
@_report_errors
def data_synth(out: str, words: str | None, per_word: int, noise_from: str | None, seed: int) -> None:
    """Speak words with espeak-ng in many voices into a Speech Commands-style folder OUT."""
    from data_prep.synth import DEFAULT_WORDS, synthesize_dataset

    summary = synthesize_dataset(
        out, words.split(",") if words else list(DEFAULT_WORDS), per_word, noise_from=noise_from, seed=seed
    )
    click.echo(f"wrote {summary['clips']} clips of {len(summary['words'])} words to {out}")


if __name__ == "__main__":
    main()
