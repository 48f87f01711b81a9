"""Exporting models to ONNX graphs, and the torch engine (training install).

Two graphs are exported, both with a dynamic batch axis and the preprocessing (pipeline, resize,
normalisation: ``InputTransform``) outside the graph, in the decoding threads:

- the *backbone* graph, preprocessed image → pooled features, for the feature cache; it depends
  only on the backbone, so it serves every head trained on it (``feature_engine``);
- the *run* graph, preprocessed image → (features, logits, Grad-CAM activations), for prediction
  (``covidxr.runtime.runners.make_engine``, ``covidxr export``), with a JSON sidecar holding labels, the image
  pipeline, normalisation, the calibration temperature and the COVID-19 threshold. ``covidxr export``
  writes it into the run folder (the bundled model ships it), so prediction then needs no torch.

Exports are cached under ``<cache>/onnx/<key>.onnx``, keyed by the model key (model, weights hash,
preprocessing, input size), the head's weights for the run graph, the opset and the onnxruntime and
torch versions, and checked against their sidecar (key and the graph's SHA-256) and loaded before use:
a stale, damaged or altered export is rebuilt, never silently used.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidxr import DISCLAIMER
from covidxr.lab.cache import default_cache_dir
from covidxr.lab.models import CovidxrNet, StagedHead, hash_state_dict, run_model
from covidxr.runtime.engines import ENGINES, GRAPH_FILE, OnnxEngine, graph_sha256, onnxruntime_available
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import ModelSidecar
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import atomic_path, stable_digest

__all__ = [
    "torch_runner",
    "TorchEngine",
    "backbone_sidecar",
    "cached_export",
    "export_onnx",
    "export_or_fallback",
    "export_run_graph",
    "feature_engine",
    "resolve_engine",
    "sidecar",
]

OPSET = 17
logger = logging.getLogger(__name__)


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
        self.input_transform = model.input_transform
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


class _RunGraph(_Features):
    """Image → features, logits and, where ``covidxr.runtime.cam`` can use them, the Grad-CAM layer's activations."""

    def __init__(self, model: CovidxrNet):
        super().__init__(model)
        self.captured: list[torch.Tensor] = []
        self.layer = cam_layer(model)
        if self.layer is not None:
            self.layer.register_forward_hook(lambda module, inputs, output: self.captured.append(output))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.captured.clear()
        features = self.model.features(x)
        logits = self.model.head(features)
        return (features, logits, self.captured[-1]) if self.layer is not None else (features, logits)


def cam_layer(model: CovidxrNet) -> nn.Module | None:
    """The Grad-CAM layer where the numpy Grad-CAM applies (an elementwise step between it and the pooling,
    and the dense head), else None."""
    if model.spec.cam_activation is None or isinstance(model.head, StagedHead):
        return None
    return model.backbone.body.get_submodule(model.spec.gradcam_layer)


def export_key(model: CovidxrNet, with_head: bool = True) -> dict:
    """Everything an exported graph depends on (the head only where the graph includes it)."""
    import onnxruntime

    key = {
        "model_key": model.model_key(),
        "graph": "features",
        "opset": OPSET,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }
    if with_head:
        key["graph"] = "features+logits+activations" if cam_layer(model) is not None else "features+logits"
        key["head_sha256"] = hash_state_dict(model.head.state_dict())
    return key


def backbone_sidecar(model: CovidxrNet) -> dict:
    """The sidecar of the backbone graph (features only, shared by every head on this backbone)."""
    return ModelSidecar(
        format="covidxr-onnx-features-1",
        inputs={"image": "float32 [batch, 3, size, size]: the output of covidxr's InputTransform"},
        outputs={"features": "pooled backbone features"},
        image_size=model.image_size,
        pipeline=model.pipeline.to_dict(),
        normalisation=model.preprocessing.to_dict(),
        key=export_key(model, with_head=False),
    ).to_dict()


def sidecar(model: CovidxrNet, labels: list[str], temperature: float, covid_threshold: float) -> dict:
    """The run graph's sidecar: what the runtime needs to predict with the graph alone (and, where the graph
    holds them, how its Grad-CAM activations reach the pooled features)."""
    outputs = {"features": "pooled backbone features", "logits": "class logits before temperature"}
    cam = None
    if cam_layer(model) is not None:
        outputs["activations"] = f"output of the Grad-CAM layer {model.spec.gradcam_layer} [batch, channels, h, w]"
        cam = {"layer": model.spec.gradcam_layer, "activation": model.spec.cam_activation}
    return ModelSidecar(
        format="covidxr-onnx-1",
        model=model.spec.name,
        inputs={"image": "float32 [batch, 3, size, size]: the output of covidxr's InputTransform"},
        outputs=outputs,
        cam=cam,
        image_size=model.image_size,
        pipeline=model.pipeline.to_dict(),
        normalisation=model.preprocessing.to_dict(),
        labels=labels,
        temperature=temperature,
        covid_threshold=covid_threshold,
        key=export_key(model),
        disclaimer=DISCLAIMER,
    ).to_dict()


def export_onnx(model: CovidxrNet, path: str | Path, info: dict) -> Path:
    """Write the graph ``info`` describes (the run graph, or the backbone graph for a
    ``backbone_sidecar``) and its sidecar (``<path>.json``); the graph is checked by onnx before it is kept."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, model.image_size, model.image_size)
    with_head = info["key"]["graph"] != "features"
    module = _RunGraph(model) if with_head else _Features(model)
    outputs = list(info["outputs"])
    with atomic_path(path) as tmp:
        try:
            # The exporter's deprecation and tracer notes are not the user's concern.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
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
            why = f"{type(exc).__name__}: {exc}"
            raise CovidxrError(f"{model.spec.name}: could not be exported to ONNX ({why})") from None
    path.with_suffix(".json").write_text(json.dumps({**info, "sha256": graph_sha256(path)}, indent=2))
    return path


def cached_export(model: CovidxrNet, info: dict, cache_dir: str | Path | None = None) -> Path:
    """The export ``info`` describes, from the cache; rebuilt when missing, stale, damaged or altered
    (its bytes no longer match the SHA-256 its sidecar recorded; checked on every load, ~20 ms)."""
    key = json.loads(json.dumps(info["key"]))  # as the sidecar stores it (tuples become lists)
    digest = stable_digest(key)[:24]
    path = Path(cache_dir or default_cache_dir()) / "onnx" / f"{digest}.onnx"
    try:
        stored = ModelSidecar.load(path.with_suffix(".json")) if path.is_file() else None
        valid = stored is not None and stored.key == key and stored.sha256 == graph_sha256(path)
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
        logger.warning("%s; running it with torch instead", exc)
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


def export_run_graph(run: Run, out: str | Path | None = None) -> Path:
    """Write the run graph and its sidecar to ``out`` (default: the run folder's ``model.onnx``, where
    ``covidxr.runtime.runners.make_engine`` finds it and predicts without torch)."""
    info = sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold)
    return export_onnx(run_model(run), Path(out) if out else run.path / GRAPH_FILE, info)


def torch_runner(
    run: Run, requested: str, cache_dir: str | Path | None, threads: int | None
) -> TorchEngine | OnnxEngine:
    """The ``torch`` runner (entry point ``covidxr.runners``): the run's torch model, or for ``auto`` and
    ``onnx`` on a run without a graph, its export into the cache, run by onnxruntime."""
    model = run_model(run)
    if resolve_engine(requested, model) == "torch":
        if threads is not None:
            raise CovidxrError("--threads applies to the onnx engine; torch uses torch.set_num_threads")
        return TorchEngine(model)
    path = export_or_fallback(
        model, sidecar(model, run.labels, run.temperature, run.covid_threshold), requested, cache_dir
    )
    return TorchEngine(model) if path is None else OnnxEngine(path, threads, spin=False)
