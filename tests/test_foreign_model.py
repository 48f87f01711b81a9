"""A model covidxr did not train (an ONNX graph with its MODEL.yaml) through prediction and evaluation: the Python
API, ``covidxr predict --model MODEL.onnx``, a real ``covidxr serve --model MODEL.onnx`` process and ``covidxr
evaluate MODEL.onnx --data DIR``, on real X-rays. Two foreign graphs: one built with ``onnx.helper`` (NHWC, one
channel, logits, a binary [COVID-19, other] model) and one exported from a tiny torch module with
``torch.onnx.export`` (NCHW, RGB, probabilities, three labels in another order, a threshold)."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from covidxr import DISCLAIMER, load_model
from covidxr.runtime.errors import CovidxrError

from .conftest import ADULT_CONTROLS, assert_one_line_error, assert_same_answer, linked_dataset, run_cli
from .test_serve import Server, _upload, _visible_images, post

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

SIZE = 64
BINARY_SPEC = {
    "input": {
        "name": "pixels",
        "size": [SIZE, SIZE],
        "channels": 1,
        "resize": "letterbox",
        "scale": 255.0,
        "mean": [0.5],
        "std": [0.25],
        "layout": "NHWC",
    },
    "output": {"name": "logits", "kind": "logits", "labels": ["COVID-19", "other"]},
}
TORCH_SPEC = {
    "input": {
        "size": [SIZE, SIZE],
        "channels": 3,
        "resize": "stretch",
        "scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "layout": "NCHW",
    },
    "output": {"kind": "probabilities", "labels": ["NORMAL", "COVID-19", "PNEUMONIA"], "threshold": 0.3},
}


def binary_graph(path: Path, mode: str = "finite") -> Path:
    """An NHWC one-channel graph of logits [z, -z], z = 4 * (mean pixel - 0.1) (``mode`` "finite"); "sqrt":
    z = sqrt(mean pixel) (NaN for the darker images); "nan": every output NaN."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", SIZE, SIZE, 1])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])
    constants = [
        helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("weight", TensorProto.FLOAT, [], [4.0]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [-0.1 if mode == "finite" else 0.0]),
        helper.make_tensor("poison", TensorProto.FLOAT, [], [float("nan") if mode == "nan" else 1.0]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape"], ["mean"]),
        helper.make_node("Add", ["mean", "offset"], ["shifted"]),
        helper.make_node("Sqrt" if mode == "sqrt" else "Identity", ["shifted"], ["rooted"]),
        helper.make_node("Mul", ["rooted", "weight"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "poison"], ["z"]),
        helper.make_node("Neg", ["z"], ["minus"]),
        helper.make_node("Concat", ["z", "minus"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "foreign-binary", [pixels], [logits], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper")
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("binary")
    write_spec(folder / "binary.yaml", BINARY_SPEC)
    return binary_graph(folder / "binary.onnx")


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.softmax(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))), dim=1)

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("torch")
    path = folder / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            Tiny().eval(),
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(path),
            input_names=["image"],
            output_names=["probs"],
            dynamic_axes={"image": {0: "n"}, "probs": {0: "n"}},
            dynamo=False,
        )
    write_spec(folder / "tiny.yaml", TORCH_SPEC)
    return path


@pytest.fixture(scope="module", params=["binary", "torch"])
def foreign(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    """Two real X-rays of each class of cxr3 and two NIH adult controls."""
    nih = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    return [cxr3 / name for name in cxr3_meta.groupby("label").head(2)["filename"]] + [
        ADULT_CONTROLS / name for name in nih["filename"].head(2)
    ]


def _probabilities(row: dict, labels: list[str]) -> dict:
    """A CSV row's answer in the shape of the API's (for ``assert_same_answer``)."""
    return {
        "label": row["label"] or None,
        "probabilities": {label: float(row[f"p_{label}"]) for label in labels},
        "covid_threshold": float(row["covid_threshold"]) if row["covid_threshold"] else None,
    }


# ---------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------


def test_load_model_answers_with_the_keys_of_a_run(foreign: Path, xrays: list[Path]) -> None:
    model = load_model(foreign)
    spec = yaml.safe_load(foreign.with_suffix(".yaml").read_text())
    run_keys = set(load_model().predict(xrays[0]))  # the bundled covidxr run
    answers = model.predict(xrays)
    assert len(answers) == len(xrays)
    for answer in answers:
        assert set(answer) == run_keys | {"file"}
        assert list(answer["probabilities"]) == spec["output"]["labels"]
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert answer["covid_threshold"] == spec["output"].get("threshold")
        assert answer["out_of_distribution"] is None and answer["ood_score"] is None
        assert answer["site"] is None and answer["disclaimer"] == DISCLAIMER
        assert answer["no_answer_reason"] is None and answer["label"] in spec["output"]["labels"]
        assert answer["covid_positive"] == (answer["label"] == "COVID-19")
        p = answer["probabilities"]
        threshold = answer["covid_threshold"]
        if threshold is None:
            assert answer["label"] == max(p, key=p.get)
        else:
            assert answer["covid_positive"] == (p["COVID-19"] >= threshold)
    # One image: one answer, the same by path, PIL image and array.
    image = Image.open(xrays[0])
    single = model.predict(xrays[0])
    assert set(single) == run_keys
    for other in (model.predict(image), model.predict(np.asarray(image.convert("RGB")))):
        assert_same_answer(other, single)
    with pytest.raises(CovidxrError, match="Grad-CAM needs a covidxr run folder"):
        model.explain(xrays[0])
    with pytest.raises(CovidxrError, match="--site is for a covidxr run folder"):
        load_model(foreign, site=foreign.with_suffix(".yaml"))


def test_the_two_graphs_see_different_inputs_and_answer_differently(
    binary_model: Path, torch_model: Path, xrays: list[Path]
) -> None:
    binary, tiny = load_model(binary_model), load_model(torch_model)
    assert binary.labels == ["COVID-19", "other"] and tiny.labels == ["NORMAL", "COVID-19", "PNEUMONIA"]
    assert len({round(a["probabilities"]["COVID-19"], 6) for a in binary.predict(xrays)}) > 1
    assert binary.identity != tiny.identity and "sha256=" in binary.identity


# ---------------------------------------------------------------------------------------------
# The command line and the service answer as the API does
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_server(foreign: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("foreign-server"), "--model", str(foreign))
    yield running
    running.stop()


def test_predict_cli_api_and_serve_give_the_same_answer(
    foreign: Path, foreign_server: Server, xrays: list[Path], tmp_path: Path
) -> None:
    model = load_model(foreign)
    expected = model.predict(xrays)

    printed = run_cli("predict", "--model", foreign, *xrays, "--json")
    assert printed.returncode == 0, printed.stderr
    for got, want in zip(json.loads(printed.stdout), expected, strict=True):
        assert got["file"] == want["file"]
        assert_same_answer(got, want)

    table = run_cli("predict", "--model", foreign, *xrays)
    assert table.returncode == 0, table.stderr
    assert "without out-of-distribution guard" in table.stdout and DISCLAIMER in table.stdout

    out = tmp_path / "preds.csv"
    written = run_cli("predict", "--model", foreign, *xrays, "--out", out)
    assert written.returncode == 0, written.stderr
    rows = list(csv.DictReader(out.open()))
    assert [row["file"] for row in rows] == [str(p) for p in xrays]
    for row, want in zip(rows, expected, strict=True):
        assert_same_answer(_probabilities(row, model.labels), want)
        assert row["model"] == model.identity and row["out_of_distribution"] == ""
        assert int(row["image_width"]) == want["image"]["width"] and row["image_mode"] == want["image"]["mode"]

    for path, want in zip(xrays, expected, strict=True):
        response = post(foreign_server, "/api/predict", path.read_bytes(), path.name)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same_answer(answer, want)
        assert answer["model"] == model.identity and answer["disclaimer"] == DISCLAIMER
        assert answer["out_of_distribution"] is None and answer["covid_threshold"] == want["covid_threshold"]

    # The page posts to /api/explain: a foreign model's answer comes with the preview and no heat map.
    explained = post(foreign_server, "/api/explain", xrays[0].read_bytes(), xrays[0].name)
    assert explained.status_code == 200, explained.text
    answer = explained.json()
    assert answer["explanation"] is None and "Grad-CAM needs a covidxr run" in answer["explanation_unavailable"]
    assert answer["image"]["preview_png"] and answer["disclaimer"] == DISCLAIMER
    assert_same_answer(answer, expected[0])

    health = httpx.get(f"{foreign_server.url}/healthz", timeout=30).json()
    assert health["model"] == model.identity and health["covid_threshold"] == model.covid_threshold
    assert health["monitor"]["n"] == len(xrays) + 1
    card = httpx.get(f"{foreign_server.url}/api/model", timeout=30).json()
    assert card["sha256"] == model.classifier.sha256 and card["site"] is None
    for page in ("/", "/model-card", "/monitor"):
        response = httpx.get(f"{foreign_server.url}{page}", timeout=30)
        assert response.status_code == 200 and "Research use only" in response.text, page


def test_page_shows_a_foreign_models_answer_without_a_heat_map(
    binary_model: Path, browser, xrays: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from selenium.webdriver.common.by import By

    server = Server(tmp_path_factory.mktemp("foreign-page"), "--model", str(binary_model))
    try:
        expected = load_model(binary_model).predict(xrays[0])
        browser.get(server.url)
        assert "Research use only" in browser.find_element(By.ID, "disclaimer").text
        _upload(browser, xrays[0])
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
        assert browser.find_element(By.ID, "label").text == expected["label"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 2
        assert "no operating threshold" in browser.find_element(By.ID, "covid-note").text
        assert _visible_images(browser) == ["preview"]  # the X-ray, and no heat map
        assert browser.find_element(By.ID, "model-id").text.startswith("onnx model=binary.onnx")
    finally:
        server.stop()


def test_predict_out_keeps_error_rows_and_resumes(binary_model: Path, xrays: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "preds.csv"
    first = run_cli("predict", "--model", binary_model, xrays[0], broken, "--out", out)
    assert_one_line_error(first, "1 of 2 file(s) could not be read")
    rows = list(csv.DictReader(out.open()))
    assert [bool(row["error"]) for row in rows] == [False, True] and "broken.png" in rows[1]["error"]
    assert list(rows[0])[:5] == ["file", "label", "no_answer_reason", "p_COVID-19", "p_other"]

    more = run_cli("predict", "--model", binary_model, xrays[0], broken, xrays[1], "--out", out, "--resume")
    assert more.returncode == 1 and "(2 were already done)" in more.stdout, more.stdout
    assert len(list(csv.DictReader(out.open()))) == 3

    other_spec = write_spec(tmp_path / "other.yaml", {**BINARY_SPEC, "output": {**BINARY_SPEC["output"]}})
    other_spec.write_text(other_spec.read_text().replace("letterbox", "stretch"))
    mixed = run_cli("predict", "--model", binary_model, "--spec", other_spec, xrays[2], "--out", out, "--resume")
    assert_one_line_error(mixed, "made by another model")


# ---------------------------------------------------------------------------------------------
# NaN and Inf outputs: a row with the reason, no decision
# ---------------------------------------------------------------------------------------------


def test_non_finite_outputs_get_no_answer_with_the_reason(xrays: list[Path], tmp_path: Path) -> None:
    write_spec(tmp_path / "sqrt.yaml", BINARY_SPEC)
    model_path = binary_graph(tmp_path / "sqrt.onnx", "sqrt")  # NaN for the images darker than the spec's mean
    answers = load_model(model_path).predict(xrays)
    unanswered = [a for a in answers if a["label"] is None]
    assert unanswered and len(unanswered) < len(answers), "the graph should give NaN for some images only"
    for answer in unanswered:
        assert answer["no_answer_reason"].startswith("the model's output is not finite")
        assert answer["covid_positive"] is None and set(answer["probabilities"].values()) == {None}

    printed = run_cli("predict", "--model", model_path, *xrays, "--json")
    assert printed.returncode == 0 and "Traceback" not in printed.stderr, printed.stderr
    parsed = json.loads(printed.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert [a["label"] for a in parsed] == [a["label"] for a in answers]
    table = run_cli("predict", "--model", model_path, *xrays)
    assert "the model's output is not finite (NaN or Inf): no answer" in table.stdout

    out = tmp_path / "preds.csv"
    assert run_cli("predict", "--model", model_path, *xrays[:3], "--out", out).returncode == 0
    resumed = run_cli("predict", "--model", model_path, *xrays, "--out", out, "--resume")
    assert resumed.returncode == 0 and "(3 were already done)" in resumed.stdout, resumed.stderr
    rows = list(csv.DictReader(out.open()))
    assert [row["label"] or None for row in rows] == [a["label"] for a in answers]


# ---------------------------------------------------------------------------------------------
# covidxr evaluate MODEL.onnx --data DIR
# ---------------------------------------------------------------------------------------------


def test_evaluate_a_binary_model_maps_the_labels(binary_model: Path, small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run_cli("evaluate", binary_model, "--data", small_dataset, "--out", out)
    assert result.returncode == 0, result.stderr
    meta = pd.read_csv(small_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(meta) == metrics["images"] and metrics["unreadable"] == metrics["no_answer"] == 0
    assert metrics["label_map"] == {"COVID-19": "COVID-19", "NORMAL": "other", "PNEUMONIA": "other"}
    assert "only non-COVID-19 class" in metrics["label_map_rule"]
    assert metrics["confusion_matrix"]["labels"] == ["COVID-19", "other"]
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == len(meta)
    low, high = metrics["accuracy_ci95"]
    assert low <= metrics["accuracy"] <= high
    assert set(metrics["per_class"]) == {"COVID-19", "other"}
    assert metrics["per_class"]["other"]["n"] == int((meta["label"] != "COVID-19").sum())
    covid = metrics["covid_vs_rest"]
    assert covid["n_covid"] == int((meta["label"] == "COVID-19").sum()) and covid["auc"] is not None
    assert covid["sensitivity"] == metrics["per_class"]["COVID-19"]["sensitivity"]
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(predictions) == len(meta) and set(predictions["model_label"]) == {"COVID-19", "other"}
    assert (predictions["label"] == meta["label"]).all()
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == "> **Bottom line**" and f"{metrics['n']} images" in report
    assert (out / "report.html").is_file() and (out / "confusion_matrix.png").is_file()
    assert f"n={metrics['n']}" in result.stdout


def test_evaluate_counts_only_answered_images(torch_model: Path, tmp_path: Path) -> None:
    nih = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False).groupby("label").head(6)
    data = linked_dataset(tmp_path / "nih12", ADULT_CONTROLS, nih)
    result = run_cli("evaluate", torch_model, "--data", data)
    assert result.returncode == 0, result.stderr
    out = torch_model.with_name("tiny-evaluation") / "nih12"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["label_map"] == {"NORMAL": "NORMAL", "PNEUMONIA": "PNEUMONIA"}
    assert metrics["covid_vs_rest"]["n_covid"] == 0 and metrics["covid_vs_rest"]["auc"] is None
    assert metrics["covid_vs_rest"]["threshold"] == TORCH_SPEC["output"]["threshold"]

    # NaN for some images: they are listed in predictions.csv with the reason and left out of n.
    write_spec(tmp_path / "sqrt.yaml", BINARY_SPEC)
    sqrt = binary_graph(tmp_path / "sqrt.onnx", "sqrt")
    result = run_cli("evaluate", sqrt, "--data", data, "--out", tmp_path / "sqrt-eval")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "sqrt-eval" / "metrics.json").read_text())
    predictions = pd.read_csv(tmp_path / "sqrt-eval" / "predictions.csv", dtype=str, keep_default_na=False)
    answered = int((predictions["predicted"] != "").sum())
    assert metrics["n"] == answered and metrics["no_answer"] == 12 - answered and len(predictions) == 12
    assert (predictions.loc[predictions["predicted"] == "", "no_answer_reason"].str.startswith("the model's")).all()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, never a traceback
# ---------------------------------------------------------------------------------------------


def test_bad_models_and_options_are_refused_in_one_line(
    binary_model: Path, xrays: list[Path], small_dataset: Path, tmp_path: Path
) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(binary_model.read_bytes())
    assert_one_line_error(run_cli("predict", "--model", lonely, xrays[0]), "lonely.yaml", "no model spec here")

    unknown = write_spec(tmp_path / "unknown.yaml", {**BINARY_SPEC, "input": {**BINARY_SPEC["input"], "colour": 1}})
    assert_one_line_error(
        run_cli("predict", "--model", binary_model, "--spec", unknown, xrays[0]), "input.colour", "unknown key"
    )
    three = write_spec(
        tmp_path / "three.yaml",
        {**BINARY_SPEC, "output": {**BINARY_SPEC["output"], "labels": ["COVID-19", "NORMAL", "PNEUMONIA"]}},
    )
    assert_one_line_error(run_cli("serve", "--model", binary_model, "--spec", three), "output.labels", "2 values")
    nhwc_as_nchw = write_spec(
        tmp_path / "nchw.yaml", {**BINARY_SPEC, "input": {**BINARY_SPEC["input"], "layout": "NCHW"}}
    )
    assert_one_line_error(run_cli("evaluate", binary_model, "--spec", nhwc_as_nchw, "--data", small_dataset), "input.")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(binary_model.read_bytes()[:100])
    write_spec(damaged.with_suffix(".yaml"), BINARY_SPEC)
    assert_one_line_error(run_cli("predict", "--model", damaged, xrays[0]), "not a usable ONNX graph")

    assert_one_line_error(
        run_cli("predict", "--model", binary_model, "--site", tmp_path / "site.json", xrays[0]), "--site"
    )
    assert_one_line_error(run_cli("predict", "--model", binary_model, "--engine", "torch", xrays[0]), "onnxruntime")
    assert_one_line_error(run_cli("explain", "--model", binary_model, xrays[0]), "Grad-CAM needs a covidxr run")
    spec = binary_model.with_suffix(".yaml")
    assert_one_line_error(run_cli("predict", "--model", tmp_path, "--spec", spec, xrays[0]), "describes itself")
    assert_one_line_error(run_cli("evaluate", binary_model), "--data")
    assert_one_line_error(run_cli("evaluate", binary_model, "--data", small_dataset, "--split", "val"), "--split")

    nan_model = binary_graph(tmp_path / "nan.onnx", "nan")
    write_spec(nan_model.with_suffix(".yaml"), BINARY_SPEC)
    assert_one_line_error(
        run_cli("evaluate", nan_model, "--data", small_dataset, "--out", tmp_path / "nan-eval"), "answered none"
    )


def test_evaluate_refuses_a_data_label_the_model_cannot_count(
    torch_model: Path, small_dataset: Path, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path / "opacity.yaml",
        {**TORCH_SPEC, "output": {**TORCH_SPEC["output"], "labels": ["NORMAL", "COVID-19", "OPACITY"]}},
    )
    result = run_cli("evaluate", torch_model, "--spec", spec, "--data", small_dataset, "--out", tmp_path / "e")
    assert_one_line_error(result, "'PNEUMONIA'", "no counterpart")
