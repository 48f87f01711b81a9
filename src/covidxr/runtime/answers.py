"""What goes beside every answer (runtime layer): the model's held-out weakness in one line, why a label goes
against the larger bar, whether an image was in the model's training split, and a chosen operating point.

The weakness line is computed from the run's own records, never typed in: a site file's local figures where one
decides; else the held-out hospital (``loso.json``: the model retrained without it) where this model called the
largest share of non-COVID images COVID-19; else the worst source of its held-out test split (``metrics.json``).
``seen_in_training`` compares an image file's SHA-256 with the ``sha256`` column of the run's ``splits.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from functools import lru_cache
from pathlib import Path

from covidxr.runtime.calibration import POSITIVE
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Loso, Metrics
from covidxr.runtime.runs import SPLITS_FILE, Run

__all__ = [
    "HASH_COLUMN",
    "MIN_HELD_OUT",
    "SITE_OR_THRESHOLD",
    "decision_note",
    "seen_in_training",
    "threshold_source",
    "training_hashes",
    "weakness",
    "with_threshold",
]

HASH_COLUMN = "sha256"  # splits.csv: each image file's SHA-256 (runs trained since issue 28)
RECORDS = ("loso.json", "metrics.json")  # where the held-out figures are read from, in order of preference
MIN_HELD_OUT = 30  # non-COVID images a held-out hospital needs before its rate is quoted as the weakness
SITE_OR_THRESHOLD = "give --site or --threshold, not both: each sets the COVID-19 operating point"


def with_threshold(run: Run, threshold: float | None) -> Run:
    """``run`` deciding with a COVID-19 threshold the user chose (``--threshold``, ``load_model(threshold=...)``);
    ``None`` gives ``run`` unchanged. A site file and a chosen threshold are two operating points: refused."""
    if threshold is None:
        return run
    if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0 and not math.isnan(threshold)):
        raise CovidxrError(f"threshold must be a probability between 0 and 1, not {threshold!r}")
    if run.site is not None:
        raise CovidxrError(SITE_OR_THRESHOLD)
    return dataclasses.replace(run, threshold=float(threshold))


def threshold_source(run: Run) -> str:
    """Who chose the threshold that decides: ``user`` (``--threshold``), ``site`` (a site file) or ``model``
    (the run's own, chosen on its validation split)."""
    if run.threshold is not None:
        return "user"
    return "site" if run.site is not None else "model"


def weakness(run: Run) -> str:
    """One line to show beside every answer: how often this model calls a non-COVID image COVID-19 where it was
    not trained, from the run's records (see the module docstring)."""
    line = _site_line(run) if run.site is not None else _held_out_line(run.path, _stamp(run.path, RECORDS))
    if run.threshold is not None and run.threshold != run.info.covid_threshold:
        line += (
            f" (measured at the model's operating point {run.info.covid_threshold:.3f}, "
            f"not at your threshold {run.threshold:.3f})"
        )
    return line


def _site_line(run: Run) -> str:
    site = run.site
    specificity = site.achieved.get("specificity")
    if specificity is not None and specificity.n:
        called = 1 - specificity.value
        return (
            f"at {site.site}, on {specificity.n} local non-COVID images, this model called {called:.0%} "
            f"({100 * (1 - specificity.high):.0f}–{100 * (1 - specificity.low):.0f}%) COVID-19 at the site's threshold"
        )
    sensitivity = site.achieved.get("sensitivity")
    if sensitivity is not None and sensitivity.n:
        return (
            f"at {site.site}, this model found {sensitivity.value:.0%} ({100 * sensitivity.low:.0f}–"
            f"{100 * sensitivity.high:.0f}%) of {sensitivity.n} local COVID-19 images at the site's threshold"
        )
    return f"at {site.site}, no local rate was measured: this model's error rate there is unknown"


def _stamp(folder: Path, names: tuple[str, ...]) -> tuple[int, ...]:
    """The files' modification times (0 where absent): the cache key that sees a record rewritten."""
    return tuple((folder / name).stat().st_mtime_ns if (folder / name).is_file() else 0 for name in names)


@lru_cache(maxsize=16)
def _held_out_line(folder: Path, stamp: tuple[int, ...]) -> str:
    """The weakness from ``loso.json`` or ``metrics.json`` (read once per run folder: answers come in batches)."""
    if (folder / "loso.json").is_file():
        units = [u for u in Loso.load(folder / "loso.json").units if u.status == "evaluated"]
        worst = _worst(units)
        if worst is not None:
            return (
                f"at a hospital it never saw ({worst.unit}: retrained without it), this model called "
                f"{_rate(worst)} of {worst.n_other} non-COVID X-rays COVID-19"
            )
    if (folder / "metrics.json").is_file():
        metrics = Metrics.load(folder / "metrics.json")
        named = [(name, rates) for name, rates in (metrics.by_source or {}).items()]
        worst = _worst([rates for _, rates in named])
        if worst is not None:
            source = next(name for name, rates in named if rates is worst)
            return (
                f"on its held-out {metrics.split} split, this model called {_rate(worst)} of {worst.n_other} "
                f"non-COVID X-rays from {source} COVID-19"
            )
    return "no held-out evaluation is recorded for this model: its error rate on unseen hospitals is unknown"


def _worst(units: list) -> object | None:
    """The unit with the largest share of non-COVID images called COVID-19, among those with enough of them."""
    rated = [u for u in units if u.n_other and u.other_called_covid is not None]
    enough = [u for u in rated if u.n_other >= MIN_HELD_OUT] or rated
    return max(enough, key=lambda u: u.other_called_covid, default=None)


def _rate(rates) -> str:
    interval = rates.other_called_covid_ci95
    if not interval or None in interval:
        return f"{rates.other_called_covid:.0%}"
    return f"{rates.other_called_covid:.0%} ({100 * interval[0]:.0f}–{100 * interval[1]:.0f}%)"


def decision_note(
    probabilities: dict[str, float], label: str | None, threshold: float | None, by_set: bool = False
) -> str | None:
    """Why ``label`` is not the most probable class, in words (None where it is, or where there is no label):
    the operating point, or a prediction set, decided against the larger bar."""
    if label is None:
        return None
    top = max(probabilities, key=probabilities.get)
    if top == label or probabilities[top] == probabilities[label]:
        return None
    if by_set:
        return f"{label} because its prediction set holds only {label}; {top} is more probable"
    covid = probabilities.get(POSITIVE)
    if label == POSITIVE:
        return (
            f"COVID-19 because p(COVID-19) {covid:.3f} ≥ {threshold:.3f}, the operating point; {top} is more probable"
        )
    return f"{label} because p(COVID-19) {covid:.3f} < {threshold:.3f}, the operating point; {top} is more probable"


def training_hashes(run: Run) -> frozenset[str] | None:
    """The SHA-256 of every image of the run's training split, or None for a run whose ``splits.csv`` has no
    ``sha256`` column (made before issue 28): then ``seen_in_training`` cannot be told."""
    return _read_hashes(run.path, _stamp(run.path, (SPLITS_FILE,)))


@lru_cache(maxsize=16)
def _read_hashes(folder: Path, stamp: tuple[int, ...]) -> frozenset[str] | None:
    """``training_hashes`` of a run folder, read once per version of its ``splits.csv``."""
    path = folder / SPLITS_FILE
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if HASH_COLUMN not in (reader.fieldnames or []):
            return None
        return frozenset(row[HASH_COLUMN] for row in reader if row["split"] == "train" and row[HASH_COLUMN])


def seen_in_training(run: Run, digest: str | None) -> bool | None:
    """Whether an image of SHA-256 ``digest`` is in the run's training split (None where it cannot be told: no
    digest, as for an image given decoded, or a run without hashes)."""
    hashes = training_hashes(run)
    return None if hashes is None or digest is None else digest in hashes
