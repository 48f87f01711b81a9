"""Typed, versioned records of what a run folder holds (runtime layer: no torch, no pandas).

One record per JSON file: ``RunInfo`` (``run.json``), ``ModelSidecar`` (``model.json``, beside an exported
graph), ``Metrics`` (``metrics.json``), ``Audit`` (``audit.json``), ``Loso`` (``loso.json``) and ``DesignRow``
(a row of a designs folder's ``designs.json``). Each has a ``format``; ``from_dict`` is the one place that
reads every older format (a field missing from an older folder takes its default) and refuses a newer or
unknown one in one line, so a report or a card never guesses at a file's shape. ``to_dict`` writes the keys
the writers always wrote, plus ``format``; keys a record does not model are kept (``rest``) and written back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from covidxr.runtime.errors import CovidxrError

__all__ = [
    "RUN_FORMAT",
    "Audit",
    "AuditCheck",
    "Bootstrap",
    "ClassRates",
    "ClassShift",
    "Confusion",
    "CovidVsRest",
    "DesignRow",
    "EvalCalibration",
    "FittedCalibration",
    "Loso",
    "LosoUnit",
    "Metrics",
    "ModelSidecar",
    "OperatingPoint",
    "Part",
    "PooledRates",
    "Rates",
    "Record",
    "RunInfo",
    "SiteAuc",
    "WithinSite",
    "read_json_file",
]

RUN_FORMAT = "covidxr-run-2"
Interval = list[float] | None  # a 95% interval [low, high] as JSON stores it


def read_json_file(path: str | Path) -> Any:
    """A JSON file's value; a missing, unreadable or damaged file is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise CovidxrError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:
        raise CovidxrError(f"{path}: damaged ({exc})") from None


def _plain(value: Any) -> Any:
    """A record's value as JSON holds it (nested parts become objects)."""
    if isinstance(value, Part):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Part:
    """A JSON object read into attributes: every field defaults (older files lack some), keys it does not
    model are kept in ``rest``, and ``to_dict`` writes back what was read."""

    rest: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    # Fields written only when they hold a value (the writers leave these keys out at times).
    SPARSE: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        """How a field's JSON value becomes its attribute (nested parts override this)."""
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path = "") -> Self:
        names = {f.name for f in fields(cls)} - {"rest"}
        values = {key: cls._read(key, value) for key, value in data.items() if key in names}
        return cls(**values, rest={key: value for key, value in data.items() if key not in names})

    def omitted(self) -> set[str]:
        """The fields ``to_dict`` leaves out: the sparse ones that hold nothing."""
        return {name for name in self.SPARSE if getattr(self, name) is None}

    def to_dict(self) -> dict[str, Any]:
        skip = self.omitted() | {"rest"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in skip} | self.rest


def _part(cls: type[Part], value: Any) -> Any:
    """A nested object read as ``cls``; anything else (an older or damaged file) as None."""
    return cls.from_dict(value) if isinstance(value, dict) else None


def _parts(cls: type[Part], value: Any) -> dict[str, Any] | None:
    """A JSON object of nested objects (per class, per source), each read as ``cls`` (empty where damaged)."""
    return {key: _part(cls, item) or cls() for key, item in value.items()} if isinstance(value, dict) else None


@dataclass(frozen=True)
class Record(Part):
    """A whole file: a part with a ``format``, which ``from_dict`` checks before reading anything."""

    WHAT: ClassVar[str] = "record"
    FORMATS: ClassVar[tuple[str, ...]] = ()  # the formats read, oldest first; the last one is written
    # The format of files written before the key existed.
    UNMARKED: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path = "") -> Self:
        """Read any format covidxr wrote; a newer or unknown one is refused in one line naming the file."""
        if not isinstance(data, dict):
            raise CovidxrError(f"{path}: not a covidxr {cls.WHAT} (not a JSON object)")
        data = data if "format" in data else {**data, "format": cls.UNMARKED}
        if data["format"] not in cls.FORMATS:
            raise CovidxrError(
                f"{path}: {cls.WHAT} format {data['format']!r} is not one this covidxr reads "
                f"({', '.join(cls.FORMATS)}); it was written by a newer covidxr: upgrade covidxr"
            )
        return super().from_dict(data, path)

    @classmethod
    def new(cls, values: dict[str, Any]) -> Self:
        """A record of the newest format from what a writer computed (nested objects as plain dicts)."""
        return cls.from_dict({**values, "format": cls.FORMATS[-1]})

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The record in the file at ``path``."""
        return cls.from_dict(read_json_file(path), path)


# ---------------------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint(Part):
    """The COVID-19 threshold a run chose on validation: its value, its rule and what it gave there."""

    SPARSE: ClassVar[frozenset[str]] = frozenset({"rule", "val_sensitivity", "val_specificity", "val_positives"})

    value: float | None = None
    rule: str | None = None  # youden; older runs: the highest cut-off reaching a target sensitivity
    val_sensitivity: float | None = None
    val_specificity: float | None = None
    val_positives: int | None = None


@dataclass(frozen=True)
class FittedCalibration(Part):
    """``run.json``'s ``calibration``: the temperature fitted on validation and the COVID-19 threshold."""

    SPARSE: ClassVar[frozenset[str]] = frozenset(
        {"method", "temperature", "val_ece_uncalibrated", "val_ece_calibrated", "covid_threshold"}
    )

    method: str | None = None
    temperature: float | None = None
    val_ece_uncalibrated: float | None = None
    val_ece_calibrated: float | None = None
    covid_threshold: OperatingPoint | None = None

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        return _part(OperatingPoint, value) if name == "covid_threshold" else value


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: how a run was made and what it needs at prediction time.

    ``covidxr-run-2`` adds the ``format`` field; folders written before it (format 1) are read by
    ``from_dict``, the one place that knows their defaults."""

    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-run-1", RUN_FORMAT)

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
    feature_cache: dict | str | None = None
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
    def from_dict(cls, data: dict, where: str | Path = "run.json") -> RunInfo:
        """Read any format covidxr wrote; a missing required field or a newer format is one line naming the file."""
        if not isinstance(data, dict):
            raise CovidxrError(f"{where}: not a covidxr run record (not a JSON object)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("format", "covidxr-run-1")
        if values["format"] not in cls.FORMATS:
            raise CovidxrError(
                f"{where}: run format {values['format']!r} is not one this covidxr reads "
                f"({', '.join(cls.FORMATS)}); it was written by a newer covidxr: upgrade covidxr"
            )
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

    @property
    def fitted(self) -> FittedCalibration:
        """``calibration`` with attributes (empty for runs made before calibration existed)."""
        return FittedCalibration.from_dict(self.calibration if isinstance(self.calibration, dict) else {})

    @property
    def design_summary(self) -> str:
        """How the run was designed, in words (runs before designs followed the paper's protocol)."""
        return self.design.get("summary", "the paper's protocol")


# ---------------------------------------------------------------------------------------------------
# model.json: the sidecar of an exported graph
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSidecar(Record):
    """``model.json`` beside an exported graph: what the runtime needs to feed it and read its outputs.

    ``covidxr-onnx-1`` is a run graph (features, logits, Grad-CAM activations), ``covidxr-onnx-features-1``
    a backbone graph (features only, no labels or calibration); an int8 graph's acceptance report
    (``covidxr quantize``) carries the same input fields and is read here too."""

    WHAT: ClassVar[str] = "graph sidecar"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-int8-1", "covidxr-onnx-features-1", "covidxr-onnx-1")
    UNMARKED: ClassVar[str] = "covidxr-onnx-1"  # int8 reports written before they named their format
    SPARSE: ClassVar[frozenset[str]] = frozenset(
        {"model", "cam", "labels", "temperature", "covid_threshold", "disclaimer", "sha256", "inputs", "outputs"}
    )

    format: str = "covidxr-onnx-1"
    model: str | None = None
    inputs: dict | None = None
    outputs: dict | None = None
    cam: dict | None = None  # {layer, activation} where the graph holds the Grad-CAM activations
    image_size: int = 0
    pipeline: dict = field(default_factory=dict)
    normalisation: dict = field(default_factory=dict)
    labels: list[str] | None = None
    temperature: float | None = None
    covid_threshold: float | None = None
    key: dict = field(default_factory=dict)  # what the graph was exported from (model key, head, versions)
    disclaimer: str | None = None
    sha256: str | None = None  # of the graph's bytes, checked before every load

    def omitted(self) -> set[str]:
        """A run graph writes ``cam`` even when it has none (null); the other formats never do."""
        skip = super().omitted()
        return skip - {"cam"} if self.format == "covidxr-onnx-1" and self.model is not None else skip

    @property
    def cam_activation(self) -> str | None:
        """The elementwise step after the Grad-CAM layer, where the graph holds its activations."""
        return (self.cam or {}).get("activation")


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
            "per_class": lambda v: _parts(ClassRates, v) or {},
            "confusion_matrix": lambda v: _part(Confusion, v) or Confusion(),
            "bootstrap": lambda v: _part(Bootstrap, v),
            "calibration": lambda v: _part(EvalCalibration, v),
            "covid_vs_rest": lambda v: _part(CovidVsRest, v),
            "by_source": lambda v: _parts(Rates, v),
            "predicted_class_shift": lambda v: _part(ClassShift, v),
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


@dataclass(frozen=True)
class Audit(Record):
    """``audit.json``: the shortcut audit (``covidxr audit``)."""

    WHAT: ClassVar[str] = "audit"
    FORMATS: ClassVar[tuple[str, ...]] = ("covidxr-audit-1", "covidxr-audit-2")
    UNMARKED: ClassVar[str] = "covidxr-audit-1"
    SPARSE: ClassVar[frozenset[str]] = frozenset({"run", "model", "data", "images", "n_images", "geometry"})

    format: str = "covidxr-audit-2"
    run: str | None = None
    model: str | None = None
    data: str | None = None
    images: str | None = None  # which images, in words
    n_images: int | None = None
    geometry: dict | None = None  # the regions the checks mask, and their areas
    checks: dict[str, AuditCheck] = field(default_factory=dict)
    verdict: str | None = None
    summary: str | None = None
    disclaimer: str | None = None

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        if name == "checks":
            checks = value.items() if isinstance(value, dict) else []
            return {k: _part(AuditCheck, v) or AuditCheck(rest={"value": v}) for k, v in checks}
        return value


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
            return [_part(SiteAuc, site) or SiteAuc() for site in value or []]
        return _part(SiteAuc, value) or SiteAuc() if name == "pooled" else value


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
            "pooled": lambda v: _part(PooledRates, v) if v else None,
            "within_site": lambda v: _part(WithinSite, v) if v else None,
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
