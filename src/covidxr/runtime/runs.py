"""Run folders: what ``covidxr train`` writes, and a run loaded back (runtime layer: no torch needed).

A run folder holds its configuration, its metadata (``run.json``, read into the typed ``RunInfo``),
the trained head, the out-of-distribution statistics, the splits and, once ``covidxr export`` has
run (the bundled model ships it), the exported graph. Prediction needs only this module, the graph
and numpy; the torch model is built by the lab (``covidxr.lab.models.run_model``), for training-side work.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidxr.runtime.bundle import BUNDLED
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.engines import GRAPH_FILE
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.ood import OODGuard

if TYPE_CHECKING:
    from covidxr.runtime.site import SiteCalibration

__all__ = [
    "BUNDLED",
    "CONFIG_FILE",
    "GRAPH_FILE",
    "HEAD_FILE",
    "HISTORY_FILE",
    "INFO_FILE",
    "OOD_FILE",
    "RUN_FORMAT",
    "SPLITS_FILE",
    "Run",
    "RunInfo",
    "default_model_path",
    "load_run",
]

INFO_FILE = "run.json"
CONFIG_FILE = "config.yaml"
HEAD_FILE = "head.safetensors"
OOD_FILE = "ood.safetensors"
SPLITS_FILE = "splits.csv"
HISTORY_FILE = "history.csv"
RUN_FORMAT = "covidxr-run-2"


def default_model_path() -> Path:
    """The model bundled with the package, for ``predict`` and ``load_model`` without a run folder."""
    if not (BUNDLED / INFO_FILE).is_file():
        raise CovidxrError("this installation has no bundled model; pass a run folder (--model RUN)")
    return BUNDLED


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: how a run was made and what it needs at prediction time.

    ``covidxr-run-2`` adds the ``format`` field; folders written before it (format 1) are read by
    ``from_dict``, the one place that knows their defaults."""

    labels: list[str]
    model: dict
    weights: dict  # kind, location, sha256, preprocessing of the pretrained backbone weights
    model_key: dict
    data: str
    datasets: list[str]
    calibration: dict = field(default_factory=dict)  # temperature, covid_threshold {value, rule, ...}
    out_of_distribution: dict | None = None
    fine_tuned_backbone: dict | None = None
    design: dict = field(default_factory=dict)
    split_sizes: dict = field(default_factory=dict)
    domains: dict | None = None
    near_duplicates: dict | None = None
    feature_engine: str | None = None
    feature_cache: dict | None = None
    processes: int = 1
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped_early: bool = False
    resumed_after_epoch: int | None = None
    seconds: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    created: str = ""
    format: str = RUN_FORMAT

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = INFO_FILE) -> RunInfo:
        """Read any format covidxr wrote; a missing required field is one line naming the file."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("format", "covidxr-run-1")
        if "data" in values:
            values.setdefault("datasets", [values["data"]])  # format 1 before several folders could be merged
        try:
            return cls(**values)
        except TypeError as exc:
            raise CovidxrError(f"{where}: not a covidxr run record ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def temperature(self) -> float:
        """The validation-fitted temperature (1.0 for runs made before calibration existed)."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def threshold_record(self) -> dict | None:
        """The stored COVID-19 operating threshold (value, rule, validation figures), if any."""
        return self.calibration.get("covid_threshold")

    @property
    def covid_threshold(self) -> float:
        return float((self.threshold_record or {}).get("value", 0.5))


@dataclass
class Run:
    """A trained run loaded back: its configuration, its record, and what prediction needs from the folder.

    ``weights`` / ``weights_dir`` say where to find the backbone's pretrained weights when the lab builds
    the torch model (``covidxr.lab.models.run_model``, which keeps it in ``_model``); the runtime never needs
    them where the folder holds its graph."""

    path: Path
    info: RunInfo
    weights: str | Path | None = None
    weights_dir: str | Path | None = None
    _model: Any = field(default=None, repr=False)
    site: SiteCalibration | None = None  # a site's own operating point (``covidxr.runtime.site.with_site``)

    @cached_property
    def config(self) -> TrainConfig:
        """The training configuration (``config.yaml``), read on first use: prediction from the graph needs
        only the sidecar."""
        return TrainConfig.load(self.path / CONFIG_FILE)

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def temperature(self) -> float:
        return self.info.temperature

    @property
    def covid_threshold(self) -> float:
        """The COVID-19 operating threshold that decides: the site's where one is applied, else the run's."""
        return self.site.covid_threshold if self.site is not None else self.info.covid_threshold

    @cached_property
    def ood_guard(self) -> OODGuard | None:
        """The out-of-distribution guard, for runs made since it exists."""
        path = self.path / OOD_FILE
        return OODGuard.load(path) if path.is_file() else None

    @property
    def graph(self) -> Path | None:
        """The run's exported graph (``covidxr export``), where the folder holds one."""
        path = self.path / GRAPH_FILE
        return path if path.is_file() else None

    def split_rows(self) -> list[dict[str, str]]:
        """``splits.csv`` as rows (file, label, patient, source, split)."""
        with open(self.path / SPLITS_FILE, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def splits(self):
        """``splits.csv`` as a pandas DataFrame (training install)."""
        import pandas as pd

        return pd.read_csv(self.path / SPLITS_FILE, dtype=str, keep_default_na=False)

    def history(self):
        import pandas as pd

        return pd.read_csv(self.path / HISTORY_FILE)


def load_run(path: str | Path, weights: str | Path | None = None, weights_dir: str | Path | None = None) -> Run:
    """A run folder, checked for its files and read; the torch model is built only when asked for."""
    path = Path(path)
    for name in (INFO_FILE, CONFIG_FILE, HEAD_FILE):
        if not (path / name).is_file():
            raise CovidxrError(f"{path}: not a covidxr run folder (no {name})")
    try:
        data = json.loads((path / INFO_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CovidxrError(f"{path / INFO_FILE}: damaged ({exc})") from None
    if not isinstance(data, dict):
        raise CovidxrError(f"{path / INFO_FILE}: damaged (not a JSON object)")
    info = RunInfo.from_dict(data, path / INFO_FILE)
    return Run(path, info, weights, weights_dir)
