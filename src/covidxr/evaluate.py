"""Metrics and figures: accuracy with its Wilson interval, per-class rates, one-vs-rest AUC, confusion
matrix, and the paper's Figures 1 (training curves) and 2 (confusion matrix)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidxr import DISCLAIMER
from covidxr.data import load_dataset
from covidxr.errors import CovidxrError
from covidxr.inference import predict_probabilities
from covidxr.train import Run, load_run


def wilson_interval(successes: int, n: int) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [float("nan"), float("nan")]
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def compute_metrics(truth: list[str], probabilities: np.ndarray, labels: list[str]) -> dict:
    """Metrics over the classes present in ``truth``; predictions range over all ``labels``.

    Rates that are undefined on this data (an AUC with one class, a PPV with no positive
    prediction) are ``null`` rather than a made-up number.
    """
    truth_idx = np.array([labels.index(t) for t in truth])
    predicted = probabilities.argmax(1)
    n = len(truth_idx)
    correct = int((predicted == truth_idx).sum())
    matrix = confusion_matrix(truth_idx, predicted, labels=list(range(len(labels))))
    per_class = {}
    for k, label in enumerate(labels):
        positives = truth_idx == k
        if not positives.any():
            continue
        tp = int(matrix[k, k])
        fn = int(positives.sum() - tp)
        fp = int(matrix[:, k].sum() - tp)
        tn = n - tp - fn - fp
        sensitivity = _ratio(tp, tp + fn)
        ppv = _ratio(tp, tp + fp)
        both = sensitivity is not None and ppv is not None and (sensitivity + ppv) > 0
        per_class[label] = {
            "n": int(positives.sum()),
            "sensitivity": sensitivity,
            "specificity": _ratio(tn, tn + fp),
            "ppv": ppv,
            "f1": 2 * sensitivity * ppv / (sensitivity + ppv) if both else (0.0 if ppv is not None else None),
            "auc": float(roc_auc_score(positives, probabilities[:, k])) if 0 < positives.sum() < n else None,
        }
    aucs = [m["auc"] for m in per_class.values() if m["auc"] is not None]
    return {
        "n": n,
        "accuracy": correct / n if n else None,
        "accuracy_ci95": wilson_interval(correct, n),
        "correct": correct,
        "per_class": per_class,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()},
        "predicted_class_counts": {label: int((predicted == k).sum()) for k, label in enumerate(labels)},
    }


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy and loss per epoch for training and validation (the paper's Figure 1)."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        ax_acc.plot(history["epoch"], history[f"{split}_accuracy"], style, label=split)
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], style, label=split)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Confusion matrix with counts, rows = truth (the paper's Figure 2)."""
    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > counts.max() / 2 else "black",
            fontsize=12,
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.text(0.5, 0.01, DISCLAIMER, ha="center", fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_run(
    run: str | Path | Run,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a run on its own split (default: test) or on every image of another dataset.

    Writes ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png`` and ``curves.png`` into
    ``out`` (default: the run folder) and returns the metrics.
    """
    run = run if isinstance(run, Run) else load_run(run, weights, weights_dir)
    if data is None:
        frame = run.splits()
        if split != "all":
            if split not in set(frame["split"]):
                raise CovidxrError(f"{run.path}: split {split!r} is empty or unknown (train, val, test, all)")
            frame = frame[frame["split"] == split]
        root = Path(run.info["data"])
        scope = f"{Path(run.info['data']).name}, {split} split"
    else:
        dataset = load_dataset(data)
        frame, root, split = dataset.frame, dataset.root, "all"
        scope = f"{dataset.name} (external: all images)"
    frame = frame.reset_index(drop=True)
    probabilities = predict_probabilities(
        run.model,
        [root / f for f in frame["filename"]],
        cache_dir,
        run.config.extract_batch_size,
        run.config.num_workers,
        progress,
    )
    metrics = {
        "run": str(run.path),
        "model": run.config.model,
        "data": str(Path(root).resolve()),
        "split": split,
        "disclaimer": DISCLAIMER,
        **compute_metrics(list(frame["label"]), probabilities, run.labels),
    }
    out = Path(out) if out else run.path
    out.mkdir(parents=True, exist_ok=True)
    predictions = frame[["filename", "label", "patient_id", "source"]].copy()
    predictions["predicted"] = [run.labels[k] for k in probabilities.argmax(1)]
    for k, label in enumerate(run.labels):
        predictions[f"p_{label}"] = probabilities[:, k]
    predictions.to_csv(out / "predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    acc = metrics["accuracy"]
    low, high = metrics["accuracy_ci95"]
    plot_confusion(
        metrics["confusion_matrix"]["matrix"],
        run.labels,
        out / "confusion_matrix.png",
        f"{run.config.model}: {scope}\naccuracy {acc:.1%} (95% CI {low:.1%}-{high:.1%}), n={metrics['n']}",
    )
    plot_history(run.history(), out / "curves.png", f"{run.config.model}: training curves")
    return metrics
