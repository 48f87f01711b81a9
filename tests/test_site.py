"""Trust at your own hospital (issue 23): ``covidxr calibrate`` sets the COVID-19 operating point on a site's
own labelled images, and ``predict`` / ``serve`` / ``load_model`` apply it with ``--site`` / ``site=``.

Real images, no mocks: the NIH adult controls (no COVID-19 image, so every COVID-19 call is false), split by
patient into a calibration half and a held-out half."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr import load_model
from covidxr.lab.site import choose_site_threshold, clopper_pearson, images_needed
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.site import SITE_FORMAT, SiteCalibration, load_site

from .conftest import (
    ADULT_CONTROLS,
    BORDERLINE,
    PROBABILITY_TOLERANCE,
    assert_one_line_error,
    linked_dataset,
    nih_halves,
    run_cli,
)
from .test_dicom import dx_dataset, save, to_bits
from .test_serve import Server

run = partial(run_cli, installed=True)  # the installed ``covidxr`` command, as a user types it


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 810 NIH adult controls split by patient into two dataset folders of symlinks (no patient in both)."""
    return nih_halves(tmp_path_factory.mktemp("nih-halves"))


@pytest.fixture(scope="module")
def calibrated(halves: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``covidxr calibrate`` on the calibration half at specificity 95%: the site file and what it printed."""
    site = tmp_path_factory.mktemp("site") / "site.json"
    result = run("calibrate", halves[0], "--specificity", "0.95", "--site-name", "NIH half A", "--out", site)
    assert result.returncode == 0, result.stderr
    return site, result.stdout


@pytest.fixture(scope="module")
def held_out(halves: tuple[Path, Path], calibrated: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    """The held-out half predicted with the site file and without it (``predict --out``)."""
    out = tmp_path_factory.mktemp("held-out-predictions")
    tables = {}
    for name, extra in (("site", ["--site", calibrated[0]]), ("own", [])):
        result = run("predict", halves[1] / "images", "--out", out / f"{name}.csv", *extra)  # not metadata.csv
        assert result.returncode == 0, result.stderr
        tables[name] = pd.read_csv(out / f"{name}.csv", keep_default_na=False)
    return tables


def false_covid_rate(table: pd.DataFrame) -> tuple[int, int]:
    """COVID-19 calls among the images given an answer (every image here is non-COVID)."""
    answered = table[table["label"] != ""]
    return int((answered["label"] == "COVID-19").sum()), len(answered)


# ---------------------------------------------------------------------------------------------
# Calibrating
# ---------------------------------------------------------------------------------------------


def test_clopper_pearson_and_the_images_a_target_needs() -> None:
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.30850), abs=1e-5)
    assert clopper_pearson(95, 100) == pytest.approx((0.88716, 0.98356), abs=1e-5)
    assert clopper_pearson(10, 10) == pytest.approx((0.69150, 1.0), abs=1e-5)
    needed = images_needed(0.95, 0.02)
    low, high = clopper_pearson(round(0.95 * needed), needed)
    assert 400 < needed < 700 and (high - low) / 2 <= 0.02 + 1e-3


def test_the_threshold_reaches_the_target_on_the_images_it_was_chosen_on() -> None:
    scores = np.random.default_rng(0).uniform(size=200)
    for target in (0.8, 0.95, 0.99):
        threshold = choose_site_threshold(scores, "specificity", target)
        assert (scores < threshold).mean() >= target
        assert (scores < threshold).mean() - target < 1 / len(scores) + 1e-9  # the lowest such threshold
        assert threshold not in scores
        threshold = choose_site_threshold(scores, "sensitivity", target)
        assert (scores >= threshold).mean() >= target
        assert (scores >= threshold).mean() - target < 1 / len(scores) + 1e-9


def test_calibrate_writes_a_versioned_site_file_with_rates_and_intervals(calibrated: tuple[Path, str]) -> None:
    site_path, printed = calibrated
    bundled = load_run(default_model_path())
    site = load_site(site_path, bundled)
    data = json.loads(site_path.read_text())
    assert data["format"] == SITE_FORMAT and SiteCalibration.from_dict(data, site_path) == site
    assert SiteCalibration.from_dict(site.to_dict()).to_dict() == site.to_dict()
    assert site.site == "NIH half A" and site.target == {"metric": "specificity", "value": 0.95}
    assert site.model["run"] == "bundled" and len(site.model["head_sha256"]) == 64
    assert set(site.counts) == {"NORMAL", "PNEUMONIA"} and site.images >= 370  # of ~405: a few get no answer
    specificity = site.achieved["specificity"]
    assert "sensitivity" not in site.achieved  # no COVID-19 image to measure it on
    assert specificity.value >= 0.95 and specificity.low < specificity.value < specificity.high
    assert specificity.n == site.images and specificity.successes == round(specificity.value * specificity.n)
    assert site.covid_threshold > site.run_threshold == bundled.info.covid_threshold
    assert site.inputs["images"] == site.images + site.inputs["unanswered"]
    assert set(site.inputs["p_covid_quantiles"]) >= {"0.05", "0.5", "0.95"} and site.inputs["ood_score_quantiles"]
    assert f"calibrated at NIH half A on {site.images} local images: specificity 95%" in printed
    assert f"n={specificity.n}" in printed
    # About 400 images give about ±2.2%: one line says so and how many a ±2% interval needs.
    assert site.note and "needs about" in site.note and site.note in printed
    assert f"{specificity.n} non-COVID images give a specificity interval of ±" in site.note


def test_the_held_out_false_covid_rate_lies_in_the_calibrated_interval(
    calibrated: tuple[Path, str], held_out: dict[str, pd.DataFrame]
) -> None:
    site = load_site(calibrated[0])
    predicted = site.achieved["specificity"]
    calls, n = false_covid_rate(held_out["site"])
    own_calls, own_n = false_covid_rate(held_out["own"])
    rate, own_rate = calls / n, own_calls / own_n
    low, high = 1 - predicted.high, 1 - predicted.low  # the false-COVID rate the calibration predicts
    print(
        f"\nheld-out NIH half: false COVID-19 {calls}/{n} = {rate:.1%} with --site "
        f"(calibration predicted {1 - predicted.value:.1%}, 95% CI {low:.1%}–{high:.1%}, from "
        f"{predicted.n - predicted.successes}/{predicted.n} at threshold {site.covid_threshold:.4f}); "
        f"{own_calls}/{own_n} = {own_rate:.1%} with the model's own threshold "
        f"(95% CI {1 - clopper_pearson(own_n - own_calls, own_n)[1]:.1%}–"
        f"{1 - clopper_pearson(own_n - own_calls, own_n)[0]:.1%})"
    )
    assert low <= rate <= high
    assert own_rate > 3 * rate and own_rate > high
    assert set(held_out["site"]["site"]) == {str(calibrated[0])}
    assert np.allclose(held_out["site"]["covid_threshold"], site.covid_threshold)
    assert set(held_out["own"]["site"]) == {""}


def test_calibrate_for_sensitivity_on_covid_images(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path: Path) -> None:
    """--sensitivity on a small mixed site: the target reached on its COVID-19 images, both rates recorded,
    and the one line that says how far 25 images are from a ±2% interval."""
    rows = pd.concat([cxr3_meta[cxr3_meta["label"] == label].head(25) for label in ("COVID-19", "NORMAL")])
    data = linked_dataset(tmp_path / "mixed", cxr3, rows[["filename", "label"]])
    out = tmp_path / "site.json"
    result = run("calibrate", data, "--sensitivity", "0.9", "--out", out)
    assert result.returncode == 0, result.stderr
    site = load_site(out, load_run(default_model_path()))
    assert site.site == "mixed" and site.target == {"metric": "sensitivity", "value": 0.9}
    sensitivity = site.achieved["sensitivity"]
    assert sensitivity.value >= 0.9 and sensitivity.n == site.counts["COVID-19"] and "specificity" in site.achieved
    assert "COVID-19 images give a sensitivity interval of ±" in result.stdout and "needs about" in result.stdout
    assert f"calibrated at mixed on {site.images} local images: sensitivity " in result.stdout


# ---------------------------------------------------------------------------------------------
# One calibrated answer, wherever it is asked
# ---------------------------------------------------------------------------------------------


def test_predict_the_python_api_and_the_service_give_the_same_calibrated_answer(
    calibrated: tuple[Path, str], held_out: dict[str, pd.DataFrame], halves: tuple[Path, Path], tmp_path: Path
) -> None:
    site_path = calibrated[0]
    site = load_site(site_path)
    own = held_out["own"]
    # An image the site's threshold changes: COVID-19 at the model's own, not at the site's (clear of both).
    between = own[
        (own["label"] == "COVID-19")
        & (own["p_COVID-19"] < site.covid_threshold - BORDERLINE)
        & (own["p_COVID-19"] > site.run_threshold + BORDERLINE)
    ]
    image = Path(between["file"].iloc[0])

    cli = run("predict", image, "--site", site_path, "--json")
    assert cli.returncode == 0, cli.stderr
    [from_cli] = json.loads(cli.stdout)
    text = run("predict", image, "--site", site_path)
    assert text.returncode == 0, text.stderr
    assert f"calibrated at NIH half A on {site.images} local images: specificity 95% (" in text.stdout
    assert f"reaches {site.covid_threshold:.3f}" in text.stdout and str(site_path) in text.stdout

    from_api = load_model(site=site_path).predict(image)
    assert repr(load_model(site=site_path)).count("NIH half A") == 1
    without = load_model().predict(image)
    assert without["label"] == "COVID-19" and without["site"] is None

    server = Server(tmp_path / "server", "--site", str(site_path))
    try:
        response = httpx.post(f"{server.url}/api/predict", files={"file": (image.name, image.read_bytes())}, timeout=60)
        health = httpx.get(f"{server.url}/healthz", timeout=10).json()
        card = httpx.get(f"{server.url}/api/model", timeout=10).json()
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    from_service = response.json()
    assert health["site"] == str(site_path) and health["covid_threshold"] == site.covid_threshold
    assert card["site"]["site"] == "NIH half A" and card["site"]["covid_threshold"] == site.covid_threshold

    for answer in (from_cli, from_api, from_service):
        assert answer["label"] != "COVID-19" and answer["label"] == from_api["label"], answer
        assert answer["covid_positive"] is False
        assert answer["covid_threshold"] == site.covid_threshold
        assert answer["site"] == str(site_path)
        for label, p in from_api["probabilities"].items():
            assert abs(answer["probabilities"][label] - p) < PROBABILITY_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, exit 1, and never a wrong threshold
# ---------------------------------------------------------------------------------------------


def test_calibrate_refuses_data_that_cannot_support_the_target(halves: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "site.json"
    calibration = halves[0]
    assert_one_line_error(
        run("calibrate", calibration, "--sensitivity", "0.9", "--out", out), "no COVID-19 image", "--sensitivity"
    )
    meta = pd.read_csv(calibration / "metadata.csv", dtype=str, keep_default_na=False)
    few = linked_dataset(tmp_path / "few", ADULT_CONTROLS, meta.head(19))
    assert_one_line_error(
        run("calibrate", few, "--specificity", "0.95", "--out", out), "only 19 non-COVID", "at least 20"
    )
    assert_one_line_error(run("calibrate", tmp_path / "nowhere", "--specificity", "0.95", "--out", out), "not found")
    unknown = linked_dataset(tmp_path / "unknown", ADULT_CONTROLS, meta.head(30))
    table = pd.read_csv(unknown / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[4, "label"] = "tuberculosis"
    table.to_csv(unknown / "metadata.csv", index=False)
    assert_one_line_error(run("calibrate", unknown, "--specificity", "0.95", "--out", out), "row 6", "unknown label")
    no_labels = tmp_path / "no-labels"
    no_labels.mkdir()
    table[["filename"]].to_csv(no_labels / "metadata.csv", index=False)
    assert_one_line_error(run("calibrate", no_labels, "--specificity", "0.95", "--out", out), "missing column", "label")
    assert_one_line_error(run("calibrate", calibration, "--out", out), "--specificity S or --sensitivity S")
    assert_one_line_error(
        run("calibrate", calibration, "--specificity", "0.9", "--sensitivity", "0.9", "--out", out), "one target"
    )
    assert not out.exists()


def test_a_bad_site_file_is_one_line_and_nothing_is_predicted(
    calibrated: tuple[Path, str], halves: tuple[Path, Path], tmp_path: Path
) -> None:
    image = next((halves[1] / "images").iterdir())
    good = json.loads(calibrated[0].read_text())
    text = calibrated[0].read_text()
    cases = {
        "truncated.json": (text[: len(text) // 2], "damaged or truncated"),
        "empty.json": ("", "damaged or truncated"),
        "newer.json": (json.dumps({**good, "format": "covidxr-site-99"}), "newer covidxr"),
        "other-model.json": (
            json.dumps({**good, "model": {**good["model"], "head_sha256": "0" * 64}}),
            "calibrated for another model",
        ),
        "no-threshold.json": (json.dumps({k: v for k, v in good.items() if k != "covid_threshold"}), "damaged"),
        "bad-threshold.json": (json.dumps({**good, "covid_threshold": 1.5}), "outside [0, 1]"),
        "not-a-site.json": (json.dumps({"format": "covidxr-run-2"}), "not a covidxr site file"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        result = run("predict", image, "--site", path, "--json")
        line = assert_one_line_error(result, str(path), fragment)
        assert result.stdout == "", (name, line)  # no answer with a wrong threshold
        with pytest.raises(CovidxrError, match="another model|damaged|newer|not a covidxr"):
            load_model(site=path)
    assert_one_line_error(run("predict", image, "--site", tmp_path / "missing.json"), "site file not found")
    # The service refuses to start with a bad site file: one line, exit 1.
    assert_one_line_error(run("serve", "--port", "1", "--site", tmp_path / "truncated.json"), "damaged or truncated")


# ---------------------------------------------------------------------------------------------
# What the files held (image sizes and bit depths), and unreadable images left out
# ---------------------------------------------------------------------------------------------


def depth_dataset(root: Path, source: Path, rows: pd.DataFrame) -> Path:
    """A dataset folder of ``rows``' real images re-saved as a scanner might send them: the first half as 16-bit
    greyscale PNGs of 640x600 pixels, the rest as 12-bit MONOCHROME2 DICOMs at their own 512x512."""
    (root / "images").mkdir(parents=True)
    names = []
    for i, name in enumerate(rows["filename"]):
        grey = Image.open(source / name).convert("L")
        if i < len(rows) // 2:
            pixels = np.asarray(grey.resize((640, 600)), dtype=np.uint16) * 257
            names.append(f"images/png16-{i}.png")
            Image.fromarray(pixels).save(root / names[-1])
        else:
            names.append(f"images/dicom12-{i}.dcm")
            save(dx_dataset(to_bits(np.asarray(grey), 12), 12), root / names[-1])
    pd.DataFrame({"filename": names, "label": rows["label"].to_numpy()}).to_csv(root / "metadata.csv", index=False)
    return root


def test_calibrate_records_the_images_sizes_and_bit_depths(
    calibrated: tuple[Path, str], halves: tuple[Path, Path], tmp_path: Path
) -> None:
    inputs = load_site(calibrated[0]).inputs
    n = inputs["images"]  # NIH: every file an 8-bit greyscale JPEG of 512x512
    assert inputs["image_widths"] == [512] * n and inputs["image_heights"] == [512] * n
    assert inputs["bit_depths"] == {"8": n} and inputs["modes"] == {"L": n}
    # 16-bit PNGs and 12-bit DICOMs: the files' own sizes, bits per sample (DICOM: BitsStored) and modes, not
    # those of the 8-bit RGB they are decoded to.
    meta = pd.read_csv(halves[0] / "metadata.csv", dtype=str, keep_default_na=False).head(40)
    data = depth_dataset(tmp_path / "depths", halves[0], meta)
    out = tmp_path / "site.json"
    result = run("calibrate", data, "--specificity", "0.9", "--out", out)
    assert result.returncode == 0, result.stderr
    inputs = load_site(out).inputs
    assert inputs["images"] == 40 and inputs["bit_depths"] == {"16": 20, "12": 20}
    assert inputs["modes"] == {"I;16": 20, "MONOCHROME2": 20}
    assert inputs["image_widths"] == [512] * 20 + [640] * 20 and inputs["image_heights"] == [512] * 20 + [600] * 20
    # predict --out writes the same facts per image, beside the columns it wrote before.
    table = pd.read_csv(_predict_out(data, tmp_path / "depths.csv"), keep_default_na=False)
    assert list(table.columns)[:12] == [
        "file",
        "label",
        "no_answer_reason",
        "p_COVID-19",
        "p_NORMAL",
        "p_PNEUMONIA",
        "covid_positive",
        "covid_threshold",
        "site",
        "out_of_distribution",
        "ood_score",
        "error",
    ]
    facts = table[["image_width", "image_height", "bit_depth", "image_mode"]]
    assert set(facts[table["file"].str.endswith(".png")].itertuples(index=False)) == {(640, 600, 16, "I;16")}
    assert set(facts[table["file"].str.endswith(".dcm")].itertuples(index=False)) == {(512, 512, 12, "MONOCHROME2")}
    assert list(table.columns)[-1] == "model" and set(table["prediction_set"]) == {""}  # no sets without --site


def _predict_out(data: Path, out: Path) -> Path:
    result = run("predict", data / "images", "--out", out)  # the images, not metadata.csv
    assert result.returncode == 0, result.stderr
    return out


def test_calibrate_leaves_unreadable_images_out_and_lists_them(halves: tuple[Path, Path], tmp_path: Path) -> None:
    meta = pd.read_csv(halves[0] / "metadata.csv", dtype=str, keep_default_na=False).head(33)
    data = linked_dataset(tmp_path / "some-broken", halves[0], meta)
    names = list(meta["filename"])
    truncated, empty, missing = data / names[3], data / names[10], data / names[20]
    content = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(content[: len(content) // 3])
    empty.unlink()
    empty.write_bytes(b"")
    missing.unlink()
    out = tmp_path / "site.json"
    result = run("calibrate", data, "--specificity", "0.9", "--out", out)
    assert result.returncode == 0, result.stderr
    site = load_site(out, load_run(default_model_path()))
    assert site.inputs["images"] == 30 == site.images + site.inputs["unanswered"]
    assert [item["file"] for item in site.unreadable] == [names[3], names[10], names[20]]
    assert [item["label"] for item in site.unreadable] == [meta["label"].iloc[i] for i in (3, 10, 20)]
    errors = [item["error"] for item in site.unreadable]
    assert "corrupt or truncated" in errors[0] and "empty file" in errors[1] and "file not found" in errors[2]
    assert all(str(data / name) in error for name, error in zip((names[3], names[10], names[20]), errors, strict=True))
    [line] = [line for line in result.stdout.splitlines() if "unreadable" in line]  # one summary line
    assert line.startswith(f"3 unreadable image(s) left out (all listed in {out}): ") and errors[0] in line
    assert len(site.inputs["image_widths"]) == 30 and site.achieved["specificity"].n == site.images
    # Too few readable images left: refused in one line, and no site file.
    few = linked_dataset(tmp_path / "too-few", halves[0], meta.head(21))
    (few / names[0]).unlink()
    (few / names[0]).write_bytes(b"not an image")
    (few / names[5]).unlink()
    out = tmp_path / "few.json"
    result = run("calibrate", few, "--specificity", "0.9", "--out", out)
    assert_one_line_error(result, "only 19 of 21 image(s) readable", "at least 20", names[0])
    assert not out.exists()


def test_an_older_site_file_without_image_facts_still_opens(calibrated: tuple[Path, str], tmp_path: Path) -> None:
    data = json.loads(calibrated[0].read_text())
    for key in ("image_widths", "image_heights", "bit_depths", "modes"):
        data["inputs"].pop(key)
    data.pop("unreadable")
    older = tmp_path / "older.json"
    older.write_text(json.dumps(data))
    site = load_site(older, load_run(default_model_path()))
    assert site.unreadable == [] and site.covid_threshold == load_site(calibrated[0]).covid_threshold
    assert SiteCalibration.from_dict({**data, "format": "covidxr-site-1"}, older).unreadable == []
