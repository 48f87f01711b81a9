"""Drift monitoring (issue 23 part 4): ``covidxr monitor`` compares windows of predictions with the images a
site was calibrated on.

Real images, no mocks: calibrated on one half of the NIH adult controls (split by patient), the other half
must raise no alarm; Kermany's children (cxr3 NORMAL / PNEUMONIA, another source, another population) must."""

from __future__ import annotations

import json
import subprocess
from datetime import date, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from covidxr.runtime.monitor import RULES, kolmogorov_sf, ks_two_sample, psi
from covidxr.runtime.records.monitor import MONITOR_FORMAT, MonitorReport
from covidxr.runtime.site import load_site

from .conftest import assert_one_line_error, linked_dataset, nih_halves, run_cli

run = partial(run_cli, installed=True)  # the installed ``covidxr`` command, as a user types it
WINDOW = 200
CHILDREN = 150  # per class: 300 Kermany images, one full window and a partial one of 100


@pytest.fixture(scope="module")
def predictions(tmp_path_factory: pytest.TempPathFactory, cxr3: Path, cxr3_meta: pd.DataFrame) -> dict[str, Path]:
    """Calibrate on one NIH half (specificity 95%), then predict with that site file the held-out half (CSV)
    and 300 Kermany children (JSON); and 5 children without it (another model identity: its own threshold)."""
    root = tmp_path_factory.mktemp("monitor")
    calibration, held_out = nih_halves(root / "nih")
    site = root / "site.json"
    result = run("calibrate", calibration, "--specificity", "0.95", "--site-name", "NIH half A", "--out", site)
    assert result.returncode == 0, result.stderr
    children = cxr3_meta[cxr3_meta["label"].isin(["NORMAL", "PNEUMONIA"])].groupby("label").head(CHILDREN)
    kermany = linked_dataset(root / "kermany", cxr3, children)
    few = linked_dataset(root / "few", cxr3, children.head(5))
    paths = {"site": site, "nih": root / "nih.csv", "kermany": root / "kermany.json", "own": root / "own.csv"}
    for data, out, extra in (
        (held_out, paths["nih"], ["--site", site]),
        (kermany, paths["kermany"], ["--site", site]),
        (few, paths["own"], []),
    ):
        result = run("predict", data / "images", "--out", out, *extra)  # not metadata.csv: it is no image
        assert result.returncode == 0, result.stderr
    return paths


def monitor(*args: str | Path) -> subprocess.CompletedProcess:
    return run("monitor", *args)


# ---------------------------------------------------------------------------------------------
# The statistics, in numpy, against scipy
# ---------------------------------------------------------------------------------------------


def test_ks_and_psi_in_numpy_agree_with_scipy_and_the_definition() -> None:
    rng = np.random.default_rng(4)
    for x in (0.05, 0.3, 0.8, 1.0, 1.3, 2.0, 3.5):
        assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), rel=1e-9, abs=1e-14)
    for n1, n2, shift in ((400, 200, 0.0), (400, 200, 0.3), (405, 100, 0.5), (300, 300, 0.1), (50, 30, 1.0)):
        a, b = rng.normal(size=n1), rng.normal(shift, size=n2)
        d, p = ks_two_sample(a, b)
        expected = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(expected.statistic, abs=1e-12)
        en = np.sqrt(n1 * n2 / (n1 + n2))
        assert p == pytest.approx(stats.kstwobign.sf((en + 0.12 + 0.11 / en) * d), rel=1e-9)
        if n2 >= 100:  # window-sized samples: within 10% of scipy's asymptotic p-value (kstwo at round(n_e))
            assert p == pytest.approx(expected.pvalue, rel=0.1)
        else:  # small samples, deep tail: both far below the alarm's 0.001, within a factor 2
            assert p < 1e-4 and expected.pvalue < 1e-4 and 0.5 < p / expected.pvalue < 2
    ties = np.round(rng.uniform(size=300), 2)  # tied values: the same D as scipy
    assert ks_two_sample(ties, ties[:120] + 0.01)[0] == pytest.approx(stats.ks_2samp(ties, ties[:120] + 0.01)[0])
    reference = rng.uniform(size=1000)
    assert psi(reference, reference) == 0.0
    assert psi(reference, rng.uniform(size=500)) < 0.05
    assert psi(reference, rng.uniform(size=500) ** 4) > RULES["psi"]


# ---------------------------------------------------------------------------------------------
# What calibrate keeps, and the two sources
# ---------------------------------------------------------------------------------------------


def test_calibrate_keeps_the_distributions_monitor_compares_with(predictions: dict[str, Path]) -> None:
    site = load_site(predictions["site"])
    inputs = site.inputs
    n = inputs["images"]
    assert len(inputs["p_covid"]) == n and inputs["p_covid"] == sorted(inputs["p_covid"])
    assert len(inputs["ood_scores"]) == n and inputs["ood_scores"] == sorted(inputs["ood_scores"])
    assert all(round(v, 5) == v for v in inputs["p_covid"] + inputs["ood_scores"])
    assert inputs["no_answer_rate"] == pytest.approx(inputs["unanswered"] / n)
    assert 0 <= inputs["ood_rate"] <= inputs["no_answer_rate"] + 1e-12  # a flagged image gets no answer
    specificity = site.achieved["specificity"]  # every NIH image is non-COVID: the share called is 1 - specificity
    assert inputs["covid_share"] == pytest.approx(1 - specificity.value)


def test_the_same_source_raises_no_alarm(predictions: dict[str, Path], tmp_path: Path) -> None:
    result = monitor(predictions["nih"], "--site", predictions["site"], "--window", WINDOW, "--out", tmp_path)
    print(f"\n$ covidxr monitor nih-held-out.csv --site site.json --window {WINDOW}\n{result.stdout}")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "ALARM" not in result.stdout and "OK: all 2 window(s)" in result.stdout
    assert "skipped: fewer than a quarter of a window (50)" in result.stdout  # ~405 images: 2 windows and a few
    report = MonitorReport.load(tmp_path / "monitor.json")
    assert report.format == MONITOR_FORMAT and report.verdict == "OK" and report.window == WINDOW
    assert [w.n for w in report.windows] == [WINDOW, WINDOW] and not any(w.alarms for w in report.windows)
    for window in report.windows:  # below every limit, though not zero: the windows' case mix varies
        assert window.psi < RULES["psi"] and window.ks_pvalue >= RULES["ks_pvalue"]
        assert abs(window.ood_rate - report.calibration.ood_rate) < 0.05
    assert MonitorReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
    with Image.open(tmp_path / "monitor.png") as image:
        assert image.format == "PNG" and image.size == (1000, 720)
        assert len(image.getcolors(1 << 16) or []) > 3  # drawn on, not blank


def test_another_source_alarms_and_names_the_figure(predictions: dict[str, Path], tmp_path: Path) -> None:
    result = monitor(predictions["kermany"], "--site", predictions["site"], "--window", WINDOW, "--out", tmp_path)
    print(f"\n$ covidxr monitor kermany-children.json --site site.json --window {WINDOW}\n{result.stdout}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    report = MonitorReport.load(tmp_path / "monitor.json")
    assert report.verdict == "ALARM" and [w.n for w in report.windows] == [WINDOW, 2 * CHILDREN - WINDOW]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("ALARM: drift in 2 of 2 window(s)")
    for window in report.windows:
        assert window.alarms and any(a.startswith(("PSI", "KS", "OOD rate", "no-answer rate")) for a in window.alarms)
        assert f"window {window.index} " in result.stdout and window.alarms[0] in result.stdout
    assert report.windows[0].psi >= RULES["psi"] or report.windows[0].ood_rate > report.calibration.ood_rate + 0.1


def test_several_files_in_order_make_consecutive_windows(predictions: dict[str, Path], tmp_path: Path) -> None:
    """The held-out NIH half, then the children: the first windows are OK, the drift shows where they start."""
    result = monitor(
        predictions["nih"], predictions["kermany"], "--site", predictions["site"], "--window", WINDOW, "--out", tmp_path
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    report = MonitorReport.load(tmp_path / "monitor.json")
    assert [bool(w.alarms) for w in report.windows][:2] == [False, False] and report.windows[-1].alarms
    assert report.skipped is None  # 405 + 300 rows: the last window holds more than a quarter


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1
# ---------------------------------------------------------------------------------------------


def test_rows_of_two_models_in_one_file_are_refused(predictions: dict[str, Path], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.csv"
    own_rows = predictions["own"].read_text().splitlines(keepends=True)[1:]  # decided at the model's own threshold
    mixed.write_text(predictions["nih"].read_text() + "".join(own_rows))
    rows = len(predictions["nih"].read_text().splitlines())
    result = monitor(mixed, "--site", predictions["site"], "--out", tmp_path / "out")
    assert_one_line_error(result, f"{mixed} row {rows + 1}: made by another model", "one model's predictions")
    assert not (tmp_path / "out").exists()


def test_empty_or_damaged_predictions_are_refused(predictions: dict[str, Path], tmp_path: Path) -> None:
    site = predictions["site"]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_one_line_error(monitor(empty, "--site", site), f"{empty}: empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text(predictions["nih"].read_text().splitlines(keepends=True)[0])
    assert_one_line_error(monitor(header_only, "--site", site), f"{header_only}: has no prediction rows")
    table = pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False)
    table.loc[3, "p_COVID-19"] = "n/a"
    damaged = tmp_path / "damaged.csv"
    table.to_csv(damaged, index=False)
    assert_one_line_error(monitor(damaged, "--site", site), f"{damaged} row 5: damaged")
    truncated = tmp_path / "truncated.json"
    text = predictions["kermany"].read_text()
    truncated.write_text(text[: len(text) // 2])
    assert_one_line_error(monitor(truncated, "--site", site), f"{truncated}: damaged")
    other = tmp_path / "other.csv"
    other.write_text("filename,label\na.png,NORMAL\n")
    assert_one_line_error(monitor(other, "--site", site), f"{other}: not a covidxr predictions file")


def test_a_site_file_for_another_model_is_refused(predictions: dict[str, Path], tmp_path: Path) -> None:
    data = json.loads(predictions["site"].read_text())
    data["model"] = {**data["model"], "head_sha256": "0" * 64, "run": "another"}
    other = tmp_path / "other-site.json"
    other.write_text(json.dumps(data))
    result = monitor(predictions["nih"], "--site", other, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{other}: calibrated for another model", "than the one that made the predictions")


def test_an_older_site_file_opens_but_monitor_asks_for_a_new_one(predictions: dict[str, Path], tmp_path: Path) -> None:
    data = json.loads(predictions["site"].read_text())
    for key in ("p_covid", "ood_scores", "ood_rate", "no_answer_rate", "covid_share"):
        data["inputs"].pop(key)
    older = tmp_path / "older-site.json"
    older.write_text(json.dumps(data))
    assert load_site(older).inputs["p_covid_quantiles"]  # still opens (predict --site goes on working)
    result = monitor(predictions["nih"], "--site", older, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{older}: lacks the calibration distributions", "covidxr calibrate")


# ---------------------------------------------------------------------------------------------
# The files themselves: image sizes, bit depths and modes
# ---------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ["prediction_set", "image_width", "image_height", "bit_depth", "image_mode"]


@pytest.fixture(scope="module")
def deeper(predictions: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 held-out NIH images re-saved as 16-bit PNGs at their own 512x512 (a changed export, same pictures),
    predicted with the site file."""
    root = tmp_path_factory.mktemp("sixteen-bit")
    files = pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False)["file"].head(60)
    for i, name in enumerate(files):
        grey = np.asarray(Image.open(name).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(root / f"png16-{i:02d}.png")
    out = root / "sixteen-bit.csv"
    result = run("predict", root, "--site", predictions["site"], "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_the_same_source_has_the_same_sizes_and_depths(predictions: dict[str, Path], tmp_path: Path) -> None:
    result = monitor(predictions["nih"], "--site", predictions["site"], "--window", WINDOW, "--out", tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = MonitorReport.load(tmp_path / "monitor.json")
    assert report.images_compared and "not compared" not in result.stdout
    for window in report.windows:  # NIH: every file an 8-bit greyscale JPEG of 512x512, like calibration's
        assert window.size_ks_statistic == 0.0 and window.format_shift == 0.0
    assert "image sizes KS 0.000 (p 1), bit depth/mode shift 0.0%: OK" in result.stdout


def test_other_sizes_and_bit_depths_alarm(predictions: dict[str, Path], deeper: Path, tmp_path: Path) -> None:
    result = monitor(predictions["kermany"], "--site", predictions["site"], "--window", WINDOW, "--out", tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    report = MonitorReport.load(tmp_path / "monitor.json")
    for window in report.windows:  # Kermany's files: 8-bit greyscale too, but of many sizes
        assert window.size_ks_statistic >= RULES["size_ks_statistic"] and window.format_shift == 0.0
        assert any(a.startswith("image sizes KS") for a in window.alarms), window.alarms
    result = monitor(deeper, "--site", predictions["site"], "--window", 60, "--out", tmp_path / "deeper")
    print(f"\n$ covidxr monitor sixteen-bit.csv --site site.json --window 60\n{result.stdout}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    [window] = MonitorReport.load(tmp_path / "deeper" / "monitor.json").windows
    assert window.size_ks_statistic == 0.0 and window.format_shift == 1.0  # the same size, 16 bits instead of 8
    assert "bit depth or mode shares moved 100.0% > 10 points" in window.alarms
    assert "bit depth or mode shares moved 100.0%" in result.stdout.splitlines()[-1]


def test_files_and_site_files_without_image_facts_are_compared_on_the_rest(
    predictions: dict[str, Path], tmp_path: Path
) -> None:
    """Predictions written before the image columns (and site files written before the image facts) still work:
    the other figures are compared, and one line says the sizes and bit depths are not."""
    table = pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False)
    assert set(IMAGE_COLUMNS) <= set(table.columns)
    older = tmp_path / "older.csv"
    table.drop(columns=IMAGE_COLUMNS).to_csv(older, index=False)
    data = json.loads(predictions["site"].read_text())
    for key in ("image_widths", "image_heights", "bit_depths", "modes"):
        data["inputs"].pop(key)
    older_site = tmp_path / "older-site.json"
    older_site.write_text(json.dumps(data))
    for files, site in (((older,), predictions["site"]), ((predictions["nih"],), older_site)):
        result = monitor(*files, "--site", site, "--window", WINDOW, "--out", tmp_path / "out")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "image sizes and bit depths not compared" in result.stdout and "OK: all 2 window(s)" in result.stdout
        report = MonitorReport.load(tmp_path / "out" / "monitor.json")
        assert not report.images_compared and all(w.size_ks_statistic is None for w in report.windows)


# ---------------------------------------------------------------------------------------------
# Windows by date
# ---------------------------------------------------------------------------------------------

MONDAY = date(2024, 3, 4)  # ISO week 2024-W10


def with_dates(table: pd.DataFrame, first: date, days: int) -> pd.DataFrame:
    """``table`` with a ``study_date`` column: its rows spread evenly over ``days`` days from ``first`` on."""
    n = len(table)
    return table.assign(study_date=[(first + timedelta(days=i * days // n)).isoformat() for i in range(n)])


def test_windows_by_date_follow_the_calendar(predictions: dict[str, Path], tmp_path: Path) -> None:
    """The held-out NIH half dated over two weeks (written newest first), then the children in a third week: one
    window per ISO week in date order, the children's week alarms."""
    nih = with_dates(pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False), MONDAY, 14)
    dated_nih = tmp_path / "nih-dated.csv"
    nih.iloc[::-1].to_csv(dated_nih, index=False)  # file order is not date order
    data = json.loads(predictions["kermany"].read_text())
    for i, row in enumerate(data["predictions"]):
        row["study_date"] = f"{MONDAY + timedelta(days=14 + i // 50)}T08:30:00"  # date-times: their dates count
    dated_kermany = tmp_path / "kermany-dated.json"
    dated_kermany.write_text(json.dumps(data))

    site = predictions["site"]
    result = monitor(dated_nih, "--site", site, "--by-date", "study_date", "--out", tmp_path / "weeks")
    print(f"\n$ covidxr monitor nih-dated.csv --site site.json --by-date study_date\n{result.stdout}")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "one window per week of the dates in column study_date" in result.stdout
    report = MonitorReport.load(tmp_path / "weeks" / "monitor.json")
    assert report.by_date == "study_date" and report.period == "week" and report.window == 0
    assert [w.period for w in report.windows] == ["2024-W10", "2024-W11"]
    assert sum(w.n for w in report.windows) == (nih["error"] == "").sum() and not any(w.alarms for w in report.windows)
    assert "window 1 (2024-W10, n=" in result.stdout
    with Image.open(tmp_path / "weeks" / "monitor.png") as image:
        assert image.size == (1000, 720)

    result = monitor(
        dated_nih, dated_kermany, "--site", site, "--by-date", "study_date", "--period", "week", "--out", tmp_path
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    report = MonitorReport.load(tmp_path / "monitor.json")
    assert [w.period for w in report.windows] == ["2024-W10", "2024-W11", "2024-W12"]
    assert [bool(w.alarms) for w in report.windows] == [False, False, True]
    assert report.windows[2].n == 2 * CHILDREN

    result = monitor(dated_nih, "--site", site, "--by-date", "study_date", "--period", "month", "--out", tmp_path)
    assert [w.period for w in MonitorReport.load(tmp_path / "monitor.json").windows] == ["2024-03"]
    result = monitor(dated_nih, "--site", site, "--by-date", "study_date", "--period", "day", "--out", tmp_path)
    days = [w.period for w in MonitorReport.load(tmp_path / "monitor.json").windows]
    assert days == [(MONDAY + timedelta(days=i)).isoformat() for i in range(14)], days


def test_bad_dates_are_one_line_naming_the_row_and_column(predictions: dict[str, Path], tmp_path: Path) -> None:
    site = predictions["site"]
    nih = with_dates(pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False), MONDAY, 14)
    for value in ("yesterday", "", "2024-02-30"):
        bad = tmp_path / "bad-date.csv"
        dates = [value if i == 4 else day for i, day in enumerate(nih["study_date"])]
        nih.assign(study_date=dates).to_csv(bad, index=False)
        result = monitor(bad, "--site", site, "--by-date", "study_date", "--out", tmp_path / "out")
        assert_one_line_error(result, f"{bad} row 6: column 'study_date' holds {value!r}, not a date")
    result = monitor(predictions["nih"], "--site", site, "--by-date", "study_date")
    assert_one_line_error(result, f"{predictions['nih']} row 2: no column 'study_date'")
    data = json.loads(predictions["kermany"].read_text())
    data["predictions"][2]["study_date"] = "03/04/2024"
    data["predictions"][0]["study_date"] = data["predictions"][1]["study_date"] = "2024-03-04"
    dated = tmp_path / "dated.json"
    dated.write_text(json.dumps(data))
    assert_one_line_error(monitor(dated, "--site", site, "--by-date", "study_date"), f"{dated} row 3: column")
    assert_one_line_error(
        monitor(predictions["nih"], "--site", site, "--by-date", "study_date", "--window", 50), "not both"
    )
    assert_one_line_error(monitor(predictions["nih"], "--site", site, "--period", "day"), "--period needs --by-date")
    few = tmp_path / "few-a-day.csv"
    table = pd.read_csv(predictions["nih"], dtype=str, keep_default_na=False)
    with_dates(table, MONDAY, len(table) // 5).to_csv(few, index=False)  # about 5 a day
    result = monitor(few, "--site", site, "--by-date", "study_date", "--period", "day", "--out", tmp_path / "out")
    assert_one_line_error(result, "no day holds 20 readable predictions or more", "longer --period")
    assert not (tmp_path / "out").exists()
