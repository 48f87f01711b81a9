"""Grad-CAM through the grad-cam package, for every registered model, and the checks of the maps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from covidxr.lab.explain import Explainer, check_maps, region_masks
from covidxr.lab.models import REGISTRY, create_model, run_model, to_input_tensor
from covidxr.lab.train import train
from covidxr.runtime.api import load_model
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.runs import load_run


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Image.Image]:
    return [read_image(cxr3 / name) for name in cxr3_meta.groupby("label").head(1)["filename"]]


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_every_model_gives_maps_for_real_xrays(name: str, method: str, xrays: list[Image.Image]) -> None:
    pretrained = name.startswith("efficientnet_lite")  # the only backbones with weights on this machine
    model = create_model(name, pretrained=pretrained, image_size=160)
    inputs = torch.stack([to_input_tensor(img, 160, model.preprocessing) for img in xrays])
    explainer = Explainer(model, method)
    maps = explainer(inputs, [0, 1, 2])
    assert maps.shape == (3, 160, 160)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # The registry's target layer is the last feature map: all the backbone's channels at stride 32
    # (VGG-16: its last convolution block, before the final max pool, at stride 16).
    hooks = explainer.cam.activations_and_grads
    side = 10 if name == "vgg16" else 5
    assert hooks.activations[0].shape == (3, model.spec.num_features, side, side)
    if method != "eigencam":
        assert hooks.gradients and hooks.gradients[0].abs().sum() > 0
    if pretrained or method == "eigencam":
        # With random weights a Grad-CAM can be all negative before its ReLU, hence blank; not so here.
        assert all(np.ptp(m) > 0 for m in maps), "a constant map explains nothing"


def test_a_missing_target_layer_is_a_clear_error() -> None:
    model = create_model("efficientnet_lite0", image_size=160)
    model.spec = replace(model.spec, gradcam_layer="_blocks.99")
    with pytest.raises(CovidxrError, match="efficientnet_lite0: Grad-CAM target layer '_blocks.99' does not exist"):
        Explainer(model, "gradcam")


def test_unknown_method_is_refused() -> None:
    with pytest.raises(CovidxrError, match="unknown explanation method 'lime'"):
        Explainer(create_model("efficientnet_lite0", image_size=160), "lime")


@pytest.fixture(scope="module")
def small_run(tiny_run: Path) -> Path:
    return tiny_run  # efficientnet_lite0, 8 epochs, 224 px: shared by the session (conftest); read only


def test_explain_files_writes_overlays_and_maps_and_skips_bad_files(
    small_run: Path, cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path
) -> None:
    run = load_run(small_run)
    good = [cxr3 / name for name in cxr3_meta["filename"][:2]]
    cat = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(cat)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    model = load_model(small_run)
    results = model.explain_files([good[0], cat, broken, good[1]], tmp_path / "out", "gradcam++")
    # A colour photograph gets no answer with predict's reason (every route alike), and the map of its likeliest class.
    assert results[1]["label"] is None and "colour photograph" in results[1]["no_answer_reason"]
    assert "broken.jpg" in results[2]["error"]
    for result in (results[0], results[1], results[3]):
        assert result["target"] in run.labels and 0 < result["probability"] <= 1
        overlay = Image.open(result["overlay"])
        assert overlay.size == read_image(result["file"]).size and overlay.mode == "RGB"
        raw = np.load(result["map"])
        assert raw.shape == (224, 224) and raw.max() <= 1
    explained = (results[0], results[1], results[3])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{Path(r['file']).stem}.gradcam++.{ext}" for r in explained for ext in ("npy", "png")]
        + ["contact-sheet.gradcam++.png"]
    )


def test_eigencam_is_flagged_as_independent_of_the_model(small_run: Path, xrays: list[Image.Image]) -> None:
    """EigenCAM never looks at the head, so a re-initialised head must give the same maps: flagged."""
    run = load_run(small_run)
    inputs = torch.stack([to_input_tensor(img, 224, run_model(run).preprocessing) for img in xrays * 3])
    report = check_maps(run_model(run), inputs, methods=("gradcam", "eigencam"))
    eigen = report["methods"]["eigencam"]
    assert eigen["randomised_head_rank_correlation"] > 0.99
    assert eigen["verdict"] == "fail" and any("reflect the image, not the model" in f for f in eigen["flags"])
    gradcam = report["methods"]["gradcam"]
    assert gradcam["randomised_head_rank_correlation"] < 0.99
    # A model trained on real classes without markers does not pile its maps into the corners.
    assert gradcam["mass"]["corners"] < report["geometry"]["area"]["corners"]
    assert not any("likely shortcuts" in flag for flag in gradcam["flags"])
    area = report["geometry"]["area"]
    assert area["lung_field"] == pytest.approx(0.49, abs=0.01) and area["border"] == pytest.approx(0.36, abs=0.01)


def _with_corner_marker(image: Image.Image) -> Image.Image:
    """A burnt-in white marker in the top-left corner, as hospitals stamp side and position labels."""
    array = np.asarray(image.convert("RGB")).copy()
    h, w = array.shape[:2]
    array[int(0.02 * h) : int(0.14 * h), int(0.02 * w) : int(0.14 * w)] = 255
    return Image.fromarray(array)


def test_maps_of_a_model_that_learned_a_corner_marker_are_flagged(
    cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path
) -> None:
    """Real NORMAL X-rays split at random into two 'classes', one of them marked: the marker is the only signal."""
    normals = cxr3_meta[cxr3_meta["label"] == "NORMAL"].drop_duplicates("patient_id").head(60)
    (tmp_path / "images").mkdir()
    rows = []
    for i, name in enumerate(normals["filename"]):
        marked = i % 2 == 0
        image = read_image(cxr3 / name)
        target = tmp_path / "images" / f"{i}.png"
        (_with_corner_marker(image) if marked else image).save(target)
        rows.append({"filename": f"images/{i}.png", "label": "COVID-19" if marked else "NORMAL", "patient_id": i})
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    config = TrainConfig(model="efficientnet_lite0", epochs=30, image_size=224, learning_rate=0.003)
    run = load_run(train(tmp_path, tmp_path / "run", config, progress=False))
    marked_inputs = torch.stack(
        [to_input_tensor(read_image(tmp_path / r["filename"]), 224, run_model(run).preprocessing) for r in rows[:24:2]]
    )
    report = check_maps(run_model(run), marked_inputs, methods=("gradcam",))["methods"]["gradcam"]
    assert report["mass"]["corners"] > 0.16  # the share of the image the four corner squares cover
    assert any("likely shortcuts" in flag for flag in report["flags"]), report
    masks = region_masks(224)
    assert masks["corners"][10, 10] and not masks["lung_field"][10, 10] and masks["lung_field"][112, 112]
