"""Run folders: what ``covidxr train`` writes, and a run loaded back (runtime layer: no torch needed).

A run folder holds its configuration, its metadata (``run.json``, read into the typed ``RunInfo``),
the trained head, the out-of-distribution statistics, the splits and, once ``covidxr export`` has
run (the bundled model ships it), the exported graph. Prediction needs only this module, the graph
and numpy; the torch model is built by the lab (``covidxr.lab.models.run_model``), for training-side work.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidxr.runtime.bundle import BUNDLED
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.engines import GRAPH_FILE
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.ood import OODGuard
from covidxr.runtime.records import RUN_FORMAT, RunInfo, read_json_file

if TYPE_CHECKING:
    from covidxr.runtime.records.site import SiteCalibration

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


def default_model_path() -> Path:
    """The model bundled with the package, for ``predict`` and ``load_model`` without a run folder."""
    if not (BUNDLED / INFO_FILE).is_file():
        raise CovidxrError("this installation has no bundled model; pass a run folder (--model RUN)")
    return BUNDLED


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
    threshold: float | None = None  # a user's own operating point (``covidxr.runtime.answers.with_threshold``)

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
        """The COVID-19 operating threshold that decides: the user's where one was chosen, else the site's where
        one is applied, else the run's."""
        if self.threshold is not None:
            return self.threshold
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
    data = read_json_file(path / INFO_FILE)
    if not isinstance(data, dict):
        raise CovidxrError(f"{path / INFO_FILE}: damaged (not a JSON object)")
    info = RunInfo.from_dict(data, path / INFO_FILE)
    return Run(path, info, weights, weights_dir)
