"""The timeline PNG of a scored stream: per-command posteriors over time, the threshold, the truth
words and the detections.

Layout: one row per 30 s of audio, like lines of text, 16 inches wide (about half an inch per
second). A word (~0.5 s) and a hop (0.2 s) stay visible, and a 6-minute stream is twelve rows that
read top to bottom in any image viewer; one very wide figure would need a viewer that zooms and
pans, and squeezing 6 minutes into one screen width would merge neighbouring words. Recordings
longer than 20 minutes get longer rows, so that there are at most 40 rows.

In each row: the smoothed posterior of every command (one colour per command, the score the
detector compares with its threshold), the threshold (dashed; a command with its own threshold
has a dotted line in its colour), the truth (shaded spans: coloured for command words, labelled
at the top, red "missed" for a word not found; grey for other events), and the detections (a
triangle in the command's colour where a word was found, a red cross and label for a false alarm).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from data_prep.errors import SpeechRNNError
from speechrnn.stream_eval import StreamScore, TruthEvent
from speechrnn.streaming import PosteriorTrace

ROW_SECONDS = 30.0
MAX_ROWS = 40
FALSE_ALARM = "#d62728"  # red: false alarms and missed words, so no command is drawn in red
# tab10 without its red and grey (grey marks events that are not commands), plus navy and black.
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#000075",
           "#000000"]


def row_length(duration_s: float, row_seconds: float = ROW_SECONDS, max_rows: int = MAX_ROWS) -> float:
    """Seconds per row: ``row_seconds``, or longer (a multiple of 10 s) so there are at most ``max_rows``."""
    if duration_s / row_seconds <= max_rows:
        return row_seconds
    return 10.0 * math.ceil(duration_s / max_rows / 10.0)


def plot_timeline(trace: PosteriorTrace, score: StreamScore, truth: Sequence[TruthEvent], path: str | os.PathLike,
                  title: str = "", row_seconds: float = ROW_SECONDS) -> None:
    """Write the timeline PNG (see the module docstring) to PATH, atomically.

    ``trace`` holds the posteriors per hop (StreamingDetector.record_posteriors), ``score`` the
    matched detections (score_stream) and ``truth`` every listed event. Raises ValueError for an
    empty trace.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    times, _, smoothed = trace.arrays()
    if not len(times):
        raise ValueError("no posteriors recorded: the stream is shorter than one window")
    commands = list(trace.thresholds)
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(commands)}
    column = {label: trace.labels.index(label) for label in commands}
    duration = max(score.duration_s, float(times[-1]))
    row = row_length(duration, row_seconds)
    rows = max(1, math.ceil(duration / row))
    usual = Counter(trace.thresholds.values()).most_common(1)[0][0]
    found = {h.word for h in score.hits}

    fig, axes = plt.subplots(rows, 1, figsize=(16, 1.0 + 1.45 * rows), squeeze=False)
    for r, ax in enumerate(axes[:, 0]):
        lo, hi = r * row, (r + 1) * row
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 1.18)
        ax.set_yticks([0, 0.5, 1])
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.25)
        for e in truth:
            if e.end < lo or e.start > hi:
                continue
            middle = min(max((e.start + e.end) / 2, lo), hi)
            if e.label in colour:
                ax.axvspan(e.start, e.end, color=colour[e.label], alpha=0.2, lw=0)
                missed = e not in found
                ax.text(middle, 1.08, e.label + (" missed" if missed else ""), ha="center", va="center", fontsize=7,
                        color=FALSE_ALARM if missed else colour[e.label], fontweight="bold")
            else:
                ax.axvspan(e.start, e.end, color="0.5", alpha=0.12, lw=0)
                ax.text(middle, 1.08, e.label[:14], ha="center", va="center", fontsize=6, color="0.4", style="italic")
        inside = (times >= lo - 1) & (times <= hi + 1)
        for label in commands:
            ax.plot(times[inside], smoothed[inside, column[label]], color=colour[label], lw=0.9)
            if trace.thresholds[label] != usual:
                ax.axhline(trace.thresholds[label], color=colour[label], lw=0.8, ls=":")
        ax.axhline(usual, color="black", lw=0.8, ls="--")
        for h in score.hits:
            d = h.detection
            if lo <= d.time <= hi:
                ax.plot(d.time, d.score, marker="v", ms=7, color=colour.get(d.label, "black"), mec="black", mew=0.6)
        for fa in score.false_alarms:
            d = fa.detection
            if lo <= d.time <= hi:
                ax.plot(d.time, d.score, marker="x", ms=8, mew=2, color=FALSE_ALARM)
                ax.text(d.time, min(d.score + 0.06, 0.98), d.label, color=FALSE_ALARM, fontsize=7, ha="left",
                        va="bottom", fontweight="bold")
        ax.set_ylabel(f"{lo:.0f}-{hi:.0f} s", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from the start of the recording", fontsize=8)

    f = score.to_dict()
    handles = [Line2D([], [], color=colour[c], lw=2, label=c) for c in commands] + [
        Line2D([], [], color="black", ls="--", label=f"threshold {usual:g}"),
        Line2D([], [], marker="v", color="0.6", mec="black", ls="", label="detection: word found"),
        Line2D([], [], marker="x", color=FALSE_ALARM, mew=2, ls="", label="false alarm"),
        Patch(color="0.5", alpha=0.25, label="other event (not a command)")]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 9), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.25 / fig.get_figheight()))
    recall = "-" if f["recall"] is None else f"{f['recall']:.3f}"
    latency = "" if f["latency_median_ms"] is None else f", median latency {f['latency_median_ms']:+.0f} ms"
    fig.suptitle(f"{title}{': ' if title else ''}recall {recall} ({f['counts']['matched']}/{f['counts']['command_words']}), "
                 f"{f['counts']['false_alarms']} false alarms = {f['false_alarms_per_hour']:g}/h "
                 f"({f['false_alarms_per_hour_no_command']:g}/h with no command spoken){latency}", fontsize=9,
                 y=1 - 0.05 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        raise SpeechRNNError(f"cannot write the timeline ({exc.strerror or exc})", path) from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
