"""Evaluate an exported model: accuracy, per-class precision/recall, confusion matrix (JSON, PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.dataset import (
    HOLDOUT,
    SPLITS,
    UNKNOWN,
    SpeechCommands,
    TaskConfig,
    flat_folder_examples,
    is_dataset_folder,
)
from data_prep.errors import SpeechRNNError
from data_prep.extract import WaveformLoader
from speechrnn.recognizer import Recognizer

# What --split selects in a dataset folder. "unseen": every clip the model's own recipe kept out
# of training (validation, testing and the held-out scarce-word speakers).
SPLIT_CHOICES = {"testing": ("testing",), "validation": ("validation",), HOLDOUT: (HOLDOUT,),
                 "unseen": ("validation", "testing", HOLDOUT), "all": (*SPLITS, HOLDOUT)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: honest bounds for small counts (e.g. 6 'on' clips)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def metrics_from_predictions(truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    n = len(labels)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (truth, predicted), 1)
    per_class = {}
    for i, label in enumerate(labels):
        support, predicted_as = int(cm[i].sum()), int(cm[:, i].sum())
        hits = int(cm[i, i])
        per_class[label] = {
            "support": support,
            "recall": hits / support if support else None,
            "precision": hits / predicted_as if predicted_as else None,
            "recall_95ci": list(wilson_interval(hits, support)) if support else None,
        }
    total = int(cm.sum())
    correct = int(np.trace(cm))
    # Mean recall over the labels present: the accuracy a split with equal class sizes would give
    # (the canonical test split is nearly balanced; ours has about a dozen "off" clips among >1,000).
    recalls = [m["recall"] for m in per_class.values() if m["recall"] is not None]
    return {"accuracy": correct / total if total else None, "accuracy_95ci": list(wilson_interval(correct, total)),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else None, "examples": total,
            "labels": labels, "per_class": per_class, "confusion_matrix": cm.tolist()}


def checkpoint_metrics(probabilities: np.ndarray, truth: np.ndarray, is_validation: np.ndarray,
                       labels: list[str]) -> dict:
    """The metrics an export carries: accuracy, its 95% interval, class-balanced accuracy, the clip
    count and per-label figures on the validation split ("validation") and on every clip the run
    kept out of training ("unseen": validation plus the held-out speakers of scarce words, present
    only when there are any). ``probabilities`` [n, labels]; ``truth`` [n] label indices."""
    if not len(truth):
        return {}
    predicted = np.asarray(probabilities).argmax(1)
    is_validation = np.asarray(is_validation, bool)
    out = {}
    for name, rows in (("validation", is_validation), ("unseen", np.ones_like(is_validation))):
        if name == "unseen" and is_validation.all():
            continue
        report = metrics_from_predictions(truth[rows], predicted[rows], labels)
        out[name] = {k: report[k] for k in ("accuracy", "accuracy_95ci", "balanced_accuracy", "examples", "per_class")}
    return out


def evaluation_examples(data, labels: list[str], task: TaskConfig, split: str, all_unknown: bool = False):
    """Dataset folders (their split lists, the model's task sampling; several are pooled as in
    training) or one flat label-folder tree. all_unknown: every clip of a word outside the task
    in the split, not the task's sample of them."""
    folders = [Path(d) for d in ([data] if isinstance(data, str | os.PathLike) else data)]
    for folder in folders:
        if not folder.is_dir():
            raise SpeechRNNError("not a folder (expected a dataset or a folder of label sub-folders)", folder)
    if all(is_dataset_folder(f) for f in folders):
        dataset = SpeechCommands.union([SpeechCommands.open(f) for f in folders])
        if split not in SPLIT_CHOICES:
            raise SpeechRNNError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}")
        examples = [ex for s in SPLIT_CHOICES[split] for ex in dataset.examples(task, s, all_unknown=all_unknown)]
        if not examples:
            raise SpeechRNNError(f"no {split} examples in this dataset; try --split validation", folders[0])
        return examples
    if len(folders) > 1:
        raise SpeechRNNError("several folders must all be datasets (with split lists or _background_noise_)",
                             next(f for f in folders if not is_dataset_folder(f)))
    return flat_folder_examples(folders[0], labels)


def evaluate(model_dir: str | os.PathLike | None, data, split: str = "testing",
             recognizer: Recognizer | None = None, all_unknown: bool = False, backend: str | None = None) -> dict:
    """Score MODEL on the clips of DATA (a folder, or a list of dataset folders; see
    evaluation_examples) with ``backend`` (see Recognizer) -> the report (metrics_from_predictions
    plus model, backend, data, split,
    ``unknown_by_word``: the recall of each word that counts as _unknown_, and ``skipped``:
    "<file>: <reason>" of each clip that could not be read, which is also logged as an error and
    left out of the figures)."""
    rec = recognizer or Recognizer(model_dir, backend)
    task = TaskConfig.from_dict(rec.meta["task"]) if "task" in rec.meta else TaskConfig()
    examples = evaluation_examples(data, rec.labels, task, split, all_unknown)
    waves, kept, errors = WaveformLoader(rec.features).load_many(examples)  # logs each unreadable clip
    if not kept:
        raise SpeechRNNError("none of the files could be read", data)
    probs = rec.probabilities(waves)
    truth = np.array([rec.labels.index(examples[i].label) for i in kept])
    predicted = probs.argmax(1)
    report = metrics_from_predictions(truth, predicted, rec.labels)
    if UNKNOWN in rec.labels:
        unknown = rec.labels.index(UNKNOWN)
        by_word: dict[str, list[int]] = {}
        for row, i in enumerate(kept):
            if examples[i].label == UNKNOWN:
                by_word.setdefault(examples[i].word or UNKNOWN, []).append(int(predicted[row] == unknown))
        report["unknown_by_word"] = {
            word: {"support": len(hits), "recall": sum(hits) / len(hits),
                   "recall_95ci": list(wilson_interval(sum(hits), len(hits)))}
            for word, hits in sorted(by_word.items())}
    report.update(model=str(rec.model_dir), backend=rec.backend, data=str(data) if isinstance(data, str | os.PathLike) else
                  ", ".join(map(str, data)), split=split, skipped=[str(e) for e in errors])
    return report


def plot_confusion(report: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion_matrix"], dtype=float)
    labels = report["labels"]
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = report["accuracy"]
    ax.set_title(f"{Path(report['model']).name} on {Path(report['data']).name} ({report['split']}): "
                 f"accuracy {acc:.3f}, n={report['examples']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    lines = [f"accuracy {report['accuracy']:.4f} on {report['examples']} clips "
             f"(95% CI {report['accuracy_95ci'][0]:.3f}-{report['accuracy_95ci'][1]:.3f})"
             + (f"; class-balanced {report['balanced_accuracy']:.4f}" if report.get("balanced_accuracy") is not None else ""),
             f"{'label':<12}{'support':>8}{'precision':>11}{'recall':>8}   recall 95% CI"]
    for label, m in report["per_class"].items():
        if not m["support"] and m["precision"] is None:
            continue
        prec = f"{m['precision']:.3f}" if m["precision"] is not None else "-"
        rec = f"{m['recall']:.3f}" if m["recall"] is not None else "-"
        ci = f"{m['recall_95ci'][0]:.2f}-{m['recall_95ci'][1]:.2f}" if m["recall_95ci"] else ""
        lines.append(f"{label:<12}{m['support']:>8}{prec:>11}{rec:>8}   {ci}")
    words = report.get("unknown_by_word") or {}
    if len(words) > 1:
        worst = sorted(words.items(), key=lambda kv: (kv[1]["recall"], -kv[1]["support"]))[:8]
        lines.append(f"{UNKNOWN} by word ({len(words)} words), lowest recall: "
                     + ", ".join(f"{w} {m['recall']:.2f} (n={m['support']})" for w, m in worst))
    if report.get("skipped"):
        lines.append(f"left out {len(report['skipped'])} unreadable files (named on stderr)")
    return "\n".join(lines)
