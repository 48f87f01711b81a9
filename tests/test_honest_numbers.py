"""Patient-level intervals, calibration, the validation-chosen threshold, seeds and external evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import covidxr
from covidxr.lab.evaluate import evaluate_run
from covidxr.lab.features import extract_features
from covidxr.lab.labels import LABELS
from covidxr.lab.metrics import compute_metrics
from covidxr.lab.models import run_model
from covidxr.lab.reproduce import reproduce
from covidxr.runtime.calibration import (
    choose_threshold,
    decide,
    describe_operating_point,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from covidxr.runtime.card import model_card, render_model_card
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.inference import predict_files
from covidxr.runtime.runs import load_run

from .conftest import PROBABILITY_TOLERANCE, linked_dataset

FAST = TrainConfig(model="efficientnet_lite0", epochs=6, image_size=224)


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run  # shared by the session (conftest); read only: a test that alters a run copies it


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 3))
    truth = np.array([rng.choice(3, p=p) for p in softmax(logits, temperature=2.0)])
    assert fit_temperature(logits, truth) == pytest.approx(2.0, rel=0.1)
    assert expected_calibration_error(softmax(logits, 2.0), truth) < expected_calibration_error(softmax(logits), truth)
    # Every validation image right: the optimum runs to T -> 0, which says nothing; keep T = 1.
    separable = np.eye(3)[truth] * 5.0
    assert fit_temperature(separable, truth) == 1.0


def test_expected_calibration_error_by_hand() -> None:
    probabilities = np.array([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0], [0.6, 0.3, 0.1]])
    truth = np.array([0, 1, 0, 0])
    # bin (0.8, 0.867]: none; (0.867, 0.933]: conf 0.9, acc 0.5 -> 0.4 x 2/4; (0.533, 0.6]: conf 0.6, acc 1 -> 0.4 x 2/4
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.4)


def test_threshold_maximises_youden_j_on_validation() -> None:
    covid_scores = np.linspace(0.3, 1.0, 20)  # 20 COVID-19 images
    other_scores = np.linspace(0.0, 0.6, 30)
    scores, is_covid = np.r_[covid_scores, other_scores], np.r_[np.ones(20, bool), np.zeros(30, bool)]
    threshold = choose_threshold(scores, is_covid)
    # Youden's J by brute force over every observed cut-off; ties go to the highest cut-off.
    j = [(scores[is_covid] >= c).mean() - (scores[~is_covid] >= c).mean() for c in scores]
    best = max(c for c, value in zip(scores, j, strict=True) if value == max(j))
    assert threshold.value == pytest.approx(best) and threshold.rule == "youden"
    assert threshold.val_sensitivity == pytest.approx((covid_scores >= best).mean())
    assert threshold.val_specificity == pytest.approx((other_scores < best).mean())
    none = choose_threshold(other_scores, np.zeros(30, bool))
    assert none.value == 0.5 and none.val_sensitivity is None and none.val_positives == 0


def test_label_is_the_decision_and_old_rules_stay_described() -> None:
    labels = ["COVID-19", "NORMAL", "PNEUMONIA"]
    probabilities = np.array([[0.30, 0.10, 0.60], [0.20, 0.50, 0.30], [0.20, 0.30, 0.50], [0.90, 0.05, 0.05]])
    # 0.30 reaches the threshold 0.25 though PNEUMONIA is more probable; below it, the better other class.
    assert list(decide(probabilities, labels, 0.25)) == [0, 1, 2, 0]
    assert list(decide(probabilities, labels, 0.95)) == [2, 1, 2, 1]
    old = {"value": 0.039, "target_sensitivity": 0.95, "val_sensitivity": 0.96, "val_positives": 28}
    assert "sensitivity 95%" in describe_operating_point(old) and "kept" in describe_operating_point(old)
    assert "Youden" in describe_operating_point({"value": 0.4, "rule": "youden", "val_positives": 3})


def test_a_run_stores_calibration_and_predict_uses_it(run_dir: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    calibration = info["calibration"]
    assert 0.05 <= calibration["temperature"] <= 20
    threshold = calibration["covid_threshold"]
    assert 0 <= threshold["value"] <= 1 and threshold["rule"] == "youden"
    run = load_run(run_dir)
    images = [cxr3 / name for name in cxr3_meta.groupby("label").head(2)["filename"]]
    results = predict_files(run, images, progress=False)
    features = torch.from_numpy(extract_features(run_model(run), images, progress=False))
    with torch.no_grad():
        logits = run_model(run).head(features).double().numpy()
    expected = softmax(logits, calibration["temperature"])
    got = np.array([[r["probabilities"][label] for label in LABELS] for r in results])
    # The graph in onnxruntime against the backbone's features and the torch head: two float32 paths.
    assert np.abs(got - expected).max() < PROBABILITY_TOLERANCE
    covid = LABELS.index("COVID-19")
    called = got[:, covid] >= threshold["value"]  # predict's own probability against the stored threshold
    answered = [r["label"] is not None for r in results]
    assert [r["covid_positive"] for r in results] == [
        bool(c) if a else None for c, a in zip(called, answered, strict=True)
    ]
    assert all((r["label"] == "COVID-19") == r["covid_positive"] for r in results if r["label"] is not None)


def test_patient_bootstrap_gives_intervals_around_every_rate() -> None:
    rng = np.random.default_rng(1)
    truth = list(np.repeat(LABELS, 30))
    probabilities = rng.dirichlet(np.ones(3), size=90)
    probabilities[np.arange(90), [LABELS.index(t) for t in truth]] += 0.6  # mostly right
    probabilities /= probabilities.sum(1, keepdims=True)
    patients = [f"p{i // 3}" for i in range(90)]  # three images per patient
    metrics = compute_metrics(truth, probabilities, list(LABELS), patients)
    assert metrics["bootstrap"]["patients"] == 30 and metrics["bootstrap"]["unit"] == "patient"
    low, high = metrics["accuracy_bootstrap_ci95"]
    assert low < metrics["accuracy"] < high
    for label, rates in metrics["per_class"].items():
        for rate in ("sensitivity", "specificity", "auc"):
            low, high = rates[f"{rate}_ci95"]
            assert low <= rates[rate] <= high, (label, rate)
    # Resampling patients, not images: the interval is wider than when each image were its own patient.
    per_image = compute_metrics(truth, probabilities, list(LABELS), [f"i{i}" for i in range(90)])
    assert np.diff(metrics["accuracy_bootstrap_ci95"]) > np.diff(per_image["accuracy_bootstrap_ci95"])


def test_external_evaluation_reports_covid_versus_rest_and_the_class_mix_shift(
    run_dir: Path, cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path
) -> None:
    trained = pd.read_csv(run_dir / "splits.csv", dtype=str).query("split == 'train'")["filename"]
    rows = cxr3_meta[cxr3_meta["label"].isin(["COVID-19", "NORMAL"]) & ~cxr3_meta["filename"].isin(trained)]
    rows = rows.groupby("label").tail(5)
    seen = cxr3_meta[cxr3_meta["filename"].isin(trained)].head(1)  # an image the run trained on: left out
    external = linked_dataset(tmp_path / "external", cxr3, pd.concat([rows, seen]))
    metrics = evaluate_run(run_dir, data=external, out=tmp_path / "eval", progress=False, explain=False)
    assert metrics["seen_in_training_left_out"] == 1 and metrics["n"] == len(rows)
    versus = metrics["covid_vs_rest"]
    assert versus["n_covid"] == 5 and versus["n_other"] == 5 and 0 <= versus["auc"] <= 1
    assert versus["threshold"] == load_run(run_dir).covid_threshold
    for rate in ("sensitivity", "specificity", "called_covid_share"):
        low, high = versus[f"{rate}_ci95"]  # Wilson, from the counts
        assert low <= versus[rate] <= high
    shift = metrics["predicted_class_shift"]
    assert set(shift["this_data"]) == set(LABELS) and 0 <= shift["total_variation"] <= 1
    assert sum(shift["internal_test"].values()) == pytest.approx(1)
    assert metrics["calibration"]["temperature"] == load_run(run_dir).temperature
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 0


def test_reproduce_over_seeds_reports_the_spread(small_dataset: Path, tmp_path: Path) -> None:
    rows = reproduce(
        small_dataset, tmp_path / "rep", ("efficientnet_lite0",), FAST, progress=False, seeds=(0, 1, 2), audit=False
    )
    row = rows[0]
    per_seed = pd.read_csv(tmp_path / "rep" / "seeds.csv")
    assert list(per_seed["seed"]) == [0, 1, 2] and list(per_seed["run"]) == [
        "efficientnet_lite0",
        "efficientnet_lite0-seed1",
        "efficientnet_lite0-seed2",
    ]
    assert row["seeds"] == "0 1 2"
    assert row["accuracy_mean"] == pytest.approx(per_seed["accuracy"].mean())
    assert row["accuracy_sd"] == pytest.approx(per_seed["accuracy"].std(ddof=1))
    assert row["accuracy_min"] <= row["accuracy_mean"] <= row["accuracy_max"]
    splits = [pd.read_csv(tmp_path / "rep" / name / "splits.csv")["split"] for name in per_seed["run"]]
    assert not splits[0].equals(splits[1])  # the split follows the seed too


def test_a_run_made_before_the_youden_rule_keeps_its_stored_operating_point(
    run_dir: Path, cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path
) -> None:
    """An older run.json (highest cut-off reaching 95% validation sensitivity, no rule) predicts, labels
    and describes itself by what it stored."""
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    info = json.loads((old / "run.json").read_text())
    info["calibration"]["covid_threshold"] = {
        "value": 0.2,
        "target_sensitivity": 0.95,
        "val_sensitivity": 0.96,
        "val_specificity": 0.5,
        "val_positives": 3,
    }
    (old / "run.json").write_text(json.dumps(info))
    model = covidxr.load_model(old)
    assert model.run.covid_threshold == 0.2
    images = [cxr3 / name for name in cxr3_meta.groupby("label").head(3)["filename"]]
    for result in model.predict(images):
        if result["label"] is not None:
            assert (result["label"] == "COVID-19") == (result["probabilities"]["COVID-19"] >= 0.2)
    card = model_card(old)
    assert card["operating_point"]["covid_threshold"] == 0.2
    assert "highest cut-off reaching validation sensitivity 95%" in card["operating_point"]["rule"]
    assert "Operating point: COVID-19 threshold 0.200" in render_model_card(card)
