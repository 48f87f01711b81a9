"""Metrics on arrays: accuracy with its Wilson interval, per-class rates, one-vs-rest AUC, confusion matrix,
the COVID-19 calls, and the one patient-level bootstrap every interval of a rate comes from.

Pure functions of truths, probabilities and predictions (as scikit-learn keeps ``sklearn.metrics`` apart
from its plotting): no figures, no files, no model, so evaluation, leave-one-source-out and the reports
compute every number the same way. Figures are ``covidxr.lab.figures``; the run evaluation ``covidxr.lab.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_auc_score

from covidxr.runtime.calibration import POSITIVE, decide

__all__ = [
    "BOOTSTRAP_REPLICATES",
    "auc_or_none",
    "called_covid_rates",
    "class_mix_shift",
    "compute_metrics",
    "covid_versus_rest",
    "patient_bootstrap",
    "rates_by_group",
    "wilson_interval",
]

BOOTSTRAP_REPLICATES = 1000


def wilson_interval(successes: int, n: int) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [float("nan"), float("nan")]
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def auc_or_none(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for the boolean ``positive``; None where only one class is present (undefined)."""
    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else None


def patient_bootstrap(
    statistic: Callable[[np.ndarray], Mapping[str, float | None]],
    patients: np.ndarray,
    seed: int = 0,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> dict[str, list[float]]:
    """95% percentile intervals of every value ``statistic(rows)`` returns, resampling *patients* (all their
    images) with replacement; ``rows`` are the drawn row positions, a patient's rows as often as it is drawn.

    Images of one patient are not independent, so resampling images would give intervals that are
    too narrow. A value that is None in a replicate (no positives drawn) is left out of that replicate;
    a key that is None in every replicate has no interval.
    """
    rng = np.random.default_rng(seed)
    codes, members = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(members == i) for i in range(len(codes))]
    draws: dict[str, list[float]] = {}
    for _ in range(replicates):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(codes), len(codes))])
        for key, value in statistic(rows).items():
            if value is not None:
                draws.setdefault(key, []).append(value)
    return {
        key: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] for key, values in draws.items()
    }


def _rates(truth_idx: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray, n_labels: int) -> dict:
    """Accuracy and, per class k, sensitivity, specificity and one-vs-rest AUC, flat (for the bootstrap)."""
    rates: dict[str, float | None] = {"accuracy": float((predicted == truth_idx).mean())}
    aucs = []
    for k in range(n_labels):
        positive, called = truth_idx == k, predicted == k
        rates[f"{k}.sensitivity"] = float(called[positive].mean()) if positive.any() else None
        rates[f"{k}.specificity"] = float((~called[~positive]).mean()) if (~positive).any() else None
        auc = auc_or_none(positive, probabilities[:, k])
        rates[f"{k}.auc"] = auc
        if auc is not None:
            aucs.append(auc)
    rates["macro_auc"] = float(np.mean(aucs)) if aucs else None
    return rates


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
            "auc": auc_or_none(positives, probabilities[:, k]),
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
        intervals = patient_bootstrap(
            lambda rows: _rates(truth_idx[rows], probabilities[rows], predicted[rows], len(labels)),
            np.asarray(patients),
            seed,
        )
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
        "auc": auc_or_none(covid, score),
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
