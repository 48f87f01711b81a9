"""The model shipped inside the package: installed from a wheel, it predicts with no run folder and no
network, and on its own test split it gives exactly the figures its model card reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr import DISCLAIMER, load_model
from covidxr.runtime.calibration import decide
from covidxr.runtime.card import model_card
from covidxr.runtime.runs import BUNDLED

from .conftest import BORDERLINE, decision_margin

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """covidxr built into a wheel and installed, without its dependencies, into a folder of its own."""
    root = tmp_path_factory.mktemp("install")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = root.glob("covidxr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "run.json",
        "config.yaml",
        "head.safetensors",
        "ood.safetensors",
        "model_card.md",
        "model.onnx",
        "model.json",
    ):
        assert f"covidxr/bundled/{name}" in names
    site = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    return site


def test_installed_package_predicts_with_the_bundled_model(installed: Path, cxr3: Path, tmp_path: Path) -> None:
    image = cxr3 / pd.read_csv(cxr3 / "metadata.csv")["filename"].iloc[0]
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),  # ahead of the editable checkout
        "HOME": str(tmp_path),  # an empty home: no cache, no run folders
        "COVIDXR_CACHE_DIR": str(tmp_path / "cache"),
        "COVIDXR_OFFLINE": "1",
    }
    code = "import covidxr, sys; print(covidxr.__file__); from covidxr.cli import cli; sys.argv[0] = 'covidxr'; cli()"
    result = subprocess.run(
        [sys.executable, "-c", code, "predict", str(image), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    where, _, payload = result.stdout.partition("\n")
    assert Path(where).is_relative_to(installed)  # the installed copy, not the checkout
    [answer] = json.loads(payload)
    assert answer["label"] in {"COVID-19", "NORMAL", "PNEUMONIA"} and answer["out_of_distribution"] is False
    assert answer["disclaimer"] == DISCLAIMER
    card = subprocess.run(
        [sys.executable, "-c", code, "model-card"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert card.returncode == 0 and "Research use only" in card.stdout and "## Known failure modes" in card.stdout


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_bundled_model_reproduces_its_reported_test_figures(engine: str, cxr3: Path) -> None:
    """The test split in the bundle, predicted again, gives the accuracy the card reports: the shipped
    head, statistics and calibration are those that were evaluated. Only an image on a decision boundary
    (within BORDERLINE) may be decided the other way by another engine or another CPU's kernels; the
    bundled model has none there (its closest is 0.002 away), so on every CPU the count is exact."""
    splits = pd.read_csv(BUNDLED / "splits.csv")
    test = splits[splits["split"] == "test"]
    metrics = json.loads((BUNDLED / "metrics.json").read_text())
    assert len(test) == metrics["n"]
    model = load_model(engine=engine)
    results = model.predict([cxr3.parent / name for name in test["filename"]])
    assert not [r["error"] for r in results if "error" in r]
    # Every image's decision, also for those the guard flags (given no label): what evaluate scored.
    probabilities = np.array([[r["probabilities"][label] for label in model.labels] for r in results])
    decided = [model.labels[k] for k in decide(probabilities, model.labels, model.run.covid_threshold)]
    assert all(r["label"] in {None, d} for r, d in zip(results, decided, strict=True))
    correct = sum(d == label for d, label in zip(decided, test["label"], strict=True))
    borderline = sum(decision_margin(r["probabilities"], model.run.covid_threshold) < BORDERLINE for r in results)
    assert abs(correct - metrics["correct"]) <= borderline
    flagged = sum(r["out_of_distribution"] for r in results)
    assert flagged <= 0.05 * len(results)  # its own test X-rays are in distribution
    card = model_card(BUNDLED)
    assert card["test_metrics"]["accuracy"] == metrics["accuracy"]
    assert "z-score" in card["design"]
