"""Limitations computed from the data that was used, not the data one expects.

Per class: sizes, sources and ages; whether the label coincides with the source, site or age group;
how small the evaluated classes are; and whether evaluated patients or sources were also in training.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidxr.lab.data import load_dataset, load_datasets
from covidxr.lab.labels import LABELS
from covidxr.lab.report.reading import read_splits, run_info, same_path
from covidxr.runtime.document import Block, Items, Table, Text
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.formatting import counted, either, missing
from covidxr.runtime.records import Metrics

# Columns whose values may coincide with the label: (column, noun, verb, the verb's part kept after
# the first clause, plural) -- "every A image comes from x and every B image from y".
CONFOUNDERS = (
    ("source", "source", "comes from", "from", "sources"),
    ("site", "site", "comes from", "from", "sites"),
    ("age_group", "age group", "is", "", "age groups"),
)
# A class/value overlap this small on both sides is reported as an exception rather than as mixing.
MINOR_SHARE = 0.05


def _counts(values: pd.Series) -> str:
    counts = values.replace("", "unknown").value_counts()
    return ", ".join(f"{value} {count}" for value, count in counts.items())


def ordered_labels(labels: pd.Series) -> list[str]:
    """The labels present, covidxr's classes first in their usual order, then any others sorted."""
    present = set(labels)
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


def _composition_table(frame: pd.DataFrame) -> Table:
    """Per class: sizes, sources, and the age groups and age range where the metadata has them."""
    header = ["class", "images", "patients", "sources"]
    header += ["age groups"] if "age_group" in frame.columns else []
    header += ["age (years)"] if "age" in frame.columns else []
    rows = []
    for label in ordered_labels(frame["label"]):
        group = frame[frame["label"] == label]
        row = [label, str(len(group)), str(group["patient_id"].nunique()), _counts(group["source"])]
        if "age_group" in frame.columns:
            row.append(_counts(group["age_group"]))
        if "age" in frame.columns:
            ages = pd.to_numeric(group["age"], errors="coerce").dropna()
            known = f"{ages.min():g} to {ages.max():g} ({len(ages)} of {len(group)} known)"
            row.append(known if len(ages) else "unknown")
        rows.append(row)
    return Table(header, rows)


def _class_groups(links: pd.DataFrame) -> list[tuple[list[str], list[str]]]:
    """Connected groups of classes and the values they share (``links``: class x value, True where linked)."""
    groups, remaining = [], list(links.index)
    while remaining:
        classes, values = {remaining[0]}, set()
        while True:
            new_values = set(links.columns[links.loc[sorted(classes)].any(axis=0)])
            new_classes = set(links.index[links[sorted(new_values)].any(axis=1)]) | classes
            if (new_classes, new_values) == (classes, values):
                break
            classes, values = new_classes, new_values
        remaining = [c for c in remaining if c not in classes]
        groups.append(([c for c in links.index if c in classes], sorted(values)))
    return groups


def confounding(frame: pd.DataFrame, column: str, noun: str, verb: str, gap: str, plural: str) -> str | None:
    """A sentence when the values of ``column`` separate the classes into groups (e.g. source vs label).

    Overlaps that are at most ``MINOR_SHARE`` of both the class and the value are named as exceptions
    ("nearly confounded"); unknown values are left out and counted.
    """
    known = frame[frame[column].astype(str).str.strip() != ""]
    counts = pd.crosstab(known["label"], known[column])
    if counts.shape[0] < 2:
        return None
    minor = (
        (counts > 0)
        & counts.div(counts.sum(axis=1), axis=0).le(MINOR_SHARE)
        & counts.div(counts.sum(axis=0), axis=1).le(MINOR_SHARE)
    )
    groups = _class_groups((counts > 0) & ~minor)
    if len(groups) < 2 or not all(values for _, values in groups):
        return None

    def said(values: list[str]) -> str:
        return either(values) if len(values) <= 3 else f"one of {len(values)} {plural}"

    parts = [
        " ".join(filter(None, ["every", "/".join(classes), "image", verb if i == 0 else gap, said(values)]))
        for i, (classes, values) in enumerate(groups)
    ]
    text = ", ".join(parts[:-1]) + " and " + parts[-1]
    exceptions = [
        f"{counted(int(counts.loc[label, value]), label + ' image')} with {noun} {value}"
        for label, value in minor.stack().loc[lambda s: s].index
    ]
    if exceptions:
        text += ", except " + ", ".join(exceptions)
    unknown = len(frame) - len(known)
    lead = f"leaving out {counted(unknown, 'image')} of unknown {noun}, " if unknown else ""
    return f"{lead}{text}: the label is {'nearly ' if exceptions else ''}confounded with the {noun}."


def scope_sentences(name: str, frame: pd.DataFrame) -> list[str]:
    """Which of source, site and age group coincide with the label in ``frame``, or that none does."""
    found = [confounding(frame, *confounder) for confounder in CONFOUNDERS if confounder[0] in frame.columns]
    nouns = either([noun for column, noun, *_ in CONFOUNDERS if column in frame.columns])
    sentences = [f"In the {name}, {s}" for s in found if s]
    return sentences or [f"In the {name}, no {nouns} coincides with a class."]


def _size_sentences(metrics: Metrics, evaluated: pd.DataFrame) -> list[str]:
    sizes = evaluated["label"].value_counts()
    low, high = metrics.accuracy_ci95 or [None, None]
    width = (
        ""
        if missing(low) or missing(high)
        else f"; the accuracy's 95% interval spans {100 * (high - low):.1f} percentage points"
    )
    return [
        f"The evaluated rows are {len(evaluated)} images of {evaluated['patient_id'].nunique()} patients; the "
        f"smallest class, {sizes.idxmin()}, has {sizes.min()} images{width}."
    ]


def _patient_sentences(evaluated: pd.DataFrame, training: pd.DataFrame) -> list[str]:
    shared = set(evaluated["patient_id"]) & set(training["patient_id"])
    per_patient = training["patient_id"].value_counts()
    several = per_patient[per_patient > 1]
    sentences = [
        f"{counted(len(shared), 'patient')} of the evaluated rows {'is' if len(shared) == 1 else 'are'} also in "
        "the training split: the evaluation is not independent of training."
        if shared
        else "No patient of the evaluated rows is in the training split."
    ]
    if len(several):
        sentences.append(
            f"{len(several)} of the {len(per_patient)} training patients have more than one image (up to "
            f"{several.max()}); a split by image, as in the paper, can put one patient on both sides."
        )
    unseen = sorted(set(evaluated["source"]) - set(training["source"]))
    seen = sorted(set(training["source"]))
    sentences.append(
        f"Evaluated images from sources not in training: {', '.join(unseen)}."
        if unseen
        else f"Every evaluated image comes from a source also in training ({', '.join(seen)}): an internal test, "
        "which says little about other hospitals."
    )
    return sentences


def limitation_blocks(metrics: Metrics, run: Path | None) -> list[Block]:
    """Sources, age groups, sizes and patient overlap of the evaluated rows and of the training split."""
    splits = read_splits(run)
    if splits is None:
        return [Text("Not computed: the run's splits.csv was not found.")]
    info = run_info(run)
    # A run on several folders records their common parent as its data: read the folders themselves.
    roots = info.datasets if info is not None and same_path(metrics.data, info.data) else None
    try:
        dataset = load_datasets(roots) if roots else load_dataset(metrics.data)
    except CovidxrError as exc:
        return [Text(f"Not computed: {exc}.")]
    evaluated, name = dataset.frame, dataset.name
    if metrics.split == "all":
        scope = f"evaluated rows (all images of {name})"
    else:
        chosen = set(splits.loc[splits["split"] == metrics.split, "filename"])
        evaluated = evaluated[evaluated["filename"].isin(chosen)]
        scope = f"evaluated rows ({metrics.split} split of {name})"
    training = splits[splits["split"] == "train"]
    return [
        Text(f"The {scope}:"),
        _composition_table(evaluated),
        Text("The training split:"),
        _composition_table(training),
        Items(
            scope_sentences(scope, evaluated)
            + scope_sentences("training split", training)
            + _size_sentences(metrics, evaluated)
            + _patient_sentences(evaluated, training)
        ),
    ]
