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
from pathlib import Path

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records.site import CONFORMAL_SCORE, METRICS, SITE_FORMAT, Rate, SiteCalibration
from covidxr.runtime.runners import head_digest
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import stable_digest

__all__ = [
    "CONFORMAL_SCORE",
    "METRICS",
    "SITE_FORMAT",
    "Rate",
    "SiteCalibration",
    "describe_set",
    "describe_site",
    "load_site",
    "model_record",
    "with_site",
]


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
        sets = site.set_thresholds
        if sets is not None and set(sets) != set(run.labels):
            raise CovidxrError(
                f"{path}: prediction sets for classes {', '.join(sorted(sets))}, but this model has "
                f"{', '.join(run.labels)}; calibrate again with this model"
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


def describe_set(members: list[str]) -> str:
    """A prediction set as text: ``{COVID-19, PNEUMONIA}`` (``{}`` for the empty set)."""
    return "{" + ", ".join(members) + "}"


def describe_site(site: SiteCalibration) -> str:
    """One line: "calibrated at SITE on N local images: specificity 95% (92–97%)" (and the other rate where
    measured; and the prediction sets' coverage where asked)."""
    order = [m for m in (site.metric, *METRICS) if m is not None]
    order = list(dict.fromkeys(order))
    rates = ", ".join(
        f"{m} {site.achieved[m].value:.0%} ({100 * site.achieved[m].low:.0f}–{100 * site.achieved[m].high:.0f}%)"
        for m in order
        if m in site.achieved
    )
    if site.conformal is not None:
        rates = ", ".join(
            filter(None, [rates, f"prediction sets for {site.conformal['coverage']:.0%} coverage per class"])
        )
    return f"calibrated at {site.site} on {site.images} local images: {rates}"
