"""``covidxr evaluate MODEL.onnx --data DIR``: a model covidxr did not train, measured on a labelled dataset.

The images are predicted exactly as ``covidxr predict --model MODEL.onnx`` predicts them (``ForeignModel``: the
spec's preprocessing and decision, one answer per image), and measured with the functions a run's evaluation
uses (``covidxr.lab.metrics``, ``covidxr.lab.figures``). It writes ``metrics.json`` (the ``Metrics`` record, with
the label map and the images left out), ``predictions.csv`` (one row per image of the dataset, unreadable ones and
those given no answer included, with their reason), ``confusion_matrix.png`` and ``report.md`` / ``report.html``,
which open with the bottom line.

**Labels.** A foreign model's labels may be a subset of the data's, or in another order. Each label of the data
is mapped to the model's label of the same name; where the model has no such label, a non-COVID-19 label goes to
the model's one non-COVID-19 class when it has exactly one (a binary ``[COVID-19, other]`` model: NORMAL and
PNEUMONIA are "other"). Any other label the model lacks is refused in one line. ``metrics.json`` records the map
(``label_map``) and the rule (``label_map_rule``); ``predictions.csv`` keeps the data's label and the mapped one.

**Not counted**: unreadable files and images the model gave no answer for (a NaN or Inf output) are listed in
``predictions.csv`` and counted in ``metrics.json`` (``unreadable``, ``no_answer``), never in ``n``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidxr import DISCLAIMER
from covidxr.lab.data import load_dataset
from covidxr.lab.figures import plot_confusion
from covidxr.lab.metrics import compute_metrics, rates_by_group, wilson_interval
from covidxr.runtime.document import Figure, Heading, Items, Table, Text, Verdict, write_report
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.foreign import ForeignModel
from covidxr.runtime.formatting import counted, dec, pct, with_ci
from covidxr.runtime.records import Metrics
from covidxr.runtime.spec import COVID

__all__ = ["LABEL_MAP_RULE", "default_out", "evaluate_foreign", "map_labels"]

log = logging.getLogger(__name__)

LABEL_MAP_RULE = (
    "each label of the data goes to the model's label of the same name; where the model has none, a non-COVID-19 "
    "label goes to the model's only non-COVID-19 class"
)


def map_labels(data_labels: Sequence[str], model_labels: Sequence[str], where: str = "data") -> dict[str, str]:
    """The model label each data label is counted as (``LABEL_MAP_RULE``); a label with no counterpart is one
    ``CovidxrError`` line naming it."""
    others = [label for label in model_labels if label != COVID]
    mapping = {}
    for label in sorted(set(data_labels)):
        if label in model_labels:
            mapping[label] = label
        elif label != COVID and len(others) == 1:
            mapping[label] = others[0]
        else:
            raise CovidxrError(
                f"{where}: label {label!r} has no counterpart among the model's labels {list(model_labels)} "
                "(a non-COVID-19 label maps only to a model with one non-COVID-19 class)"
            )
    return mapping


def default_out(model: str | Path, data: str | Path) -> Path:
    """Where ``evaluate MODEL.onnx --data DIR`` writes by default: ``<MODEL>-evaluation/<DIR's name>/`` beside the
    graph (as a run's evaluations go to ``RUN/external/<DIR's name>/``)."""
    model = Path(model)
    return model.with_name(f"{model.stem}-evaluation") / Path(data).resolve().name


def _covid_versus_rest(truth: np.ndarray, p_covid: np.ndarray, predicted: np.ndarray, threshold: float | None) -> dict:
    """COVID-19 against everything else at the model's own decision (its threshold, or its most probable class),
    with Wilson intervals, and the AUC of p(COVID-19)."""
    from covidxr.lab.metrics import auc_or_none

    covid, called = truth == COVID, predicted == COVID
    caught, cleared = int(called[covid].sum()), int((~called[~covid]).sum())
    return {
        "threshold": threshold,
        "decision": "p(COVID-19) >= threshold" if threshold is not None else "most probable class",
        "n_covid": int(covid.sum()),
        "n_other": int((~covid).sum()),
        "auc": auc_or_none(covid, p_covid),
        "sensitivity": caught / int(covid.sum()) if covid.any() else None,
        "sensitivity_ci95": wilson_interval(caught, int(covid.sum())) if covid.any() else None,
        "specificity": cleared / int((~covid).sum()) if (~covid).any() else None,
        "specificity_ci95": wilson_interval(cleared, int((~covid).sum())) if (~covid).any() else None,
        "called_covid_share": float(called.mean()) if len(called) else None,
        "called_covid_share_ci95": wilson_interval(int(called.sum()), len(called)) if len(called) else None,
    }


def evaluate_foreign(
    model: str | Path | ForeignModel,
    data: str | Path,
    out: str | Path | None = None,
    spec: str | Path | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate a foreign ONNX model (``MODEL.onnx`` with its spec) on every image of the dataset ``data``; write
    ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png`` and the report into ``out`` (default
    ``default_out``); return the metrics. ``seed`` draws the patient bootstrap of the intervals."""
    model = model if isinstance(model, ForeignModel) else ForeignModel(model, spec, threads)
    dataset = load_dataset(data)
    frame = dataset.frame.reset_index(drop=True)
    labels = model.labels
    label_map = map_labels(frame["label"], labels, f"{dataset.root / 'metadata.csv'}")
    out = Path(out) if out is not None else default_out(model.path, data)
    results = model.predict_files([dataset.root / name for name in frame["filename"]])

    table = frame[["filename", "label", "patient_id", "source"]].copy()
    table["model_label"] = [label_map[label] for label in frame["label"]]
    table["predicted"] = [r.get("label") or "" for r in results]
    for label in labels:
        table[f"p_{label}"] = [np.nan if "error" in r else r["probabilities"][label] for r in results]
    table["no_answer_reason"] = [r.get("no_answer_reason") or "" for r in results]
    table["error"] = [r.get("error", "") for r in results]
    answered = np.array([bool(r.get("label")) for r in results])
    unreadable = int(sum("error" in r for r in results))
    no_answer = int(len(results) - unreadable - answered.sum())
    if not answered.any():
        why = table["error"].iloc[0] or table["no_answer_reason"].iloc[0]
        raise CovidxrError(
            f"{dataset.root}: the model answered none of its {len(results)} images "
            f"({unreadable} unreadable, {no_answer} without answer; first: {why})"
        )
    kept = table[answered].reset_index(drop=True)
    truth = list(kept["model_label"])
    probabilities = kept[[f"p_{label}" for label in labels]].to_numpy(dtype=np.float64)
    predicted = kept["predicted"].to_numpy()
    threshold = model.covid_threshold
    measured = compute_metrics(truth, probabilities, labels, list(kept["patient_id"]), seed=seed, threshold=threshold)
    by_source = rates_by_group(kept.assign(label=kept["model_label"]), list(predicted))
    metrics = {
        "run": None,
        "model": model.identity,
        "data": str(Path(dataset.root).resolve()),
        "split": "all",
        "disclaimer": DISCLAIMER,
        **measured,
        "covid_vs_rest": _covid_versus_rest(
            np.asarray(truth), probabilities[:, labels.index(COVID)], predicted, threshold
        ),
        "by_source": by_source,
        "foreign_model": {
            "file": str(model.path.resolve()),
            "sha256": model.classifier.sha256,
            "spec": model.spec.to_dict(),
            "decision": model.describe_decision(),
            "out_of_distribution_guard": None,
        },
        "label_map": label_map,
        "label_map_rule": LABEL_MAP_RULE,
        "images": len(results),
        "unreadable": unreadable,
        "no_answer": no_answer,
    }
    metrics = Metrics.new(metrics).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    table.to_csv(out / "predictions.csv", index=False)
    low, high = metrics["accuracy_ci95"]
    title = f"{model.path.name} on {dataset.name}"
    plot_confusion(
        metrics["confusion_matrix"]["matrix"],
        labels,
        out / "confusion_matrix.png",
        f"{title}\naccuracy {metrics['accuracy']:.1%} (95% CI {low:.1%}-{high:.1%}), n={metrics['n']}",
    )
    _write_report(out, title, metrics, dataset.name)
    log.info(
        "evaluated %s on %s (%d images answered of %d) into %s",
        model.path,
        dataset.name,
        metrics["n"],
        len(results),
        out,
    )
    return metrics


def _write_report(out: Path, title: str, metrics: dict, data_name: str) -> None:
    """``report.md`` and ``report.html``: the bottom line, then the figures and tables behind it."""
    covid = metrics["covid_vs_rest"]
    n = metrics["n"]
    left_out = []
    if metrics["unreadable"]:
        left_out.append(f"{counted(metrics['unreadable'], 'unreadable file')}")
    if metrics["no_answer"]:
        left_out.append(f"{counted(metrics['no_answer'], 'image')} the model gave no answer for (output not finite)")
    mapped = {k: v for k, v in metrics["label_map"].items() if k != v}
    verdict = [
        f"Accuracy {with_ci(metrics['accuracy'], metrics['accuracy_ci95'], label='95% CI ')} on "
        f"{counted(n, 'image')} of {data_name}; label: {metrics['foreign_model']['decision']}.",
        f"COVID-19 against the rest: sensitivity {with_ci(covid['sensitivity'], covid['sensitivity_ci95'])} "
        f"of {covid['n_covid']}, specificity {with_ci(covid['specificity'], covid['specificity_ci95'])} of "
        f"{covid['n_other']}; AUC of p(COVID-19) {dec(covid['auc'])}.",
        "Left out of the figures: " + ("; ".join(left_out) if left_out else "none") + ".",
    ]
    if mapped:
        verdict.append(
            "Labels counted as the model's: " + ", ".join(f"{k} → {v}" for k, v in mapped.items()) + " (label_map)."
        )
    rows = [
        [
            label,
            str(rates["n"]),
            with_ci(rates["sensitivity"], rates.get("sensitivity_ci95")),
            with_ci(rates["specificity"], rates.get("specificity_ci95")),
            dec(rates["auc"]),
        ]
        for label, rates in metrics["per_class"].items()
    ]
    sources = [
        [source, str(rates["n"]), with_ci(rates["accuracy"], rates["accuracy_ci95"]), pct(rates["covid_sensitivity"])]
        for source, rates in metrics["by_source"].items()
    ]
    blocks = [
        Verdict(verdict),
        Text(DISCLAIMER, warning=True),
        Figure(
            "confusion",
            out / "confusion_matrix.png",
            "confusion_matrix.png",
            "confusion matrix",
            "Rows: the data's labels as the model's (label_map); columns: the model's answer.",
        ),
        Heading(2, "Per class"),
        Table(["class", "images", "sensitivity (95% CI)", "specificity (95% CI)", "AUC"], rows),
        Text("Intervals of sensitivity and specificity: patient bootstrap; of accuracy: Wilson."),
        Heading(2, "By source"),
        Table(["source", "images", "accuracy (95% CI)", "COVID-19 sensitivity"], sources),
        Heading(2, "The model"),
        Items(
            [
                f"Model: {metrics['model']} ({metrics['foreign_model']['file']}).",
                f"Label: {metrics['foreign_model']['decision']}.",
                "Not made by covidxr: no out-of-distribution guard and no lung check, so every readable image is "
                "answered; what it was trained on is not known here.",
                f"Label map: {LABEL_MAP_RULE}: "
                + ", ".join(f"{k} → {v}" for k, v in metrics["label_map"].items())
                + ".",
                "Every image, with its answer or the reason it has none: predictions.csv.",
            ]
        ),
    ]
    write_report(out, f"Evaluation of {title}", blocks)


def summary_line(metrics: dict, out: Path) -> str:
    """What ``covidxr evaluate`` prints."""
    low, high = metrics["accuracy_ci95"]
    return (
        f"{Path(metrics['foreign_model']['file']).name} on {metrics['data']}: accuracy {metrics['accuracy']:.1%} "
        f"(95% CI {low:.1%}-{high:.1%}), n={metrics['n']} ({metrics['unreadable']} unreadable, "
        f"{metrics['no_answer']} without answer); written to {out}"
    )
