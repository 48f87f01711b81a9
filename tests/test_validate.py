"""``covidxr validate`` (issue 23 part 3): the local validation report a hospital files before use.

Real images, no mocks: the held-out half of the NIH adult controls (split by patient; no COVID-19 image, so every
COVID-19 call is false) at the model's own operating point and at a site file's made by ``calibrate
--specificity 0.95`` on the other half; and a small cxr3 folder with all three classes, where sensitivity and AUC
are measured."""

from __future__ import annotations

import json
import re
import subprocess
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from covidxr.lab.validate import check_target, rank_auc
from covidxr.runtime.formatting import pct
from covidxr.runtime.records.validation import VALIDATION_FORMAT, Validation

from .conftest import assert_one_line_error, linked_dataset, nih_halves, run_cli

run = partial(run_cli, installed=True)  # the installed ``covidxr`` command, as a user types it

Validated = tuple[Validation, subprocess.CompletedProcess, Path]


def validate(*args: str | Path) -> Validated:
    out = Path(args[args.index("--out") + 1])
    result = run("validate", *args)
    assert result.returncode == 0, result.stderr
    return Validation.load(out / "validation.json"), result, out


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return nih_halves(tmp_path_factory.mktemp("nih-halves"))


@pytest.fixture(scope="module")
def own_threshold(halves: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Validated:
    """The held-out NIH half validated at the bundled model's own operating point."""
    return validate(halves[1], "--out", tmp_path_factory.mktemp("own") / "report")


@pytest.fixture(scope="module")
def site_threshold(halves: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Validated:
    """The held-out NIH half validated at the threshold ``calibrate --specificity 0.95`` chose on the other half."""
    site = tmp_path_factory.mktemp("site") / "site.json"
    calibrated = run("calibrate", halves[0], "--specificity", "0.95", "--site-name", "NIH half A", "--out", site)
    assert calibrated.returncode == 0, calibrated.stderr
    return validate(halves[1], "--site", site, "--out", tmp_path_factory.mktemp("with-site") / "report")


@pytest.fixture(scope="module")
def mixed(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Validated:
    """40 cxr3 images per class, with their sex/age_group/view/source columns, and one unreadable file."""
    rows = pd.concat([cxr3_meta[cxr3_meta["label"] == label].head(40) for label in ("COVID-19", "NORMAL", "PNEUMONIA")])
    rows = rows[["filename", "label", "patient_id", "sex", "age_group", "view", "source"]]
    data = linked_dataset(tmp_path_factory.mktemp("mixed") / "mixed", cxr3, rows)
    (data / "images" / "broken.jpg").write_bytes(b"not an image at all")
    broken = {"filename": "images/broken.jpg", "label": "normal", "patient_id": "x-1", "source": "x"}
    pd.concat([rows, pd.DataFrame([broken])]).fillna("").to_csv(data / "metadata.csv", index=False)
    return validate(data, "--out", tmp_path_factory.mktemp("mixed-report") / "report")


def shown(rate: dict) -> str:
    """A rate as the report writes it."""
    return f"{pct(rate['value'])} ({100 * rate['low']:.1f}–{100 * rate['high']:.1f}%)"


def recount(out: Path) -> dict[str, tuple[int, int]]:
    """Sensitivity and specificity counted again from predictions.csv (answered rows only)."""
    table = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    answered = table[(table["label"] != "") & (table["error"] == "")]
    covid = answered["true_label"] == "COVID-19"
    called = answered["label"] == "COVID-19"
    return {
        "sensitivity": (int((covid & called).sum()), int(covid.sum())),
        "specificity": (int((~covid & ~called).sum()), int((~covid).sum())),
    }


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------


def test_the_rules_pass_warn_fail_and_not_measured() -> None:
    def rate(value: float, low: float, high: float, n: int = 1000) -> dict:
        return {"value": value, "low": low, "high": high, "successes": round(value * n), "n": n}

    assert check_target("specificity", rate(0.72, 0.68, 0.76), 0.9, 0.02)["status"] == "fail"
    assert check_target("specificity", rate(0.9, 0.88, 0.92), 0.9, 0.02)["status"] == "warn"  # straddles
    too_wide = check_target("specificity", rate(0.96, 0.93, 0.99, 300), 0.9, 0.02)
    assert too_wide["status"] == "warn" and "images needed" in too_wide["reason"]
    assert check_target("specificity", rate(0.96, 0.95, 0.97), 0.9, 0.02)["status"] == "pass"
    assert check_target("sensitivity", rate(1.0, 0.83, 1.0, 19), 0.8, 0.2)["status"] == "warn"  # n < 20
    absent = check_target("sensitivity", None, 0.8, 0.02)
    assert absent == {"status": "not measured", "target": 0.8, "reason": "no COVID-19 image"}
    assert rank_auc([True, True, False, False], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert rank_auc([False, False], [0.9, 0.4]) is None


# ---------------------------------------------------------------------------------------------
# NIH adults: the model's own operating point, then the site's
# ---------------------------------------------------------------------------------------------


def test_nih_adults_at_the_models_own_threshold_are_not_ready(own_threshold: Validated) -> None:
    record, result, out = own_threshold
    print(f"\n{record.verdict_line}")
    data = json.loads((out / "validation.json").read_text())
    assert data["format"] == VALIDATION_FORMAT == record.format
    assert Validation.from_dict(record.to_dict()).to_dict() == record.to_dict()
    assert record.verdict == "NOT READY" and record.checks["specificity"]["status"] == "fail"
    specificity = record.rate("specificity")
    assert specificity is not None and specificity.high < 0.9 and specificity.n >= 350
    assert record.metrics["sensitivity"] is None and record.metrics["auc"] is None
    assert record.checks["sensitivity"] == {"status": "not measured", "target": 0.8, "reason": "no COVID-19 image"}
    calls = specificity.n - specificity.successes
    assert record.verdict_line.startswith(
        f"NOT READY: specificity {shown(record.metrics['specificity'])} at the operating point, below the 90.0% "
        f"accepted: {calls} of {specificity.n} non-COVID images called COVID-19"
    )
    assert record.verdict_line.endswith("sensitivity not measured (no COVID-19 image)")
    assert result.stdout.splitlines()[0] == record.verdict_line
    assert record.operating_point["source"] == "model" and record.operating_point["covid_threshold"] < 0.2
    # The numbers agree with predictions.csv and with the Markdown and HTML.
    assert recount(out)["specificity"] == (specificity.successes, specificity.n)
    counts = record.counts
    assert counts["images"] == counts["answered"] + counts["no_answer"] + counts["unreadable"]
    assert len(record.no_answer) == counts["no_answer"] and all(r["file"] and r["reason"] for r in record.no_answer)
    markdown = (out / "validation.md").read_text()
    page = (out / "validation.html").read_text()
    assert markdown.index("Research use only") < markdown.index("Bottom line") < markdown.index("## The rules")
    assert f"> - {record.verdict_line}" in markdown and "NOT READY: specificity" in page
    assert f"| specificity | {shown(record.metrics['specificity'])} | {specificity.successes} of {specificity.n} |" in (
        markdown
    )
    needed = record.images_needed["specificity"]
    assert needed > specificity.n and f"about {needed} non-COVID images give ±2.0%" in markdown
    for row in record.no_answer:
        assert f"| {row['file']} | {row['reason']} |" in markdown
    # Subgroups: the columns that exist (sex partly filled, source), small ones said to be small.
    groups = {(g["column"], g["value"]): g for g in record.subgroups}
    assert ("source", "nih") in groups and groups["source", "nih"]["answered"] == specificity.n
    assert any(column == "sex" for column, _ in groups) and all(column != "view" for column, _ in groups)
    small = [g for g in record.subgroups if g["too_small"]]
    assert all(g["answered"] < 20 for g in small) and ("too small to judge (n < 20)" in markdown) == bool(small)
    assert "| column | value | answered |" in markdown
    for name in ("validation_rates.png", "validation_confusion.png", "validation_calibration.png"):
        assert (out / name).stat().st_size > 5000 and f"]({name})" in markdown
    assert page.count("data:image/png;base64,") >= 3 and "<img" in page and 'src="validation_' not in page
    assert re.search(r"Clopper.Pearson", markdown) and "fail: the whole 95% interval lies below" in markdown


def test_the_site_threshold_improves_the_specificity_verdict(own_threshold: Validated, site_threshold: Validated):
    own, site = own_threshold[0], site_threshold[0]
    print(f"\n{site.verdict_line}")
    assert site.operating_point["source"] == "site" and site.operating_point["site"].endswith("site.json")
    assert site.operating_point["covid_threshold"] > own.operating_point["covid_threshold"]
    assert "calibrated at NIH half A" in site.operating_point["description"]
    assert site.checks["specificity"]["status"] in {"pass", "warn"}
    assert site.metrics["specificity"]["value"] > own.metrics["specificity"]["value"]
    assert site.metrics["specificity"]["high"] >= 0.9
    # No COVID-19 image, so never READY: the verdict says sensitivity was not measured.
    assert site.verdict == "UNDECIDED" and "sensitivity not measured (no COVID-19 image)" in site.verdict_line
    rate = site.metrics["specificity"]
    assert f"specificity {shown(rate)} at the operating point" in site.verdict_line
    assert recount(site_threshold[2])["specificity"] == (rate["successes"], rate["n"])
    markdown = (site_threshold[2] / "validation.md").read_text()
    assert f"> - {site.verdict_line}" in markdown and "site file" in markdown


# ---------------------------------------------------------------------------------------------
# All three classes: sensitivity and AUC measured, subgroups, an unreadable file counted
# ---------------------------------------------------------------------------------------------


def test_a_folder_with_covid_images_measures_sensitivity_and_auc(mixed: Validated) -> None:
    record, result, out = mixed
    print(f"\n{record.verdict_line}")
    sensitivity, auc = record.rate("sensitivity"), record.metrics["auc"]
    assert sensitivity is not None and 30 <= sensitivity.n <= 40
    assert record.checks["sensitivity"]["status"] in {"pass", "warn", "fail"}
    assert auc is not None and auc["low"] <= auc["value"] <= auc["high"] and auc["n_positive"] == sensitivity.n
    assert recount(out)["sensitivity"] == (sensitivity.successes, sensitivity.n)
    assert record.counts["unreadable"] == 1 and record.unreadable[0]["file"] == "images/broken.jpg"
    assert record.counts["images"] == 121 and record.counts["by_label"]["NORMAL"] == 41
    matrix = record.confusion["matrix"]
    assert record.confusion["columns"][-1] == "no answer" and sum(map(sum, matrix)) == 120
    assert record.calibration and sum(b["n"] for b in record.calibration) == record.counts["answered"]
    markdown = (out / "validation.md").read_text()
    assert f"| sensitivity | {shown(record.metrics['sensitivity'])} | {sensitivity.successes} of {sensitivity.n} |" in (
        markdown
    )
    assert f"| AUC of p(COVID-19) | {auc['value']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})" in markdown
    assert "| images/broken.jpg |" in markdown and "## Unreadable images (1)" in markdown
    groups = {(g["column"], g["value"]) for g in record.subgroups}
    assert {("age_group", "adult"), ("age_group", "child"), ("view", "PA")} <= groups
    assert "| age_group | child |" in markdown and (out / "validation_subgroups.png").is_file()
    table = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(table) == 121 and {"filename", "true_label", "label", "p_COVID-19", "error", "model"} <= set(table)


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, exit 1
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(mixed: Validated, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert_one_line_error(run("validate", tmp_path / "nowhere", "--out", out), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("validate", empty, "--out", out), "no metadata.csv")
    no_labels = tmp_path / "no-labels"
    no_labels.mkdir()
    (no_labels / "metadata.csv").write_text("filename\nimages/a.jpg\n")
    assert_one_line_error(run("validate", no_labels, "--out", out), "missing column", "label")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "metadata.csv").write_text("filename,label\nimages/a.jpg,NORMAL\nimages/b.jpg,tuberculosis\n")
    assert_one_line_error(run("validate", unknown, "--out", out), "row 3", "unknown label 'tuberculosis'")
    # An existing report is never overwritten.
    data, report = Path(mixed[0].data), mixed[2]
    before = (report / "validation.json").read_bytes()
    assert_one_line_error(run("validate", data, "--out", report), "validation.json: already exists")
    assert (report / "validation.json").read_bytes() == before
    assert_one_line_error(run("validate", data, "--out", out, "--site", tmp_path / "missing.json"), "site file")
    assert not out.exists()
