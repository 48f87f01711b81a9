"""``covidxr calibrate``: a hospital sets the model's operating point on its own labelled images (issue 23).

The site's images are predicted exactly as ``covidxr predict`` predicts them (``make_engine`` and
``predict_files``); then the COVID-19 threshold is chosen so that the target holds on them:

- ``specificity S``: the lowest threshold at which at most ``1 - S`` of the local non-COVID images are
  called COVID-19 (placed midway to the next higher score, not on an image's own score);
- ``sensitivity S``: the highest threshold at which at least ``S`` of the local COVID-19 images are.

Only images that get an answer count (an image the out-of-distribution guard or the lung check turns away
is never called COVID-19, whatever the threshold); they are counted in ``inputs``. The rates reached are
recorded with exact Clopper–Pearson 95% intervals (``scipy.stats.beta``) and their n; where the interval is
wider than ``PRECISION`` either side, one line says how many images a ±2% interval would need.

For ``covidxr monitor``, ``inputs`` also keeps every calibration image's p(COVID-19) and OOD score (sorted,
rounded to 5 decimals), the share flagged out of distribution, the share given no answer, the share of
the answered images called COVID-19 at the site threshold, and what the files themselves held: every image's
own width and height (sorted) and the count of images per bit depth (DICOM: BitsStored) and per mode.

An image that cannot be read (corrupt, truncated, empty, missing) is left out and listed, with its error, in
the site file's ``unreadable`` (as ``covidxr validate`` lists them); calibration goes on with the readable
images, and is refused in one line where fewer than ``MIN_IMAGES`` remain (or too few of a class the target or
the coverage needs).

With ``coverage 1 - α`` (``--coverage``, alone or with a target), split-conformal, class-conditional (Mondrian)
prediction sets are calibrated on the same answered images (``conformal_thresholds``): per class k, the LAC
score 1 − p_k of the site's class-k images gives the threshold q_k, so that a new class-k image's set holds k
with probability at least 1 − α (exchangeable images; marginally over the calibration draw).

Calibration moves the operating point; it cannot make the model rank cases it cannot tell apart: the
sensitivity that remains at the chosen specificity is what the model's ranking allows at this site.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import beta

from covidxr.lab.labels import LABELS, canonical_label
from covidxr.runtime.calibration import POSITIVE
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import predict_files
from covidxr.runtime.records.site import MIN_IMAGES
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.site import CONFORMAL_SCORE, METRICS, Rate, SiteCalibration, model_record

__all__ = [
    "CONFIDENCE",
    "MIN_IMAGES",
    "PRECISION",
    "QUANTILES",
    "calibrate_site",
    "choose_site_threshold",
    "clopper_pearson",
    "conformal_thresholds",
    "describe_unreadable",
    "images_needed",
    "read_site_data",
    "read_site_table",
    "site_rate",
]

CONFIDENCE = 0.95
PRECISION = 0.02  # half-width of the interval that a target is "supported" at
DECIMALS = 5  # the p(COVID-19) values and OOD scores kept in site.json for monitoring
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def clopper_pearson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper–Pearson) two-sided interval of a binomial share ``successes / n``."""
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def site_rate(successes: int, n: int) -> Rate:
    low, high = clopper_pearson(successes, n)
    return Rate(successes / n, low, high, successes, n)


def _half_width(rate: float, n: int) -> float:
    low, high = clopper_pearson(round(rate * n), n)
    return (high - low) / 2


def images_needed(rate: float, half_width: float = PRECISION) -> int:
    """About how many images give a Clopper–Pearson interval no wider than ``±half_width`` at ``rate``
    (the smallest such n, found by bisection; rounded up to ten)."""
    low, high = 1, 1
    while _half_width(rate, high) > half_width:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _half_width(rate, middle) <= half_width else (middle, high)
    return int(math.ceil(high / 10) * 10)


def choose_site_threshold(covid_probability: np.ndarray, metric: str, target: float) -> float:
    """The threshold on p(COVID-19) that reaches ``target`` on the given images: the non-COVID images'
    scores for ``specificity`` (at most ``1 - target`` at or above it), the COVID-19 images' for
    ``sensitivity`` (at least ``target`` at or above it). It lies midway between two neighbouring scores."""
    scores = np.sort(np.asarray(covid_probability, dtype=np.float64))[::-1]  # high to low
    n = len(scores)
    if metric == "specificity":
        allowed = int(math.floor((1 - target) * n + 1e-9))  # false COVID-19 calls the target allows
        if allowed >= n:
            return 0.0
        below = scores[allowed]  # the highest score that must not be called
        above = scores[scores > below]
        if len(above):
            return float((below + above.min()) / 2)
        return float(min((below + 1.0) / 2, 1.0)) if below < 1.0 else 1.0
    if metric == "sensitivity":
        needed = int(math.ceil(target * n - 1e-9))  # COVID-19 images that must be called
        if needed <= 0:
            return 1.0
        lowest = scores[needed - 1]  # the lowest score that must be called
        under = scores[scores < lowest]
        return float((lowest + under.max()) / 2) if len(under) else float(lowest / 2)
    raise CovidxrError(f"target must be one of {', '.join(METRICS)}, not {metric!r}")


class _Probabilities:
    """A prefit sklearn-style classifier whose "features" are the model's own probabilities (one row per
    image): MAPIE's split conformal classifier calls ``predict_proba`` and gets them back unchanged."""

    _estimator_type = "classifier"

    def __init__(self, classes: list[str]) -> None:
        self.classes_ = np.array(classes)

    def fit(self, X, y):  # noqa: N803 - never called (prefit)
        return self

    def predict_proba(self, X) -> np.ndarray:  # noqa: N803 - sklearn's name
        return np.asarray(X, dtype=np.float64)

    def predict(self, X) -> np.ndarray:  # noqa: N803
        return self.classes_[np.argmax(np.asarray(X), axis=1)]

    def __sklearn_is_fitted__(self) -> bool:
        return True


def conformal_thresholds(probabilities: np.ndarray, labels: list[str], classes: list[str], coverage: float) -> dict:
    """Per class k, the split-conformal threshold on the LAC score 1 − p_k computed by MAPIE
    (``SplitConformalClassifier``, prefit, ``conformity_score="lac"``) on that class's images only: the
    ceil((n_k + 1)·coverage)-th smallest score (MAPIE's finite-sample correction). MAPIE 1.6 has no
    class-conditional (Mondrian) mode, so it is conformalized once per class. A class with fewer images than
    MAPIE accepts (n_k < max(1/α, 1/(1 − α)); below 1/α − 1 no finite threshold exists) is refused in one line.
    ``{label: {"threshold", "n"}}`` in label order."""
    import warnings

    from mapie.classification import SplitConformalClassifier

    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(labels)
    result = {}
    alpha = 1 - coverage
    needed = int(math.ceil(max(1 / alpha, 1 / coverage) - 1e-9))
    for label in classes:
        rows = truth == label
        if rows.sum() < needed:
            raise CovidxrError(
                f"only {int(rows.sum())} {label} image(s): prediction sets for {coverage:g} coverage need at least "
                f"{needed} per class"
            )
        mapie = SplitConformalClassifier(_Probabilities(classes), confidence_level=coverage, conformity_score="lac")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fewer labels than training": one class at a time, by design
            mapie.conformalize(probabilities[rows], truth[rows])
            mapie.predict_set(probabilities[:1])  # MAPIE computes its quantile at the first prediction
        quantile = float(np.ravel(mapie._mapie_classifier.conformity_score_function_.quantiles_)[0])
        result[label] = {"threshold": min(quantile, 1.0), "n": int(rows.sum())}
    return result


def read_site_table(root: str | Path) -> pd.DataFrame:
    """A site's dataset folder's ``metadata.csv`` (every column as text, empty where unknown), checked: at least
    ``filename`` and ``label`` (one of the classes, any spelling covidxr knows, made canonical here), and
    file names inside the folder; anything else is one line naming the file and row."""
    root = Path(root)
    if not root.is_dir():
        raise CovidxrError(f"{root}: dataset folder not found")
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise CovidxrError(f"{root}: no metadata.csv (a table with at least the columns filename,label)")
    try:
        frame = pd.read_csv(metadata, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CovidxrError(f"{metadata}: not a readable CSV table ({type(exc).__name__})") from None
    missing = [column for column in ("filename", "label") if column not in frame.columns]
    if missing:
        raise CovidxrError(f"{metadata}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise CovidxrError(f"{metadata}: has no rows")
    labels = [canonical_label(value) for value in frame["label"]]
    for index, (value, label) in enumerate(zip(frame["label"], labels, strict=True)):
        if label is None:
            raise CovidxrError(
                f"{metadata} row {index + 2}: unknown label {value!r} (expected one of {', '.join(LABELS)})"
            )
    for index, name in enumerate(frame["filename"]):
        if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CovidxrError(f"{metadata} row {index + 2}: filename must be a path inside {root}")
    return frame.assign(label=labels)


def read_site_data(root: str | Path) -> tuple[list[Path], list[str]]:
    """A site's dataset folder: ``metadata.csv`` with at least ``filename`` and ``label`` (one of the
    classes, any spelling covidxr knows); its image paths and canonical labels."""
    frame = read_site_table(root)
    return [Path(root) / name for name in frame["filename"]], list(frame["label"])


def _needed_class(metric: str) -> str:
    return "non-COVID" if metric == "specificity" else POSITIVE


def _check_enough(root: Path, metric: str, count: int, what: str = "") -> None:
    flag, kind = f"--{metric}", _needed_class(metric)
    if count == 0:
        raise CovidxrError(f"{root}: no {kind} image{what}; {flag} is measured on {kind} images, so it needs some")
    if count < MIN_IMAGES:
        raise CovidxrError(
            f"{root}: only {count} {kind} image(s){what}; {flag} needs at least {MIN_IMAGES} "
            f"(and about {images_needed(0.95)} for a ±{PRECISION:.0%} interval at 95%)"
        )


def _check_classes(root: Path, labels: list[str], classes: list[str], what: str = "") -> None:
    """Prediction sets are calibrated per class: every class of the model needs ``MIN_IMAGES`` images."""
    counts = Counter(labels)
    present = [label for label in classes if counts[label]]
    if len(present) < 2:
        raise CovidxrError(
            f"{root}: images of {len(present)} class(es){what} ({', '.join(present) or 'none'}); --coverage "
            f"calibrates one threshold per class, so it needs images of every class ({', '.join(classes)})"
        )
    short = [f"{label} {counts[label]}" for label in classes if counts[label] < MIN_IMAGES]
    if short:
        raise CovidxrError(
            f"{root}: too few images{what} of {', '.join(short)}; --coverage needs at least {MIN_IMAGES} per class"
        )


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)}


def _counts(values) -> dict[str, int]:
    """How many images hold each value, the most frequent first."""
    return dict(Counter(values).most_common())


def describe_unreadable(unreadable: list[dict], shown: int = 3) -> str:
    """The unreadable images in a few words: the first ``shown`` errors (each names its file), and how many more."""
    text = "; ".join(item["error"] for item in unreadable[:shown])
    return text + (f"; and {len(unreadable) - shown} more" if len(unreadable) > shown else "")


def _sorted_values(values: list[float]) -> list[float]:
    return sorted(round(float(value), DECIMALS) for value in values)


def calibrate_site(
    run: Run,
    data: str | Path,
    metric: str | None,
    target: float | None,
    site_name: str | None = None,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = False,
    coverage: float | None = None,
) -> SiteCalibration:
    """Predict the site's labelled images with ``run`` (as ``covidxr predict`` does) and choose the COVID-19
    threshold that reaches ``target`` ``metric`` on them, and/or (``coverage``) the class-conditional conformal
    prediction sets; the record to save as ``site.json``. Without a metric the model's own threshold stays."""
    if metric is None and coverage is None:
        raise CovidxrError("give a target (--specificity S or --sensitivity S) and/or --coverage C")
    if metric is not None and metric not in METRICS:
        raise CovidxrError(f"target must be one of {', '.join(METRICS)}, not {metric!r}")
    if metric is not None and not 0 < target < 1:
        raise CovidxrError(f"the target {metric} must lie between 0 and 1 (exclusive), not {target}")
    if coverage is not None and not 0 < coverage < 1:
        raise CovidxrError(f"--coverage must lie between 0 and 1 (exclusive), not {coverage}")
    root = Path(data)
    paths, labels = read_site_data(root)
    is_covid = np.array([label == POSITIVE for label in labels])
    needed = ~is_covid if metric == "specificity" else is_covid
    if metric is not None:
        _check_enough(root, metric, int(needed.sum()))
    if coverage is not None:
        _check_classes(root, labels, run.labels)

    runner = make_engine(run, engine, cache_dir, threads)
    results = predict_files(run, paths, cache_dir, progress=progress, engine=runner)
    unreadable = [
        {"file": path.relative_to(root).as_posix(), "label": label, "error": result["error"]}
        for path, label, result in zip(paths, labels, results, strict=True)
        if "error" in result
    ]
    what = " given an answer by the model"
    if unreadable:
        readable = ["error" not in result for result in results]
        results = [result for result, ok in zip(results, readable, strict=True) if ok]
        labels = [label for label, ok in zip(labels, readable, strict=True) if ok]
        is_covid = np.array([label == POSITIVE for label in labels], dtype=bool)
        needed = ~is_covid if metric == "specificity" else is_covid
        what = f" readable and given an answer ({len(unreadable)} unreadable: {describe_unreadable(unreadable)})"
        if len(results) < MIN_IMAGES:
            raise CovidxrError(
                f"{root}: only {len(results)} of {len(paths)} image(s) readable; calibration needs at least "
                f"{MIN_IMAGES} ({describe_unreadable(unreadable)})"
            )
    answered = np.array([result["label"] is not None for result in results])
    p_covid = np.array([result["probabilities"][POSITIVE] for result in results])
    conformal = None
    if coverage is not None:
        kept = [label for label, ok in zip(labels, answered, strict=True) if ok]
        _check_classes(root, kept, run.labels, what)
        probabilities = np.array([[r["probabilities"][k] for k in run.labels] for r in results])[answered]
        classes = conformal_thresholds(probabilities, kept, list(run.labels), coverage)
        conformal = {"coverage": float(coverage), "score": CONFORMAL_SCORE, "classes": classes}
    if metric is not None:
        _check_enough(root, metric, int((needed & answered).sum()), what)
        threshold = choose_site_threshold(p_covid[needed & answered], metric, target)
    else:
        threshold = run.info.covid_threshold
    called = p_covid >= threshold
    achieved = {}
    negatives, positives = ~is_covid & answered, is_covid & answered
    if negatives.any():
        achieved["specificity"] = site_rate(int((~called & negatives).sum()), int(negatives.sum()))
    if positives.any():
        achieved["sensitivity"] = site_rate(int((called & positives).sum()), int(positives.sum()))
    note = None
    measured = achieved.get(metric) if metric is not None else None
    half_width = 0.0 if measured is None else (measured.high - measured.low) / 2
    if measured is not None and half_width > PRECISION:
        note = (
            f"{measured.n} {_needed_class(metric)} images give a {metric} interval of ±{half_width:.1%}; "
            f"{target:.0%} ± {PRECISION:.0%} needs about {images_needed(target)}"
        )
    scores = [result["ood_score"] for result in results if result["ood_score"] is not None]
    flagged = [bool(result["out_of_distribution"]) for result in results]
    facts = [result["image"] for result in results]
    return SiteCalibration(
        site=site_name or root.resolve().name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=model_record(run),
        counts=dict(sorted(Counter(label for label, ok in zip(labels, answered, strict=True) if ok).items())),
        target=None if metric is None else {"metric": metric, "value": float(target)},
        covid_threshold=threshold,
        run_threshold=run.info.covid_threshold,
        achieved=achieved,
        inputs={
            "images": len(results),
            "unanswered": int((~answered).sum()),
            "p_covid_quantiles": _quantiles(p_covid.tolist()),
            "ood_score_quantiles": _quantiles(scores),
            # What ``covidxr monitor`` compares later windows of predictions with (issue 23 part 4).
            "p_covid": _sorted_values(p_covid.tolist()),
            "ood_scores": _sorted_values(scores),
            "ood_rate": float(np.mean(flagged)),
            "no_answer_rate": float((~answered).mean()),
            "covid_share": float((called & answered).sum() / answered.sum()),
            # The files themselves (issue 23: image sizes and bit depths), compared by ``covidxr monitor`` too.
            "image_widths": sorted(int(image["width"]) for image in facts),
            "image_heights": sorted(int(image["height"]) for image in facts),
            "bit_depths": _counts(str(image["bit_depth"]) for image in facts),
            "modes": _counts(str(image["mode"]) for image in facts),
        },
        unreadable=unreadable,
        note=note,
        confidence=CONFIDENCE,
        conformal=conformal,
    )
