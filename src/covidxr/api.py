"""The Python API: ``covidxr.load_model(run)`` → ``model.predict(images)`` / ``model.explain(images)``.

Images may be file paths (PNG, JPEG, TIFF, DICOM) or decoded images (PIL images or HxW / HxWx3
uint8 arrays). Every result carries the research-use disclaimer. The command line is built on
the same functions (``covidxr.inference``), so both answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covidxr.card import default_model_path
from covidxr.data import read_image
from covidxr.errors import CovidxrError
from covidxr.explain import METHODS, Explainer, overlay
from covidxr.inference import answer, make_engine, predict_files
from covidxr.ood import is_blank
from covidxr.train import Run, load_run

ImageLike = str | Path | Image.Image | np.ndarray


def _as_image(item: ImageLike) -> Image.Image:
    if isinstance(item, str | Path):
        return read_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise CovidxrError(f"an image array must be uint8 HxW or HxWx3, not {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


class Model:
    """A trained covidxr model, ready to predict and explain."""

    def __init__(self, run: Run, engine: str = "auto", cache_dir: str | Path | None = None, threads: int | None = None):
        self.run, self.cache_dir = run, cache_dir
        self.engine = make_engine(run, engine, cache_dir, threads)

    @property
    def labels(self) -> list[str]:
        return self.run.labels

    def predict(self, images: Sequence[ImageLike], batch_size: int = 32) -> list[dict]:
        """Label, calibrated probabilities, COVID-19 threshold decision and out-of-distribution flag per image.

        File paths are read in batches and an unreadable file gets ``error`` instead of a label; for
        decoded images a bad one raises ``CovidxrError``.
        """
        if all(isinstance(item, str | Path) for item in images):
            return predict_files(self.run, list(images), self.cache_dir, batch_size, progress=False, engine=self.engine)
        decoded = [_as_image(item) for item in images]
        results = []
        for start in range(0, len(decoded), batch_size):
            batch = decoded[start : start + batch_size]
            features, logits = self.engine(torch.stack([self.run.model.input_tensor(image) for image in batch]))
            results += answer(self.run, features, logits, [is_blank(image) for image in batch])
        return results

    def explain(self, images: Sequence[ImageLike], method: str = "gradcam") -> list[dict]:
        """``predict``'s answer plus the class activation map (``map``, input-sized floats in [0, 1])
        for the predicted class and its ``overlay`` on the image (a PIL image). Explanations need
        gradients, so they always run in torch."""
        if method not in METHODS:
            raise CovidxrError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        decoded = [_as_image(item) for item in images]
        results = self.predict(decoded)
        explainer = Explainer(self.run.model, method)
        inputs = torch.stack([self.run.model.input_tensor(image) for image in decoded])
        classes = [self.labels.index(result["label"]) for result in results]
        maps = explainer(inputs, classes)
        for result, image, cam in zip(results, decoded, maps, strict=True):
            result |= {"method": method, "map": cam, "overlay": overlay(self.run.model.pipeline(image), cam)}
        return results


def load_model(
    path: str | Path | None = None,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Model:
    """A trained model from a run folder (``covidxr train`` / ``reproduce`` output), or with no path
    the model bundled with the package (see its card: ``covidxr model-card``).

    ``engine``: ``auto`` (onnxruntime on a CPU where it is installed, else torch), ``torch`` or ``onnx``;
    ``threads``: onnxruntime's intra-op threads (default: the physical cores)."""
    return Model(load_run(path if path is not None else default_model_path()), engine, cache_dir, threads)
