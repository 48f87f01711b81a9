"""A hospital's own operating point: ``site.json``, written by ``covidxr calibrate`` and read by ``predict``,
``serve`` and ``covidxr.load_model(..., site=...)`` (runtime layer: stdlib only).

Calibration at a site moves the COVID-19 threshold so that a target specificity (or sensitivity) holds on the
site's own labelled images; it records the figures it reached there, with exact (Clopper–Pearson) 95%
intervals and their n, and what the site's inputs looked like (for later monitoring). It belongs to one
model: a site file is refused for any model whose head or preprocessing differs from the one it was made
with, and a damaged, truncated or newer file is refused in one line, so nothing is ever predicted with a
wrong threshold.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runners import head_digest
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import atomic_write, stable_digest

__all__ = [
    "METRICS",
    "SITE_FORMAT",
    "Rate",
    "SiteCalibration",
    "describe_site",
    "load_site",
    "model_record",
    "with_site",
]

SITE_FORMAT = "covidxr-site-1"
_PREFIX = "covidxr-site-"
METRICS = ("specificity", "sensitivity")


@dataclass(frozen=True)
class Rate:
    """A share measured on local images: ``successes`` of ``n``, and its exact 95% interval."""

    value: float
    low: float
    high: float
    successes: int
    n: int

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Rate:
        if not isinstance(data, dict):
            raise CovidxrError(f"{where}: damaged (a rate is not a JSON object)")
        try:
            rate = cls(
                float(data["value"]), float(data["low"]), float(data["high"]), int(data["successes"]), int(data["n"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CovidxrError(f"{where}: damaged (a rate lacks or mistypes {exc})") from None
        if not (0 <= rate.low <= rate.value <= rate.high <= 1 and 0 <= rate.successes <= rate.n):
            raise CovidxrError(f"{where}: damaged (a rate outside [0, 1] or its interval)")
        return rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.1%} ({self.low:.1%}–{self.high:.1%}, {self.successes}/{self.n})"


@dataclass(frozen=True)
class SiteCalibration:
    """``site.json``: the COVID-19 threshold a site chose on its own images, for one model.

    ``model``: backbone name, run folder name, ``head_sha256`` (``covidxr.runtime.runners.head_digest``) and
    ``model_key``; ``counts``: answered local images per class; ``target``: ``{"metric", "value"}``;
    ``achieved``: each measured rate with its interval; ``inputs``: image count and quantiles of p(COVID-19)
    and of the OOD score, for monitoring. ``path`` is where it was read from (not written)."""

    site: str
    created: str
    model: dict
    counts: dict[str, int]
    target: dict
    covid_threshold: float
    run_threshold: float
    achieved: dict[str, Rate]
    inputs: dict
    note: str | None = None
    confidence: float = 0.95
    format: str = SITE_FORMAT
    path: str | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "site.json") -> SiteCalibration:
        """Read a record this or an older covidxr wrote; anything else is one line naming ``where``."""
        where = str(where)
        if not isinstance(data, dict):
            raise CovidxrError(f"{where}: not a covidxr site file (not a JSON object)")
        version = str(data.get("format", ""))
        if not version.startswith(_PREFIX) or not version.removeprefix(_PREFIX).isdigit():
            raise CovidxrError(f"{where}: not a covidxr site file (format {version or 'missing'})")
        if int(version.removeprefix(_PREFIX)) > int(SITE_FORMAT.removeprefix(_PREFIX)):
            raise CovidxrError(f"{where}: written by a newer covidxr (format {version}); upgrade covidxr to use it")
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["achieved"] = {k: Rate.from_dict(v, where) for k, v in dict(values["achieved"]).items()}
            values["covid_threshold"] = float(values["covid_threshold"])
            values["run_threshold"] = float(values["run_threshold"])
            record = cls(**values, path=where)
        except (KeyError, TypeError, ValueError) as exc:
            raise CovidxrError(f"{where}: damaged or incomplete site file ({type(exc).__name__}: {exc})") from None
        threshold = record.covid_threshold
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise CovidxrError(f"{where}: damaged (COVID-19 threshold {threshold} outside [0, 1])")
        model = record.model
        if not isinstance(model, dict) or not isinstance(model.get("head_sha256"), str) or "model_key" not in model:
            raise CovidxrError(f"{where}: damaged (no model identity: head_sha256 and model_key)")
        if not isinstance(record.target, dict) or record.target.get("metric") not in METRICS:
            raise CovidxrError(f"{where}: damaged (no target metric: one of {', '.join(METRICS)})")
        return record

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    def save(self, path: str | Path) -> Path:
        """Written atomically: a reader sees the old file or the whole new one, never part of one."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n", sync=True)

    @property
    def images(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def metric(self) -> str:
        return str(self.target["metric"])


def model_record(run: Run) -> dict:
    """What identifies a run's model in a site file: its backbone and folder name (for people), its head's
    SHA-256 and its model key (checked)."""
    return {
        "name": run.info.model.get("name"),
        "run": run.path.name,
        "head_sha256": head_digest(run),
        "model_key": run.info.model_key,
    }


def load_site(path: str | Path, run: Run | None = None) -> SiteCalibration:
    """``site.json`` read and checked (one line for a missing, damaged, truncated or newer file), and, with
    ``run``, checked to belong to its model (a site file for another model is refused)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CovidxrError(f"{path}: site file not found; make one with `covidxr calibrate`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CovidxrError(f"{path}: cannot read the site file ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CovidxrError(f"{path}: damaged or truncated site file (not complete JSON: {exc.msg})") from None
    site = SiteCalibration.from_dict(data, path)
    if run is not None:
        mine = model_record(run)
        same_key = stable_digest(site.model["model_key"]) == stable_digest(mine["model_key"])
        if site.model["head_sha256"] != mine["head_sha256"] or not same_key:
            raise CovidxrError(
                f"{path}: calibrated for another model ({site.model.get('name')}/{site.model.get('run')}, head "
                f"{site.model['head_sha256'][:12]}), not this one ({mine['name']}/{mine['run']}, head "
                f"{mine['head_sha256'][:12]}); calibrate again with this model"
            )
    return site


def with_site(run: Run, site: SiteCalibration | str | Path | None) -> Run:
    """``run`` deciding with the site's threshold instead of its own (a path is read by ``load_site``, which
    checks that it belongs to this model); ``None`` gives ``run`` unchanged."""
    if site is None:
        return run
    if not isinstance(site, SiteCalibration):
        site = load_site(site, run)
    return dataclasses.replace(run, site=site)


def describe_site(site: SiteCalibration) -> str:
    """One line: "calibrated at SITE on N local images: specificity 95% (92–97%)" (and the other rate where
    measured)."""
    order = [site.metric, *(m for m in METRICS if m != site.metric)]
    rates = ", ".join(
        f"{m} {site.achieved[m].value:.0%} ({100 * site.achieved[m].low:.0f}–{100 * site.achieved[m].high:.0f}%)"
        for m in order
        if m in site.achieved
    )
    return f"calibrated at {site.site} on {site.images} local images: {rates}"
