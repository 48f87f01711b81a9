"""The vocabulary of a dataset: the three classes (and the spellings public metadata uses) and the splits."""

from __future__ import annotations

__all__ = ["LABELS", "SPLITS", "canonical_label"]

LABELS: tuple[str, ...] = ("COVID-19", "NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
_LABEL_ALIASES = {
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "normal": "NORMAL",
    "pneumonia": "PNEUMONIA",
    "other infection": "PNEUMONIA",
    "infection": "PNEUMONIA",
}


def canonical_label(value: object) -> str | None:
    """The canonical class name for a label spelling, or None when it is not one of ours."""
    text = str(value).strip()
    if text in LABELS:
        return text
    return _LABEL_ALIASES.get(text.lower())
