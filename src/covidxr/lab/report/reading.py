"""What earlier commands left in a run folder, read back into records.

metrics.json, run.json, splits.csv and the evaluations of other datasets are read as they are: a report
describes what is there and says what is missing, rather than failing on an older or partial run. A file
of a newer format than this covidxr reads is refused in one line (``covidxr.runtime.records``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import pandas as pd

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Metrics, Record, RunInfo

__all__ = [
    "externals",
    "is_external",
    "read_metrics",
    "read_record",
    "read_splits",
    "run_folder",
    "run_info",
    "same_path",
]

R = TypeVar("R", bound=Record | RunInfo)


def read_metrics(folder: Path) -> Metrics:
    """An evaluation's metrics.json; without it there is nothing to report, so its absence is an error."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise CovidxrError(f"{folder}: no metrics.json; run `covidxr evaluate` first")
    return Metrics.load(path)


def run_folder(folder: Path, metrics: Metrics) -> Path | None:
    """The run behind an evaluation; metrics.json records its path relative to where evaluate ran."""
    candidates = [Path(metrics.run)] if metrics.run else []
    return next((path for path in [*candidates, folder] if (path / "run.json").is_file()), None)


def read_record(kind: type[R], path: Path) -> R | None:
    """The record in a JSON file written by another command, or None when it is missing or damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kind.from_dict(value, path) if isinstance(value, dict) else None


def run_info(run: Path | None) -> RunInfo | None:
    """The run's run.json, or None when there is no run or it cannot be read."""
    return read_record(RunInfo, run / "run.json") if run else None


def same_path(a: object, b: object) -> bool:
    """Whether two recorded paths name the same folder (relative or absolute as they were written)."""
    return bool(a) and bool(b) and Path(str(a)).resolve() == Path(str(b)).resolve()


def is_external(metrics: Metrics, info: RunInfo | None) -> bool:
    """Evaluated on every image of a dataset other than the one the run was trained on."""
    if metrics.split != "all":
        return False
    if info is not None and info.data:
        return not same_path(metrics.data, info.data)
    return metrics.predicted_class_shift is not None


def read_splits(run: Path | None) -> pd.DataFrame | None:
    """The run's splits.csv as text (empty cells stay ""), or None when there is none."""
    if run is None or not (run / "splits.csv").is_file():
        return None
    return pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)


def externals(run: Path | None) -> dict[str, Metrics]:
    """The evaluations ``evaluate RUN --data OTHER`` wrote under ``RUN/external/``, by dataset name."""
    if run is None or not (run / "external").is_dir():
        return {}
    found = {
        folder.name: read_record(Metrics, folder / "metrics.json") for folder in sorted((run / "external").iterdir())
    }
    return {name: metrics for name, metrics in found.items() if metrics is not None}
