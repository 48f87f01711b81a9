"""What stands beside every answer (issue 28 items 1, 2, 3, 6, 11): the held-out weakness from the run's own
records, why a label goes against the larger bar, seen_in_training by content hash, no probability beside "no
answer", one reason for a photograph, empty Grad-CAM maps said in words, and a user's own --threshold; in the
CLI, the Python API, the service and the page (Chromium), on the shared images."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from skimage import data as skimage_data

from covidxr import load_model
from covidxr.runtime.answers import MIN_HELD_OUT, weakness
from covidxr.runtime.cam import COLOUR_PHOTOGRAPH
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Loso, Metrics
from covidxr.runtime.runs import BUNDLED, load_run

from .conftest import ADULT_CONTROLS, CXR3, assert_one_line_error, linked_dataset, run_cli
from .test_serve import Server, post

# An NIH normal of the bundled model's test split that it calls COVID-19 although NORMAL is more probable.
NIH_NORMAL = ADULT_CONTROLS / "images" / "nih_00003601_006.jpg"
PAVING = CXR3 / "images" / "ieee8023_paving.jpg"  # its Grad-CAM map is all zero
PROBABILITY = re.compile(r"\b[01]\.\d{3}\b")


def bundled_splits() -> pd.DataFrame:
    return pd.read_csv(BUNDLED / "splits.csv", dtype=str, keep_default_na=False)


def nih_images(split: str, count: int) -> list[Path]:
    rows = bundled_splits().query("source == 'nih' and split == @split").head(count)
    return [ADULT_CONTROLS.parent / name for name in rows["filename"]]


def worst_held_out() -> tuple[str, int]:
    """The largest share of non-COVID images called COVID-19 at a held-out hospital of the bundled run's own
    loso.json (with at least MIN_HELD_OUT of them), as the line prints it, and its n: read here, never typed in."""
    units = [
        u
        for u in Loso.load(BUNDLED / "loso.json").units
        if u.status == "evaluated" and (u.n_other or 0) >= MIN_HELD_OUT
    ]
    worst = max(units, key=lambda u: u.other_called_covid)
    return f"{worst.other_called_covid:.0%}", worst.n_other


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """Byte-identical copies under new names of 3 NIH images of the bundled model's training split and 2 of
    its test split, in one folder: only their content can tell them apart."""
    folder = tmp_path_factory.mktemp("copies")
    seen, unseen = [], []
    for i, path in enumerate(nih_images("train", 3) + nih_images("test", 2)):
        copy = folder / f"upload-{i}.jpg"
        shutil.copyfile(path, copy)
        (seen if i < 3 else unseen).append(copy)
    return folder, seen, unseen


def records_only(tmp_path: Path, *names: str) -> Path:
    """A run folder of the bundled run's files that ``load_run`` needs, plus ``names`` of its records."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("run.json", "config.yaml", "head.safetensors", "splits.csv", *names):
        shutil.copyfile(BUNDLED / name, folder / name)
    return folder


# ---------------------------------------------------------------------------------------------
# 1. The held-out weakness beside every answer; why an answer goes against the larger bar
# ---------------------------------------------------------------------------------------------


def test_predict_prints_the_weakness_and_why_covid_beats_the_larger_bar(photo: Path, tmp_path: Path) -> None:
    result = run_cli("predict", NIH_NORMAL, photo)
    assert result.returncode == 0, result.stderr
    rate, n = worst_held_out()
    weak = [line for line in result.stdout.splitlines() if line.startswith("Held-out weakness:")]
    assert len(weak) == 1 and f"called {rate} " in weak[0] and f"of {n} non-COVID" in weak[0], result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith(NIH_NORMAL.name))
    assert "COVID-19" in row and "the operating point; NORMAL is more probable" in row, row
    # 3. A no-answer row: no probability in the text table, one reason, and nothing about lungs for a photo.
    refused = next(line for line in result.stdout.splitlines() if line.startswith(photo.name))
    assert PROBABILITY.search(refused) is None, refused
    assert COLOUR_PHOTOGRAPH in refused and refused.endswith(": no answer") and "lung" not in refused, refused


def test_the_api_and_csv_carry_the_same_weakness_note_and_the_no_answer_probabilities(
    photo: Path, tmp_path: Path
) -> None:
    model = load_model()
    normal, refused = model.predict([NIH_NORMAL, photo])
    assert normal["weakness"] == weakness(model.run) and worst_held_out()[0] in normal["weakness"]
    p = normal["probabilities"]
    assert normal["label"] == "COVID-19" and p["NORMAL"] > p["COVID-19"] >= normal["covid_threshold"]
    assert normal["decision_note"].startswith(f"COVID-19 because p(COVID-19) {p['COVID-19']:.3f} ≥ ")
    assert refused["label"] is None and refused["no_answer_reason"].startswith(COLOUR_PHOTOGRAPH)
    assert refused["decision_note"] is None and refused["weakness"] == normal["weakness"]
    out = tmp_path / "answers.csv"
    assert run_cli("predict", NIH_NORMAL, photo, "--out", out).returncode == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert float(rows[1]["p_COVID-19"]) == pytest.approx(refused["probabilities"]["COVID-19"], abs=1e-4)
    assert rows[1]["label"] == "" and rows[1]["no_answer_reason"] == refused["no_answer_reason"]
    assert [row["threshold_source"] for row in rows] == ["model", "model"]


def test_the_weakness_is_read_from_the_runs_own_records(tmp_path: Path) -> None:
    folder = records_only(tmp_path, "loso.json", "metrics.json")
    loso = json.loads((folder / "loso.json").read_text())
    nih = next(u for u in loso["units"] if u["unit"] == "nih")
    nih |= {"other_called_covid": 0.125, "other_called_covid_ci95": [0.1, 0.15]}  # a rewritten record
    (folder / "loso.json").write_text(json.dumps(loso))
    rest = [u for u in Loso.load(folder / "loso.json").units if (u.n_other or 0) >= MIN_HELD_OUT and u.unit != "nih"]
    worst = max(rest, key=lambda u: u.other_called_covid)
    line = weakness(load_run(folder))
    assert f"({worst.unit}: retrained without it)" in line and f"{worst.other_called_covid:.0%}" in line
    (folder / "loso.json").unlink()  # no leave-one-source-out: the worst source of the held-out test split
    by_source = Metrics.load(folder / "metrics.json").by_source
    enough = {name: rates for name, rates in by_source.items() if (rates.n_other or 0) >= MIN_HELD_OUT}
    source, rates = max(enough.items(), key=lambda item: item[1].other_called_covid or 0)
    line = weakness(load_run(folder))
    assert "test split" in line and f"{rates.other_called_covid:.0%}" in line and f"from {source}" in line
    (folder / "metrics.json").unlink()
    assert "unknown" in weakness(load_run(folder))


def test_a_site_calibrated_model_shows_its_site_figures(tmp_path: Path) -> None:
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    data = linked_dataset(tmp_path / "site-data", ADULT_CONTROLS, meta.head(40))
    site = tmp_path / "site.json"
    made = run_cli("calibrate", data, "--specificity", "0.9", "--site-name", "Ward 7", "--out", site)
    assert made.returncode == 0, made.stderr
    specificity = json.loads(site.read_text())["achieved"]["specificity"]
    answer = load_model(site=site).predict(NIH_NORMAL)
    called = 1 - specificity["value"]
    assert answer["weakness"].startswith(f"at Ward 7, on {specificity['n']} local non-COVID images")
    assert f"called {called:.0%}" in answer["weakness"] and "retrained" not in answer["weakness"]
    assert answer["threshold_source"] == "site"


# ---------------------------------------------------------------------------------------------
# 2. seen_in_training, by content hash
# ---------------------------------------------------------------------------------------------


def test_seen_in_training_by_content_hash_in_cli_csv_and_api(copies, tmp_path: Path) -> None:
    folder, seen, unseen = copies
    out = tmp_path / "seen.csv"
    result = run_cli("predict", folder, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"warning: {len(seen)} of {len(seen) + len(unseen)} image(s) are in this model's training split" in (
        result.stdout
    )
    rows = {Path(row["file"]).name: row["seen_in_training"] for row in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows == {**{p.name: "True" for p in seen}, **{p.name: "False" for p in unseen}}
    answers = load_model().predict([*seen, *unseen])
    assert [a["seen_in_training"] for a in answers] == [True] * len(seen) + [False] * len(unseen)
    # A decoded image has no file to hash: unknown, not "unseen".
    assert load_model().predict(Image.open(seen[0]))["seen_in_training"] is None
    assert "warning:" not in run_cli("predict", *unseen).stdout


def test_evaluate_leaves_out_the_adult_controls_the_bundled_model_trained_on() -> None:
    """``evaluate --data adult-controls`` scores only the images the model never trained on (the whole
    evaluation, on the tiny run, is in test_honest_numbers); the count comes from the bundled splits.csv."""
    from covidxr.lab.evaluate import unseen_images

    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    trained = bundled_splits().query("split == 'train' and filename.str.startswith('adult-controls/')")
    kept, left_out = unseen_images(load_run(BUNDLED), meta, ADULT_CONTROLS)
    assert left_out == len(trained) and len(kept) == len(meta) - len(trained)
    assert not set("adult-controls/" + kept["filename"]) & set(trained["filename"])
    with pytest.raises(CovidxrError, match="every image is in"):
        unseen_images(load_run(BUNDLED), meta[~meta.index.isin(kept.index)], ADULT_CONTROLS)


# ---------------------------------------------------------------------------------------------
# 3 and 6. One reason for a photograph; an empty Grad-CAM map said in words
# ---------------------------------------------------------------------------------------------


def test_explain_says_an_empty_map_in_words_and_gives_a_photo_predicts_reason(photo: Path, tmp_path: Path) -> None:
    result = run_cli("explain", PAVING, NIH_NORMAL, photo, "--out", tmp_path / "maps")
    assert result.returncode == 0, result.stderr  # the photograph gets no answer, as from predict: not an error
    lines = result.stdout.splitlines()
    paving = next(line for line in lines if line.startswith(str(PAVING)))
    assert "no class-specific activation" in paving and "% of the map" not in paving, paving
    normal = next(line for line in lines if line.startswith(str(NIH_NORMAL)))
    assert "% of the map inside the lungs" in normal
    refused = load_model().predict(photo)["no_answer_reason"]
    refusal = next(line for line in lines if line.startswith(str(photo)))
    assert f"(no answer: {refused})" in refusal and "lungs" not in refused, (refused, refusal)
    model = load_model()
    [empty] = model.explain_files([PAVING], tmp_path / "api")
    assert empty["map_empty"] is True and empty["lung_share"] is None
    assert not model.explain(NIH_NORMAL)["map_empty"]


def test_the_lab_leaves_empty_maps_out_of_the_lung_share() -> None:
    from covidxr.lab.explain import _lung_mass

    lungs = np.zeros((8, 8), dtype=bool)
    lungs[2:6, 2:6] = True
    inside = np.where(lungs, 1.0, 0.0).astype(np.float32)
    mass = _lung_mass(np.stack([inside, np.zeros((8, 8), np.float32)]), [lungs, lungs], [0, 0], 0)
    assert mass["share"] == pytest.approx(1.0) and mass["n"] == 1 and mass["empty_maps"] == 1
    assert mass["lungs_not_found"] == 0


# ---------------------------------------------------------------------------------------------
# 11. A user's own operating point
# ---------------------------------------------------------------------------------------------


def test_threshold_decides_is_recorded_in_every_row_and_refuses_a_site_too(tmp_path: Path) -> None:
    p = load_model().predict(NIH_NORMAL)["probabilities"]["COVID-19"]
    above = round(p + 0.1, 2)
    out = tmp_path / "chosen.json"
    result = run_cli("predict", NIH_NORMAL, "--threshold", above, "--out", out)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(out.read_text())["predictions"]
    assert row["label"] == "NORMAL" and row["covid_threshold"] == above and row["threshold_source"] == "user"
    assert f"not at your threshold {above:.3f}" in result.stdout
    answer = load_model(threshold=above).predict(NIH_NORMAL)
    assert answer["label"] == "NORMAL" and answer["covid_threshold"] == above and answer["decision_note"] is None
    resumed = run_cli("predict", NIH_NORMAL, "--threshold", 0.2, "--out", out, "--resume")
    assert_one_line_error(resumed, "another model")  # rows of two operating points are never mixed
    assert_one_line_error(run_cli("predict", NIH_NORMAL, "--site", tmp_path / "s.json", "--threshold", 0.5), "not both")
    assert run_cli("predict", NIH_NORMAL, "--threshold", 1.5).returncode == 2  # click: out of range


# ---------------------------------------------------------------------------------------------
# The service and the page (Chromium)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chosen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server-threshold"), "--threshold", "0.3")
    yield running
    running.stop()


def _upload(browser: webdriver.Chrome, path: Path) -> None:
    browser.execute_script("document.body.dataset.state = ''")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 120).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in {"done", "error"}
    )


def test_the_page_shows_weakness_note_badge_photo_reason_and_empty_map(
    chosen_server: Server, browser: webdriver.Chrome, photo: Path
) -> None:
    answer = post(chosen_server, "/api/explain", NIH_NORMAL.read_bytes(), NIH_NORMAL.name).json()
    assert answer["threshold_source"] == "user" and answer["covid_threshold"] == 0.3
    assert answer["label"] == "COVID-19" and "NORMAL is more probable" in answer["decision_note"]
    assert answer["seen_in_training"] is False and "not at your threshold 0.300" in answer["weakness"]
    browser.set_window_size(1300, 800)
    browser.get(chosen_server.url)
    _upload(browser, NIH_NORMAL)
    note, weak = browser.find_element(By.ID, "decision-note"), browser.find_element(By.ID, "weakness")
    assert note.is_displayed() and "NORMAL is more probable" in note.text
    assert weak.is_displayed() and worst_held_out()[0] in weak.text
    assert weak.location["y"] + weak.size["height"] <= 800  # beside the answer, on the first screen
    assert not browser.find_element(By.ID, "seen-badge").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, ".legend").is_displayed()
    browser.set_window_size(390, 844)  # a phone: the longer answer still fits its width
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.set_window_size(1300, 800)

    _upload(browser, nih_images("train", 1)[0])  # an image of the training split: the badge
    assert browser.find_element(By.ID, "seen-badge").is_displayed()

    _upload(browser, photo)
    warning = browser.find_element(By.ID, "ood").text
    assert COLOUR_PHOTOGRAPH.lower() in warning.lower() and "lung" not in warning.lower()
    assert not browser.find_element(By.ID, "weakness").is_displayed()

    _upload(browser, PAVING)  # an all-zero map: words, not an even overlay under a "weak → strong" legend
    assert browser.find_element(By.ID, "empty-map").is_displayed()
    assert "No class-specific activation" in browser.find_element(By.ID, "empty-map").text
    assert not browser.find_element(By.CSS_SELECTOR, ".legend").is_displayed()
    assert not browser.find_element(By.ID, "heatmap").is_displayed()
