"""Engines: what turns a batch of preprocessed images into backbone features and logits.

Both engines answer the same question, ``engine(inputs) -> (features, logits)``, so prediction,
the out-of-distribution guard and (later) the web service do not care which one runs:

- ``TorchEngine`` runs the model in PyTorch (channels-last on CPU), and is what Grad-CAM needs;
- ``OnnxEngine`` runs the same graph exported to ONNX in onnxruntime, several times faster on CPU.

``export_onnx`` writes one graph, preprocessed image batch → (pooled features, logits), with a
dynamic batch axis, plus a JSON sidecar holding everything else a user of the graph needs: labels,
the image pipeline and normalisation (done outside the graph, by ``InputTransform``), the
calibration temperature and the COVID-19 threshold. Exports are cached under
``<cache>/onnx/<key>.onnx``, keyed by the model key, the head's weights, the opset and the
onnxruntime version, and checked against their sidecar before use: a stale or damaged export is
rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidxr import DISCLAIMER
from covidxr.cache import default_cache_dir
from covidxr.errors import CovidxrError
from covidxr.models import CovidxrNet, hash_state_dict

OPSET = 17
ENGINES = ("torch", "onnx")


class TorchEngine:
    """The model itself, in inference mode."""

    name = "torch"

    def __init__(self, model: CovidxrNet):
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(inputs).contiguous(memory_format=torch.channels_last)
        features = self.model.features(x)
        return features.float().numpy(), self.model.head(features).float().numpy()


class _FeaturesAndLogits(nn.Module):
    def __init__(self, model: CovidxrNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return features, self.model.head(features)


def export_key(model: CovidxrNet) -> dict:
    """Everything the exported graph depends on."""
    import onnxruntime

    return {
        "model_key": model.model_key(),
        "head_sha256": hash_state_dict(model.head.state_dict()),
        "opset": OPSET,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def sidecar(model: CovidxrNet, labels: list[str], temperature: float, covid_threshold: float) -> dict:
    return {
        "format": "covidxr-onnx-1",
        "inputs": {"image": "float32 [batch, 3, size, size]: the output of covidxr's InputTransform"},
        "outputs": {"features": "pooled backbone features", "logits": "class logits before temperature"},
        "image_size": model.image_size,
        "pipeline": model.pipeline.to_dict(),
        "normalisation": model.preprocessing.to_dict(),
        "labels": labels,
        "temperature": temperature,
        "covid_threshold": covid_threshold,
        "key": export_key(model),
        "disclaimer": DISCLAIMER,
    }


def export_onnx(model: CovidxrNet, path: str | Path, info: dict) -> Path:
    """Write the graph and its sidecar (``<path>.json``); the graph is checked by onnx before it is kept."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    example = torch.zeros(2, 3, model.image_size, model.image_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
            torch.onnx.export(
                _FeaturesAndLogits(model.eval()),
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["features", "logits"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(tmp))
    except Exception as exc:  # the exporter raises many types; any of them means no usable graph
        tmp.unlink(missing_ok=True)
        raise CovidxrError(f"{model.spec.name}: could not be exported to ONNX ({type(exc).__name__}: {exc})") from None
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


class OnnxEngine:
    """An exported graph run by onnxruntime, on ``threads`` intra-op threads (default: all cores)."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise CovidxrError("the onnx engine needs onnxruntime: pip install onnxruntime") from None
        cores = os.cpu_count() or 1
        if threads is not None and not 1 <= threads <= cores:
            raise CovidxrError(f"threads must be between 1 and {cores} (the cores of this machine), not {threads}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or cores
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise CovidxrError(f"{path}: not a usable ONNX graph ({type(exc).__name__})") from None

    def __call__(self, inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))
        features, logits = self.session.run(["features", "logits"], {"image": x})
        return features, logits


def cached_export(model: CovidxrNet, info: dict, cache_dir: str | Path | None = None) -> Path:
    """The export for this model from the cache, rebuilt when missing, stale or damaged."""
    key = json.loads(json.dumps(info["key"]))  # as the sidecar stores it (tuples become lists)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / "onnx" / f"{digest}.onnx"
    try:
        valid = path.is_file() and json.loads(path.with_suffix(".json").read_text())["key"] == key
        if valid:
            OnnxEngine(path, threads=1)  # loads, so a damaged file is caught here
    except (OSError, ValueError, KeyError, CovidxrError):
        valid = False
    return path if valid else export_onnx(model, path, info)
