"""Prediction: the one API behind ``covidxr predict``, ``evaluate`` and (later) the web service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from covidxr import DISCLAIMER
from covidxr.features import compute_features, extract_features
from covidxr.models import CovidxrNet


@torch.no_grad()
def head_probabilities(model: CovidxrNet, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities of the trained head on pooled backbone features."""
    model.head.eval()
    return torch.softmax(model.head(torch.from_numpy(features)), dim=1).numpy()


def predict_probabilities(
    model: CovidxrNet,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Class probabilities for every file; stops with a clear error on an unreadable one."""
    return head_probabilities(model, extract_features(model, paths, cache_dir, batch_size, num_workers, progress))


def predict_files(
    model: CovidxrNet,
    labels: Sequence[str],
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
) -> list[dict]:
    """One result per file — label and probabilities, or the error — continuing past bad files."""
    features, errors = compute_features(model, paths, cache_dir, batch_size, num_workers, progress)
    probabilities = head_probabilities(model, features)
    results = []
    for i, path in enumerate(paths):
        if i in errors:
            results.append({"file": str(path), "error": errors[i]})
            continue
        results.append(
            {
                "file": str(path),
                "label": labels[int(probabilities[i].argmax())],
                "probabilities": {label: float(p) for label, p in zip(labels, probabilities[i], strict=True)},
                "disclaimer": DISCLAIMER,
            }
        )
    return results
