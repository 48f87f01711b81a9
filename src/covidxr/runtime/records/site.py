"""``site.json``: a hospital's own operating point, as ``covidxr calibrate`` records it (``covidxr.runtime.site``
reads it for a model and applies it)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.storage import atomic_write

__all__ = ["CONFORMAL_SCORE", "METRICS", "MIN_IMAGES", "SITE_FORMAT", "Rate", "SiteCalibration"]

MIN_IMAGES = 20  # of a class a site figure is measured on: fewer is refused (calibrate) or too few to judge (validate)

# 2: ``conformal`` (prediction sets, issue 23), and ``target`` may be null where only a coverage was asked;
# files of format 1 keep opening.
SITE_FORMAT = "covidxr-site-2"
_PREFIX = "covidxr-site-"
METRICS = ("specificity", "sensitivity")
CONFORMAL_SCORE = "lac"  # the score 1 - p(class): a class is in an image's set where 1 - p_k <= its threshold


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
    and of the OOD score, and, for ``covidxr monitor`` (files written since issue 23 part 4; older ones lack
    them), ``p_covid`` and ``ood_scores`` (every image's value, sorted, 5 decimals), ``ood_rate``,
    ``no_answer_rate`` and ``covid_share`` (answered images called COVID-19 at the site threshold), and (files
    written since the image facts were kept; older ones lack them) ``image_widths`` and ``image_heights`` (every
    readable image's own, sorted), ``bit_depths`` and ``modes`` (images per bits per sample, DICOM BitsStored,
    and per mode: Pillow's, or DICOM's photometric interpretation).
    ``conformal`` (format 2, optional): split-conformal, class-conditional prediction sets, ``{"coverage",
    "score": "lac", "classes": {label: {"threshold", "n"}}}``: an image's set holds the classes k with
    ``1 - p_k <= threshold_k`` (``covidxr.runtime.inference.answer``). ``target`` is ``None`` where only a
    coverage was asked (the COVID-19 threshold is then the model's own).
    ``unreadable``: the images left out because they could not be read, ``{"file", "label", "error"}`` each
    (``file`` relative to the dataset folder; empty in older files, whose calibration refused any such image).
    ``path`` is where it was read from (not written)."""

    site: str
    created: str
    model: dict
    counts: dict[str, int]
    target: dict | None
    covid_threshold: float
    run_threshold: float
    achieved: dict[str, Rate]
    inputs: dict
    note: str | None = None
    confidence: float = 0.95
    conformal: dict | None = None
    unreadable: list[dict] = field(default_factory=list)
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
        target = record.target
        if target is None and record.conformal is None:
            raise CovidxrError(f"{where}: damaged (neither a target metric nor prediction sets)")
        if target is not None and (not isinstance(target, dict) or target.get("metric") not in METRICS):
            raise CovidxrError(f"{where}: damaged (no target metric: one of {', '.join(METRICS)})")
        if record.conformal is not None:
            _check_conformal(record.conformal, where)
        if not isinstance(record.unreadable, list) or not all(isinstance(item, dict) for item in record.unreadable):
            raise CovidxrError(f"{where}: damaged (the unreadable images are not a list of objects)")
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
    def metric(self) -> str | None:
        """The rate the COVID-19 threshold was chosen for; ``None`` where only a coverage was asked."""
        return None if self.target is None else str(self.target["metric"])

    @property
    def set_thresholds(self) -> dict[str, float] | None:
        """Per class, the conformal threshold on 1 - p(class); ``None`` without prediction sets."""
        if self.conformal is None:
            return None
        return {label: float(entry["threshold"]) for label, entry in self.conformal["classes"].items()}


def _check_conformal(conformal: object, where: str) -> None:
    try:
        coverage = float(conformal["coverage"])  # type: ignore[index]
        classes = conformal["classes"]  # type: ignore[index]
        score = conformal.get("score")  # type: ignore[union-attr]
        entries = [(float(entry["threshold"]), int(entry["n"])) for entry in classes.values()]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CovidxrError(f"{where}: damaged (prediction sets lack or mistype {exc})") from None
    if score != CONFORMAL_SCORE or not 0 < coverage < 1 or len(entries) < 2:
        raise CovidxrError(
            f"{where}: damaged (prediction sets: score {score!r}, coverage {coverage}, {len(entries)} classes)"
        )
    if not all(math.isfinite(q) and 0.0 <= q <= 1.0 and n > 0 for q, n in entries):
        raise CovidxrError(f"{where}: damaged (a prediction-set threshold outside [0, 1])")
