"""Metrics and figures: accuracy with its Wilson interval, per-class rates, one-vs-rest AUC, confusion
matrix, and the paper's Figures 1 (training curves) and 2 (confusion matrix)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidxr import DISCLAIMER
from covidxr.calibration import POSITIVE, decide, expected_calibration_error, reliability_curve
from covidxr.data import load_dataset
from covidxr.errors import CovidxrError
from covidxr.explain import Explainer, check_maps, input_lungs, overlay, probabilities_of
from covidxr.features import extract_features
from covidxr.images import read_image
from covidxr.inference import head_probabilities
from covidxr.models import CovidxrNet
from covidxr.report import write_run_report
from covidxr.train import Run, load_run


def wilson_interval(successes: int, n: int) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [float("nan"), float("nan")]
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


BOOTSTRAP_REPLICATES = 1000
LUNG_MASKS = "lung-masks"  # a folder of hand-drawn lung masks beside the datasets, as in ../shared/data


def hand_masks(paths: Sequence[Path]) -> list[np.ndarray | None]:
    """The hand-drawn lung mask of each image where a ``lung-masks`` folder beside its dataset has one
    (``metadata.csv``: ``mask``, ``image`` relative to the folder holding both); None elsewhere."""
    index: dict[Path, Path] = {}
    for folder in {Path(p).resolve().parents[2] / LUNG_MASKS for p in paths if len(Path(p).resolve().parents) > 2}:
        if (folder / "metadata.csv").is_file():
            table = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
            hand = ~table["origin"].str.contains("generated|lungVAE", case=False) if "origin" in table else True
            for mask, image in zip(table.loc[hand, "mask"], table.loc[hand, "image"], strict=True):
                index[(folder.parent / image).resolve()] = folder / mask
    masks = []
    for path in paths:
        found = index.get(Path(path).resolve())
        masks.append(None if found is None else np.asarray(Image.open(found).convert("L")))
    return masks


def _rates(truth_idx: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray, n_labels: int) -> dict:
    """Accuracy and, per class k, sensitivity, specificity and one-vs-rest AUC, flat (for the bootstrap)."""
    rates: dict[str, float | None] = {"accuracy": float((predicted == truth_idx).mean())}
    aucs = []
    for k in range(n_labels):
        positive, called = truth_idx == k, predicted == k
        rates[f"{k}.sensitivity"] = float(called[positive].mean()) if positive.any() else None
        rates[f"{k}.specificity"] = float((~called[~positive]).mean()) if (~positive).any() else None
        auc = float(roc_auc_score(positive, probabilities[:, k])) if 0 < positive.sum() < len(positive) else None
        rates[f"{k}.auc"] = auc
        if auc is not None:
            aucs.append(auc)
    rates["macro_auc"] = float(np.mean(aucs)) if aucs else None
    return rates


def patient_bootstrap(
    truth_idx: np.ndarray,
    probabilities: np.ndarray,
    predicted: np.ndarray,
    patients: np.ndarray,
    n_labels: int,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """95% percentile intervals of every rate, resampling *patients* (all their images) with replacement.

    Images of one patient are not independent, so resampling images would give intervals that are
    too narrow. A rate undefined in a replicate (no positives drawn) is left out of that replicate.
    """
    rng = np.random.default_rng(seed)
    codes, members = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(members == i) for i in range(len(codes))]
    draws: dict[str, list[float]] = {}
    for _ in range(BOOTSTRAP_REPLICATES):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(codes), len(codes))])
        for key, value in _rates(truth_idx[rows], probabilities[rows], predicted[rows], n_labels).items():
            if value is not None:
                draws.setdefault(key, []).append(value)
    return {
        key: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] for key, values in draws.items()
    }


def compute_metrics(
    truth: list[str],
    probabilities: np.ndarray,
    labels: list[str],
    patients: list[str] | None = None,
    seed: int = 0,
    threshold: float | None = None,
) -> dict:
    """Metrics over the classes present in ``truth``; predictions range over all ``labels``.

    With the run's COVID-19 ``threshold`` the predicted class is the run's decision (``decide``: the
    label ``predict`` gives); without it, the most probable class.

    Rates that are undefined on this data (an AUC with one class, a PPV with no positive
    prediction) are ``null`` rather than a made-up number. With ``patients``, every accuracy,
    sensitivity, specificity and AUC gets a ``*_ci95`` from a patient-level bootstrap (accuracy's
    ``accuracy_ci95`` stays the Wilson interval; its bootstrap interval is ``accuracy_bootstrap_ci95``).
    """
    truth_idx = np.array([labels.index(t) for t in truth])
    predicted = probabilities.argmax(1) if threshold is None else decide(probabilities, labels, threshold)
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
    metrics = {
        "n": n,
        "accuracy": correct / n if n else None,
        "accuracy_ci95": wilson_interval(correct, n),
        "correct": correct,
        "per_class": per_class,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": {"labels": labels, "matrix": matrix.tolist()},
        "predicted_class_counts": {label: int((predicted == k).sum()) for k, label in enumerate(labels)},
    }
    if patients is not None:
        intervals = patient_bootstrap(truth_idx, probabilities, predicted, np.asarray(patients), len(labels), seed)
        metrics["accuracy_bootstrap_ci95"] = intervals.get("accuracy")
        metrics["macro_auc_ci95"] = intervals.get("macro_auc") if metrics["macro_auc"] is not None else None
        for k, label in enumerate(labels):
            for rate in ("sensitivity", "specificity", "auc"):
                if label in per_class:
                    defined = per_class[label][rate] is not None
                    per_class[label][f"{rate}_ci95"] = intervals.get(f"{k}.{rate}") if defined else None
        metrics["bootstrap"] = {
            "unit": "patient",
            "patients": int(len(set(patients))),
            "replicates": BOOTSTRAP_REPLICATES,
            "seed": seed,
        }
    return metrics


def covid_versus_rest(truth: list[str], probabilities: np.ndarray, labels: list[str], threshold: float) -> dict:
    """COVID-19 against everything else at the run's validation-chosen threshold, with Wilson intervals."""
    covid = np.asarray(truth) == POSITIVE
    score = probabilities[:, labels.index(POSITIVE)]
    called = score >= threshold
    caught, cleared = int(called[covid].sum()), int((~called[~covid]).sum())
    return {
        "threshold": threshold,
        "n_covid": int(covid.sum()),
        "n_other": int((~covid).sum()),
        "auc": float(roc_auc_score(covid, score)) if 0 < covid.sum() < len(covid) else None,
        "sensitivity": float(caught / covid.sum()) if covid.any() else None,
        "sensitivity_ci95": wilson_interval(caught, int(covid.sum())) if covid.any() else None,
        "specificity": float(cleared / (~covid).sum()) if (~covid).any() else None,
        "specificity_ci95": wilson_interval(cleared, int((~covid).sum())) if (~covid).any() else None,
        "called_covid_share": float(called.mean()),
        "called_covid_share_ci95": wilson_interval(int(called.sum()), len(called)),
    }


def called_covid_rates(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """How often COVID-19 images are called COVID-19 (sensitivity) and other images are (false-alarm
    rate), with Wilson intervals; ``None`` where a group has no images of that kind."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    covid, called = truth == POSITIVE, predicted == POSITIVE
    correct = int((truth == predicted).sum())
    rates: dict = {"n": len(truth), "n_covid": int(covid.sum()), "n_other": int((~covid).sum())}
    rates["accuracy"] = correct / len(truth) if len(truth) else None
    rates["accuracy_ci95"] = wilson_interval(correct, len(truth)) if len(truth) else None
    for name, rows in (("covid_sensitivity", covid), ("other_called_covid", ~covid)):
        hits = int(called[rows].sum())
        rates[name] = hits / int(rows.sum()) if rows.any() else None
        rates[f"{name}_ci95"] = wilson_interval(hits, int(rows.sum())) if rows.any() else None
    return rates


def rates_by_group(frame: pd.DataFrame, predicted: Sequence[str], column: str = "source") -> dict[str, dict]:
    """``called_covid_rates`` for every value of ``column`` (e.g. per source)."""
    predicted = np.asarray(predicted)
    return {
        str(value): called_covid_rates(frame["label"].to_numpy()[rows], predicted[rows])
        for value in sorted(frame[column].astype(str).unique())
        for rows in [(frame[column].astype(str) == value).to_numpy()]
    }


def class_mix_shift(external_counts: dict[str, int], internal_counts: dict[str, int]) -> dict:
    """How the share of each predicted class moves from the internal test set to another dataset."""

    def shares(counts: dict[str, int]) -> dict[str, float]:
        total = sum(counts.values()) or 1
        return {label: counts[label] / total for label in counts}

    external, internal = shares(external_counts), shares(internal_counts)
    return {
        "internal_test": internal,
        "this_data": external,
        "difference": {label: external[label] - internal[label] for label in external},
        "total_variation": 0.5 * sum(abs(external[label] - internal[label]) for label in external),
    }


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
    save_with_disclaimer(fig, path)


def choose_examples(frame: pd.DataFrame, per_class: int, seed: int) -> list[int]:
    """Row positions of up to ``per_class`` images of each true class, drawn with ``seed``."""
    chosen: list[int] = []
    for _, group in frame.groupby("label", sort=True):
        chosen += list(group.sample(n=min(per_class, len(group)), random_state=seed).index)
    return chosen


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


def plot_gradcam(
    model: CovidxrNet,
    labels: list[str],
    images: list[Image.Image],
    true_labels: list[str],
    path: Path,
    method: str = "gradcam",
) -> None:
    """Rows per true class, columns of examples with their class activation maps (the paper's Figure 4).

    Only the (up to) three examples per class that are drawn are explained.
    """
    classes = [label for label in labels if label in true_labels]
    per_class = {label: [i for i, t in enumerate(true_labels) if t == label][:3] for label in classes}
    shown = [i for label in classes for i in per_class[label]]
    images = {i: images[i] for i in shown}
    inputs = torch.stack([model.input_tensor(images[i]) for i in shown])
    probs = dict(zip(shown, probabilities_of(model, inputs), strict=True))
    maps = dict(zip(shown, Explainer(model, method)(inputs, [p.argmax() for p in probs.values()]), strict=True))
    columns = 2 * max(len(v) for v in per_class.values())
    fig, axes = plt.subplots(len(classes), columns, figsize=(2.4 * columns, 2.7 * len(classes)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(classes):
        for n, i in enumerate(per_class[label]):
            k = int(probs[i].argmax())
            axes[row, 2 * n].imshow(images[i].convert("L").resize((model.image_size,) * 2), cmap="gray")
            axes[row, 2 * n].set_title(f"true {label}", fontsize=9)
            axes[row, 2 * n + 1].imshow(overlay(images[i], maps[i], model.image_size))
            axes[row, 2 * n + 1].set_title(
                f"{method}: {labels[k]} {probs[i][k]:.2f}", fontsize=9, color="black" if labels[k] == label else "red"
            )
    fig.suptitle(f"{method} maps for the predicted class, rows = true class")
    save_with_disclaimer(fig, path)


def external_folder(run_dir: str | Path, data: str | Path) -> Path:
    """Where ``evaluate RUN --data OTHER`` writes by default: ``RUN/external/<OTHER's folder name>/``, so
    an evaluation on another dataset never overwrites the run's own test results."""
    return Path(run_dir) / "external" / Path(data).resolve().name


def evaluate_run(
    run: str | Path | Run,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    explain: bool = True,
) -> dict:
    """Evaluate a run on its own split (default: test) or on every image of another dataset.

    Writes ``metrics.json``, ``predictions.csv``, the figures ``curves.png``, ``confusion_matrix.png``,
    ``predictions.png`` and (with ``explain``) ``gradcam.png`` plus the explanation checks, and the
    reports, into ``out`` (default: the run folder; for another dataset ``external_folder``, and the
    run's own report is rewritten to link it); returns the metrics.
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
    extraction = (cache_dir, run.config.extract_batch_size, run.config.num_workers, progress)
    features = extract_features(run.model, [root / f for f in frame["filename"]], *extraction)
    uncalibrated = head_probabilities(run.model, features)
    probabilities = head_probabilities(run.model, features, run.temperature)
    threshold = run.covid_threshold
    predicted = [run.labels[k] for k in decide(probabilities, run.labels, threshold)]  # what `predict` says
    truth = list(frame["label"])
    truth_idx = np.array([run.labels.index(t) for t in truth])
    metrics = {
        "run": str(run.path.resolve()),
        "model": run.config.model,
        "data": str(Path(root).resolve()),
        "split": split,
        "disclaimer": DISCLAIMER,
        **compute_metrics(
            truth, probabilities, run.labels, list(frame["patient_id"]), seed=run.config.seed, threshold=threshold
        ),
        "calibration": {
            "temperature": run.temperature,
            "ece_uncalibrated": expected_calibration_error(uncalibrated, truth_idx),
            "ece_calibrated": expected_calibration_error(probabilities, truth_idx),
        },
        "covid_vs_rest": covid_versus_rest(truth, probabilities, run.labels, threshold),
        "by_source": rates_by_group(frame, predicted),
    }
    if data is not None:
        internal = run.splits().query("split == 'test'")
        internal_paths = [Path(run.info["data"]) / f for f in internal["filename"]]
        internal_features = extract_features(run.model, internal_paths, *extraction)
        internal_probabilities = head_probabilities(run.model, internal_features, run.temperature)
        internal_predicted = decide(internal_probabilities, run.labels, threshold)
        internal_counts = {label: int((internal_predicted == k).sum()) for k, label in enumerate(run.labels)}
        metrics["predicted_class_shift"] = class_mix_shift(metrics["predicted_class_counts"], internal_counts)
    out = Path(out) if out else (run.path if data is None else external_folder(run.path, data))
    out.mkdir(parents=True, exist_ok=True)
    predictions = frame[["filename", "label", "patient_id", "source"]].copy()
    predictions["predicted"] = predicted
    for k, label in enumerate(run.labels):
        predictions[f"p_{label}"] = probabilities[:, k]
    predictions.to_csv(out / "predictions.csv", index=False)
    seed = run.config.seed
    if explain:
        chosen = choose_examples(frame, per_class=8, seed=seed)
        images = [read_image(root / frame["filename"].iloc[i]) for i in chosen]
        inputs = torch.stack([run.model.input_tensor(img) for img in images])
        hands = hand_masks([root / frame["filename"].iloc[i] for i in chosen])
        lungs = [input_lungs(run.model, img, hand) for img, hand in zip(images, hands, strict=True)]
        covid = run.labels.index(POSITIVE)
        metrics["explanations"] = check_maps(run.model, inputs, seed=seed, lungs=lungs, covid_class=covid)
        metrics["explanations"]["lung_masks"] = {"hand_drawn": sum(h is not None for h in hands), "n": len(hands)}
        plot_gradcam(run.model, run.labels, images, list(frame["label"].iloc[chosen]), out / "gradcam.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_predictions(frame, probabilities, run.labels, predicted, Path(root), out / "predictions.png", seed)
    acc = metrics["accuracy"]
    low, high = metrics["accuracy_ci95"]
    plot_confusion(
        metrics["confusion_matrix"]["matrix"],
        run.labels,
        out / "confusion_matrix.png",
        f"{run.config.model}: {scope}\naccuracy {acc:.1%} (95% CI {low:.1%}-{high:.1%}), n={metrics['n']}",
    )
    plot_history(run.history(), out / "curves.png", f"{run.config.model}: training curves")
    plot_calibration(probabilities, uncalibrated, truth_idx, out / "calibration.png", f"{run.config.model}\n{scope}")
    write_run_report(out)
    if out.resolve() != run.path.resolve() and (run.path / "metrics.json").is_file():
        write_run_report(run.path)  # its report links every evaluation under external/
    return metrics
