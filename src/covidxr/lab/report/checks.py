"""Checks on what the model looks at: the explanation checks in metrics.json and the shortcut audit.

Each check is shown as its verdict and one sentence, a few key figures, and every raw number folded
away, so the verdict is readable and the numbers behind it stay available.
"""

from __future__ import annotations

from pathlib import Path

from covidxr.lab.report.reading import read_record
from covidxr.runtime.document import Block, Details, Items, Text
from covidxr.runtime.formatting import num, pct, spaced
from covidxr.runtime.records import AUDIT_DECISION, Audit, AuditCheck, Metrics

# The checks `covidxr audit` writes into audit.json, in its order; unknown checks are shown after them.
AUDIT_CHECKS = ("lungs_hidden", "source_probe", "resolution_format")


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}: "))
        else:
            flat[spaced(f"{prefix}{key}")] = value
    return flat


EXPLANATION_KEY_FIGURES = (
    "confidence_change",
    "random_confidence_change",
    "better_than_random_p",
    "mass: lung_field",
    "lungs: share",
    "lungs: covid_calls_share",
    "lungs: uniform_share",
    "randomised_head_rank_correlation",
)


def _explanation_sentence(values: dict) -> str:
    flags = values.get("flags") or []
    if flags:
        return "; ".join(str(flag) for flag in flags) + "."
    if values.get("verdict") == "pass":
        return "better than random maps, dependent on the trained head, and no geometry flag."
    return "no flag recorded."


def explanation_blocks(metrics: Metrics) -> list[Block]:
    """Per method: its verdict and what it means in one sentence, the key figures, the raw numbers folded."""
    explanations = metrics.explanations
    if not explanations:
        return [Text("Explanation checks: not computed.")]
    blocks: list[Block] = []
    methods = explanations.get("methods") or {}
    for name, values in methods.items():
        flat = _flatten(values)
        sentence = f"{name}: {values.get('verdict', 'n/a')}. {_explanation_sentence(values)}"
        wanted = [spaced(key) for key in EXPLANATION_KEY_FIGURES]
        figures = [_figure(key, flat[key]) for key in wanted if key in flat]
        raw = [f"{k} = {num(v)}" for k, v in flat.items() if k not in {"flags", "verdict"}]
        blocks.append(Text(sentence))
        if figures:
            blocks.append(Items(figures))
        if raw:
            blocks.append(Details(f"raw numbers of {name}", raw))
    if not methods:
        blocks.append(Text("No explanation method was checked."))
    geometry = explanations.get("geometry") or {}
    facts = [f"{spaced(k)}: {num(v)}" for k, v in explanations.items() if k not in {"methods", "geometry"}]
    facts += [f"geometry {spaced(k)}: {num(v)}" for k, v in geometry.items()]
    if facts:
        blocks.append(Details("how the maps were checked", facts))
    return blocks


# The 3-5 figures that carry each audit check; the rest go into its folded raw numbers.
AUDIT_KEY_FIGURES = {
    "lungs_hidden": ("accuracy", "accuracy_lungs_hidden", "accuracy_border_only", "chance", "p_value"),
    "source_probe": ("balanced_accuracy", "chance", "confounded", "every_class_from_one_source"),
    "resolution_format": ("accuracy", "accuracy_common_format", "accuracy_drop", "changed_share"),
}


def _figure(key: str, value: object) -> str:
    """ "accuracy lungs hidden 47.1%": rates and shares in percent, the rest as numbers."""
    rate = isinstance(value, float) and any(word in key for word in ("accuracy", "share", "chance", "drop", "mass"))
    return f"{spaced(key)} {pct(value) if rate else num(value)}"


def _key_figures(figures: dict, keys: tuple[str, ...] = ()) -> list[str]:
    """The named figures of a check, or for a check covidxr does not know its first four plain numbers."""
    plain = [k for k, v in figures.items() if isinstance(v, int | float | bool)]
    chosen = [k for k in keys if k in figures] or plain[:4]
    return [_figure(k, figures[k]) for k in chosen]


def _shown_verdict(check: AuditCheck) -> str:
    """The verdict, except that a "pass" whose own sentence calls the test weak is shown as inconclusive."""
    verdict = "n/a" if check.verdict is None else str(check.verdict)
    if verdict == "pass" and "weak" in str(check.summary or "").lower():
        return "inconclusive (a weak test; see the sentence)"
    return verdict


def _check_blocks(name: str, check: AuditCheck, keys: tuple[str, ...] = ()) -> list[Block]:
    """One check: its verdict and sentence, 3-5 key figures, and every raw number folded away."""
    sentence = str(check.summary or "")
    figures = _key_figures(check.figures, keys)
    raw = _flatten(check.figures)
    blocks: list[Block] = [
        Text(f"{spaced(name)}: {_shown_verdict(check)}." + (f" {sentence}" if sentence else ""), warning=False)
    ]
    if figures:
        blocks.append(Items(figures))
    if raw:
        blocks.append(Details(f"raw numbers of {spaced(name)}", [f"{k} = {num(v)}" for k, v in raw.items()]))
    return blocks


def audit_blocks(candidates: list[Path], command: str) -> list[Block]:
    """The first audit.json among ``candidates``: the overall verdict, then per check a sentence, its key
    figures and its raw numbers folded away; or how to make one."""
    path = next((c / "audit.json" for c in candidates if (c / "audit.json").is_file()), None)
    audit = read_record(Audit, path) if path else None
    if audit is None:
        damaged = f" ({path} is damaged)" if path else ""
        return [Text(f"No shortcut audit yet{damaged}: run `{command}`.")]
    verdict = _shown_overall(audit)
    scope = f" on {audit.n_images} images ({audit.images})" if audit.images and audit.n_images else ""
    blocks: list[Block] = [
        Text(f"Overall verdict{scope}: {_verdict_sentence(audit)}", warning=verdict in {"fail", "warning"}),
        Text(_decision_sentence(audit)),
    ]
    checks = audit.checks
    names = [name for name in AUDIT_CHECKS if name in checks] + [name for name in checks if name not in AUDIT_CHECKS]
    for name in names:
        blocks += _check_blocks(name, checks[name], AUDIT_KEY_FIGURES.get(name, ()))
    if not names:
        blocks.append(Text("The audit lists no check."))
    facts = [f"from: {path}"]
    facts += [
        f"{spaced(k)}: {num(getattr(audit, k))}"
        for k in ("model", "images", "n_images")
        if getattr(audit, k) is not None
    ]
    if isinstance(audit.geometry, dict):
        facts += [f"geometry {key}: {num(value)}" for key, value in _flatten(audit.geometry).items()]
    blocks.append(Details("where these numbers come from", facts))
    return blocks


def _shown_overall(audit: Audit) -> str:
    """The overall verdict as the checks are shown: a recorded "pass" with a check shown inconclusive is
    inconclusive, so the overall line never contradicts the lines under it."""
    verdict = "not recorded" if audit.verdict is None else str(audit.verdict)
    if verdict == "pass" and any(_shown_verdict(check) != str(check.verdict) for check in audit.checks.values()):
        return "inconclusive"
    return verdict


def _verdict_sentence(audit: Audit) -> str:
    """ "warning (lungs hidden inconclusive (...), source probe warning)." with each check as it is shown."""
    shown = ", ".join(f"{spaced(k)} {_shown_verdict(v)}" for k, v in audit.checks.items())
    return _shown_overall(audit) + (f" ({shown})." if shown else ".")


def _decision_sentence(audit: Audit) -> str:
    """How the audit called each image, so its accuracies can be read against the metrics' accuracy."""
    return f"Each image is called {audit.decision or AUDIT_DECISION}."


def audit_line(candidates: list[Path], command: str) -> str:
    """The audit's overall and per-check verdicts in one bottom-line sentence, or how to run it."""
    path = next((c / "audit.json" for c in candidates if (c / "audit.json").is_file()), None)
    audit = read_record(Audit, path) if path else None
    if audit is None:
        return f"Shortcut audit: not run yet (`{command}`)."
    return f"Shortcut audit: {_verdict_sentence(audit)}"
