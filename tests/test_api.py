"""``covidxr.load_model``: predict and explain on files, PIL images and arrays, with either engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidxr
from covidxr.config import TrainConfig
from covidxr.data import read_image
from covidxr.errors import CovidxrError
from covidxr.train import train


@pytest.fixture(scope="module")
def run_dir(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(small_dataset, tmp_path_factory.mktemp("runs") / "r", replace(TrainConfig(image_size=224), epochs=2))


def test_predict_accepts_paths_images_and_arrays_alike(run_dir: Path) -> None:
    model = covidxr.load_model(run_dir)
    paths = model.run.dataset().paths()[:3]
    by_path = model.predict(paths)
    by_image = model.predict([read_image(p) for p in paths])
    by_array = model.predict([np.asarray(read_image(p).convert("L")) for p in paths])
    for a, b, c in zip(by_path, by_image, by_array, strict=True):
        assert a["label"] == b["label"] == c["label"]
        for label in model.labels:
            assert abs(a["probabilities"][label] - b["probabilities"][label]) < 1e-5
            assert abs(a["probabilities"][label] - c["probabilities"][label]) < 1e-5
        assert b["out_of_distribution"] is False and "Research use only" in b["disclaimer"]
    assert model.predict([Image.new("RGB", (300, 300))])[0]["out_of_distribution"] is True  # blank

    onnx = covidxr.load_model(run_dir, engine="onnx")
    for a, b in zip(by_image, onnx.predict([read_image(p) for p in paths]), strict=True):
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in model.labels) < 1e-4


def test_explain_returns_maps_and_overlays(run_dir: Path) -> None:
    model = covidxr.load_model(run_dir)
    image = read_image(model.run.dataset().paths()[0])
    [result] = model.explain([image])
    assert result["map"].shape == (224, 224) and result["map"].min() >= 0 and result["map"].max() <= 1
    assert result["map"].std() > 0  # a real map, not a constant
    assert result["overlay"].size == image.size
    assert result["label"] == model.predict([image])[0]["label"]


def test_bad_inputs_are_refused(run_dir: Path) -> None:
    model = covidxr.load_model(run_dir)
    with pytest.raises(CovidxrError, match="uint8"):
        model.predict([np.zeros((10, 10), dtype=np.float32)])
    with pytest.raises(CovidxrError, match="method must be one of"):
        model.explain([Image.new("RGB", (64, 64))], method="lime")
    with pytest.raises(CovidxrError, match="engine must be one of"):
        covidxr.load_model(run_dir, engine="tpu")
    with pytest.raises(CovidxrError, match="not a covidxr run folder"):
        covidxr.load_model(run_dir.parent / "missing")
