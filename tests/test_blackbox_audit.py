"""The black-box audit of any classifier, through ``covidxr audit MODEL --data DIR``, on real X-rays.

Foreign models are ONNX graphs built here with ``onnx.helper`` (NHWC, one grey channel, logits or
probabilities), not by covidxr's trainer, with known behaviour: one reads only the mean brightness of the
top-left corner (a planted-marker model, audited on images whose COVID-19 class carries a bright corner
square), one reads only two boxes over the lungs. The bundled run folder goes through the same command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import yaml
from onnx import TensorProto, helper
from PIL import Image

from covidxr.lab.blackbox import CHECKS as AUDIT_CHECKS
from covidxr.lab.blackbox import Sample, audit_classifier, load_samples, periphery_masks, rescore_audit
from covidxr.runtime.classifier import load_classifier
from covidxr.runtime.runs import default_model_path

from .conftest import ADULT_CONTROLS, CXR3, assert_one_line_error, run_cli

SIZE = 64  # the foreign models' input side
MARKER = 64  # the planted corner square, in pixels of the 512-px images (12.5% of the side)
PER_CLASS = 8
VERDICTS = {"pass", "warning", "fail"}
CHECKS = set(AUDIT_CHECKS)


# ---------------------------------------------------------------------------------------------
# Foreign graphs
# ---------------------------------------------------------------------------------------------


def _const(name: str, values, dtype=TensorProto.FLOAT) -> onnx.NodeProto:
    array = np.asarray(values, dtype=np.float32 if dtype == TensorProto.FLOAT else np.int64)
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, dtype, array.shape, array.ravel().tolist())
    )


def _patch_mean(prefix: str, rows: tuple[int, int], cols: tuple[int, int]) -> list[onnx.NodeProto]:
    """Nodes giving ``{prefix}_mean`` (N, 1): the mean of x[:, rows, cols, :] (NHWC)."""
    return [
        _const(f"{prefix}_starts", [rows[0], cols[0]], TensorProto.INT64),
        _const(f"{prefix}_ends", [rows[1], cols[1]], TensorProto.INT64),
        _const(f"{prefix}_axes", [1, 2], TensorProto.INT64),
        helper.make_node("Slice", ["x", f"{prefix}_starts", f"{prefix}_ends", f"{prefix}_axes"], [f"{prefix}_patch"]),
        helper.make_node("ReduceMean", [f"{prefix}_patch"], [f"{prefix}_mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", [f"{prefix}_mean4", "shape_n1"], [f"{prefix}_mean"]),
    ]


def _graph(nodes: list[onnx.NodeProto], outputs: int, input_shape=("N", SIZE, SIZE, 1)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [_const("shape_n1", [-1, 1], TensorProto.INT64), *nodes],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    onnx.checker.check_model(model)
    return model


def corner_model(nan_when_marked: bool = False, kind: str = "logits") -> onnx.ModelProto:
    """[COVID-19, other] logits from the top-left 8x8 patch only: COVID-19 when its mean is above 0.9 (the
    planted square); ``nan_when_marked``: NaN for such images instead (sqrt of a negative)."""
    nodes = _patch_mean("tl", (0, 8), (0, 8))
    nodes += [_const("c", [0.9]), _const("k", [40.0]), _const("zero", [0.0]), _const("big", [0.95])]
    if nan_when_marked:
        nodes += [helper.make_node("Sub", ["big", "tl_mean"], ["gap"]), helper.make_node("Sqrt", ["gap"], ["covid"])]
    else:
        nodes += [
            helper.make_node("Sub", ["tl_mean", "c"], ["d"]),
            helper.make_node("Mul", ["d", "k"], ["covid"]),
        ]
    if kind == "logits":
        nodes += [
            helper.make_node("Mul", ["tl_mean", "zero"], ["other"]),
            helper.make_node("Concat", ["covid", "other"], ["y"], axis=1),
        ]
    else:  # not probabilities: both outputs are the patch mean, so rows sum to 2 x mean
        nodes += [helper.make_node("Concat", ["tl_mean", "tl_mean"], ["y"], axis=1)]
    return _graph(nodes, 2)


def lung_model() -> onnx.ModelProto:
    """[NORMAL, COVID-19, PNEUMONIA] probabilities (softmax in the graph) from the mean of two boxes over the
    lungs only: nothing within 16 pixels (of 64) of the top or 8 of the sides reaches it."""
    nodes = _patch_mean("right", (16, 44), (10, 28)) + _patch_mean("left", (16, 44), (36, 54))
    nodes += [
        _const("half", [0.5]),
        _const("c", [0.45]),
        _const("k", [30.0]),
        _const("minus_one", [-1.0]),
        helper.make_node("Add", ["right_mean", "left_mean"], ["sum"]),
        helper.make_node("Mul", ["sum", "half"], ["m"]),
        helper.make_node("Sub", ["m", "c"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["covid"]),
        helper.make_node("Sub", ["m", "m"], ["normal"]),
        helper.make_node("Add", ["normal", "minus_one"], ["pneumonia"]),
        helper.make_node("Concat", ["normal", "covid", "pneumonia"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    return _graph(nodes, 3)


def spec(labels: list[str], kind: str = "logits", **input_changes) -> dict:
    inp = {"size": [SIZE, SIZE], "channels": 1, "resize": "stretch", "scale": 255.0, "layout": "NHWC"}
    return {"input": inp | input_changes, "output": {"kind": kind, "labels": labels}}


def write_model(folder: Path, name: str, graph: onnx.ModelProto | bytes, model_spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    path.write_bytes(graph if isinstance(graph, bytes) else graph.SerializeToString())
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(model_spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Data: real images, the COVID-19 class marked with a bright top-left square
# ---------------------------------------------------------------------------------------------


def _pick(meta: pd.DataFrame, label: str, source: str, n: int, seed: int) -> pd.DataFrame:
    rows = meta[(meta["label"] == label) & (meta["source"] == source)]
    return rows.sample(n=n, random_state=seed)


@pytest.fixture(scope="module")
def marked_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder of real images: COVID-19 (ieee8023) with a white square in the top-left corner,
    NORMAL and PNEUMONIA (kermany), and NORMAL adults (nih) as a second source for the probe."""
    root = tmp_path_factory.mktemp("marked")
    (root / "images").mkdir()
    cxr3 = pd.read_csv(CXR3 / "metadata.csv", dtype=str, keep_default_na=False)
    nih = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    parts = [
        (CXR3, _pick(cxr3, "COVID-19", "ieee8023", PER_CLASS, 1)),
        (CXR3, _pick(cxr3, "NORMAL", "kermany", PER_CLASS, 2)),
        (CXR3, _pick(cxr3, "PNEUMONIA", "kermany", PER_CLASS, 3)),
        (ADULT_CONTROLS, _pick(nih, "NORMAL", "nih", PER_CLASS, 4)),
    ]
    rows = []
    for origin, frame in parts:
        for record in frame.to_dict("records"):
            grey = np.array(Image.open(origin / record["filename"]).convert("L"))
            if record["label"] == "COVID-19":
                grey[:MARKER, :MARKER] = 255
            name = f"images/{Path(record['filename']).stem}.png"
            Image.fromarray(grey).save(root / name)
            rows.append(
                {
                    "filename": name,
                    "label": record["label"],
                    "patient_id": record["patient_id"],
                    "source": record["source"],
                }
            )
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def audit_cli(model: Path, data: Path, out: Path, *extra: str):
    return run_cli("audit", model, "--data", data, "--out", out, *extra)


def read_audit(out: Path) -> dict:
    audit = json.loads((out / "audit.json").read_text())
    assert audit["verdict"] in VERDICTS
    assert set(audit["checks"]) == CHECKS
    for check in audit["checks"].values():
        assert check["verdict"] in VERDICTS | {"not applicable"}
        assert check["rule"] and check["summary"]
    md = (out / "audit.md").read_text()
    first_lines = [line for line in md.splitlines() if line.strip()][:4]
    assert any(line.startswith("> - Verdict:") for line in first_lines), md[:500]
    html = (out / "audit.html").read_text()
    assert html.index('id="verdict"') < html.index("<h2", html.index('id="verdict"') + 40)
    for check in audit["checks"].values():
        assert check["rule"] in md.replace("\n", " ") or check["rule"][:60] in md
    assert "Research use only" in md
    return audit


# ---------------------------------------------------------------------------------------------
# Foreign models
# ---------------------------------------------------------------------------------------------


def test_a_marker_model_is_caught_by_the_corner_mask(marked_data: Path, tmp_path: Path) -> None:
    """The planted-marker model: right on every marked COVID-19 image, lost once the corners are masked."""
    model = write_model(tmp_path / "m", "foreign", corner_model(), spec(["COVID-19", "other"]))
    result = audit_cli(model, marked_data, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Verdict: FAIL")
    audit = read_audit(tmp_path / "out")
    periphery = audit["checks"]["periphery"]
    assert periphery["verdict"] in {"fail", "warning"}
    corners = periphery["figures"]["masks"]["corners"]
    # Every marked COVID-19 image flips to "other"; no unmarked image's corner mean reaches 0.9.
    assert corners["flips"] >= PER_CLASS and corners["verdict"] == "fail"
    assert audit["checks"]["lungs_hidden"]["verdict"] == "fail"  # the lungs do not matter to it
    # Transplants: a COVID-19 donor's corners carry the marker, so the corners move p(COVID-19); the lungs do not.
    effects = audit["checks"]["transplant"]["figures"]["effects"]
    assert effects["corners"]["effect"] >= 0.5 and effects["corners"]["verdict"] == "fail"
    assert abs(effects["lungs"]["effect"]) < 0.05 and effects["lungs"]["verdict"] == "fail"
    assert audit["checks"]["explanation"]["verdict"] in {"fail", "warning"}
    assert audit["verdict"] == "fail"
    assert audit["scored_as"].startswith("labels (every non-COVID image as other)")
    assert audit["checks"]["per_source"]["figures"]["sources"]["all"]["balanced_accuracy"] == 1.0
    # Every source holds one scored class (COVID-19 only from ieee8023, "other" only from kermany and nih), so
    # accuracy without a shortcut cannot be estimated: the audit says so rather than repeat the unchanged 1.0.
    assert audit["estimated_clean_accuracy"] is None
    assert audit["estimate"]["limited_by"].startswith("not estimable")
    # The marker's skill is gone once the flagged regions come from donors of one class; from donors of each
    # image's own class every image keeps its marker (1.0): the transplant itself cost nothing to give back.
    estimate = audit["estimate"]
    own = estimate["reported"]["flagged_regions_by_own_class_donor"]
    by_class = estimate["reported"]["flagged_regions_by_donor_class"]
    assert own["corners"] == 1.0
    expected = min(1.0 + max(by_class[r].values()) - own[r] for r in by_class)
    assert estimate["terms"]["flagged_regions_transplanted"] == pytest.approx(expected)
    assert estimate["terms"]["flagged_regions_transplanted"] <= 0.65
    assert audit["model"]["kind"] == "onnx" and len(audit["model"]["sha256"]) == 64
    assert audit["data"]["per_source"] == {
        "ieee8023": {"COVID-19": PER_CLASS},
        "kermany": {"NORMAL": PER_CLASS, "PNEUMONIA": PER_CLASS},
        "nih": {"NORMAL": PER_CLASS},
    }
    probe = audit["checks"]["per_source"]["figures"]["source_probe_within_class"]
    assert set(probe) == {"NORMAL"}  # the only class held by two sources
    # Rescoring from the stored predictions (the benchmark's --rescore) gives the same audit, model not run.
    samples, _ = load_samples([marked_data], limit=None)
    again = rescore_audit(tmp_path / "out", load_classifier(model), samples)
    for key in ("verdict", "verdict_line", "estimated_clean_accuracy", "estimate"):
        assert again[key] == audit[key], key
    assert again["checks"] == audit["checks"]


def test_a_lung_model_is_not_flagged_by_the_corner_mask(marked_data: Path, tmp_path: Path) -> None:
    """A model reading only boxes over the lungs: masking the corners changes nothing it sees."""
    model = write_model(
        tmp_path / "m", "lungs", lung_model(), spec(["NORMAL", "COVID-19", "PNEUMONIA"], "probabilities")
    )
    result = audit_cli(model, marked_data, tmp_path / "out", "--seed", "3")
    assert result.returncode == 0, result.stderr
    audit = read_audit(tmp_path / "out")
    corners = audit["checks"]["periphery"]["figures"]["masks"]["corners"]
    assert corners["flips"] == 0 and corners["verdict"] == "pass"
    effects = audit["checks"]["transplant"]["figures"]["effects"]
    assert effects["corners"]["effect"] == 0 and effects["corners"]["verdict"] == "pass"  # it never sees them
    assert audit["scored_as"] == "labels" and audit["seed"] == 3
    hidden = audit["checks"]["lungs_hidden"]["figures"]
    assert hidden["lungs_found"] >= 3 * PER_CLASS  # the bundled segmenter finds most lungs


def test_in_memory_samples_and_masks() -> None:
    """``audit_classifier`` takes in-memory samples (the benchmark plants shortcuts this way); the periphery
    masks hold what they say."""
    meta = pd.read_csv(CXR3 / "metadata.csv", dtype=str, keep_default_na=False)
    rows = pd.concat(
        [_pick(meta, label, source, 3, 5) for label, source in [("COVID-19", "ieee8023"), ("NORMAL", "kermany")]]
    )
    samples = [
        Sample(Image.open(CXR3 / r["filename"]).convert("L"), r["label"], r["source"], r["patient_id"], r["filename"])
        for r in rows.to_dict("records")
    ]
    grey = np.asarray(samples[0].image)
    lungs = np.zeros(grey.shape, dtype=bool)
    lungs[150:400, 100:420] = True
    masks = periphery_masks(grey, lungs)
    assert masks["corners"][0, 0] and masks["corners"][-1, -1] and not masks["corners"][256, 256]
    assert masks["border"][0, 256] and not masks["border"][256, 256]
    assert not (masks["text"] & lungs).any()
    # The text mask is the bright pixels outside the grown lung box, grown by a square maximum filter: the same
    # mask as PIL's MaxFilter (the audit's earlier, slower way), on a film with burnt-in text drawn in.
    from PIL import ImageDraw, ImageFilter

    from covidxr.lab.blackbox import TEXT_GROW, _lung_box, text_level

    marked = Image.fromarray(grey.copy())
    ImageDraw.Draw(marked).text((20, 8), "L  PORTABLE", fill=255, font_size=24)
    marked = np.asarray(marked)
    inside = _lung_box(marked.shape, lungs)
    bright = (marked >= text_level(marked)) & ~inside
    size = 2 * max(1, round(TEXT_GROW * min(marked.shape) / 2)) + 1
    pil = np.asarray(Image.fromarray(bright.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))) > 0
    text = periphery_masks(marked, lungs)["text"]
    assert text[8:30, 20:60].any() and (text == (pil & ~inside)).all()
    assert (masks["all"] == (masks["corners"] | masks["border"] | masks["text"])).all()


# ---------------------------------------------------------------------------------------------
# A covidxr run folder through the same command
# ---------------------------------------------------------------------------------------------


def test_the_bundled_run_folder_gets_the_black_box_audit(tmp_path: Path) -> None:
    result = run_cli(
        "audit", default_model_path(), "--data", CXR3, "--blackbox", "--limit", "3", "--out", tmp_path / "out"
    )
    assert result.returncode == 0, result.stderr
    audit = read_audit(tmp_path / "out")
    assert audit["model"]["kind"] == "run" and audit["model"]["threshold"] is not None
    assert audit["data"]["images"] == 6 and audit["data"]["limit_per_source"] == 3
    assert audit["data"]["per_source"] == {"ieee8023": {"COVID-19": 3}, "kermany": {"NORMAL": 1, "PNEUMONIA": 2}}
    assert 0 <= audit["estimated_clean_accuracy"] <= audit["estimate"]["unchanged"] <= 1
    assert f"wrote {tmp_path / 'out' / 'audit.json'}" in result.stdout


def test_a_run_folder_with_one_data_folder_and_limit_asks_for_blackbox(tmp_path: Path) -> None:
    """The run's own audit (one --data) keeps its meaning; a black-box option without --blackbox says so."""
    result = run_cli("audit", default_model_path(), "--data", CXR3, "--limit", "3", "--out", tmp_path)
    assert_one_line_error(result, "--blackbox")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key or the value
# ---------------------------------------------------------------------------------------------


def test_an_onnx_model_without_data_is_refused(tmp_path: Path) -> None:
    model = write_model(tmp_path, "foreign", corner_model(), spec(["COVID-19", "other"]))
    assert_one_line_error(run_cli("audit", model), "--data")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("unknown key", "input.colour"),
        ("input shape", "input.size"),
        ("output count", "output.labels"),
        ("no COVID-19", "output.labels"),
        ("damaged graph", "not a usable ONNX graph"),
        ("not probabilities", "output.kind"),
    ],
)
def test_bad_models_are_refused_in_one_line(marked_data: Path, tmp_path: Path, case: str, fragment: str) -> None:
    graph, model_spec = corner_model(), spec(["COVID-19", "other"])
    if case == "unknown key":
        model_spec["input"]["colour"] = "grey"
    elif case == "input shape":
        model_spec["input"]["size"] = [32, 32]
    elif case == "output count":
        model_spec["output"]["labels"] = ["COVID-19", "NORMAL", "PNEUMONIA"]
    elif case == "no COVID-19":
        model_spec["output"]["labels"] = ["NORMAL", "PNEUMONIA"]
    elif case == "damaged graph":
        graph = graph.SerializeToString()[:200]
    else:
        graph, model_spec = corner_model(kind="probabilities"), spec(["COVID-19", "other"], "probabilities")
    model = write_model(tmp_path, "bad", graph, model_spec)
    assert_one_line_error(audit_cli(model, marked_data, tmp_path / "out"), fragment)
    assert not (tmp_path / "out" / "audit.json").exists()


def test_a_model_emitting_nan_gives_rows_without_a_decision(marked_data: Path, tmp_path: Path) -> None:
    """NaN for the marked images: those rows get the reason and no decision, and the audit completes."""
    model = write_model(tmp_path / "m", "nan", corner_model(nan_when_marked=True), spec(["COVID-19", "other"]))
    classifier = load_classifier(model)
    meta = pd.read_csv(marked_data / "metadata.csv", dtype=str, keep_default_na=False)
    samples = [
        Sample(
            Image.open(marked_data / r["filename"]).convert("L"),
            r["label"],
            r["source"],
            r["patient_id"],
            r["filename"],
        )
        for r in meta.to_dict("records")
    ]
    outputs = classifier.predict_proba([s.image for s in samples])
    marked = np.array([s.label == "COVID-19" for s in samples])
    assert np.isnan(outputs.probabilities[marked]).all() and np.isfinite(outputs.probabilities[~marked]).all()
    assert all(classifier.decide(outputs.probabilities[marked])[i] is None for i in range(marked.sum()))
    audit = audit_classifier(classifier, samples, tmp_path / "out", data=[])
    assert {row["name"] for row in audit["data"]["unanswered"]} == {s.name for s in samples if s.label == "COVID-19"}
    assert all("not finite" in row["reason"] for row in audit["data"]["unanswered"])
    assert read_audit(tmp_path / "out")["verdict"] == audit["verdict"]


def test_per_source_warns_when_every_source_holds_one_class(tmp_path: Path) -> None:
    """COVID-19 only from ieee8023 and NORMAL only from nih: no probe can run, yet the source alone gives the
    label, so per_source warns outright, whatever the model reads (here: only the lungs). With a second class
    in one source the same model's outputs are probed instead, and do not warn for this reason."""
    from covidxr.lab.blackbox import Predictions, make_scoring, per_source_check

    model = load_classifier(
        write_model(tmp_path, "lungs", lung_model(), spec(["NORMAL", "COVID-19", "PNEUMONIA"], "probabilities"))
    )
    cxr3 = pd.read_csv(CXR3 / "metadata.csv", dtype=str, keep_default_na=False)
    nih = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    parts = [(CXR3, _pick(cxr3, "COVID-19", "ieee8023", 6, 1)), (ADULT_CONTROLS, _pick(nih, "NORMAL", "nih", 6, 2))]
    parts += [(CXR3, _pick(cxr3, "NORMAL", "kermany", 6, 3)), (CXR3, _pick(cxr3, "PNEUMONIA", "kermany", 6, 4))]
    samples = [
        Sample(Image.open(origin / r["filename"]).convert("L"), r["label"], r["source"], r["patient_id"])
        for origin, frame in parts
        for r in frame.to_dict("records")
    ]
    probabilities = np.asarray(model.predict_proba([s.image for s in samples]).probabilities, dtype=np.float64)

    def check(chosen: list[Sample]) -> dict:
        rows = [samples.index(s) for s in chosen]
        scoring = make_scoring(model.labels, [s.label for s in chosen])
        p = probabilities[rows]
        decided = np.array(model.decide(p), dtype=object)
        preds = Predictions({"unchanged": p}, {"unchanged": decided}, [None] * len(rows), decided)
        return per_source_check(scoring, chosen, preds, model.covid_index, seed=0)

    confounded = check(samples[:12])
    assert confounded["verdict"] == "warning"
    assert confounded["figures"]["one_class_sources"] == ["ieee8023", "nih"]
    assert "every source holds a single class (ieee8023, nih)" in confounded["summary"]
    # Kermany holding two classes: NORMAL from nih and kermany is probed instead, and nothing warns for this.
    mixed = check(samples)
    assert mixed["figures"]["source_probe_within_class"] and "every source" not in mixed["summary"]
    # One class in all (NORMAL from nih and kermany): the source cannot give a label that does not vary.
    assert "every source" not in check(samples[6:18])["summary"]


def sharpness_model(size: int, level: float) -> onnx.ModelProto:
    """[COVID-19, NORMAL] logits from sharpness only: the mean absolute step between neighbouring pixels over
    that between pixels 4 apart (about 1/4 on a film enlarged 4x, bilinear); COVID-19 below ``level``."""
    nodes = []
    for lag in (1, 4):
        nodes += [
            _const(f"from{lag}", [lag], TensorProto.INT64),
            _const(f"end{lag}", [size], TensorProto.INT64),
            _const(f"zero{lag}", [0], TensorProto.INT64),
            _const(f"stop{lag}", [size - lag], TensorProto.INT64),
            _const(f"axis{lag}", [2], TensorProto.INT64),
            helper.make_node("Slice", ["x", f"from{lag}", f"end{lag}", f"axis{lag}"], [f"right{lag}"]),
            helper.make_node("Slice", ["x", f"zero{lag}", f"stop{lag}", f"axis{lag}"], [f"left{lag}"]),
            helper.make_node("Sub", [f"right{lag}", f"left{lag}"], [f"step{lag}"]),
            helper.make_node("Abs", [f"step{lag}"], [f"abs{lag}"]),
            helper.make_node("ReduceMean", [f"abs{lag}"], [f"mean{lag}"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", [f"mean{lag}", "shape_n1"], [f"d{lag}"]),
        ]
    nodes += [
        helper.make_node("Div", ["d1", "d4"], ["ratio"]),
        _const("level", [level]),
        _const("k", [200.0]),
        helper.make_node("Sub", ["level", "ratio"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["covid"]),
        helper.make_node("Sub", ["ratio", "ratio"], ["normal"]),
        helper.make_node("Concat", ["covid", "normal"], ["y"], axis=1),
    ]
    return _graph(nodes, 2, input_shape=("N", size, size, 1))


def test_a_low_resolution_shortcut_is_not_estimable(tmp_path: Path) -> None:
    """A model reading only sharpness, on data whose COVID-19 images are all enlarged from a quarter of their
    size: a transplant can blur the others but cannot sharpen these, so the look moves one class only, and
    the audit declines to estimate accuracy without the shortcut rather than give the unchanged one."""
    from covidxr.lab.blackbox import LOOK_ONE_WAY
    from covidxr.lab.transplant import down_up, effective_resolution

    nih = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    samples = []
    for label, shown_as, seed in (("PNEUMONIA", "COVID-19", 6), ("NORMAL", "NORMAL", 7)):
        for r in _pick(nih, label, "nih", 24, seed).to_dict("records"):
            grey = np.asarray(Image.open(ADULT_CONTROLS / r["filename"]).convert("L"))
            if shown_as == "COVID-19":
                grey = down_up(grey, 4)
            elif effective_resolution(grey) > 1:  # the others: sharp films only, so their look is sharp
                continue
            if sum(s.label == shown_as for s in samples) < 8:
                samples.append(Sample(Image.fromarray(grey), shown_as, "nih", r["patient_id"], r["filename"]))
    size = 512

    def sharpness(image: Image.Image) -> float:
        x = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        return float(np.abs(x[:, 1:] - x[:, :-1]).mean() / np.abs(x[:, 4:] - x[:, :-4]).mean())

    blurred, sharp = ([sharpness(s.image) for s in samples if (s.label == "COVID-19") == b] for b in (True, False))
    assert len(blurred) == len(sharp) == 8 and max(blurred) < min(sharp)
    model_spec = spec(["COVID-19", "NORMAL"], size=[size, size])
    model = load_classifier(
        write_model(tmp_path, "sharp", sharpness_model(size, (max(blurred) + min(sharp)) / 2), model_spec)
    )
    audit = audit_classifier(model, samples, sample_limit=None)
    assert audit["estimate"]["unchanged"] == 1.0
    assert audit["checks"]["transplant"]["figures"]["effects"]["look"]["verdict"] in {"fail", "warning"}
    moved = audit["estimate"]["reported"]["look_change_by_recipient_class"]
    assert moved["covid"] < LOOK_ONE_WAY * moved["other"]  # blurring the others moves them; these cannot move
    assert audit["estimated_clean_accuracy"] is None
    assert audit["estimate"]["limited_by"].startswith("not estimable: the look moves the answer of one class only")
