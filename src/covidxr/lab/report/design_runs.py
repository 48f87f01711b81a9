"""The runs of a designs folder and how each scores against the validity targets.

``designs.json`` names one run per design; each run's folder holds its records (run.json, metrics.json,
audit.json, loso.json) and splits.csv. The designs report (``designs``) writes what is read here; the design
to ship is chosen by held-out figures only, never by internal accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidxr.lab.report.reading import read_record, read_splits, run_info
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Audit, DesignRow, Loso, LosoUnit, Metrics, PooledRates, RunInfo, read_json_file

__all__ = [
    "VALIDITY_TARGETS",
    "Design",
    "above_chance_within_site",
    "best_design",
    "read_designs",
    "unit_of_source",
    "shortfall",
    "targets_met",
    "validity_figures",
]

# Issue 17's targets for a model that learns the disease, not the collection (held-out figures).
VALIDITY_TARGETS = {
    "within_site_auc": 0.80,
    "loso_auc": 0.75,
    "nih_called_covid": 0.20,
    "kermany_called_covid": 0.20,
    "covid_sensitivity": 0.80,
    "lung_share": 0.6,
}


@dataclass
class Design:
    """One row of designs.json with what its run folder holds (None where a file is missing or damaged)."""

    row: DesignRow
    folder: Path
    info: RunInfo | None
    metrics: Metrics | None
    audit: Audit | None
    loso: Loso | None
    splits: pd.DataFrame | None

    @property
    def name(self) -> str:
        return str(self.row.run or self.folder.name)

    @property
    def description(self) -> str:
        return str(self.row.description or "n/a")

    @property
    def trained_on(self) -> str:
        scope = "first dataset only" if self.row.design == "paper" else "every dataset merged"
        return f"{'n/a' if self.row.datasets is None else self.row.datasets} ({scope})"

    @property
    def units(self) -> list[LosoUnit]:
        return self.loso.units if self.loso is not None else []

    @property
    def pooled(self) -> PooledRates:
        return (self.loso.pooled if self.loso is not None else None) or PooledRates()


def read_designs(out: Path) -> list[Design]:
    """Every design of a designs folder, with its run's records; no designs.json is one line saying how."""
    path = out / "designs.json"
    rows = read_json_file(path) if path.is_file() else None
    if not isinstance(rows, list):
        raise CovidxrError(f"{out}: no designs.json; run `covidxr reproduce --design deconfounded` first")
    designs = []
    for data in rows:
        row = DesignRow.from_dict(data, path)
        folder = out / str(row.run)
        designs.append(
            Design(
                row,
                folder,
                run_info(folder if (folder / "run.json").is_file() else None),
                read_record(Metrics, folder / "metrics.json"),
                read_record(Audit, folder / "audit.json"),
                read_record(Loso, folder / "loso.json"),
                read_splits(folder),
            )
        )
    return designs


def unit_of_source(d: Design, source: str) -> LosoUnit | None:
    """The evaluated held-out unit that is ``source`` as a whole (retrained without it, or external)."""
    return d.loso.evaluated_unit(source) if d.loso is not None else None


def validity_figures(d: Design) -> dict[str, float | None]:
    """The held-out figures the validity targets name, for one design (None where not measured)."""
    figures: dict[str, float | None] = {
        "within_site_auc": d.row.within_site_auc,
        "loso_auc": d.pooled.covid_vs_rest_auc,
        "covid_sensitivity": d.pooled.covid_sensitivity,
        "lung_share": d.row.gradcam_lung_share_covid_calls,
    }
    for source in ("nih", "kermany"):
        unit = unit_of_source(d, source)
        figures[f"{source}_called_covid"] = None if unit is None else unit.other_called_covid
    return figures


def targets_met(figures: dict[str, float | None]) -> int:
    """How many validity targets a design's figures meet (a figure not measured meets none)."""
    met = 0
    for name, target in VALIDITY_TARGETS.items():
        value = figures.get(name)
        if value is not None and (value <= target if name.endswith("called_covid") else value >= target):
            met += 1
    return met


def shortfall(figures: dict[str, float | None]) -> float:
    """How far a design's figures fall short of the validity targets, summed over the six (AUCs and shares on
    the same 0-1 scale; a target met adds 0, a figure not measured adds its whole target)."""
    total = 0.0
    for name, target in VALIDITY_TARGETS.items():
        value = figures.get(name)
        if name.endswith("called_covid"):
            total += 1.0 - target if value is None else max(0.0, value - target)
        else:
            total += target if value is None else max(0.0, target - value)
    return total


def above_chance_within_site(d: Design) -> bool:
    """Whether the within-site AUC's 95% interval lies above 0.5: the design tells COVID-19 from other
    pneumonia at sites it never saw better than chance."""
    interval = d.row.within_site_auc_ci95
    return bool(interval) and interval[0] > 0.5


def best_design(designs: list[Design]) -> Design | None:
    """The design to ship, by held-out figures only (never internal accuracy): among the designs that pass
    the within-site test above chance (all designs if none does), the smallest total shortfall from the
    validity targets, then the higher within-site AUC."""

    def key(d: Design) -> tuple:
        figures = validity_figures(d)
        return (shortfall(figures), -(figures["within_site_auc"] or 0.0))

    measured = [d for d in designs if d.loso is not None and d.row.design != "paper"]
    candidates = [d for d in measured if above_chance_within_site(d)] or measured
    return min(candidates, key=key) if candidates else None
