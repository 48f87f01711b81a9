"""What earlier commands left in a run folder, read back tolerantly.

metrics.json, run.json, splits.csv and the evaluations of other datasets are read as they are: a report
describes what is there and says what is missing, rather than failing on an older or partial run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidxr.runtime.errors import CovidxrError


def mapping(values: dict, key: str) -> dict:
    """The JSON object at ``key``, or an empty dict when it is missing or not an object (older runs)."""
    value = values.get(key)
    return value if isinstance(value, dict) else {}


def read_metrics(folder: Path) -> dict:
    """An evaluation's metrics.json; without it there is nothing to report, so its absence is an error."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise CovidxrError(f"{folder}: no metrics.json; run `covidxr evaluate` first")
    return json.loads(path.read_text())


def run_folder(folder: Path, metrics: dict) -> Path | None:
    """The run behind an evaluation; metrics.json records its path relative to where evaluate ran."""
    candidates = [Path(metrics["run"])] if metrics.get("run") else []
    return next((path for path in [*candidates, folder] if (path / "run.json").is_file()), None)


def read_json(path: Path) -> dict | None:
    """A JSON object written by another command, or None when it is missing or damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_info(run: Path | None) -> dict:
    """The run's run.json, or an empty dict when there is no run or it cannot be read."""
    return (read_json(run / "run.json") if run else None) or {}


def same_path(a: object, b: object) -> bool:
    """Whether two recorded paths name the same folder (relative or absolute as they were written)."""
    return bool(a) and bool(b) and Path(str(a)).resolve() == Path(str(b)).resolve()


def is_external(metrics: dict, info: dict) -> bool:
    """Evaluated on every image of a dataset other than the one the run was trained on."""
    if metrics.get("split") != "all":
        return False
    if info.get("data"):
        return not same_path(metrics.get("data"), info["data"])
    return "predicted_class_shift" in metrics


def read_splits(run: Path | None) -> pd.DataFrame | None:
    """The run's splits.csv as text (empty cells stay ""), or None when there is none."""
    if run is None or not (run / "splits.csv").is_file():
        return None
    return pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)


def externals(run: Path | None) -> dict[str, dict]:
    """The evaluations ``evaluate RUN --data OTHER`` wrote under ``RUN/external/``, by dataset name."""
    if run is None or not (run / "external").is_dir():
        return {}
    found = {folder.name: read_json(folder / "metrics.json") for folder in sorted((run / "external").iterdir())}
    return {name: metrics for name, metrics in found.items() if metrics}
