"""The local validation report, ``validation.md`` and ``validation.html``, from a ``Validation`` record: the
verdict first, the rules that gave it, the rates with their intervals, the figures, the subgroups, the images
needed for the precision asked, and the images the model gave no answer or could not read."""

from __future__ import annotations

from pathlib import Path

from covidxr import DISCLAIMER
from covidxr.lab.figures import plot_confusion, plot_interval_rates, plot_reliability
from covidxr.lab.site import MIN_IMAGES
from covidxr.runtime.document import Block, Figure, Heading, Items, Table, Text, Verdict, render_html, render_markdown
from covidxr.runtime.formatting import counted, cutoff, dec, pct
from covidxr.runtime.records.validation import MIN_SUBGROUP, RULES, Validation

__all__ = ["FIGURES", "validation_blocks", "write_validation_report"]

FIGURES = {
    "rates": "validation_rates.png",
    "confusion": "validation_confusion.png",
    "calibration": "validation_calibration.png",
    "subgroups": "validation_subgroups.png",
}
RATE_NAMES = ("accuracy", "sensitivity", "specificity")


def _interval(rate: dict | None, percent: bool = True) -> str:
    if rate is None:
        return "not measured"
    if percent:
        return f"{pct(rate['value'])} ({100 * rate['low']:.1f}–{100 * rate['high']:.1f}%)"
    return f"{dec(rate['value'])} ({dec(rate['low'])}–{dec(rate['high'])})"


def _class(metric: str) -> str:
    return "non-COVID" if metric == "specificity" else "COVID-19"


def _auc_n(auc: dict | None) -> str:
    return "" if auc is None else f"{auc['n_positive']} COVID-19 / {auc['n_negative']} other"


def _rate_rows(record: Validation) -> list[tuple[str, float, float, float]]:
    rows = [(name, m["value"], m["low"], m["high"]) for name in RATE_NAMES if (m := record.metric(name)) is not None]
    if (auc := record.metric("auc")) is not None:
        rows.append(("AUC of p(COVID-19)", auc["value"], auc["low"], auc["high"]))
    return rows


def _figures(folder: Path, record: Validation) -> dict[str, Path]:
    """The PNGs beside the report (each with the disclaimer at its foot)."""
    written = {}
    where = Path(record.data).name
    threshold = record.operating_point["covid_threshold"]
    rows = _rate_rows(record)
    if rows:
        written["rates"] = folder / FIGURES["rates"]
        plot_interval_rates(rows, record.targets, written["rates"], f"{where}: rates at threshold {cutoff(threshold)}")
    written["confusion"] = folder / FIGURES["confusion"]
    confusion = record.confusion
    plot_confusion(
        confusion["matrix"], confusion["rows"], written["confusion"], f"{where}: confusion", confusion["columns"]
    )
    written["calibration"] = folder / FIGURES["calibration"]
    plot_reliability(record.calibration, threshold, written["calibration"], f"{where}: reliability of p(COVID-19)")
    sub_rows = []
    for group in record.subgroups:
        for name in ("specificity", "sensitivity"):
            if (m := group[name]) is not None:
                label = f"{name} {group['column']}={group['value']} (n={m['n']})"
                sub_rows.append((label, m["value"], m["low"], m["high"]))
    if sub_rows:
        written["subgroups"] = folder / FIGURES["subgroups"]
        plot_interval_rates(sub_rows, record.targets, written["subgroups"], f"{where}: per subgroup")
    return written


def _figure(figures: dict[str, Path], key: str, alt: str, caption: str) -> list[Block]:
    if key not in figures:
        return []
    path = figures[key]
    return [Figure(key, path, path.name, alt, caption)]


def validation_blocks(record: Validation, figures: dict[str, Path]) -> list[Block]:
    """The report's blocks, in order: disclaimer, verdict, rules, rates, figures, subgroups, sample size,
    images without an answer, unreadable images, what it does not show."""
    metrics, counts, point = record.metrics, record.counts, record.operating_point
    targets = record.targets
    precision = record.precision
    rules = [rule.format(min_images=MIN_IMAGES, precision=pct(precision)) for rule in RULES]
    rules.insert(
        0,
        f"Accepted minimums: specificity {pct(targets['specificity'])}, sensitivity {pct(targets['sensitivity'])} "
        f"(--min-specificity, --min-sensitivity); precision asked ±{pct(precision)} (--precision).",
    )
    verdict = [
        record.verdict_line,
        f"Operating point: COVID-19 when p(COVID-19) reaches {cutoff(point['covid_threshold'])} "
        f"({'site file ' + str(point['site']) + ': ' if point['source'] == 'site' else 'the model’s own: '}"
        f"{point['description']}).",
        f"{counts['images']} images in {record.data}: {counts['answered']} given an answer, "
        f"{counts['no_answer']} given none, {counts['unreadable']} unreadable.",
    ]
    rate_table = []
    for name in RATE_NAMES:
        rate = record.metric(name)
        check = record.check(name)
        rate_table.append(
            [
                name,
                _interval(rate),
                "" if rate is None else f"{rate['successes']} of {rate['n']}",
                pct(check["target"]) if check else "",
                check["status"] if check else "",
            ]
        )
    auc = record.metric("auc")
    rate_table.append(
        [
            "AUC of p(COVID-19)",
            _interval(auc, percent=False) if auc else "not measured (needs COVID-19 and other images)",
            _auc_n(auc),
            "",
            "",
        ]
    )
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Verdict(verdict),
        Heading(2, "The rules"),
        Items(rules),
        Heading(2, "At the operating point"),
        Table(["rate", "value (95% interval)", "images", "accepted minimum", "status"], rate_table),
        Items([f"{name}: {check['status']} — {check['reason']}" for name, check in record.checks.items()]),
        Text(
            "Intervals: exact Clopper–Pearson for the rates; for the AUC the 2.5th and 97.5th percentiles of "
            f"{auc['replicates'] if auc else 1000} bootstrap replicates that resample patients (images where "
            "metadata.csv has no patient_id)."
        ),
        *_figure(
            figures, "rates", "rates with intervals", "Each rate with its 95% interval; red: the accepted minimum."
        ),
        *_figure(
            figures,
            "confusion",
            "confusion matrix",
            "Rows: the true label; columns: covidxr's answer, or none (the guard or the lung check turned it away).",
        ),
        *_figure(
            figures,
            "calibration",
            "reliability diagram of p(COVID-19)",
            "Observed COVID-19 share per bin of p(COVID-19) (exact 95% intervals) against the bin's mean p; on the "
            "diagonal, p(COVID-19) means what it says at this site. Red: the operating threshold.",
        ),
        Heading(2, "Subgroups"),
    ]
    if record.subgroups:
        blocks.append(
            Table(
                ["column", "value", "answered", "accuracy", "sensitivity", "specificity", "AUC", "note"],
                [
                    [
                        g["column"],
                        g["value"],
                        str(g["answered"]),
                        *(_interval(g[name]) for name in RATE_NAMES),
                        _interval(g["auc"], percent=False) if g["auc"] else "n/a",
                        f"too small to judge (n < {MIN_SUBGROUP})" if g["too_small"] else "",
                    ]
                    for g in record.subgroups
                ],
            )
        )
        blocks += _figure(figures, "subgroups", "rates per subgroup", "Specificity and sensitivity per subgroup.")
    else:
        blocks.append(Text("metadata.csv has none of the columns sex, age_group, view, source (or only empty values)."))
    needed = [
        f"{name}: measured on {metrics[name]['n']} images; about {n} {_class(name)} images give "
        f"±{pct(precision)} at {pct(metrics[name]['value'])}"
        if n is not None
        else f"{name}: not measured here, so no estimate"
        for name, n in record.images_needed.items()
    ]
    blocks += [Heading(2, f"Images needed for ±{pct(precision)}"), Items(needed)]
    blocks.append(Heading(2, f"Images given no answer ({counts['no_answer']})"))
    if record.no_answer:
        blocks.append(Table(["file", "reason"], [[row["file"], row["reason"]] for row in record.no_answer]))
    else:
        blocks.append(Text("None: the model answered every readable image."))
    blocks.append(Heading(2, f"Unreadable images ({counts['unreadable']})"))
    if record.unreadable:
        blocks.append(Table(["file", "error"], [[row["file"], row["error"]] for row in record.unreadable]))
    else:
        blocks.append(Text("None."))
    blocks += [
        Heading(2, "What this does not show"),
        Items(
            [
                "These figures hold for this population, these scanners and this mix of cases; another ward, scanner "
                "or period needs its own validation.",
                "Sensitivity and specificity do not depend on prevalence; what a positive call means (its predictive "
                "value) does: work it out at your own prevalence.",
                f"Counted: {counted(counts['answered'], 'image')} given an answer; the rest are listed above. "
                "covidxr is a research tool: a READY verdict supports a research trial, never clinical use.",
            ]
        ),
    ]
    return blocks


def write_validation_report(folder: Path, record: Validation) -> tuple[Path, Path]:
    """validation.md (figures linked) and validation.html (figures inlined) in ``folder``."""
    figures = _figures(folder, record)
    blocks = validation_blocks(record, figures)
    title = f"Local validation: {Path(record.data).name}"
    md, page = folder / "validation.md", folder / "validation.html"
    md.write_text(render_markdown(title, blocks), encoding="utf-8")
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return md, page
