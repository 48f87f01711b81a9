"""One interface for every model covidxr can audit or run: a foreign ONNX graph with its spec, or a covidxr run.

``load_classifier(path)`` gives either kind. Both answer ``predict_proba(images)`` with the model's class
probabilities for decoded images (no out-of-distribution guard, no lung check: an audit must see what the
model itself says of a masked or perturbed image) and ``decide(probabilities)`` with the model's own labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from covidxr.runtime.calibration import POSITIVE, decide, softmax
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.spec import ModelOutputs, OnnxClassifier

__all__ = ["Classifier", "RunClassifier", "load_classifier"]


class Classifier(Protocol):
    """What an audit needs of a model."""

    kind: str

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def covid_index(self) -> int: ...

    @property
    def threshold(self) -> float | None: ...

    @property
    def identity(self) -> dict[str, str]: ...

    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 16) -> ModelOutputs: ...

    def decide(self, probabilities: np.ndarray) -> list[str | None]: ...


class RunClassifier:
    """A covidxr run folder as a ``Classifier``: its engine, its temperature and its operating threshold."""

    kind = "run"

    def __init__(self, path: str | Path, engine: str = "auto", threads: int | None = None):
        from covidxr.runtime.runners import head_digest, input_transform, make_engine
        from covidxr.runtime.runs import load_run

        self.run = load_run(path)
        self.engine = make_engine(self.run, engine, None, threads)
        self.transform = input_transform(self.run, self.engine)
        self._digest = head_digest(self.run)

    def __repr__(self) -> str:
        return f"RunClassifier({str(self.run.path)!r}, labels={list(self.labels)})"

    @property
    def name(self) -> str:
        return self.run.path.name

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.run.labels)

    @property
    def covid_index(self) -> int:
        return self.labels.index(POSITIVE)

    @property
    def threshold(self) -> float:
        return float(self.run.covid_threshold)

    @property
    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "head_sha256": self._digest}

    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 16) -> ModelOutputs:
        rows = []
        for start in range(0, len(images), batch_size):
            arrays = [
                self.transform.with_reason(image.convert("RGB"))[0] for image in images[start : start + batch_size]
            ]
            _, logits = self.engine(np.stack(arrays))
            rows.append(softmax(np.asarray(logits, dtype=np.float64), self.run.temperature))
        probabilities = np.concatenate(rows) if rows else np.zeros((0, len(self.labels)))
        finite = np.isfinite(probabilities).all(axis=1)
        probabilities[~finite] = np.nan
        reasons = [None if ok else "the model's output is not finite (NaN or Inf)" for ok in finite]
        return ModelOutputs(probabilities, reasons)

    def decide(self, probabilities: np.ndarray) -> list[str | None]:
        finite = np.isfinite(probabilities).all(axis=1)
        indices = decide(np.nan_to_num(probabilities), self.labels, self.threshold)
        return [self.labels[int(i)] if ok else None for i, ok in zip(indices, finite, strict=True)]


def load_classifier(path: str | Path, spec: str | Path | None = None, threads: int | None = None) -> Classifier:
    """A model to audit or run: ``MODEL.onnx`` (with ``MODEL.yaml`` beside it, or ``spec``) or a covidxr run folder."""
    path = Path(path)
    if path.is_dir():
        if spec is not None:
            raise CovidxrError(f"{path}: a covidxr run folder describes itself; --spec is for an ONNX graph")
        return RunClassifier(path, threads=threads)
    if path.suffix.lower() == ".onnx" or spec is not None:
        return OnnxClassifier(path, spec, threads)
    if not path.exists():
        raise CovidxrError(f"{path}: no such model (give MODEL.onnx with its spec, or a covidxr run folder)")
    raise CovidxrError(f"{path}: not a model covidxr can run (give MODEL.onnx with its spec, or a covidxr run folder)")
