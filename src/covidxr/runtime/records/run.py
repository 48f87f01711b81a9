"""``run.json`` (how a run was made) and ``model.json`` (the sidecar of its exported graph)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records.base import Part, Record, read_part

__all__ = ["RUN_FORMAT", "FittedCalibration", "ModelSidecar", "OperatingPoint", "RunInfo"]

RUN_FORMAT = "covidxr-run-2"


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
        return read_part(OperatingPoint, value) if name == "covid_threshold" else value


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
