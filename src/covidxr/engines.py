"""Engines: what turns a batch of preprocessed images into backbone features (and logits).

Every frozen-backbone path of covidxr (the feature cache, prediction, the out-of-distribution
features, the web service) spends nearly all its time in this one forward pass, so the engine
decides how fast covidxr is on a CPU:

- ``TorchEngine`` runs the model in PyTorch (channels-last on CPU); Grad-CAM and fine-tuning, which
  need gradients, always use torch;
- ``OnnxEngine`` runs the same graph exported to ONNX in onnxruntime, several times faster on CPU.

``--engine auto`` (the default) picks onnxruntime on a CPU where it is installed and the model
exports cleanly, torch otherwise (and always torch on a GPU); ``resolve_engine`` says which.

Two graphs are exported, both with a dynamic batch axis and the preprocessing (pipeline, resize,
normalisation: ``InputTransform``) outside the graph, in the decoding workers:

- the *backbone* graph, preprocessed image → pooled features, for the feature cache; it depends
  only on the backbone, so it serves every head trained on it (``feature_engine``);
- the *run* graph, preprocessed image → (features, logits), for prediction (``make_engine`` in
  ``covidxr.inference``, ``covidxr export``), with a JSON sidecar holding labels, the image pipeline,
  normalisation, the calibration temperature and the COVID-19 threshold.

Exports are cached under ``<cache>/onnx/<key>.onnx``, keyed by the model key (model, weights hash,
preprocessing, input size), the head's weights for the run graph, the opset and the onnxruntime and
torch versions, and checked against their sidecar (key and the graph's SHA-256) and loaded before use:
a stale, damaged or altered export is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidxr import DISCLAIMER
from covidxr.cache import default_cache_dir
from covidxr.config import ENGINES
from covidxr.errors import CovidxrError
from covidxr.models import CovidxrNet, hash_state_dict

OPSET = 17
logger = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's arithmetic units, so intra-op
    threads beyond the physical cores only add contention)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return usable
    cores = {
        (block.split("physical id")[1].split("\n")[0], block.split("core id")[1].split("\n")[0])
        for block in text.split("\n\n")
        if "physical id" in block and "core id" in block
    }
    return max(1, min(usable, len(cores) or usable))


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(requested: str, model: CovidxrNet | None = None) -> str:
    """``torch`` or ``onnx`` for a requested ``auto``, ``torch`` or ``onnx``.

    ``auto`` is onnxruntime on a CPU where it is installed, torch otherwise (and on a GPU, where
    PyTorch already runs at the device's speed). An explicit ``onnx`` without onnxruntime is refused.
    """
    if requested not in ENGINES:
        raise CovidxrError(f"engine must be one of {', '.join(ENGINES)}, not {requested!r}")
    on_gpu = model is not None and any(p.device.type != "cpu" for p in model.parameters())
    if requested == "onnx":
        if not onnxruntime_available():
            raise CovidxrError("the onnx engine needs onnxruntime: pip install onnxruntime (or use --engine torch)")
        if on_gpu:
            raise CovidxrError("the onnx engine runs on the CPU; this model is on a GPU: use --engine torch")
        return "onnx"
    if requested == "auto":
        return "onnx" if onnxruntime_available() and not on_gpu else "torch"
    return "torch"


class TorchEngine:
    """The model itself, in inference mode."""

    name = "torch"

    def __init__(self, model: CovidxrNet):
        self.model = model.eval()
        self.description = f"torch {torch.__version__} (channels-last, {torch.get_num_threads()} threads)"

    @torch.inference_mode()
    def features(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Pooled backbone features of a preprocessed batch."""
        x = torch.as_tensor(inputs).contiguous(memory_format=torch.channels_last)
        return self.model.features(x).float().numpy()

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = self.features(inputs)
        return features, self.model.head(torch.from_numpy(features)).float().numpy()


class _Features(nn.Module):
    def __init__(self, model: CovidxrNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class _FeaturesAndLogits(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return features, self.model.head(features)


def export_key(model: CovidxrNet, with_head: bool = True) -> dict:
    """Everything an exported graph depends on (the head only where the graph includes it)."""
    import onnxruntime

    key = {
        "model_key": model.model_key(),
        "graph": "features+logits" if with_head else "features",
        "opset": OPSET,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }
    if with_head:
        key["head_sha256"] = hash_state_dict(model.head.state_dict())
    return key


def backbone_sidecar(model: CovidxrNet) -> dict:
    """The sidecar of the backbone graph (features only, shared by every head on this backbone)."""
    return {
        "format": "covidxr-onnx-features-1",
        "inputs": {"image": "float32 [batch, 3, size, size]: the output of covidxr's InputTransform"},
        "outputs": {"features": "pooled backbone features"},
        "image_size": model.image_size,
        "pipeline": model.pipeline.to_dict(),
        "normalisation": model.preprocessing.to_dict(),
        "key": export_key(model, with_head=False),
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
    """Write the graph ``info`` describes (the run graph, or the backbone graph for a
    ``backbone_sidecar``) and its sidecar (``<path>.json``); the graph is checked by onnx before it is kept."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    example = torch.zeros(2, 3, model.image_size, model.image_size)
    with_head = info["key"]["graph"] != "features"
    module = (_FeaturesAndLogits if with_head else _Features)(model)
    outputs = ["features", "logits"] if with_head else ["features"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
            torch.onnx.export(
                module.eval(),
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(tmp))
    except Exception as exc:  # the exporter raises many types; any of them means no usable graph
        tmp.unlink(missing_ok=True)
        raise CovidxrError(f"{model.spec.name}: could not be exported to ONNX ({type(exc).__name__}: {exc})") from None
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({**info, "sha256": graph_sha256(path)}, indent=2))
    return path


def graph_sha256(path: str | Path) -> str:
    """The SHA-256 of an exported graph, kept in its sidecar: bytes changed in place (same size, and
    still a loadable graph) would otherwise change predictions silently."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxEngine:
    """An exported graph run by onnxruntime on ``threads`` intra-op threads (default: the physical cores).

    ``spin=False`` stops idle onnxruntime threads from busy-waiting between calls: where decoding
    workers share the cores with the session (``predict`` over folders, feature extraction), spinning
    threads would take the workers' CPU time.
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        try:
            import onnxruntime
        except ImportError:
            raise CovidxrError("the onnx engine needs onnxruntime: pip install onnxruntime") from None
        cores = os.cpu_count() or 1
        if threads is not None and not 1 <= threads <= cores:
            raise CovidxrError(f"threads must be between 1 and {cores} (the cores of this machine), not {threads}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise CovidxrError(f"{path}: not a usable ONNX graph ({type(exc).__name__})") from None
        self.path = Path(path)
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.description = f"onnxruntime {onnxruntime.__version__} (CPU, {options.intra_op_num_threads} threads)"

    def _run(self, names: list[str], inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        return self.session.run(names, {"image": np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))})

    def features(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Pooled backbone features of a preprocessed batch."""
        return self._run(["features"], inputs)[0]

    def __call__(self, inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "logits" not in self.outputs:
            raise CovidxrError("this ONNX graph holds the backbone only (no head): it gives features, not logits")
        features, logits = self._run(["features", "logits"], inputs)
        return features, logits


def cached_export(model: CovidxrNet, info: dict, cache_dir: str | Path | None = None) -> Path:
    """The export ``info`` describes, from the cache; rebuilt when missing, stale, damaged or altered
    (its bytes no longer match the SHA-256 its sidecar recorded; checked on every load, ~20 ms)."""
    key = json.loads(json.dumps(info["key"]))  # as the sidecar stores it (tuples become lists)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / "onnx" / f"{digest}.onnx"
    try:
        stored = json.loads(path.with_suffix(".json").read_text()) if path.is_file() else {}
        valid = stored.get("key") == key and stored.get("sha256") == graph_sha256(path)
        if valid:
            OnnxEngine(path, threads=1)  # loads, so a damaged file is caught here
    except (OSError, ValueError, KeyError, AttributeError, CovidxrError):
        valid = False
    if not valid and path.is_file():
        logger.warning("the cached export %s is stale or altered; rebuilding it", path)
    return path if valid else export_onnx(model, path, info)


def export_or_fallback(model: CovidxrNet, info: dict, requested: str, cache_dir: str | Path | None) -> Path | None:
    """The cached export ``info`` describes; where it cannot be made, an error for an explicit ``onnx``,
    and for ``auto`` one line on stderr and ``None`` (the caller runs torch)."""
    try:
        return cached_export(model, info, cache_dir)
    except CovidxrError as exc:
        if requested == "onnx":
            raise
        print(f"covidxr: {exc}; running it with torch instead", file=sys.stderr)
        return None


_feature_engines: dict[str, OnnxEngine | None] = {}  # None: the export failed, torch it is


def feature_engine(
    model: CovidxrNet, requested: str = "auto", cache_dir: str | Path | None = None
) -> TorchEngine | OnnxEngine:
    """The engine that computes this model's backbone features (for the feature cache), made once per
    process, model key and cache folder.

    With ``auto``, a backbone that cannot be exported gets one line on stderr and runs in torch; an
    explicit ``onnx`` that cannot be exported is an error. Backbones being fine-tuned always use torch.
    """
    resolved = "torch" if model.trainable_backbone else resolve_engine(requested, model)
    if resolved == "torch":
        return TorchEngine(model)
    memo = json.dumps([model.model_key(), str(Path(cache_dir or default_cache_dir()).resolve())], sort_keys=True)
    if memo not in _feature_engines:
        path = export_or_fallback(model, backbone_sidecar(model), requested, cache_dir)
        _feature_engines[memo] = None if path is None else OnnxEngine(path, spin=False)
    return _feature_engines[memo] or TorchEngine(model)
