"""``metrics.json`` (one evaluation) and ``audit.json`` (the shortcut audit)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from covidxr.runtime.records.base import Interval, Part, Record, read_part, read_parts

__all__ = [
    "Audit",
    "AuditCheck",
    "Bootstrap",
    "ClassRates",
    "ClassShift",
    "Confusion",
    "CovidVsRest",
    "EvalCalibration",
    "Metrics",
    "Rates",
]


# ---------------------------------------------------------------------------------------------------
# metrics.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRates(Part):
    """One class of ``per_class``; the intervals exist where the evaluation ran the patient bootstrap."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"sensitivity_ci95", "specificity_ci95", "auc_ci95"})

    n: int | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    f1: float | None = None
    auc: float | None = None
    sensitivity_ci95: Interval = None
    specificity_ci95: Interval = None
    auc_ci95: Interval = None


@dataclass(frozen=True)
class Confusion(Part):
    labels: list[str] = field(default_factory=list)
    matrix: list[list[int]] = field(default_factory=list)  # rows = truth, columns = prediction


@dataclass(frozen=True)
class Bootstrap(Part):
    """How the patient-level bootstrap intervals were drawn."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"unit"})

    unit: str | None = None  # "patient" (older files do not say)
    patients: int | None = None
    replicates: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class EvalCalibration(Part):
    """Temperature scaling on the evaluated images: the ECE before and after."""

    temperature: float | None = None
    ece_uncalibrated: float | None = None
    ece_calibrated: float | None = None


@dataclass(frozen=True)
class CovidVsRest(Part):
    """COVID-19 against everything else at the run's threshold (Wilson intervals)."""

    threshold: float | None = None
    n_covid: int | None = None
    n_other: int | None = None
    auc: float | None = None
    sensitivity: float | None = None
    sensitivity_ci95: Interval = None
    specificity: float | None = None
    specificity_ci95: Interval = None
    called_covid_share: float | None = None
    called_covid_share_ci95: Interval = None


@dataclass(frozen=True)
class Rates(Part):
    """How often COVID-19 images and other images are called COVID-19 (``lab.metrics.called_covid_rates``):
    per source, per held-out unit, pooled. Where no image was evaluated only ``n`` (0) is written."""

    n: int | None = None
    n_covid: int | None = None
    n_other: int | None = None
    accuracy: float | None = None
    accuracy_ci95: Interval = None
    covid_sensitivity: float | None = None
    covid_sensitivity_ci95: Interval = None
    other_called_covid: float | None = None
    other_called_covid_ci95: Interval = None

    def omitted(self) -> set[str]:
        empty = self.n == 0
        return super().omitted() | {f.name for f in fields(Rates) if empty and getattr(self, f.name) is None}


@dataclass(frozen=True)
class ClassShift(Part):
    """How the predicted-class mix moved from the run's internal test set to another dataset."""

    internal_test: dict[str, float] = field(default_factory=dict)
    this_data: dict[str, float] = field(default_factory=dict)
    difference: dict[str, float] = field(default_factory=dict)
    total_variation: float | None = None


@dataclass(frozen=True)
class Metrics(Record):
    """``metrics.json``: one evaluation (``covidxr evaluate``). Format 1 is every file written before it had a
    format (the oldest lack the bootstrap, the calibration, the COVID-19 threshold and the per-source rates)."""

    WHAT: ClassVar[str] = "metrics"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-metrics-1", "covidxr-metrics-2")
    UNMARKED: ClassVar[str] = "covidxr-metrics-1"
    SPARSE: ClassVar[frozenset[str]] = frozenset(
        {"accuracy_bootstrap_ci95", "macro_auc_ci95", "bootstrap", "predicted_class_shift", "explanations"}
    )

    format: str = "covidxr-metrics-2"
    run: str | None = None  # the run folder, as evaluate saw it
    model: str | None = None
    data: str | None = None
    split: str | None = None  # train / val / test / all (another dataset)
    disclaimer: str | None = None
    n: int | None = None
    accuracy: float | None = None
    accuracy_ci95: Interval = None  # Wilson
    correct: int | None = None
    per_class: dict[str, ClassRates] = field(default_factory=dict)
    macro_auc: float | None = None
    confusion_matrix: Confusion = field(default_factory=Confusion)
    predicted_class_counts: dict[str, int] = field(default_factory=dict)
    accuracy_bootstrap_ci95: Interval = None
    macro_auc_ci95: Interval = None
    bootstrap: Bootstrap | None = None
    calibration: EvalCalibration | None = None
    covid_vs_rest: CovidVsRest | None = None
    by_source: dict[str, Rates] | None = None
    predicted_class_shift: ClassShift | None = None  # evaluations of another dataset
    explanations: dict | None = None  # the explanation checks (``lab.explain.check_maps``), shown as they are

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        readers = {
            "per_class": lambda v: read_parts(ClassRates, v) or {},
            "confusion_matrix": lambda v: read_part(Confusion, v) or Confusion(),
            "bootstrap": lambda v: read_part(Bootstrap, v),
            "calibration": lambda v: read_part(EvalCalibration, v),
            "covid_vs_rest": lambda v: read_part(CovidVsRest, v),
            "by_source": lambda v: read_parts(Rates, v),
            "predicted_class_shift": lambda v: read_part(ClassShift, v),
            "explanations": lambda v: v if isinstance(v, dict) else None,
        }
        return readers[name](value) if name in readers else value

    @property
    def covid_class(self) -> ClassRates:
        """The COVID-19 row of ``per_class`` (empty where no COVID-19 image was evaluated)."""
        return self.per_class.get("COVID-19") or ClassRates()


# ---------------------------------------------------------------------------------------------------
# audit.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditCheck(Part):
    """One check of the shortcut audit: its verdict, its sentence, and its figures (``rest``, in order)."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"verdict", "summary"})

    verdict: str | None = None
    summary: str | None = None

    @property
    def figures(self) -> dict[str, Any]:
        """Every number of the check, in the order the audit wrote them."""
        return self.rest


# How `covidxr audit` calls each image (audit.json "decision"; audits without the key did the same): its checks
# compare the model's own ranking of the classes, wherever an operating threshold sits, so on a run whose
# threshold calls COVID-19 at a low probability its unchanged accuracy differs from the metrics'.
AUDIT_DECISION = (
    "the most probable class (not the COVID-19 operating threshold the metrics apply, so the unchanged accuracy "
    "here can differ from the test accuracy)"
)


@dataclass(frozen=True)
class Audit(Record):
    """``audit.json``: the shortcut audit (``covidxr audit``)."""

    WHAT: ClassVar[str] = "audit"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-audit-1", "covidxr-audit-2")
    UNMARKED: ClassVar[str] = "covidxr-audit-1"
    SPARSE: ClassVar[frozenset[str]] = frozenset({"run", "model", "data", "images", "n_images", "geometry", "decision"})

    format: str = "covidxr-audit-2"
    run: str | None = None
    model: str | None = None
    data: str | None = None
    images: str | None = None  # which images, in words
    n_images: int | None = None
    geometry: dict | None = None  # the regions the checks mask, and their areas
    decision: str | None = None  # how each image was called, in words; None (older audits): AUDIT_DECISION
    checks: dict[str, AuditCheck] = field(default_factory=dict)
    verdict: str | None = None
    summary: str | None = None
    disclaimer: str | None = None

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        if name == "checks":
            checks = value.items() if isinstance(value, dict) else []
            return {k: read_part(AuditCheck, v) or AuditCheck(rest={"value": v}) for k, v in checks}
        return value
