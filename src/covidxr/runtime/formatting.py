"""How numbers are written in reports and model cards: rates, decimals, intervals, cut-offs, counts.

In one place so that a rate reads the same wherever it appears. Standard library only: the model card
uses these in an installation without pandas or torch.
"""

from __future__ import annotations

import math

__all__ = [
    "ci_range",
    "counted",
    "cutoff",
    "dec",
    "either",
    "mean_sd",
    "missing",
    "num",
    "pct",
    "rate_n",
    "spaced",
    "with_ci",
]


def missing(value: object) -> bool:
    """None or NaN: JSON null, or an empty cell of a CSV read by pandas; shown as "n/a", never as "nan%"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: float | None) -> str:
    """A rate as a percentage with one decimal ("97.3%")."""
    return "n/a" if missing(value) else f"{value:.1%}"


def dec(value: float | None) -> str:
    """A number on a 0-1 scale that is not a rate (an AUC, an ECE) with three decimals."""
    return "n/a" if missing(value) else f"{value:.3f}"


def num(value: object) -> str:
    """Any value from a JSON or YAML file, readably: yes/no, three significant digits, lists and mappings."""
    if missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "; ".join(num(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{spaced(k)} {num(v)}" for k, v in value.items())
    return str(value)


def ci_range(interval: object, percent: bool = True) -> str | None:
    """ "93.6–100.0%" (or "0.950–1.000"), None when there is no interval."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or any(missing(v) for v in interval):
        return None
    low, high = interval
    if percent:
        return f"{100 * low:.1f}–{100 * high:.1f}%"
    return f"{low:.3f}–{high:.3f}"


def with_ci(value: object, interval: object, percent: bool = True, label: str = "") -> str:
    """ "97.3% (95% CI 93.6–100.0%)" with ``label`` "95% CI ", "100.0% (100.0–100.0%)" without."""
    shown = pct(value) if percent else dec(value)
    if missing(value):
        return shown
    span = ci_range(interval, percent)
    return f"{shown} ({label}{span})" if span else f"{shown} (no interval)"


def mean_sd(mean: object, sd: object, percent: bool = True) -> str:
    """ "95.0% ± 2.1%": a spread over seeds."""
    fmt = pct if percent else dec
    if missing(mean):
        return "n/a"
    return f"{fmt(mean)} ± {fmt(sd)}" if not missing(sd) else f"{fmt(mean)} (sd n/a)"


def cutoff(value: object) -> str:
    """A probability cut-off; one within 0.001 of 0 or 1 keeps its distance from the edge visible."""
    if missing(value):
        return "n/a"
    if 0.999 < value < 1:
        return f"1 − {1 - value:.1e}"
    if 0 < value < 0.001:
        return f"{value:.1e}"
    return f"{value:.3f}"


def either(words: list[str]) -> str:
    """ "a or b", "a, b or c"."""
    return " or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1]


def spaced(key: str) -> str:
    """A JSON key as words ("accuracy_drop" -> "accuracy drop")."""
    return str(key).replace("_", " ")


def counted(n: int, word: str) -> str:
    """ "1 image", "3 images"."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def rate_n(value: object, interval: object, n: object) -> str:
    """ "93.3% (78.7–98.2%), n = 30"; "n/a" where there were no images to compute it on."""
    return "n/a" if missing(value) else f"{with_ci(value, interval)}, n = {num(n)}"
