"""Every matplotlib figure an evaluation writes: training curves, confusion matrix, reliability diagram,
captioned predictions and Grad-CAM grids (the paper's Figures 1-4), each carrying the disclaimer where it
shows predictions.

Drawing only: the numbers come from ``covidxr.lab.metrics`` and ``covidxr.runtime.calibration``, the activation maps
from ``covidxr.lab.explain`` (so no model is needed here). Figures are written to files, never shown, so the
non-interactive Agg backend is chosen explicitly: it works headless (servers, CI) and in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from covidxr import DISCLAIMER
from covidxr.runtime.calibration import expected_calibration_error, reliability_curve
from covidxr.runtime.images import read_image

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

__all__ = [
    "gradcam_examples",
    "plot_calibration",
    "plot_confusion",
    "plot_gradcam",
    "plot_history",
    "plot_interval_rates",
    "plot_predictions",
    "plot_reliability",
    "save_with_disclaimer",
]


def plot_calibration(
    probabilities: np.ndarray, uncalibrated: np.ndarray, truth_idx: np.ndarray, path: Path, title: str
) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for name, probs, style in (("uncalibrated", uncalibrated, "o--"), ("temperature-scaled", probabilities, "s-")):
        curve = reliability_curve(probs, truth_idx)
        ece = expected_calibration_error(probs, truth_idx)
        ax.plot(curve["confidence"], curve["accuracy"], style, label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence of the predicted class", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_with_disclaimer(fig: plt.Figure, path: Path, top: float = 1.0) -> None:
    """Every figure that shows predictions carries the research-use disclaimer at its foot."""
    fig.text(0.5, 0.005, DISCLAIMER, ha="center", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, top))
    fig.savefig(path, dpi=90)
    plt.close(fig)


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


def plot_confusion(
    matrix: list[list[int]], labels: list[str], path: Path, title: str, columns: list[str] | None = None
) -> None:
    """Confusion matrix with counts, rows = truth (the paper's Figure 2); ``columns`` where the predictions
    have other names than the truths (e.g. a "no answer" column)."""
    counts = np.asarray(matrix)
    columns = columns or labels
    fig, ax = plt.subplots(figsize=(5 + 0.9 * (len(columns) - len(labels)), 4.4))
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
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_with_disclaimer(fig, path)


def plot_predictions(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    labels: list[str],
    predicted: Sequence[str],
    root: Path,
    path: Path,
    seed: int,
) -> None:
    """A grid of evaluated images captioned "Predict = X / Correct = Y", wrong ones in red (the paper's Figure 3).

    Wrong predictions are shown first, so the grid shows the model's errors when there are any.
    """
    predicted = np.asarray(predicted)
    wrong = list(np.flatnonzero(predicted != frame["label"].to_numpy()))
    right = list(np.random.default_rng(seed).permutation(np.flatnonzero(predicted == frame["label"].to_numpy())))
    shown = (wrong[:8] + right)[:16]
    columns = 4
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.25 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), shown, strict=False):
        ax.imshow(read_image(root / frame["filename"].iloc[i]).convert("L"), cmap="gray")
        is_wrong = predicted[i] != frame["label"].iloc[i]
        ax.set_title(
            f"Predict = {predicted[i]} ({probabilities[i][labels.index(predicted[i])]:.2f})\n"
            f"Correct = {frame['label'].iloc[i]}",
            color="red" if is_wrong else "black",
            fontsize=10,
            fontweight="bold" if is_wrong else "normal",
        )
    fig.suptitle(f"{len(wrong)} wrong of {len(frame)}; wrong predictions in red, shown first")
    save_with_disclaimer(fig, path, top=0.97)


def gradcam_examples(labels: Sequence[str], true_labels: Sequence[str], per_class: int = 3) -> dict[str, list[int]]:
    """The examples the Grad-CAM grid draws, by true class in the order of ``labels``: the first
    ``per_class`` of each (so only those need explaining)."""
    classes = [label for label in labels if label in true_labels]
    return {label: [i for i, t in enumerate(true_labels) if t == label][:per_class] for label in classes}


def plot_gradcam(
    labels: Sequence[str],
    images: Sequence[Image.Image],
    true_labels: Sequence[str],
    probabilities: Mapping[int, np.ndarray],
    overlays: Mapping[int, Image.Image],
    image_size: int,
    path: Path,
    method: str = "gradcam",
) -> None:
    """Rows per true class, columns of examples with their class activation maps (the paper's Figure 4).

    ``probabilities`` and ``overlays`` (the map of the predicted class over the image) are keyed by the
    position in ``images`` of each example ``gradcam_examples`` picks.
    """
    per_class = gradcam_examples(labels, true_labels)
    classes = list(per_class)
    columns = 2 * max(len(v) for v in per_class.values())
    fig, axes = plt.subplots(len(classes), columns, figsize=(2.4 * columns, 2.7 * len(classes)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(classes):
        for n, i in enumerate(per_class[label]):
            k = int(probabilities[i].argmax())
            axes[row, 2 * n].imshow(images[i].convert("L").resize((image_size,) * 2), cmap="gray")
            axes[row, 2 * n].set_title(f"true {label}", fontsize=9)
            axes[row, 2 * n + 1].imshow(overlays[i])
            axes[row, 2 * n + 1].set_title(
                f"{method}: {labels[k]} {probabilities[i][k]:.2f}",
                fontsize=9,
                color="black" if labels[k] == label else "red",
            )
    fig.suptitle(f"{method} maps for the predicted class, rows = true class")
    save_with_disclaimer(fig, path)


def plot_interval_rates(
    rows: Sequence[tuple[str, float, float, float]], targets: Mapping[str, float], path: Path, title: str
) -> None:
    """Rates as points with their 95% intervals, one row each (name, value, low, high), and each target as a
    red tick on its row (a rate passes where its whole interval lies right of it)."""
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rows) + 1.6))
    for y, (name, value, low, high) in enumerate(rows):
        ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color="#1f5fbf", capsize=4)
        ax.annotate(
            f"{value:.1%} ({low:.1%}–{high:.1%})",
            (value, y),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=7,
        )
        if name.split(" ")[0] in targets:
            ax.plot([targets[name.split(" ")[0]]] * 2, [y - 0.3, y + 0.3], color="#b00", lw=2)
    ax.set_yticks(range(len(rows)), [row[0] for row in rows])
    ax.set(xlim=(0, 1.02), ylim=(-0.6, len(rows) - 0.4), xlabel="value (95% interval; red: target)", title=title)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    save_with_disclaimer(fig, path)


def plot_reliability(bins: Sequence[Mapping[str, float]], threshold: float, path: Path, title: str) -> None:
    """Reliability diagram of p(COVID-19): the observed COVID-19 share per bin (exact 95% interval) against the
    bin's mean p, with the operating threshold; below, how many images fell in each bin."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    if bins:
        x = np.array([b["mean_p"] for b in bins])
        y = np.array([b["observed"] for b in bins])
        error = [y - np.array([b["observed_low"] for b in bins]), np.array([b["observed_high"] for b in bins]) - y]
        ax.errorbar(x, y, yerr=error, fmt="o-", capsize=3, label="observed COVID-19 share (95% interval)")
        counts.bar([(b["low_edge"] + b["high_edge"]) / 2 for b in bins], [b["n"] for b in bins], width=0.09)
    for axis in (ax, counts):
        axis.axvline(threshold, color="#b00", lw=1, ls="--")
    ax.set(ylabel="share of images that are COVID-19", xlim=(0, 1), ylim=(-0.02, 1.02), title=title)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    counts.set(xlabel="p(COVID-19) (red: the operating threshold)", ylabel="images")
    save_with_disclaimer(fig, path)
