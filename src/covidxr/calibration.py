"""Temperature scaling and the COVID-19 operating threshold, both fitted on validation data only.

A network's softmax is usually over-confident; one temperature ``T`` (logits / T) fitted by
minimising the validation negative log-likelihood fixes most of that without changing any
prediction (Guo et al., 2017). The COVID-19 threshold is the highest probability cut-off that
still reaches the target sensitivity on validation data, so the test set never tunes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

TARGET_SENSITIVITY = 0.95
ECE_BINS = 15
POSITIVE = "COVID-19"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in ``TEMPERATURE_BOUNDS`` that minimises the negative log-likelihood of ``targets``.

    When every validation image is classified correctly the likelihood keeps rising as T → 0, so
    the temperature is not identifiable: 1.0 (no change) is returned rather than a softmax sharpened
    as far as the bound allows.
    """
    if (logits.argmax(1) == targets).all():
        return 1.0
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    targets_t = torch.as_tensor(targets, dtype=torch.long)

    def nll(log_temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits_t / np.exp(log_temperature), targets_t))

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
    """A cut-off on the calibrated COVID-19 probability, with what it achieved on validation data."""

    value: float
    target_sensitivity: float
    val_sensitivity: float | None
    val_specificity: float | None
    val_positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def choose_threshold(
    covid_probability: np.ndarray, is_covid: np.ndarray, target: float = TARGET_SENSITIVITY
) -> OperatingThreshold:
    """The highest cut-off whose validation sensitivity reaches ``target`` (0.5 when there are no positives)."""
    positives = int(is_covid.sum())
    if positives == 0:
        return OperatingThreshold(0.5, target, None, _rate(covid_probability[~is_covid] < 0.5), 0)
    scores = np.sort(covid_probability[is_covid])[::-1]
    needed = int(np.ceil(target * positives))
    value = float(scores[needed - 1])
    return OperatingThreshold(
        value=value,
        target_sensitivity=target,
        val_sensitivity=_rate(covid_probability[is_covid] >= value),
        val_specificity=_rate(covid_probability[~is_covid] < value),
        val_positives=positives,
    )


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if len(hits) else None
