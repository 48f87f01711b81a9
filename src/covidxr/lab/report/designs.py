"""The designs report: the paper's design beside the deconfounded variants, judged on held-out figures.

Internal test accuracy rewards shortcuts, so the report leads with the within-site AUC and the
leave-one-source-out figures, sets them against the validity targets, and names the design to ship.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidxr import DISCLAIMER
from covidxr.lab.report.checks import AUDIT_CHECKS
from covidxr.lab.report.design_runs import (
    VALIDITY_TARGETS,
    Design,
    best_design,
    read_designs,
    shortfall,
    targets_met,
    unit_of_source,
    validity_figures,
)
from covidxr.lab.report.holdout import (
    CALLED_BY_ARGMAX,
    by_source_table,
    every_covid_note,
    loso_unit_table,
    units_with_every_covid,
)
from covidxr.lab.report.limitations import scope_sentences
from covidxr.lab.report.run import config_blocks, write_run_report
from covidxr.runtime.document import Block, Figure, Heading, Items, Links, Table, Text, write_report
from covidxr.runtime.formatting import ci_range, counted, cutoff, missing, num, pct, rate_n, spaced, with_ci
from covidxr.runtime.records import CovidVsRest, LosoUnit, Metrics, RunInfo

__all__ = ["DESIGNS_FIGURE", "MAX_HELD_OUT_ADULT_CALLED_COVID", "TARGET_HELD_OUT_SENSITIVITY", "write_designs_report"]

# The bar a design would have to clear on held-out sources (point estimates): find COVID-19 at a new
# hospital without calling adult non-COVID images COVID-19.
TARGET_HELD_OUT_SENSITIVITY = 0.80
MAX_HELD_OUT_ADULT_CALLED_COVID = 0.20
DESIGNS_FIGURE = "designs.png"
# Sources whose labels were not read from the images; the note is shown when the source is in the data.
TEXT_MINED_LABELS = {
    "nih": "NIH ChestX-ray14 labels (No Finding, Pneumonia) were mined from radiology reports by language "
    "processing, not read from the images: some are wrong, so a held-out NIH image called COVID-19 is not "
    "always a healthy or bacterial-pneumonia lung.",
}


def _adult_sources(designs: list[Design]) -> list[str]:
    """Sources of non-COVID images most of whose non-COVID images of known age are adults, over every run's rows."""
    frames = [d.splits for d in designs if d.splits is not None and "age_group" in d.splits.columns]
    if not frames:
        return []
    rows = pd.concat(frames).drop_duplicates("filename")
    rows = rows[rows["label"] != "COVID-19"]
    known = rows[rows["age_group"].astype(str).str.strip() != ""]
    adult = (known["age_group"] == "adult").groupby(known["source"].astype(str)).mean()
    return sorted(adult[adult > 0.5].index)


def _unit_sources(unit: LosoUnit) -> set[str]:
    return {s.strip() for s in str(unit.source or "").split(",") if s.strip()}


def _adult_units(design: Design, adult: list[str]) -> list[LosoUnit]:
    """Evaluated held-out units of non-COVID images whose sources are all adult sources."""
    return [
        u
        for u in design.units
        if u.status == "evaluated"
        and not missing(u.other_called_covid)
        and _unit_sources(u)
        and _unit_sources(u) <= set(adult)
    ]


def _non_covid_units(designs: list[Design]) -> list[str]:
    """Names of held-out units with non-COVID images in any run, in order of first appearance."""
    names = [str(u.unit) for d in designs for u in d.units if (u.n_other or 0) > 0]
    return list(dict.fromkeys(names))


def _unit_called(unit: LosoUnit) -> str:
    return rate_n(unit.other_called_covid, unit.other_called_covid_ci95, unit.n_other)


def _pooled_sensitivity(design: Design) -> str:
    pooled = design.pooled
    return rate_n(pooled.covid_sensitivity, pooled.covid_sensitivity_ci95, pooled.n_covid)


def _validity_table(designs: list[Design]) -> Table:
    """One row per design with every figure of the validity targets, each with its interval."""
    rows = []
    for d in designs:
        within = with_ci(d.row.within_site_auc, d.row.within_site_auc_ci95, False)
        within += f", n={d.row.within_site_n}" if d.row.within_site_n else ""
        auc = with_ci(d.pooled.covid_vs_rest_auc, d.pooled.covid_vs_rest_auc_ci95, False)
        called = []
        for source in ("nih", "kermany"):
            unit = unit_of_source(d, source)
            called.append("n/a" if unit is None else _unit_called(unit))
        share = d.row.gradcam_lung_share_covid_calls
        lungs = "n/a" if share is None else f"{share:.2f} (n={d.row.gradcam_lung_share_covid_calls_n})"
        figures = validity_figures(d)
        met = f"{targets_met(figures)} of {len(VALIDITY_TARGETS)}; shortfall {shortfall(figures):.2f}"
        rows.append([d.name, d.description, within, auc, *called, _pooled_sensitivity(d), lungs, met])
    t = VALIDITY_TARGETS
    header = [
        "run",
        "design",
        f"within-site COVID-19 vs other pneumonia AUC (95% CI) — target ≥ {t['within_site_auc']:.2f}",
        f"leave-one-source-out COVID-vs-rest AUC (95% CI) — target ≥ {t['loso_auc']:.2f}",
        f"held-out NIH non-COVID called COVID-19 — target ≤ {t['nih_called_covid']:.0%}",
        f"held-out Kermany non-COVID called COVID-19 — target ≤ {t['kermany_called_covid']:.0%}",
        f"held-out COVID-19 sensitivity — target ≥ {t['covid_sensitivity']:.0%}",
        f"Grad-CAM mass inside the lungs, COVID-19 calls — target ≥ {t['lung_share']}",
        "targets met; total shortfall from them",
    ]
    return Table(header, rows)


def _best_sentence(designs: list[Design]) -> str:
    best = best_design(designs)
    if best is None:
        return "No design has held-out figures yet."
    figures = validity_figures(best)
    return (
        "Best by held-out figures (never internal accuracy): among the designs whose within-site AUC is above "
        "chance (95% interval above 0.5), the smallest total shortfall from the six targets, then the higher "
        f"within-site AUC: {best.name}, meeting {targets_met(figures)} of {len(VALIDITY_TARGETS)} targets, total "
        f"shortfall {shortfall(figures):.2f}."
    )


WITHIN_SITE_TEXT = (
    "The test the source cannot pass. Inside a web site that published both COVID-19 and other pneumonia "
    "(ieee8023's radiopaedia.org, eurorad.org, pubs.rsna.org), which collection an image comes from says nothing "
    "about its label. Each such site is held out (the design retrained without it) and p(COVID-19) ranks the "
    "site's COVID-19 against its other pneumonia; the AUC is pooled over sites with a patient-bootstrap interval. "
    "0.5 is chance. The other columns are leave-one-source-out figures: NIH and Kermany held out by retraining "
    "without them (or, for a design that never trained on them, predicted by its own model), called COVID-19 by "
    "the most probable class."
)


def _loso_overview_table(designs: list[Design], units: list[str]) -> Table:
    """One row per design: pooled held-out sensitivity, false-COVID share per held-out unit, pooled AUC."""
    rows = []
    for d in designs:
        if d.loso is None:
            rows.append([d.name, d.trained_on, d.description, "no loso.json", *["n/a"] * (len(units) + 1)])
            continue
        by_name = {str(u.unit): u for u in d.units}
        cells = []
        for name in units:
            unit = by_name.get(name)
            if unit is None:
                cells.append("n/a (not a unit of this run)")
            elif unit.status != "evaluated":
                cells.append("n/a (skipped)")
            else:
                cells.append(_unit_called(unit))
        auc = with_ci(d.pooled.covid_vs_rest_auc, d.pooled.covid_vs_rest_auc_ci95, False)
        rows.append([d.name, d.trained_on, d.description, _pooled_sensitivity(d), *cells, auc])
    header = [
        "run",
        "trained on",
        "description",
        "held-out COVID-19 sensitivity (95% CI), n",
        *(f"held-out {name}: non-COVID called COVID-19 (95% CI), n" for name in units),
        "pooled COVID-19-vs-rest AUC (95% CI)",
    ]
    return Table(header, rows)


def _loso_findings(designs: list[Design], adult: list[str]) -> list[str]:
    """Which design called the fewest held-out adult non-COVID images COVID-19, and whether any met the bar."""
    named = ", ".join(adult) or "none"
    candidates = [(d, u) for d in designs for u in _adult_units(d, adult)]
    if not candidates:
        return [
            "No run has held-out non-COVID images from an adult source (sources whose non-COVID images of known "
            f"age are mostly adults: {named}), so the false-COVID rate on adult controls is not measured here."
        ]
    lowest = min(u.other_called_covid for _, u in candidates)
    best = [(d, u) for d, u in candidates if u.other_called_covid == lowest]
    described = "; ".join(
        f"{d.name} ({d.trained_on}; {d.description}) called {_unit_called(u)} of held-out {u.unit} "
        f"COVID-19, with a held-out COVID-19 sensitivity of {_pooled_sensitivity(d)}"
        for d, u in best
    )
    findings = [
        "Lowest share of held-out adult non-COVID images called COVID-19 (sources whose non-COVID images of known "
        f"age are mostly adults: {named}): {described}."
    ]
    bar = (
        f"held-out COVID-19 sensitivity of at least {pct(TARGET_HELD_OUT_SENSITIVITY)} while calling at most "
        f"{pct(MAX_HELD_OUT_ADULT_CALLED_COVID)} of held-out adult non-COVID images ({named}) COVID-19 "
        "(point estimates)"
    )
    passed = [
        d.name
        for d in designs
        if _adult_units(d, adult)
        and not missing(d.pooled.covid_sensitivity)
        and d.pooled.covid_sensitivity >= TARGET_HELD_OUT_SENSITIVITY
        and all(u.other_called_covid <= MAX_HELD_OUT_ADULT_CALLED_COVID for u in _adult_units(d, adult))
    ]
    findings.append(
        f"Runs that kept a {bar}: {', '.join(passed)}."
        if passed
        else f"No run kept a {bar}: none of these designs separates COVID-19 from adult controls on sources it "
        "never trained on."
    )
    return findings


def _whole_class_units(designs: list[Design]) -> list[str]:
    return [f"{unit} in {d.name}" for d in designs for unit in units_with_every_covid(d.loso, d.splits)]


def _designs_figure(out: Path, designs: list[Design], adult: list[str]) -> list[Block]:
    """Held-out COVID-19 sensitivity against the share of held-out adult non-COVID images called COVID-19."""
    import matplotlib.pyplot as plt

    from covidxr.lab.figures import save_with_disclaimer

    points = []
    for d in designs:
        sensitivity = d.pooled.covid_sensitivity
        for u in _adult_units(d, adult):
            if not missing(sensitivity):
                points.append((d, u, sensitivity))
    if not points:
        return [Text("No figure: no run has both a held-out COVID-19 sensitivity and held-out adult non-COVID images.")]

    def error(value: float, interval: object) -> list[float]:
        span = interval if ci_range(interval) else [value, value]
        return [value - span[0], span[1] - value]

    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_patch(
        plt.Rectangle(
            (0, TARGET_HELD_OUT_SENSITIVITY),
            MAX_HELD_OUT_ADULT_CALLED_COVID,
            1.05 - TARGET_HELD_OUT_SENSITIVITY,
            color="tab:green",
            alpha=0.12,
            label=f"the bar: sensitivity ≥ {pct(TARGET_HELD_OUT_SENSITIVITY)}, adult non-COVID called "
            f"COVID-19 ≤ {pct(MAX_HELD_OUT_ADULT_CALLED_COVID)}",
        )
    )
    for d, u, sensitivity in points:
        x = u.other_called_covid
        ax.errorbar(
            x,
            sensitivity,
            xerr=[[v] for v in error(x, u.other_called_covid_ci95)],
            yerr=[[v] for v in error(sensitivity, d.pooled.covid_sensitivity_ci95)],
            fmt="s" if d.row.design == "paper" else "o",
            capsize=3,
            label=f"{d.name}: held-out {u.unit}",
        )
    ax.set(
        xlabel=f"held-out adult non-COVID images ({', '.join(adult)}) called COVID-19",
        ylabel="held-out COVID-19 images called COVID-19 (pooled)",
        xlim=(-0.05, 1.05),
        ylim=(-0.05, 1.05),
        title="Leave-one-source-out, 95% Wilson intervals",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, ncol=2)
    path = out / DESIGNS_FIGURE
    save_with_disclaimer(fig, path)
    caption = (
        "Each run's pooled held-out COVID-19 sensitivity against the share of its held-out adult non-COVID "
        "images called COVID-19 (most probable class), with 95% Wilson intervals; the shaded corner is the bar."
    )
    return [Figure("fig-designs", path, DESIGNS_FIGURE, caption, caption)]


def _internal_table(designs: list[Design]) -> Table:
    rows = []
    for d in designs:
        m = d.metrics or Metrics()
        covid = m.covid_vs_rest or CovidVsRest()
        rows.append(
            [
                d.name,
                d.trained_on,
                num(m.n),
                with_ci(m.accuracy, m.accuracy_ci95),
                with_ci(covid.sensitivity, covid.sensitivity_ci95),
                with_ci(covid.specificity, covid.specificity_ci95),
                cutoff(covid.threshold),
            ]
        )
    header = [
        "run",
        "trained on",
        "test images",
        "accuracy (95% CI)",
        "COVID-19 sensitivity (95% CI)",
        "COVID-19 specificity (95% CI)",
        "threshold on p(COVID-19)",
    ]
    return Table(header, rows)


def _audit_verdict_blocks(designs: list[Design]) -> list[Block]:
    """Overall and per-check verdicts, one row per run, then each check's summary."""
    checks = list(AUDIT_CHECKS)
    for d in designs:
        for name in d.audit.checks if d.audit is not None else {}:
            if name not in checks:
                checks.append(name)
    verdicts, summaries = [], []
    for d in designs:
        if d.audit is None:
            verdicts.append([d.name, "no audit.json", *["n/a"] * len(checks)])
            continue
        found = d.audit.checks
        overall = str(d.audit.verdict or "n/a")
        verdicts.append([d.name, overall, *(str(found[c].verdict or "n/a") if c in found else "n/a" for c in checks)])
        if d.audit.summary:
            summaries.append([d.name, "overall", overall, str(d.audit.summary)])
        summaries += [
            [d.name, spaced(c), str(found[c].verdict or "n/a"), str(found[c].summary or "n/a")]
            for c in checks
            if c in found
        ]
    return [
        Table(["run", "overall", *(spaced(c) for c in checks)], verdicts),
        Table(["run", "check", "verdict", "summary"], summaries),
    ]


def _split_by_source(info: RunInfo | None) -> str:
    parts = []
    for part, sizes in (info.split_sizes if info is not None else {}).items():
        by_source = sizes.get("by_source") if isinstance(sizes, dict) else None
        if isinstance(by_source, dict):
            parts.append(f"{part}: " + ", ".join(f"{source} {num(n)}" for source, n in by_source.items()))
    return "; ".join(parts) or "n/a"


def _made_blocks(out: Path, designs: list[Design]) -> list[Block]:
    rows = []
    for d in designs:
        datasets = d.info.datasets if d.info is not None else []
        summary = d.info.design.get("summary") if d.info is not None else None
        rows.append(
            [
                d.name,
                "n/a" if d.row.design is None else str(d.row.design),
                "; ".join(str(x) for x in datasets) or "n/a",
                str(summary or d.description),
                _split_by_source(d.info),
                str((d.info.feature_cache if d.info is not None else None) or "n/a"),
                num(d.row.wall_seconds),
            ]
        )
    header = ["run", "design", "datasets", "design summary", "images per split and source", "feature cache", "seconds"]
    links = [
        (f"{d.name}: its own report", f"{d.name}/report.html") for d in designs if (d.folder / "report.html").is_file()
    ]
    return [
        Table(header, rows),
        Text("Each run's own report (configuration, split, figures, calibration, audit, held-out units):"),
        Links(links) if links else Text("No run has a report.html."),
        Text("The shared configuration; each deconfounded variant changes only the settings its description names:"),
        *config_blocks(out / "config.yaml"),
    ]


def _designs_limitations(designs: list[Design]) -> list[str]:
    frames = [d.splits for d in designs if d.splits is not None]
    rows = pd.concat(frames).drop_duplicates("filename") if frames else pd.DataFrame(columns=["label", "source"])
    covid_sources = sorted(rows.loc[rows["label"] == "COVID-19", "source"].astype(str).unique())
    covid_units = sorted({str(u.unit) for d in designs for u in d.units if (u.n_covid or 0) > 0})
    notes = []
    if len(covid_sources) == 1 and set(covid_units) - set(covid_sources):
        notes.append(
            f"{covid_sources[0]} is the only source of COVID-19 images, so the held-out COVID-19 units "
            f"({', '.join(covid_units)}) are sites within one collection, not hospitals: their images were gathered, "
            "selected and processed together, so a held-out site is less new than a new hospital."
        )
    elif len(covid_sources) == 1:
        notes.append(
            f"{covid_sources[0]} is the only source of COVID-19 images and is held out whole: the model retrained "
            "without it has no COVID-19 image to learn from."
        )
    elif covid_sources:
        notes.append(
            f"COVID-19 images come from {', '.join(covid_sources)}; held-out COVID-19 units: {', '.join(covid_units)}."
        )
    mixed = sorted({str(u.unit) for d in designs for u in d.units if (u.n_covid or 0) > 0 and (u.n_other or 0) > 0})
    notes.append(
        f"Held-out units with both COVID-19 and non-COVID images: {', '.join(mixed)}."
        if mixed
        else "No held-out unit has both COVID-19 and non-COVID images, so no unit has an AUC of its own: the "
        "COVID-19-versus-rest AUC pools units, each predicted by its own retrained model (or the run's own model for "
        "data it never trained on), and partly measures how the units differ rather than how one model ranks images."
    )
    pooled = sorted({f"{u.unit} ({num(u.n)} images)" for d in designs for u in d.units if "other sites" in str(u.unit)})
    if pooled:
        minimum = next((d.loso.min_unit_images for d in designs if d.loso), None)
        notes.append(
            f"Sites with fewer than {num(minimum)} images are held out together, so one result mixes several sites: "
            f"{'; '.join(pooled)}."
        )
    sources = set(rows["source"].astype(str)) | {s for d in designs for u in d.units for s in _unit_sources(u)}
    notes += [text for source, text in TEXT_MINED_LABELS.items() if source in sources]
    sizes = [u.n for d in designs for u in d.units if u.status == "evaluated" and not missing(u.n)]
    if sizes:
        notes.append(
            f"The smallest evaluated held-out unit has {counted(int(min(sizes)), 'image')}; Wilson intervals treat "
            "images as independent, though several images can come from one patient, so they are too narrow where "
            "patients have many images."
        )
    notes.append(CALLED_BY_ARGMAX)
    return notes


def write_designs_report(out: str | Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` for a ``covidxr reproduce --design deconfounded`` folder.

    Leave-one-source-out comes first: internal test accuracy rewards shortcuts. Each run's own report is
    written again first, so that it shows the run's loso.json (written after the run's first report).
    """
    out = Path(out)
    designs = read_designs(out)
    for d in designs:
        if d.metrics is not None:
            write_run_report(d.folder)
    adult = _adult_sources(designs)
    paper = next((d for d in designs if d.row.design == "paper"), designs[0] if designs else None)
    confounded = (
        scope_sentences(f"data of the {paper.name} run ({paper.row.datasets})", paper.splits)
        if paper is not None and paper.splits is not None
        else ["The paper's data was not found: no confounding computed."]
    )
    units = _non_covid_units(designs)
    whole = _whole_class_units(designs)
    loso_notes = [
        *_loso_findings(designs, adult),
        "A column per held-out unit with non-COVID images: a unit is a source held out by retraining without it, or "
        "a dataset the run never trained on (external), predicted by the run's own model. n/a (skipped): removing "
        "the unit left too few classes to train on (see the per-run tables).",
        CALLED_BY_ARGMAX,
    ]
    if whole:
        loso_notes.append(every_covid_note(whole))
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Heading(2, "Within-site AUC first: does the design learn the disease, not the collection?"),
        Text(WITHIN_SITE_TEXT),
        _validity_table(designs),
        Text(_best_sentence(designs)),
        Heading(2, "Why internal accuracy is not the goal"),
        Text(
            "A test split drawn from the same sources as training shares their hospitals, scanners, markers and "
            "patients' ages, so a model that recognises the hospital or the age instead of the disease scores well "
            'on it. When one source supplies every COVID-19 image and another every other image, "adult" or '
            '"this hospital" predicts the label: high internal accuracy is then expected whether or not the model '
            "sees COVID-19. Leave-one-source-out is the closest thing to a new hospital that the data allows: each "
            "source (for a many-site collection, each publishing site) is removed from training, the run's protocol "
            "retrained on the rest and tested on the removed images; a dataset a run never trained on is held out "
            "as a whole."
        ),
        Items(confounded),
        Heading(2, "Leave-one-source-out"),
        _loso_overview_table(designs, units),
        Items(loso_notes),
        *_designs_figure(out, designs, adult),
        Heading(2, "Held-out units per run"),
    ]
    for d in designs:
        blocks += [Heading(3, d.name), Text(f"{d.description}; trained on {d.trained_on}.")]
        blocks.append(loso_unit_table(d.loso) if d.loso else Text(f"No loso.json in {d.folder}."))
    blocks += [
        Heading(2, "Internal test split"),
        Text(
            "The test split of each run's own data: the same sources, and so the same shortcuts, as training. "
            "Sensitivity and specificity here use the run's validation-chosen COVID-19 threshold (Wilson intervals), "
            "as every label does."
        ),
        _internal_table(designs),
    ]
    for d in designs:
        by_source = d.metrics.by_source if d.metrics is not None else None
        blocks += [Heading(3, f"{d.name}: by source")]
        blocks.append(
            by_source_table(by_source) if by_source is not None else Text("Not computed: no by_source in metrics.json.")
        )
    blocks += [
        Heading(2, "Shortcut audit"),
        *_audit_verdict_blocks(designs),
        Heading(2, "How each run was made"),
        *_made_blocks(out, designs),
        Heading(2, "Limitations"),
        Items(_designs_limitations(designs)),
    ]
    return write_report(out, "covidxr designs report: the paper's design against deconfounded training", blocks)
