"""Typed, versioned records: a run folder made before records had formats still opens (the bundled model's files
are such a folder), and a file of a newer format is refused in one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from covidxr.runtime.bundle import BUNDLED
from covidxr.runtime.card import model_card
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Audit, DesignRow, Loso, Metrics, ModelSidecar, Record, RunInfo
from covidxr.runtime.runs import load_run

# Each JSON file of a run folder and its record, with the format the bundled file is read as.
BUNDLED_RECORDS = {
    "run.json": (RunInfo, "covidxr-run-1"),
    "model.json": (ModelSidecar, "covidxr-onnx-1"),
    "metrics.json": (Metrics, "covidxr-metrics-1"),
    "audit.json": (Audit, "covidxr-audit-1"),
    "loso.json": (Loso, "covidxr-loso-1"),
}


def _without_format(data: dict) -> dict:
    return {key: value for key, value in data.items() if key != "format"}


@pytest.mark.parametrize("name", BUNDLED_RECORDS)
def test_each_bundled_file_reads_into_its_record_and_back(name: str) -> None:
    """The bundled files predate records: each reads as its oldest format and writes back the same keys and
    values, plus the ``format`` key where the file had none."""
    kind, oldest = BUNDLED_RECORDS[name]
    data = json.loads((BUNDLED / name).read_text())
    record = kind.from_dict(data, BUNDLED / name)
    assert record.format == (data.get("format") or oldest)
    written = record.to_dict()
    assert written["format"] == record.format
    assert _without_format(written) == _without_format(data)
    assert kind.from_dict(written, BUNDLED / name) == record


def test_the_bundled_records_answer_by_attribute() -> None:
    metrics = Metrics.load(BUNDLED / "metrics.json")
    assert metrics.n == sum(rates.n for rates in metrics.per_class.values())
    assert metrics.covid_class.sensitivity_ci95 == metrics.per_class["COVID-19"].sensitivity_ci95
    assert metrics.covid_vs_rest.threshold == ModelSidecar.load(BUNDLED / "model.json").covid_threshold
    loso = Loso.load(BUNDLED / "loso.json")
    assert loso.pooled.n == sum(unit.n for unit in loso.units if unit.status == "evaluated")
    assert loso.within_site.pooled.n == loso.within_site.pooled.n_covid + loso.within_site.pooled.n_other
    audit = Audit.load(BUNDLED / "audit.json")
    assert set(audit.checks) == {"lungs_hidden", "source_probe", "resolution_format"}
    assert "verdict" not in audit.checks["lungs_hidden"].figures  # the figures are the check's numbers only
    assert load_run(BUNDLED).info.fitted.covid_threshold.value == metrics.covid_vs_rest.threshold


def test_an_older_metrics_file_opens_with_defaults(tmp_path: Path) -> None:
    """The oldest metrics.json had no bootstrap, calibration, COVID-19 threshold or per-source rates."""
    data = json.loads((BUNDLED / "metrics.json").read_text())
    for key in ("bootstrap", "accuracy_bootstrap_ci95", "macro_auc_ci95", "calibration", "covid_vs_rest", "by_source"):
        data.pop(key)
    for rates in data["per_class"].values():
        for key in ("sensitivity_ci95", "specificity_ci95", "auc_ci95"):
            rates.pop(key)
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    metrics = Metrics.load(tmp_path / "metrics.json")
    assert metrics.bootstrap is None and metrics.covid_vs_rest is None and metrics.by_source is None
    assert metrics.per_class["COVID-19"].auc_ci95 is None
    # The keys the writer leaves out when it has nothing for them stay out.
    assert "bootstrap" not in metrics.to_dict() and "auc_ci95" not in metrics.to_dict()["per_class"]["NORMAL"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [("metrics.json", Metrics), ("audit.json", Audit), ("loso.json", Loso), ("model.json", ModelSidecar)],
)
def test_a_newer_format_is_refused_in_one_line_naming_the_file(tmp_path: Path, name: str, kind: type[Record]) -> None:
    family = kind.FORMATS[-1].rsplit("-", 1)[0]
    path = tmp_path / name
    path.write_text(json.dumps({**json.loads((BUNDLED / name).read_text()), "format": f"{family}-99"}))
    with pytest.raises(CovidxrError) as caught:
        kind.load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and f"'{family}-99'" in message


def test_a_metrics_file_of_a_newer_format_is_refused_by_the_readers(tmp_path: Path) -> None:
    """The issue's example, through the model card, which reads every record of a run folder."""
    folder = shutil.copytree(BUNDLED, tmp_path / "run")
    data = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**data, "format": "covidxr-metrics-99"}))
    with pytest.raises(CovidxrError) as caught:
        model_card(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder / 'metrics.json'}: ")
    assert "covidxr-metrics-99" in message


def test_a_run_json_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(BUNDLED, tmp_path / "run")
    data = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**data, "format": "covidxr-run-99"}))
    with pytest.raises(CovidxrError, match=r"run\.json: run format 'covidxr-run-99' is not one this covidxr reads"):
        load_run(folder)


def test_new_records_carry_the_newest_format() -> None:
    data = json.loads((BUNDLED / "metrics.json").read_text())
    written = Metrics.new(data).to_dict()
    assert written["format"] == "covidxr-metrics-2" and _without_format(written) == data


def test_a_designs_row_keeps_its_column_order() -> None:
    """designs.csv columns: the per-check audit verdicts after the overall verdict, the per-unit figures after
    the pooled ones, the wall time last."""
    row = DesignRow.new(
        {
            "design": "paper",
            "run": "paper",
            "audit_verdict": "fail",
            "audit_lungs_hidden": "pass",
            "loso_auc_ci95": [0.4, 0.6],
            "loso_called_covid[nih]": 0.3,
            "wall_seconds": 12.0,
        }
    ).to_dict()
    keys = list(row)
    assert keys.index("audit_lungs_hidden") == keys.index("audit_verdict") + 1
    assert keys.index("loso_called_covid[nih]") == keys.index("loso_auc_ci95") + 1
    assert keys[-1] == "wall_seconds" and row["format"] == "covidxr-design-2"
