"""Temperature scaling and the COVID-19 operating threshold, both fitted on validation data only.

A network's softmax is usually over-confident; one temperature ``T`` (logits / T) fitted by
minimising the validation negative log-likelihood fixes most of that without changing any
prediction (Guo et al., 2017).

The COVID-19 operating threshold is the cut-off on the calibrated COVID-19 probability that
maximises Youden's J (sensitivity + specificity - 1) on the validation split, so the test set never
tunes it. It *is* the decision: an image is labelled COVID-19 when its probability reaches the
threshold, otherwise the more probable of the other classes (``decide``), so the label and the
COVID-19 call can never disagree. Runs made before this rule stored the highest cut-off reaching a
target sensitivity; that stored value stays their operating point (``describe_operating_point``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "ECE_BINS",
    "OperatingThreshold",
    "POSITIVE",
    "choose_threshold",
    "decide",
    "describe_operating_point",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_curve",
    "softmax",
]

YOUDEN = "youden"
ECE_BINS = 15
POSITIVE = "COVID-19"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (shifted by the row maximum, so it never overflows)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _log_softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in ``TEMPERATURE_BOUNDS`` that minimises the negative log-likelihood of ``targets``.

    When every validation image is classified correctly the likelihood keeps rising as T → 0, so
    the temperature is not identifiable: 1.0 (no change) is returned rather than a softmax sharpened
    as far as the bound allows.
    """
    if (logits.argmax(1) == targets).all():
        return 1.0
    from scipy.optimize import minimize_scalar  # fitting happens in training only

    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(targets))

    def nll(log_temperature: float) -> float:
        return float(-_log_softmax(logits / np.exp(log_temperature))[rows, targets].mean())

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    return float(np.exp(minimize_scalar(nll, bounds=(low, high), method="bounded").x))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| of the top-class prediction over equal-width confidence bins."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def reliability_curve(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (for the reliability diagram)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    curve: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            curve["confidence"].append(float(confidence[in_bin].mean()))
            curve["accuracy"].append(float(correct[in_bin].mean()))
            curve["count"].append(int(in_bin.sum()))
    return curve


@dataclass
class OperatingThreshold:
    """A cut-off on the calibrated COVID-19 probability, the rule that chose it and what it achieved on
    validation data."""

    value: float
    rule: str
    val_sensitivity: float | None
    val_specificity: float | None
    val_positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def choose_threshold(covid_probability: np.ndarray, is_covid: np.ndarray) -> OperatingThreshold:
    """The cut-off that maximises Youden's J on validation data (the highest such cut-off on ties;
    0.5 when the validation split lacks COVID-19 or other images, so J is undefined)."""
    positives = int(is_covid.sum())
    if positives == 0 or positives == len(is_covid):
        value = 0.5
    else:
        from sklearn.metrics import roc_curve  # fitting happens in training only

        false_positive_rate, true_positive_rate, cut_offs = roc_curve(is_covid, covid_probability)
        # roc_curve lists cut-offs from high to low, and argmax takes the first maximum: the highest.
        value = float(min(cut_offs[int(np.argmax(true_positive_rate - false_positive_rate))], 1.0))
    called = covid_probability >= value
    return OperatingThreshold(
        value=value,
        rule=YOUDEN,
        val_sensitivity=_rate(called[is_covid]),
        val_specificity=_rate(~called[~is_covid]),
        val_positives=positives,
    )


def describe_operating_point(stored: dict | None) -> str:
    """The rule behind a run's stored COVID-19 threshold, in words (also for runs made before the rule)."""
    if not stored:
        return "not recorded; 0.5 is used"
    if not stored.get("val_positives"):
        return "0.5 (the validation split had no COVID-19 image, so no cut-off could be chosen)"
    if stored.get("rule") == YOUDEN:
        return "the cut-off maximising Youden's J (sensitivity + specificity - 1) on the validation split"
    return (
        f"the highest cut-off reaching validation sensitivity {stored.get('target_sensitivity', 0.95):.0%} "
        "(the rule of runs made before covidxr chose by Youden's J; the stored value is kept)"
    )


def decide(probabilities: np.ndarray, labels: Sequence[str], threshold: float) -> np.ndarray:
    """The class index of each row: COVID-19 where its probability reaches ``threshold``, otherwise the
    more probable of the other classes. Label and COVID-19 call therefore agree by construction."""
    covid = list(labels).index(POSITIVE)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    others = probabilities.copy()
    others[:, covid] = -np.inf
    return np.where(probabilities[:, covid] >= threshold, covid, others.argmax(1))


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if len(hits) else None
