"""Typed, versioned records of what a run folder holds (runtime layer: no torch, no pandas).

One record per JSON file: ``RunInfo`` (``run.json``), ``ModelSidecar`` (``model.json``, beside an exported
graph), ``Metrics`` (``metrics.json``), ``Audit`` (``audit.json``), ``Loso`` (``loso.json``) and ``DesignRow``
(a row of a designs folder's ``designs.json``). Each has a ``format``; ``from_dict`` is the one place that
reads every older format (a field missing from an older folder takes its default) and refuses a newer or
unknown one in one line, so a report or a card never guesses at a file's shape. ``to_dict`` writes the keys
the writers always wrote, plus ``format``; keys a record does not model are kept (``rest``) and written back.
"""

from covidxr.runtime.records.base import Part, Record, read_json_file
from covidxr.runtime.records.evaluation import (
    AUDIT_DECISION,
    Audit,
    AuditCheck,
    Bootstrap,
    ClassRates,
    ClassShift,
    Confusion,
    CovidVsRest,
    EvalCalibration,
    Metrics,
    Rates,
)
from covidxr.runtime.records.holdout import DesignRow, Loso, LosoUnit, PooledRates, SiteAuc, WithinSite
from covidxr.runtime.records.run import RUN_FORMAT, FittedCalibration, ModelSidecar, OperatingPoint, RunInfo
from covidxr.runtime.records.validation import VALIDATION_FORMAT, Validation

__all__ = [
    "AUDIT_DECISION",
    "RUN_FORMAT",
    "VALIDATION_FORMAT",
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
    "Validation",
    "WithinSite",
    "read_json_file",
]
