"""Conformal prediction sets at a site (issue 23): ``covidxr calibrate --coverage 0.9`` calibrates split-conformal,
class-conditional (Mondrian) thresholds on the LAC score 1 - p(class) with MAPIE; ``predict --site`` gives each
answered image its set, and an image whose set is not one class is answered "indeterminate".

Real images, no mocks: cxr3 split by patient into a calibration part and a held-out part (80 images per class each)."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from covidxr.lab.site import conformal_thresholds
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.site import SITE_FORMAT, SiteCalibration, load_site

from .conftest import assert_one_line_error, linked_dataset, run_cli

run = partial(run_cli, installed=True)
PER_CLASS = 80
COVERAGE = 0.9
INDETERMINATE = re.compile(r"^indeterminate: \{(.*)\}$")


@pytest.fixture(scope="module")
def parts(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """cxr3 split by patient (no patient in both), PER_CLASS images per class in each part."""
    patients = np.array(sorted(cxr3_meta["patient_id"].unique()))
    first = set(np.random.default_rng(9).permutation(patients)[: len(patients) // 2])
    in_first = cxr3_meta["patient_id"].isin(first)
    root = tmp_path_factory.mktemp("cxr3-parts")

    def take(rows: pd.DataFrame) -> pd.DataFrame:
        return pd.concat(
            rows[rows["label"] == label].sample(PER_CLASS, random_state=9) for label in sorted(set(rows["label"]))
        )

    return (
        linked_dataset(root / "calibration", cxr3, take(cxr3_meta[in_first])),
        linked_dataset(root / "held-out", cxr3, take(cxr3_meta[~in_first])),
    )


@pytest.fixture(scope="module")
def calibrated(parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    site = tmp_path_factory.mktemp("site") / "site.json"
    result = run("calibrate", parts[0], "--coverage", str(COVERAGE), "--out", site)
    assert result.returncode == 0, result.stderr
    return site, result.stdout


@pytest.fixture(scope="module")
def held_out(parts: tuple[Path, Path], calibrated: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("predictions") / "held-out.csv"
    result = run("predict", parts[1] / "images", "--site", calibrated[0], "--out", out)  # not its metadata.csv
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out, keep_default_na=False)
    truth = pd.read_csv(parts[1] / "metadata.csv", dtype=str, keep_default_na=False)
    names = {str(parts[1] / name): label for name, label in zip(truth["filename"], truth["label"], strict=True)}
    return table.assign(truth=[names[name] for name in table["file"]])


def prediction_set(row: pd.Series) -> list[str] | None:
    """The set an answer gives: its label alone, the classes an indeterminate answer names, None for no answer."""
    if row["label"]:
        return [row["label"]]
    match = INDETERMINATE.match(row["no_answer_reason"])
    return None if match is None else [m for m in match[1].split(", ") if m]


def test_mapie_thresholds_are_the_finite_sample_conformal_quantile() -> None:
    rng = np.random.default_rng(0)
    probabilities, labels = rng.dirichlet([1, 1, 1], size=90), ["A", "B", "C"] * 30
    thresholds = conformal_thresholds(probabilities, labels, ["A", "B", "C"], COVERAGE)
    for k, label in enumerate("ABC"):
        scores = np.sort(1 - probabilities[np.array(labels) == label, k])
        assert thresholds[label] == {"threshold": scores[int(np.ceil(31 * COVERAGE)) - 1], "n": 30}
    # Too few images for the asked coverage (fewer than 1/α): refused, never a set that always holds the class.
    with pytest.raises(CovidxrError, match="only 20 A image"):
        conformal_thresholds(probabilities[:60], labels[:60], ["A", "B", "C"], 0.99)


def test_calibrate_coverage_writes_per_class_thresholds(calibrated: tuple[Path, str]) -> None:
    site_path, printed = calibrated
    bundled = load_run(default_model_path())
    site = load_site(site_path, bundled)
    data = json.loads(site_path.read_text())
    assert data["format"] == SITE_FORMAT == "covidxr-site-2" and site.target is None and site.metric is None
    assert site.covid_threshold == site.run_threshold == bundled.info.covid_threshold
    conformal = site.conformal
    assert conformal["coverage"] == COVERAGE and conformal["score"] == "lac"
    assert list(conformal["classes"]) == list(bundled.labels)
    for label, entry in conformal["classes"].items():
        assert entry["n"] == site.counts[label] >= 20 and 0 <= entry["threshold"] <= 1
    assert "prediction sets for 90% coverage per class" in printed
    assert f"n={conformal['classes']['COVID-19']['n']}" in printed


def test_held_out_coverage_per_class_and_indeterminate_answers(
    calibrated: tuple[Path, str], held_out: pd.DataFrame
) -> None:
    site = load_site(calibrated[0])
    thresholds = site.set_thresholds
    labels = list(site.conformal["classes"])
    measured = {}
    indeterminate = 0
    for _, row in held_out.iterrows():
        members = prediction_set(row)
        if members is None:  # turned away by the OOD guard or the lung check: no set
            assert row["no_answer_reason"] and not row["no_answer_reason"].startswith("indeterminate")
            continue
        # The set is exactly the classes k with 1 - p_k <= q_k, in label order.
        expected = [k for k in labels if 1 - row[f"p_{k}"] <= thresholds[k]]
        margins = [abs(1 - row[f"p_{k}"] - thresholds[k]) for k in labels]
        if min(margins) > 1e-4:  # not on a boundary another float32 path could tip
            assert members == expected, (row.to_dict(), expected)
        if len(members) != 1:
            indeterminate += 1
            assert row["label"] == "" and row["covid_positive"] == ""
            assert row["no_answer_reason"] == "indeterminate: {" + ", ".join(members) + "}"
        hits, n = measured.get(row["truth"], (0, 0))
        measured[row["truth"]] = (hits + (row["truth"] in members), n + 1)
    report = {label: f"{hits}/{n} = {hits / n:.1%}" for label, (hits, n) in sorted(measured.items())}
    print(f"held-out coverage per class at {COVERAGE:.0%}: {report}; indeterminate: {indeterminate}")
    assert set(measured) == set(labels)
    for label, (hits, n) in measured.items():
        assert n >= 60, (label, n)
        # Below 1 - α by more than sampling allows: fewer hits than a Binomial(n, 0.9) gives once in a thousand.
        assert binom.cdf(hits, n, COVERAGE) > 1e-3, (label, hits, n, report)


def test_predict_text_shows_the_set(parts: tuple[Path, Path], calibrated: tuple[Path, str], held_out) -> None:
    reasons = held_out["no_answer_reason"]
    picks = [held_out[held_out["label"] != ""]["file"].iloc[0]]
    if reasons.str.startswith("indeterminate").any():
        picks.append(held_out[reasons.str.startswith("indeterminate")]["file"].iloc[0])
    result = run("predict", *picks, "--site", calibrated[0])
    assert result.returncode == 0, result.stderr
    assert re.search(r"set \{[A-Z0-9-]+\}", result.stdout), result.stdout
    if len(picks) > 1:
        assert "indeterminate: {" in result.stdout and ": no answer" in result.stdout


def test_coverage_refuses_one_class_or_too_few_images(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path) -> None:
    normal = cxr3_meta[cxr3_meta["label"] == "NORMAL"].head(30)
    one = linked_dataset(tmp_path / "one-class", cxr3, normal)
    result = run("calibrate", one, "--coverage", "0.9", "--out", tmp_path / "a.json")
    assert_one_line_error(result, "images of 1 class(es)", "--coverage", "every class")
    few = pd.concat(
        [
            normal,
            cxr3_meta[cxr3_meta["label"] == "PNEUMONIA"].head(25),
            cxr3_meta[cxr3_meta["label"] == "COVID-19"].head(5),
        ]
    )
    folder = linked_dataset(tmp_path / "few", cxr3, few)
    result = run("calibrate", folder, "--coverage", "0.9", "--specificity", "0.9", "--out", tmp_path / "b.json")
    assert_one_line_error(result, "too few images of COVID-19 5", "at least 20 per class")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_format_1_files_keep_opening_and_damaged_sets_are_refused(calibrated: tuple[Path, str]) -> None:
    data = json.loads(calibrated[0].read_text())
    old = {**data, "format": "covidxr-site-1", "target": {"metric": "specificity", "value": 0.9}}
    old.pop("conformal")
    assert SiteCalibration.from_dict(old, "old.json").conformal is None
    assert SiteCalibration.from_dict(old, "old.json").set_thresholds is None
    broken = {**data, "conformal": {**data["conformal"], "classes": {"NORMAL": {"threshold": 2.0, "n": 30}}}}
    with pytest.raises(CovidxrError, match="damaged"):
        SiteCalibration.from_dict(broken, "broken.json")
    with pytest.raises(CovidxrError, match="neither a target metric nor prediction sets"):
        SiteCalibration.from_dict({**data, "conformal": None}, "none.json")


def test_predict_out_states_each_images_set(
    calibrated: tuple[Path, str], held_out: pd.DataFrame, tmp_path: Path
) -> None:
    """``prediction_set`` in ``predict --out`` files: ``{A, B}`` (``{}`` for the empty set) for every image that got
    a set, empty for one turned away before (guard, lung check); the same in CSV and JSON."""

    def check(rows: list[dict]) -> int:
        with_sets = 0
        for row in rows:
            members = prediction_set(pd.Series(row))
            if members is None:
                assert row["prediction_set"] == "", row
            else:
                assert row["prediction_set"] == "{" + ", ".join(members) + "}", row
                with_sets += 1
        return with_sets

    assert check(held_out.to_dict("records")) >= 0.9 * len(held_out)
    picks = list(held_out["file"].head(12))
    out = tmp_path / "sets.json"
    result = run("predict", *picks, "--site", calibrated[0], "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [{k: "" if v is None else v for k, v in row.items()} for row in json.loads(out.read_text())["predictions"]]
    assert [row["file"] for row in rows] == picks and check(rows) > 0
