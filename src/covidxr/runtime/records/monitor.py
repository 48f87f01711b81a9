"""``monitor.json``: what ``covidxr monitor`` measured on windows of predictions against a site's calibration
(``covidxr.runtime.monitor`` computes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from covidxr.runtime.records.base import Part, Record, read_part

__all__ = ["MONITOR_FORMAT", "MonitorFigures", "MonitorReport", "MonitorWindow"]

MONITOR_FORMAT = "covidxr-monitor-1"


@dataclass(frozen=True)
class MonitorFigures(Part):
    """The shares a window is compared on (and the calibration images' own, as the reference)."""

    n: int = 0
    ood_rate: float | None = None  # flagged out of distribution
    no_answer_rate: float | None = None  # given no answer (the guard or the lung check)
    covid_share: float | None = None  # answered images called COVID-19 at the site threshold


@dataclass(frozen=True)
class MonitorWindow(MonitorFigures):
    """One window of consecutive predictions: rows ``first``..``last`` (1-based, over all files in order,
    unreadable images not counted), its shares, its p(COVID-19) against calibration's (PSI over the
    calibration deciles, two-sample KS statistic and asymptotic p-value) and the rules it broke.

    By date (``covidxr monitor --by-date``), a window holds the rows of one ``period`` (``2024-03-01``,
    ``2024-W09``, ``2024-03``), ``first`` and ``last`` its first and last row. ``size_ks_statistic`` and
    ``size_ks_pvalue`` (image widths and heights against calibration's: the larger KS D) and ``format_shift``
    (bit depths and modes: the larger total variation distance) are ``None`` where the predictions file or the
    site file lacks the images' own sizes and bit depths."""

    index: int = 0
    first: int = 0
    last: int = 0
    psi: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    alarms: list[str] = field(default_factory=list)
    period: str | None = None
    size_ks_statistic: float | None = None
    size_ks_pvalue: float | None = None
    format_shift: float | None = None

    @property
    def verdict(self) -> str:
        return "ALARM" if self.alarms else "OK"


@dataclass(frozen=True)
class MonitorReport(Record):
    """``monitor.json``: the inputs (prediction files, site file, model), the rules with their limits, the
    calibration reference, every window's figures and the verdict (``OK`` or ``ALARM``)."""

    WHAT: ClassVar[str] = "monitor report"
    FORMATS: ClassVar[tuple[str, ...]] = (MONITOR_FORMAT,)

    format: str = MONITOR_FORMAT
    created: str | None = None
    predictions: list[str] = field(default_factory=list)
    site_file: str | None = None
    site: str | None = None
    model: str | None = None
    window: int = 0  # images per window; 0 by date
    by_date: str | None = None  # the column whose dates make the windows (--by-date), one per period
    period: str | None = None  # day, week or month (by date)
    skipped: str | None = None  # the partial last window (or the periods with too few images) left out, and why
    images_compared: bool = False  # image sizes, bit depths and modes compared (the files and site file hold them)
    unreadable: int = 0  # rows with an error (no image): not in any window
    rules: dict[str, Any] = field(default_factory=dict)
    calibration: MonitorFigures = field(default_factory=MonitorFigures)
    windows: list[MonitorWindow] = field(default_factory=list)
    verdict: str = "OK"
    disclaimer: str | None = None

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        if name == "calibration":
            return read_part(MonitorFigures, value) or MonitorFigures()
        if name == "windows":
            return [MonitorWindow.from_dict(w) for w in value or [] if isinstance(w, dict)]
        return value
