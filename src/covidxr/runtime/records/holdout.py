"""``loso.json`` (leave-one-source-out and the within-site test) and the rows of a designs folder's ``designs.json``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from covidxr.runtime.records.base import Interval, Part, Record, read_part
from covidxr.runtime.records.evaluation import Rates

__all__ = ["DesignRow", "Loso", "LosoUnit", "PooledRates", "SiteAuc", "WithinSite"]


# ---------------------------------------------------------------------------------------------------
# loso.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LosoUnit(Rates):
    """One held-out unit: a source or site retrained without, or a dataset the run never saw. A skipped
    unit has a ``reason`` and no rates."""

    unit: str | None = None
    source: str | None = None  # its sources, comma-separated
    kind: str | None = None
    status: str | None = None  # evaluated / skipped
    reason: str | None = None

    def omitted(self) -> set[str]:
        if self.status == "evaluated":
            return {"reason"} if self.reason is None else set()
        return {f.name for f in fields(self) if getattr(self, f.name) is None}


@dataclass(frozen=True)
class PooledRates(Rates):
    """Rates over every held-out prediction, with the pooled COVID-19-versus-rest AUC."""

    covid_vs_rest_auc: float | None = None
    covid_vs_rest_auc_ci95: Interval = None

    def omitted(self) -> set[str]:
        return {f.name for f in fields(self) if self.n == 0 and getattr(self, f.name) is None}


@dataclass(frozen=True)
class SiteAuc(Part):
    """COVID-19 against other pneumonia inside one site held out (or pooled over sites)."""

    SPARSE: ClassVar[frozenset[str]] = frozenset(
        {"source", "site", "status", "reason", "n_covid", "n_other", "auc", "auc_ci95", "n"}
    )

    source: str | None = None
    site: str | None = None
    status: str | None = None
    reason: str | None = None
    n: int | None = None  # the pooled figures only
    n_covid: int | None = None
    n_other: int | None = None
    auc: float | None = None
    auc_ci95: Interval = None


@dataclass(frozen=True)
class WithinSite(Part):
    """The test the source cannot pass (``lab.generalisation.within_site``)."""

    what: str | None = None
    min_images: int | None = None
    sites: list[SiteAuc] = field(default_factory=list)
    pooled: SiteAuc = field(default_factory=SiteAuc)

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        if name == "sites":
            return [read_part(SiteAuc, site) or SiteAuc() for site in value or []]
        return read_part(SiteAuc, value) or SiteAuc() if name == "pooled" else value


@dataclass(frozen=True)
class Loso(Record):
    """``loso.json``: leave-one-source-out (``covidxr holdout``); the within-site test came later (format 1
    files may lack it)."""

    WHAT: ClassVar[str] = "leave-one-source-out"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-loso-1", "covidxr-loso-2")
    UNMARKED: ClassVar[str] = "covidxr-loso-1"

    format: str = "covidxr-loso-2"
    run: str | None = None
    model: str | None = None
    design: str | None = None
    min_unit_images: int | None = None
    only_units: list[str] | None = None
    units: list[LosoUnit] = field(default_factory=list)
    pooled: PooledRates | None = None  # None where no unit was held out yet (older files)
    within_site_auc: float | None = None
    within_site_auc_ci95: Interval = None
    within_site: WithinSite | None = None
    disclaimer: str | None = None

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        readers = {
            "units": lambda v: [LosoUnit.from_dict(u) for u in v or [] if isinstance(u, dict)],
            "pooled": lambda v: read_part(PooledRates, v) if v else None,
            "within_site": lambda v: read_part(WithinSite, v) if v else None,
        }
        return readers[name](value) if name in readers else value

    def evaluated_unit(self, source: str) -> LosoUnit | None:
        """The evaluated held-out unit that is ``source`` as a whole and holds non-COVID images."""
        return next((u for u in self.units if u.status == "evaluated" and u.source == source and u.n_other), None)


# ---------------------------------------------------------------------------------------------------
# designs.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesignRow(Record):
    """One row of ``designs.json`` (``covidxr reproduce --design deconfounded``): a design's run and its
    headline figures. The per-check audit verdicts (``audit_<check>``) and per-unit false-COVID shares
    (``loso_called_covid[<unit>]``) are named after the data, so they stay in ``rest``."""

    WHAT: ClassVar[str] = "designs row"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-design-1", "covidxr-design-2")
    UNMARKED: ClassVar[str] = "covidxr-design-1"
    SPARSE: ClassVar[frozenset[str]] = frozenset({"wall_seconds"})

    format: str = "covidxr-design-2"
    design: str | None = None  # "paper" or "deconfounded"
    variant: str | None = None
    run: str | None = None  # its folder's name
    description: str | None = None
    datasets: str | None = None
    within_site_auc: float | None = None
    within_site_auc_ci95: Interval = None
    within_site_n: int | None = None
    gradcam_lung_share_covid_calls: float | None = None
    gradcam_lung_share_covid_calls_n: int | None = None
    gradcam_lung_share: float | None = None
    lungs_uniform_share: float | None = None
    internal_accuracy: float | None = None
    internal_accuracy_ci95: Interval = None
    internal_n: int | None = None
    internal_covid_sensitivity: float | None = None
    internal_covid_sensitivity_ci95: Interval = None
    internal_covid_specificity: float | None = None
    internal_covid_specificity_ci95: Interval = None
    audit_verdict: str | None = None
    loso_covid_sensitivity: float | None = None
    loso_covid_sensitivity_ci95: Interval = None
    loso_covid_n: int | None = None
    loso_auc: float | None = None
    loso_auc_ci95: Interval = None
    wall_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row in the order designs.csv has always had: each ``audit_<check>`` after ``audit_verdict``,
        each ``loso_called_covid[<unit>]`` after ``loso_auc_ci95``."""
        row = super().to_dict()
        named = [key for key in row if key not in self.rest]
        audits = [key for key in self.rest if key.startswith("audit_")]
        at = named.index("audit_verdict") + 1
        named[at:at] = audits
        at = named.index("loso_auc_ci95") + 1
        named[at:at] = [key for key in self.rest if key not in audits]
        return {key: row[key] for key in named}
