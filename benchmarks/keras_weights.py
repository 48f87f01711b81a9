"""Keras weight import checked against Keras itself: the paper's three backbones, built by
``keras.applications`` with seeded random weights, saved in both file formats, imported with
``covidxr weights import``'s code and run by covidxr on real X-rays; prints the maximum relative error
of the pooled features (Keras' ``preprocess_input`` included) and the import time per backbone and format.

Keras runs on its torch backend (no TensorFlow). The helpers here are shared with
``tests/test_keras_weights.py``; the test asserts what this script measures.

    python benchmarks/keras_weights.py [--images 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported anywhere: no TensorFlow

REPO = Path(__file__).resolve().parents[1]
PAPER_BACKBONES = ("vgg16", "resnet50", "xception")
FORMATS = ("legacy-h5", "keras3")
TOLERANCE = 1e-4  # relative, as issue 25 asks

__all__ = [
    "FORMATS",
    "PAPER_BACKBONES",
    "TOLERANCE",
    "keras_backbone",
    "keras_features",
    "relative_error",
    "resized_pixels",
    "save_keras_weights",
]


def _applications(name: str):
    import keras

    return {
        "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input),
        "resnet50": (keras.applications.ResNet50, keras.applications.resnet50.preprocess_input),
        "xception": (keras.applications.Xception, keras.applications.xception.preprocess_input),
    }[name]


def keras_backbone(name: str, seed: int = 0, include_top: bool = False):
    """keras.applications' backbone (global-average pooled when without its top) with seeded random weights
    everywhere, BatchNorm statistics and convolution biases included, so the mapping of each array is
    checked (Keras' own initialisation leaves biases, means and offsets at 0 and variances at 1)."""
    import keras

    keras.utils.set_random_seed(seed)
    build, _ = _applications(name)
    model = build(include_top=include_top, weights=None, pooling=None if include_top else "avg")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        arrays = []
        for weight in layer.weights:
            shape, path = tuple(weight.shape), weight.path
            if path.endswith(("kernel", "depthwise_kernel", "pointwise_kernel")):
                fan_in = int(np.prod(shape[:-1])) if not path.endswith("depthwise_kernel") else shape[0] * shape[1]
                arrays.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))
            elif path.endswith(("gamma", "moving_variance")):
                arrays.append(rng.uniform(0.5, 1.5, shape))
            else:  # bias, beta, moving_mean
                arrays.append(rng.normal(0.0, 0.1, shape))
        if arrays:
            layer.set_weights([a.astype(np.float32) for a in arrays])
    return model


def save_keras_weights(model, folder: Path, file_format: str, stem: str) -> Path:
    """The model's weights as ``folder/stem`` in ``file_format``: Keras 3's ``save_weights``
    (``.weights.h5``) or Keras' legacy HDF5 writer (``keras.applications``' own ``.h5`` layout:
    ``layer_names``, and ``weight_names`` per layer group)."""
    folder.mkdir(parents=True, exist_ok=True)
    if file_format == "keras3":
        path = folder / f"{stem}.weights.h5"
        model.save_weights(path)
        return path
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = folder / f"{stem}.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return path


def resized_pixels(images: list, size: int) -> np.ndarray:
    """The RGB pixels both sides get: each decoded image resized to ``size`` as covidxr resizes it."""
    from PIL import Image

    return np.stack(
        [np.asarray(i.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32) for i in images]
    )


def keras_features(model, name: str, pixels: np.ndarray) -> np.ndarray:
    """Keras' pooled features of 0-255 RGB ``pixels``, after its own ``preprocess_input``."""
    import keras

    _, preprocess = _applications(name)
    return keras.ops.convert_to_numpy(model(preprocess(pixels.copy()), training=False))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference over the largest reference magnitude (features near zero stay meaningful)."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def covidxr_features(name: str, weights_dir: Path, images: list) -> tuple[np.ndarray, object]:
    """covidxr's pooled features of decoded ``images`` with the weights in ``weights_dir``: the model and its
    input transform (preprocessing included) chosen by the imported file, as ``train`` builds them."""
    import torch

    from covidxr.lab.models import create_model

    model = create_model(name, weights_dir=weights_dir)
    with torch.no_grad():
        batch = torch.stack([model.input_tensor(image) for image in images])
        return model.features(batch).numpy(), model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--images", type=int, default=3, help="real X-rays, one per class in turn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import tempfile

    import keras
    import pandas as pd

    from covidxr.lab.keras_weights import import_keras_weights
    from covidxr.runtime.images import read_image
    from machine import machine_lines  # run as a script beside machine.py, as every benchmark (the tests import
    # the helpers above as benchmarks.keras_weights, without this)

    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    rows = meta.groupby("label").head(-(-args.images // meta["label"].nunique())).head(args.images)
    images = [read_image(args.data / f) for f in rows["filename"]]
    print(machine_lines())
    print(f"  Keras:       {keras.__version__} on its {keras.backend.backend()} backend")
    print(f"{len(images)} real X-rays from {args.data} ({', '.join(rows['label'])}); seed {args.seed}")
    print(f"{'backbone':10s} {'format':10s} {'import s':>9s} {'max rel. error':>15s}  preprocessing, variant")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in PAPER_BACKBONES:
            model = keras_backbone(name, args.seed)
            size = 299 if name == "xception" else 224  # keras.applications' default input sizes
            reference = keras_features(model, name, resized_pixels(images, size))
            for file_format in FORMATS:
                source = save_keras_weights(model, Path(tmp) / "keras", file_format, f"{name}_notop")
                result = import_keras_weights(source, name, Path(tmp) / file_format)
                ours, built = covidxr_features(name, Path(tmp) / file_format, images)
                error = relative_error(ours, reference)
                worst = max(worst, error)
                print(
                    f"{name:10s} {file_format:10s} {result.seconds:9.2f} {error:15.2e}  "
                    f"{built.weights.preprocessing}, {built.weights.variant}"
                )
    print(f"largest error {worst:.2e} (tolerance {TOLERANCE:.0e}): {'within' if worst <= TOLERANCE else 'OVER'}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
