"""Rates on images a model never trained on: per source, per held-out source and on other datasets.

Internal test figures share their sources with training; these are the figures that say how a model
would fare at a new hospital (metrics.json "by_source", loso.json, ``evaluate RUN --data OTHER``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from covidxr.lab.report.reading import externals
from covidxr.runtime.document import Block, Items, Table, Text
from covidxr.runtime.formatting import counted, dec, missing, num, pct, with_ci
from covidxr.runtime.records import CovidVsRest, Loso, Metrics, PooledRates, Rates

if TYPE_CHECKING:
    import pandas as pd

CALLED_BY_ARGMAX = (
    "Here an image is called COVID-19 when COVID-19 is its most probable class (not the validation-chosen "
    "threshold of the COVID-19-versus-the-rest table); intervals are 95% Wilson intervals, which treat images "
    "as independent."
)
CALLED_BY_LABEL = (
    "Here an image is called COVID-19 when it is labelled COVID-19 (its probability reaches the operating "
    "threshold); intervals are 95% Wilson intervals, which treat images as independent."
)


def _image_counts(rates: Rates) -> str:
    """ "30 (0 COVID-19, 30 other)" """
    if missing(rates.n_covid):
        return num(rates.n)
    return f"{num(rates.n)} ({num(rates.n_covid)} COVID-19, {num(rates.n_other)} other)"


def _rate_cells(rates: Rates) -> list[str]:
    """Accuracy, COVID-19 sensitivity and the share of other images called COVID-19, each with its interval."""
    return [
        with_ci(rates.accuracy, rates.accuracy_ci95),
        with_ci(rates.covid_sensitivity, rates.covid_sensitivity_ci95),
        with_ci(rates.other_called_covid, rates.other_called_covid_ci95),
    ]


RATE_HEADER = ["accuracy (95% CI)", "COVID-19 sensitivity (95% CI)", "non-COVID images called COVID-19 (95% CI)"]


def by_source_table(by_source: dict[str, Rates]) -> Table:
    """metrics.json "by_source": one row per source of the evaluated images."""
    rows = [[str(source), _image_counts(rates), *_rate_cells(rates)] for source, rates in by_source.items()]
    return Table(["source", "images", *RATE_HEADER], rows)


def loso_unit_table(loso: Loso) -> Table:
    """loso.json "units": one row per held-out unit, evaluated or skipped with the reason."""
    rows = []
    for unit in loso.units:
        status = "n/a" if unit.status is None else str(unit.status)
        if unit.reason:
            status += f": {unit.reason}"
        kind = "n/a" if unit.kind is None else str(unit.kind)
        rows.append([str(unit.unit), kind, _image_counts(unit), status, *_rate_cells(unit)])
    return Table(["held-out unit", "how it was held out", "images", "status", *RATE_HEADER], rows)


def _pooled_loso_table(pooled: PooledRates) -> Table:
    rows = [
        [
            "held-out COVID-19 images called COVID-19 (sensitivity)",
            with_ci(pooled.covid_sensitivity, pooled.covid_sensitivity_ci95),
            num(pooled.n_covid),
        ],
        [
            "held-out non-COVID images called COVID-19",
            with_ci(pooled.other_called_covid, pooled.other_called_covid_ci95),
            num(pooled.n_other),
        ],
        [
            "accuracy (three classes)",
            with_ci(pooled.accuracy, pooled.accuracy_ci95),
            num(pooled.n),
        ],
        [
            "COVID-19-versus-rest AUC (patient bootstrap)",
            with_ci(pooled.covid_vs_rest_auc, pooled.covid_vs_rest_auc_ci95, False),
            num(pooled.n),
        ],
    ]
    return Table(["pooled over every held-out unit", "value (95% CI)", "images"], rows)


def units_with_every_covid(loso: Loso | None, splits: pd.DataFrame | None) -> list[str]:
    """Held-out units, retrained without, that hold every COVID-19 image of the run's data: the model
    retrained without them never saw COVID-19, so its sensitivity there is zero by construction."""
    total = 0 if splits is None else int((splits["label"] == "COVID-19").sum())
    return [
        f"{unit.unit} ({counted(total, 'COVID-19 image')})"
        for unit in (loso.units if loso is not None else [])
        if total and unit.status == "evaluated" and unit.n_covid == total and unit.kind != "never in this run's data"
    ]


def every_covid_note(units: list[str]) -> str:
    """Why a held-out sensitivity of (nearly) zero says nothing when the unit held every COVID-19 image."""
    return (
        "Where a held-out unit holds every COVID-19 image of the run's data, the model retrained without it never "
        "saw a COVID-19 image and can hardly call one COVID-19: its held-out sensitivity says nothing about new "
        f"hospitals ({'; '.join(units)})."
    )


def loso_blocks(loso: Loso, path: Path, splits: pd.DataFrame | None) -> list[Block]:
    """The pooled held-out rates and the per-unit table of one run's loso.json."""
    whole = units_with_every_covid(loso, splits)
    return [
        Text(
            "Each unit (a source, or for a many-site source a publishing site; sites with fewer than "
            f"{num(loso.min_unit_images)} images together) was removed from training, the run's protocol "
            "retrained on the rest and tested on the unit's images; a dataset the run never trained on is a unit "
            f"of the run's own model. From {path}."
        ),
        _pooled_loso_table(loso.pooled or PooledRates()),
        loso_unit_table(loso),
        Items(
            [
                CALLED_BY_ARGMAX,
                "The pooled AUC mixes units, each predicted by a model that never saw it (one retrained model per "
                "unit, the run's own model for data it never trained on).",
                *([every_covid_note(whole)] if whole else []),
            ]
        ),
    ]


def external_line(name: str, metrics: Metrics) -> str:
    """One sentence on an evaluation of data the model never saw."""
    covid = metrics.covid_vs_rest or CovidVsRest()
    parts = [f"accuracy {with_ci(metrics.accuracy, metrics.accuracy_ci95)}"]
    if covid.auc is not None:
        parts.append(f"COVID-19-versus-rest AUC {dec(covid.auc)}")
    if covid.n_covid:
        parts.append(f"COVID-19 sensitivity {with_ci(covid.sensitivity, covid.sensitivity_ci95)}")
    if covid.n_other:
        called = 1 - covid.specificity if covid.specificity is not None else None
        parts.append(f"non-COVID images called COVID-19 {pct(called)} of {covid.n_other}")
    n = counted(int(metrics.n or 0), "image")
    return f"On {name} ({n}, never seen in training): " + "; ".join(parts) + "."


def generalisation_lines(run: Path | None, loso: Loso | None, command: str) -> list[str]:
    """How the model fares on data it never saw: other datasets, and every source held out in turn."""
    lines = [external_line(name, metrics) for name, metrics in externals(run).items()]
    pooled = loso.pooled if loso is not None else None
    if pooled is not None:
        lines.append(
            "Leave-one-source-out (each source held out of training in turn): COVID-19 sensitivity "
            f"{with_ci(pooled.covid_sensitivity, pooled.covid_sensitivity_ci95)}, non-COVID images "
            f"called COVID-19 {with_ci(pooled.other_called_covid, pooled.other_called_covid_ci95)}, "
            f"pooled COVID-19-versus-rest AUC {dec(pooled.covid_vs_rest_auc)}."
        )
    return lines or [f"On data it never saw: not measured yet (`{command}`); internal test figures do not travel."]
