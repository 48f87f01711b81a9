"""``covidxr.load_model``: predict and explain on files, PIL images and arrays, with either engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidxr
from covidxr.lab.data import run_dataset
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run  # shared by the session (conftest); read only


def test_predict_accepts_paths_images_and_arrays_alike(run_dir: Path) -> None:
    model = covidxr.load_model(run_dir)
    paths = run_dataset(model.run).paths()[:3]
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
    image = read_image(run_dataset(model.run).paths()[0])
    [result] = model.explain([image])
    assert result["map"].shape == (224, 224) and result["map"].min() >= 0 and result["map"].max() <= 1
    assert result["map"].std() > 0  # a real map, not a constant
    assert result["overlay"].size == image.size
    assert result["label"] == model.predict([image])[0]["label"]


def test_bad_inputs_are_refused(run_dir: Path) -> None:
    model = covidxr.load_model(run_dir)
    with pytest.raises(CovidxrError, match=r"in \[0, 1\]"):
        model.predict(np.full((64, 64), 2.0, dtype=np.float32))
    [row] = model.predict([np.zeros((10, 10), dtype=np.float32)])  # in a list: the error, as for a bad file
    assert "too small" in row["error"]
    with pytest.raises(CovidxrError, match="method must be one of"):
        model.explain([Image.new("RGB", (64, 64))], method="lime")
    with pytest.raises(CovidxrError, match="engine must be one of"):
        covidxr.load_model(run_dir, engine="tpu")
    with pytest.raises(CovidxrError, match="not a covidxr run folder"):
        covidxr.load_model(run_dir.parent / "missing")


def test_one_image_gives_one_result_and_a_list_gives_a_list(cxr3: Path, cxr3_meta) -> None:
    """A single str, Path, PIL image or array is one image (``predict("a.png")`` once iterated the characters)."""
    model = covidxr.load_model()  # the bundled model
    path = cxr3 / cxr3_meta["filename"].iloc[0]
    single = [model.predict(str(path)), model.predict(path), model.predict(read_image(path))]
    single.append(model.predict(np.asarray(read_image(path))))
    assert all(isinstance(result, dict) for result in single)
    assert len({result["label"] for result in single}) == 1
    [listed] = model.predict([path])
    assert listed["label"] == single[0]["label"]
    assert isinstance(model.predict((path, path)), list)
    with pytest.raises(CovidxrError, match="missing.png"):
        model.predict(str(path.parent / "missing.png"))
    explained = model.explain(path)
    assert isinstance(explained, dict) and explained["target"] == explained["label"]


def test_label_and_covid_call_agree_on_a_folder_of_real_images() -> None:
    """The 810 adult controls: every answered image's label is COVID-19 exactly when covid_positive is."""
    from tests.conftest import ADULT_CONTROLS

    model = covidxr.load_model()
    results = model.predict(sorted((ADULT_CONTROLS / "images").iterdir()))
    assert len(results) == 810 and not [r for r in results if "error" in r]
    answered = [r for r in results if r["label"] is not None]
    assert answered and all((r["label"] == "COVID-19") == r["covid_positive"] for r in answered)
    for r in answered:
        covid = r["probabilities"]["COVID-19"]
        others = {k: v for k, v in r["probabilities"].items() if k != "COVID-19"}
        assert r["label"] == ("COVID-19" if covid >= r["covid_threshold"] else max(others, key=others.get))
    for r in results:
        assert (r["label"] is None) == (r["no_answer_reason"] is not None) == (r["covid_positive"] is None)


def test_the_package_shows_what_is_there() -> None:
    assert {"load_model", "Model", "CovidxrError", "DISCLAIMER"} <= set(dir(covidxr))
    model = covidxr.load_model()
    text = repr(model)
    assert "efficientnet_lite0" in text and "bundled" in text and "covid_threshold=" in text
    for documented in (covidxr, covidxr.load_model, covidxr.Model, covidxr.Model.predict, covidxr.Model.explain):
        assert ">>>" in documented.__doc__, documented
    import pydoc

    assert "load_model" in pydoc.render_doc(covidxr)
