"""``covidxr validate``: the local validation a hospital files before using the model on its own population
(issue 23).

The site's labelled images (``metadata.csv`` with ``filename,label``; ``sex``, ``age_group``, ``view`` and
``source`` used where present) are predicted exactly as ``covidxr predict`` predicts them, at the model's
operating point or at a site file's (``--site``). Every rate counts the images given an answer; the images
the out-of-distribution guard or the lung check turns away are listed with their reasons, and unreadable ones
with their errors, and both are counted, never fatal.

Measured at the operating point, each with an exact (Clopper–Pearson) 95% interval: accuracy over the
classes, COVID-19 sensitivity and specificity; the AUC of p(COVID-19) where both COVID-19 and other images
exist, with a 95% percentile bootstrap interval (resampling patients where ``patient_id`` is given, images
otherwise); the confusion matrix; a reliability diagram of p(COVID-19); the same per subgroup.

The verdict (``RULES``, stated in the report): per target (``--min-specificity``, ``--min-sensitivity``), *fail*
when the whole interval lies below it, *warn* when the interval straddles it, when fewer than ``MIN_IMAGES``
images measure it or when its interval is wider than ``±precision``, *pass* otherwise; a metric whose class is
absent is *not measured*. Any fail: NOT READY; else any warn or not measured: UNDECIDED; else READY for a
trial on this population.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from covidxr.lab.metrics import patient_bootstrap
from covidxr.lab.site import CONFIDENCE, MIN_IMAGES, PRECISION, images_needed, read_site_table, site_rate
from covidxr.runtime.calibration import POSITIVE, describe_operating_point
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.formatting import pct
from covidxr.runtime.inference import predict_files
from covidxr.runtime.records.validation import MIN_SUBGROUP, RULES, STATUSES, Validation
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.site import describe_site, model_record
from covidxr.runtime.writer import flat_row, model_identity

__all__ = [
    "AUC_REPLICATES",
    "CALIBRATION_BINS",
    "MIN_SUBGROUP",
    "RULES",
    "SUBGROUP_COLUMNS",
    "TARGET_METRICS",
    "auc_with_interval",
    "check_target",
    "rank_auc",
    "validate_site",
]

logger = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("sex", "age_group", "view", "source")
CALIBRATION_BINS = 10
AUC_REPLICATES = 1000
TARGET_METRICS = ("specificity", "sensitivity")
NO_ANSWER = "no answer"


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC from ranks (Mann–Whitney, ties counted half); ``None`` where one class is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def auc_with_interval(
    positive: np.ndarray, score: np.ndarray, patients: np.ndarray, replicates: int = AUC_REPLICATES
) -> dict | None:
    """The AUC of ``score`` for ``positive`` with its 95% percentile bootstrap interval over ``patients``."""
    value = rank_auc(positive, score)
    if value is None:
        return None
    interval = patient_bootstrap(
        lambda rows: {"auc": rank_auc(positive[rows], score[rows])}, patients, replicates=replicates
    ).get("auc", [value, value])
    return {
        "value": value,
        "low": min(interval[0], value),
        "high": max(interval[1], value),
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
        "replicates": replicates,
    }


def _rate(successes: int, n: int) -> dict | None:
    return None if n == 0 else site_rate(int(successes), int(n)).to_dict()


def _measure(truth: np.ndarray, predicted: np.ndarray, p_covid: np.ndarray, answered: np.ndarray, patients) -> dict:
    """Accuracy, sensitivity, specificity (exact intervals) and AUC (bootstrap) on the answered images."""
    covid = truth == POSITIVE
    called = predicted == POSITIVE
    return {
        "accuracy": _rate(((predicted == truth) & answered).sum(), answered.sum()),
        "sensitivity": _rate((called & covid & answered).sum(), (covid & answered).sum()),
        "specificity": _rate((~called & ~covid & answered).sum(), (~covid & answered).sum()),
        "auc": auc_with_interval(covid[answered], p_covid[answered], patients[answered]),
    }


def _class_of(metric: str) -> str:
    return "non-COVID" if metric == "specificity" else POSITIVE


def check_target(metric: str, rate: dict | None, target: float, precision: float, present: int = 0) -> dict:
    """One target's status (pass, warn, fail, not measured) by ``RULES``, with the reason in words; ``present``:
    the readable images of the class the rate is measured on (to say why a rate is not measured)."""
    if rate is None:
        kind = _class_of(metric)
        why = f"no {kind} image" if not present else f"no {kind} image given an answer ({present} turned away)"
        return {"status": "not measured", "target": target, "reason": why}
    low, high, n = rate["low"], rate["high"], rate["n"]
    half = (high - low) / 2
    accepted = f"the {pct(target)} accepted"
    if high < target:
        status, reason = "fail", f"below {accepted}"
    elif low < target:
        status, reason = "warn", f"its interval straddles {accepted}"
    elif n < MIN_IMAGES:
        status, reason = "warn", f"only {n} {_class_of(metric)} images (fewer than {MIN_IMAGES})"
    elif half > precision:
        status = "warn"
        reason = (
            f"above {accepted}, but ±{pct(half)} is wider than the ±{pct(precision)} asked "
            f"(about {images_needed(rate['value'], precision)} {_class_of(metric)} images needed)"
        )
    else:
        status, reason = "pass", f"at or above {accepted}"
    return {"status": status, "target": target, "reason": reason}


def _metric_phrase(metric: str, rate: dict | None, check: dict) -> str:
    if rate is None:
        return f"{metric} not measured ({check['reason']})"
    shown = f"{metric} {pct(rate['value'])} ({100 * rate['low']:.1f}–{100 * rate['high']:.1f}%)"
    if metric == "specificity":
        detail = f"{rate['n'] - rate['successes']} of {rate['n']} non-COVID images called COVID-19"
    else:
        detail = f"{rate['successes']} of {rate['n']} COVID-19 images called COVID-19"
    return f"{shown} at the operating point, {check['reason']}: {detail}"


def _verdict(metrics: dict, checks: dict) -> tuple[str, str]:
    statuses = [check["status"] for check in checks.values()]
    if "fail" in statuses:
        verdict, head = STATUSES[0], STATUSES[0]
    elif all(status == "pass" for status in statuses):
        verdict, head = STATUSES[2], f"{STATUSES[2]} for a trial on this population"
    else:
        verdict, head = STATUSES[1], STATUSES[1]
    order = {"fail": 0, "warn": 1, "not measured": 2, "pass": 3}
    ranked = sorted(checks, key=lambda metric: order[checks[metric]["status"]])
    return verdict, f"{head}: " + "; ".join(_metric_phrase(m, metrics[m], checks[m]) for m in ranked)


def _calibration_bins(p_covid: np.ndarray, covid: np.ndarray) -> list[dict]:
    """Reliability of p(COVID-19): per equal-width bin, the mean p and the observed COVID-19 share (exact
    interval)."""
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    index = np.clip(np.digitize(p_covid, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    bins = []
    for b in range(CALIBRATION_BINS):
        inside = index == b
        n = int(inside.sum())
        if n == 0:
            continue
        rate = site_rate(int(covid[inside].sum()), n)
        bins.append(
            {
                "low_edge": float(edges[b]),
                "high_edge": float(edges[b + 1]),
                "n": n,
                "mean_p": float(p_covid[inside].mean()),
                "observed": rate.value,
                "observed_low": rate.low,
                "observed_high": rate.high,
            }
        )
    return bins


def _subgroups(frame: pd.DataFrame, readable: np.ndarray, measure) -> list[dict]:
    groups = []
    for column in SUBGROUP_COLUMNS:
        if column not in frame.columns:
            continue
        values = frame[column].str.strip()
        for value in sorted(set(values[readable & (values != "").to_numpy()])):
            rows = readable & (values == value).to_numpy()
            measured = measure(rows)
            answered = measured.pop("answered")
            groups.append(
                {
                    "column": column,
                    "value": value,
                    "images": int(rows.sum()),
                    "answered": answered,
                    "too_small": answered < MIN_SUBGROUP,
                    **measured,
                }
            )
    return groups


def _refuse_existing(out: Path) -> Path:
    target = out / "validation.json"
    if out.exists() and not out.is_dir():
        raise CovidxrError(f"{out}: not a folder; --out names the folder the report goes to")
    if target.exists():
        raise CovidxrError(f"{target}: already exists; choose another --out folder or remove it first")
    return target


def validate_site(
    run: Run,
    data: str | Path,
    out: str | Path,
    precision: float = PRECISION,
    min_specificity: float = 0.9,
    min_sensitivity: float = 0.8,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> Validation:
    """Predict the site's labelled images with ``run`` (and its site file, if ``with_site`` gave it one), measure
    them, judge them by ``RULES`` and write validation.json, validation.md, validation.html, the figures and
    predictions.csv into ``out``; the record."""
    from covidxr.lab.report.validation import write_validation_report

    for name, value in (("precision", precision), ("min-specificity", min_specificity)):
        if not 0 < value < 1:
            raise CovidxrError(f"--{name} must lie between 0 and 1 (exclusive), not {value}")
    if not 0 < min_sensitivity < 1:
        raise CovidxrError(f"--min-sensitivity must lie between 0 and 1 (exclusive), not {min_sensitivity}")
    root, out = Path(data), Path(out)
    target_file = _refuse_existing(out)
    frame = read_site_table(root)
    paths = [root / name for name in frame["filename"]]

    runner = make_engine(run, engine, cache_dir, threads)
    results = predict_files(run, paths, cache_dir, progress=progress, engine=runner)
    readable = np.array(["error" not in result for result in results])
    answered = np.array([result.get("label") is not None for result in results])
    truth = frame["label"].to_numpy(dtype=object)
    predicted = np.array([result.get("label") or "" for result in results], dtype=object)
    p_covid = np.array(
        [result["probabilities"][POSITIVE] if "probabilities" in result else np.nan for result in results]
    )
    if "patient_id" in frame.columns:
        patients = np.where(frame["patient_id"].str.strip() != "", frame["patient_id"], frame["filename"])
    else:
        patients = frame["filename"].to_numpy()
    patients = np.asarray(patients, dtype=str)

    def measure(rows: np.ndarray) -> dict:
        ok = answered & rows
        return {
            "answered": int(ok.sum()),
            **_measure(truth[rows], predicted[rows], p_covid[rows], ok[rows], patients[rows]),
        }

    covid = truth == POSITIVE
    everything = measure(np.ones(len(results), dtype=bool))
    everything.pop("answered")
    present = {"specificity": int((readable & (truth != POSITIVE)).sum()), "sensitivity": int((readable & covid).sum())}
    minimums = {"specificity": min_specificity, "sensitivity": min_sensitivity}
    checks = {
        metric: check_target(metric, everything[metric], minimums[metric], precision, present[metric])
        for metric in TARGET_METRICS
    }
    verdict, line = _verdict(everything, checks)
    columns = [*run.labels, NO_ANSWER]
    matrix = [
        [
            int(((truth == label) & readable & (np.where(answered, predicted, NO_ANSWER) == column)).sum())
            for column in columns
        ]
        for label in run.labels
    ]
    needed = {
        metric: None if everything[metric] is None else images_needed(everything[metric]["value"], precision)
        for metric in TARGET_METRICS
    }
    if run.site is None:
        point = {"covid_threshold": run.covid_threshold, "source": "model", "site": None}
        point["description"] = describe_operating_point(run.info.threshold_record)
    else:
        point = {"covid_threshold": run.covid_threshold, "source": "site", "site": run.site.path or run.site.site}
        point["description"] = describe_site(run.site)
    record = Validation.new(
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": str(root),
            "model": model_record(run),
            "operating_point": point,
            "targets": {"specificity": min_specificity, "sensitivity": min_sensitivity},
            "precision": precision,
            "confidence": CONFIDENCE,
            "verdict": verdict,
            "verdict_line": line,
            "checks": checks,
            "counts": {
                "images": len(results),
                "answered": int(answered.sum()),
                "no_answer": int((readable & ~answered).sum()),
                "unreadable": int((~readable).sum()),
                "by_label": {label: int((truth == label).sum()) for label in run.labels},
            },
            "metrics": everything,
            "confusion": {"rows": list(run.labels), "columns": columns, "matrix": matrix},
            "calibration": _calibration_bins(p_covid[answered], (truth == POSITIVE)[answered]),
            "subgroups": _subgroups(frame, readable, measure),
            "images_needed": needed,
            "no_answer": [
                {"file": name, "reason": result["no_answer_reason"]}
                for name, result in zip(frame["filename"], results, strict=True)
                if "error" not in result and result["label"] is None
            ],
            "unreadable": [
                {"file": name, "error": result["error"]}
                for name, result in zip(frame["filename"], results, strict=True)
                if "error" in result
            ],
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    identity = model_identity(run, runner)
    table = pd.DataFrame(
        [
            {"filename": name, "true_label": label, **flat_row(result, run.labels), "model": identity}
            for name, label, result in zip(frame["filename"], truth, results, strict=True)
        ]
    )
    table.to_csv(out / "predictions.csv", index=False)
    write_validation_report(out, record)
    record.save(target_file)
    logger.debug("validation of %s written to %s: %s", root, out, line)
    return record
