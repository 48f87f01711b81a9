"""Prediction: the one API behind ``covidxr predict``, ``evaluate`` and (later) the web service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from covidxr import DISCLAIMER
from covidxr.calibration import POSITIVE
from covidxr.data import read_image
from covidxr.features import compute_features
from covidxr.models import CovidxrNet
from covidxr.ood import is_blank
from covidxr.train import Run


@torch.no_grad()
def head_probabilities(model: CovidxrNet, features: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities of the trained head on pooled backbone features, logits divided by ``temperature``."""
    model.head.eval()
    return torch.softmax(model.head(torch.from_numpy(features)) / temperature, dim=1).numpy()


def predict_files(
    run: Run,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
) -> list[dict]:
    """One result per file — label and calibrated probabilities, or the error — continuing past bad files.

    ``covid_positive`` applies the run's COVID-19 threshold, chosen on validation data;
    ``out_of_distribution`` says whether the image is unlike the training X-rays (``covidxr.ood``;
    ``None`` for runs made before the guard existed).
    """
    model, labels = run.model, run.labels
    features, errors = compute_features(model, paths, cache_dir, batch_size, num_workers, progress)
    probabilities = head_probabilities(model, features, run.temperature)
    guard = run.ood_guard
    scores = guard.score(features) if guard is not None else None
    blank = {i for i, path in enumerate(paths) if i not in errors and guard is not None and is_blank(read_image(path))}
    covid = labels.index(POSITIVE)
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
                "covid_threshold": run.covid_threshold,
                "covid_positive": bool(probabilities[i, covid] >= run.covid_threshold),
                "out_of_distribution": None if scores is None else bool(scores[i] > guard.threshold or i in blank),
                "ood_score": None if scores is None else float(scores[i]),
                "disclaimer": DISCLAIMER,
            }
        )
    return results
