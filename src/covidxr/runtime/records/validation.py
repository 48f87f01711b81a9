"""``validation.json``: a hospital's local validation of one model at one operating point, as
``covidxr validate`` records it (the report's numbers, its verdict and the rules that gave it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from covidxr.runtime.records.base import Record
from covidxr.runtime.records.site import MIN_IMAGES, Rate
from covidxr.runtime.storage import atomic_write

__all__ = ["MIN_SUBGROUP", "RULES", "STATUSES", "VALIDATION_FORMAT", "Validation"]

VALIDATION_FORMAT = "covidxr-validation-1"
# The verdicts, worst first: a failed target, a target not (yet) shown, every target shown.
STATUSES = ("NOT READY", "UNDECIDED", "READY")
MIN_SUBGROUP = MIN_IMAGES  # images given an answer below which a subgroup is "too small to judge"
# How the verdict is reached, stated in the report beside the figures.
RULES = [
    "Each rate counts only the images the model gave an answer; the images it turned away and the unreadable "
    "ones are listed below and not counted.",
    "Specificity: the share of non-COVID images not called COVID-19; sensitivity: the share of COVID-19 images "
    "called COVID-19; both at the operating point, with exact (Clopper–Pearson) 95% intervals.",
    "fail: the whole 95% interval lies below the accepted minimum.",
    "warn: the interval straddles the minimum, or fewer than {min_images} images measure the rate, or the "
    "interval is wider than ±{precision} (the precision asked for).",
    "pass: the whole interval lies at or above the minimum and is no wider than ±{precision}.",
    "not measured: no image of the class the rate is measured on (no COVID-19 image: no sensitivity).",
    "Verdict: NOT READY when any rate fails; UNDECIDED when none fails but any warns or is not measured; "
    "READY for a trial on this population when every rate passes.",
]


@dataclass(frozen=True)
class Validation(Record):
    """What ``covidxr validate`` measured on a site's labelled images.

    ``verdict`` is one of ``STATUSES`` and ``verdict_line`` the sentence the report opens with; ``checks`` holds,
    per target metric (specificity, sensitivity), its ``status`` (pass, warn, fail, not measured), ``target`` and
    ``reason``. ``metrics``: ``accuracy``, ``sensitivity``, ``specificity`` as rates (value, exact 95% interval,
    successes, n; ``None`` where the class is absent) and ``auc`` (value, bootstrap interval, n of each class).
    ``operating_point``: the COVID-19 threshold that decided and where it came from (the model or a site file).
    ``subgroups``: the same per value of sex, age_group, view and source where the table has them.
    ``images_needed``: per target metric, about how many images give ``±precision`` at the measured value.
    ``no_answer`` and ``unreadable``: the images the model turned away (file, reason) or could not read
    (file, error); every rate counts only the images given an answer."""

    WHAT: ClassVar[str] = "validation record"
    FORMATS: ClassVar[tuple[str, ...]] = (VALIDATION_FORMAT,)

    format: str = VALIDATION_FORMAT
    created: str = ""
    data: str = ""
    model: dict = field(default_factory=dict)
    operating_point: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    precision: float = 0.02
    confidence: float = 0.95
    verdict: str = ""
    verdict_line: str = ""
    checks: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    confusion: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)
    subgroups: list = field(default_factory=list)
    images_needed: dict = field(default_factory=dict)
    no_answer: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)

    def metric(self, name: str) -> dict | None:
        """``accuracy``, ``sensitivity``, ``specificity`` or ``auc`` as recorded; ``None`` where not measured."""
        return self.metrics.get(name)

    def check(self, name: str) -> dict | None:
        """The verdict on a target metric (status, target, reason); ``None`` where it has no target."""
        return self.checks.get(name)

    def rate(self, name: str) -> Rate | None:
        """``accuracy``, ``sensitivity`` or ``specificity`` with its interval; ``None`` where not measured."""
        value = self.metrics.get(name)
        return None if value is None else Rate.from_dict(value, f"validation.json metrics.{name}")

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n", sync=True)
