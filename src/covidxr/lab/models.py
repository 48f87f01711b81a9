"""``create_model``: a registered backbone with its head (``CovidxrNet``), its weights and its input transform.

The registry is ``covidxr.lab.registry``, the weights lookup ``covidxr.lab.weights`` and the heads
``covidxr.lab.heads`` (split as timm splits its models package); their public names are importable from
here too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from covidxr.lab.heads import StagedHead, make_head
from covidxr.lab.labels import LABELS
from covidxr.lab.registry import PAPER_MODELS, REGISTRY, Backbone, ModelSpec, get_spec, list_models, register
from covidxr.lab.weights import (
    WeightsSource,
    default_weights_dir,
    hash_state_dict,
    load_backbone_weights,
    resolve_weights,
)
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.preprocess import PREPROCESSING, ImagePipeline, InputTransform, Preprocessing, to_input_array
from covidxr.runtime.runs import HEAD_FILE, Run
from covidxr.runtime.storage import stable_digest

__all__ = [
    "Backbone",
    "CovidxrNet",
    "ModelSpec",
    "PAPER_MODELS",
    "PREPROCESSING",
    "REGISTRY",
    "StagedHead",
    "WeightsSource",
    "create_backbone",
    "create_model",
    "default_weights_dir",
    "get_spec",
    "model_from_config",
    "run_model",
    "hash_state_dict",
    "head_probabilities",
    "list_models",
    "load_backbone_weights",
    "make_head",
    "register",
    "resolve_weights",
    "to_input_tensor",
]


def to_input_tensor(image: Image.Image, size: int, preprocessing: Preprocessing) -> torch.Tensor:
    """``covidxr.runtime.preprocess.to_input_array`` as a tensor (for the torch side: training, Grad-CAM, audits)."""
    return torch.from_numpy(to_input_array(image, size, preprocessing))


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------


class CovidxrNet(nn.Module):
    """Frozen backbone → global average pooling → trainable head. Input: a preprocessed image batch."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        spec: ModelSpec,
        weights: WeightsSource,
        image_size: int,
        pipeline: ImagePipeline | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = head
        self.spec = spec
        self.weights = weights
        self.image_size = image_size
        self.pipeline = pipeline or ImagePipeline()
        self.trainable_backbone = False
        self.engine = "auto"  # what computes its frozen features (covidxr.lab.export.feature_engine)

    @property
    def preprocessing(self) -> Preprocessing:
        return PREPROCESSING[self.weights.preprocessing]

    @property
    def input_transform(self) -> InputTransform:
        return InputTransform(self.image_size, self.preprocessing, self.pipeline)

    def input_tensor(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB image → this model's input tensor (pipeline, resize, normalisation)."""
        return torch.from_numpy(self.input_transform(image))

    def unfreeze_last_blocks(self, count: int) -> list[nn.Parameter]:
        """Make the last ``count`` backbone stages trainable; returns their parameters.

        BatchNorm layers keep their ImageNet running statistics (they stay in inference mode): with
        batches of 15 re-estimated statistics would be noise, and frozen ones keep several processes
        in step without synchronising them.
        """
        if self.spec.blocks is None:
            raise CovidxrError(f"{self.spec.name}: the registry names no blocks, so it cannot be fine-tuned")
        stages = self.spec.blocks(self.backbone.body)
        if not 0 < count <= len(stages):
            raise CovidxrError(f"{self.spec.name}: unfreeze_blocks must be between 1 and {len(stages)}, not {count}")
        parameters = [p for stage in stages[-count:] for module in stage for p in module.parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        self.trainable_backbone = True
        return parameters

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: what the feature cache stores."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> CovidxrNet:
        """The backbone always runs in inference mode (BatchNorm statistics and drop-connect fixed),
        also when its last blocks are being fine-tuned; only the head switches."""
        super().train(mode)
        self.backbone.eval()
        return self

    def model_key(self) -> dict:
        """What determines the cached features: model, weights, preprocessing, pipeline and input size."""
        key = {
            "model": self.spec.name,
            "weights_sha256": self.weights.sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "image_size": self.image_size,
            "feature_layer": self.spec.feature_layer,
        }
        if not self.pipeline.is_identity:  # absent for the paper's pipeline, so older caches stay valid
            key["pipeline"] = self.pipeline.to_dict()
        if self.weights.variant != "reference":  # likewise
            key["variant"] = self.weights.variant
        return key

    def model_key_hash(self) -> str:
        return stable_digest(self.model_key())[:24]


def create_backbone(
    name: str,
    pretrained: bool = True,
    image_size: int | None = None,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[Backbone, WeightsSource]:
    """The frozen reference backbone, with pretrained weights (or random ones, seeded, for tests)."""
    spec = get_spec(name)
    size = image_size or spec.native_size
    if pretrained:
        state, source = resolve_weights(spec, weights, weights_dir)
    torch.manual_seed(seed)
    variant = source.variant if pretrained else "reference"
    backbone = Backbone(spec.body(size, variant), spec.features, spec.classify, spec.num_features)
    if pretrained:
        load_backbone_weights(backbone, spec, state, source.location)
    else:
        source = WeightsSource(
            "random", f"seed {seed}", hash_state_dict(backbone.body.state_dict()), spec.preprocessing
        )
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone, source


def create_model(
    name: str,
    pretrained: bool = True,
    num_classes: int = 3,
    image_size: int | None = None,
    hidden: int = 256,
    dropout: float = 0.5,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    seed: int = 0,
    pipeline: ImagePipeline | None = None,
    decision: str = "flat",
) -> CovidxrNet:
    """Build a registered model: frozen ImageNet backbone + GAP + a new head of ``num_classes`` logits."""
    backbone, source = create_backbone(name, pretrained, image_size, weights, weights_dir, seed)
    spec = get_spec(name)
    torch.manual_seed(seed)
    head = make_head(spec.num_features, num_classes, hidden, dropout, decision)
    return CovidxrNet(backbone, head, spec, source, image_size or spec.native_size, pipeline).eval()


@torch.no_grad()
def head_probabilities(model: CovidxrNet, features: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities of the trained head on pooled backbone features, logits divided by ``temperature``."""
    model.head.eval()
    return torch.softmax(model.head(torch.from_numpy(features)) / temperature, dim=1).numpy()


# ---------------------------------------------------------------------------------------------
# A model from its configuration, and a trained run's model
# ---------------------------------------------------------------------------------------------


def model_from_config(
    config: TrainConfig,
    pretrained: bool = True,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
) -> CovidxrNet:
    """The model a configuration describes: its backbone, input size, head (over all labels) and engine."""
    model = create_model(
        config.model,
        pretrained=pretrained,
        num_classes=len(LABELS),
        image_size=config.image_size,
        hidden=config.hidden_units,
        dropout=config.dropout,
        weights=weights,
        weights_dir=weights_dir,
        seed=config.seed,
        pipeline=config.pipeline(),
        decision=config.decision,
    )
    return model


def run_model(run: Run) -> CovidxrNet:
    """The torch model of a loaded run, built on first use and kept with the run; refuses backbone weights
    that differ from those it was trained on."""
    if run._model is None:
        run._model = _build_run_model(run)
    return run._model


def _build_run_model(run: Run) -> CovidxrNet:
    info, config, path = run.info, run.config, run.path
    pretrained = info.weights["kind"] != "random"
    recorded = Path(info.weights["location"])
    weights = run.weights
    if weights is None and info.weights["kind"] in {"file", "weights-dir"} and recorded.is_file():
        weights = recorded
    model = model_from_config(config, pretrained, weights, run.weights_dir)
    if model.weights.sha256 != info.weights["sha256"]:
        raise CovidxrError(
            f"{path}: was trained on {config.model} weights {info.weights['sha256'][:12]} "
            f"({info.weights['location']}), but the weights found now are {model.weights.sha256[:12]} "
            f"({model.weights.location}); pass the original with --weights"
        )
    try:
        model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CovidxrError(f"{path / HEAD_FILE}: damaged or incompatible ({type(exc).__name__})") from None
    if info.fine_tuned_backbone:
        _load_fine_tuned(model, path / info.fine_tuned_backbone["file"], info.fine_tuned_backbone["sha256"])
    return model.eval()


def _load_fine_tuned(model: CovidxrNet, path: Path, sha256: str) -> None:
    try:
        state = load_file(str(path))
        model.backbone.body.load_state_dict(state)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CovidxrError(f"{path}: missing, damaged or incompatible ({type(exc).__name__})") from None
    if hash_state_dict(state) != sha256:
        raise CovidxrError(f"{path}: its weights differ from those the run was trained with")
    model.weights = replace(model.weights, kind="fine-tuned", location=str(path.resolve()), sha256=sha256)
