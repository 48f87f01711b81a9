"""Out-of-distribution guard: is this input like the chest X-rays the model was trained on?

A classifier answers one of its three classes for anything, a photo of a cat included. The guard
measures how far an image's backbone features lie from the training features and flags those
beyond a threshold chosen on the validation split.

The distance is a Mahalanobis distance in the leading principal components of the training
features plus the variance-normalised residual outside them (a full 1280x1280 covariance would be
poorly estimated from ~1,000 images and too large to ship with a model). Both parts are in
units of the training data's own spread, so the score is comparable across images. Nearly
uniform images, whose features can sit close to an X-ray's, are flagged from their pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from covidxr.runtime.errors import CovidxrError

__all__ = ["MARGIN", "OODGuard", "QUANTILE", "fit_guard", "is_blank"]

COMPONENTS = 32  # principal components kept (fewer when there are fewer training images)
QUANTILE = 0.99  # share of validation X-rays the threshold lets through
MARGIN = 1.25  # the threshold is this factor above that quantile, for images a little unlike validation
MIN_CONTRAST = 4.0  # standard deviation of every band below which an image is blank, not a radiograph
_LEVELS = np.arange(256, dtype=np.float64)


def is_blank(image: Image.Image) -> bool:
    """A nearly uniform image (blank, all white, a flat fill): its backbone features can sit close to
    an X-ray's, so the guard checks the pixels themselves. Every band's standard deviation is read from
    its histogram (computed in C: this runs for every image predicted)."""
    if image.mode not in {"L", "RGB"}:
        image = image.convert("RGB")
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256)
    total = counts.sum(axis=1)
    mean = counts @ _LEVELS / total
    variance = np.maximum(counts @ _LEVELS**2 / total - mean**2, 0.0)
    return bool(np.sqrt(variance).max() < MIN_CONTRAST)


@dataclass
class OODGuard:
    """Training-feature statistics and the validation-chosen threshold."""

    mean: np.ndarray
    components: np.ndarray  # (k, features), orthonormal rows
    variances: np.ndarray  # (k,) variance along each component
    residual_variance: float  # mean squared residual per remaining dimension
    threshold: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance of each feature vector from the training data (about 1 per dimension for typical ones)."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        projected = centred @ self.components.T
        residual = centred - projected @ self.components
        dims = self.mean.shape[0] - len(self.variances)
        inside = (projected**2 / self.variances).sum(1)
        outside = (residual**2).sum(1) / self.residual_variance
        return (inside + outside) / (len(self.variances) + dims)

    def flag(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) > self.threshold

    def save(self, path: str | Path) -> None:
        tensors = {
            "mean": self.mean,
            "components": self.components,
            "variances": self.variances,
            "residual_variance": np.array([self.residual_variance]),
            "threshold": np.array([self.threshold]),
        }
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> OODGuard:
        try:
            t = load_file(str(path))
            return cls(
                t["mean"], t["components"], t["variances"], float(t["residual_variance"][0]), float(t["threshold"][0])
            )
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CovidxrError(f"{path}: damaged out-of-distribution statistics ({type(exc).__name__})") from None


def fit_guard(train_features: np.ndarray, val_features: np.ndarray, components: int = COMPONENTS) -> OODGuard:
    """Statistics of the training features; threshold at ``MARGIN`` x the ``QUANTILE`` of validation scores."""
    train = np.asarray(train_features, dtype=np.float64)
    if len(train) < 3 or len(val_features) < 1:
        raise CovidxrError("the out-of-distribution guard needs at least 3 training and 1 validation image")
    mean = train.mean(0)
    centred = train - mean
    k = int(min(components, len(train) - 2))
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variances = singular[:k] ** 2 / (len(train) - 1) + 1e-12
    residual = centred - centred @ vt[:k].T @ vt[:k]
    residual_variance = float((residual**2).sum() / ((len(train) - 1) * (train.shape[1] - k))) + 1e-12
    guard = OODGuard(mean, vt[:k], variances, residual_variance, threshold=np.inf)
    guard.threshold = float(np.quantile(guard.score(val_features), QUANTILE) * MARGIN)
    return guard
