"""Model cards, and the model that ships with the package.

A model card says what a model is for and, more importantly here, what it is not good at: its
training data and their confounders, its test metrics with intervals, the shortcut audit's verdicts,
its leave-one-source-out figures and the failure modes they reveal. Everything in it is read from
the run folder (``run.json``, ``metrics.json``, ``audit.json``, ``loso.json``); nothing is typed in.

``bundle_run`` copies what prediction needs (configuration, head, out-of-distribution statistics)
and the evidence (metrics, audit, leave-one-source-out) into ``covidxr/bundled``, without image
paths of the machine it was trained on, so ``covidxr predict IMAGE`` works after ``pip install``.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

from covidxr import DISCLAIMER
from covidxr.runtime.answers import HASH_COLUMN
from covidxr.runtime.calibration import describe_operating_point
from covidxr.runtime.document import Block, Heading, Items, Text, render_html
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.formatting import dec, pct, with_ci
from covidxr.runtime.records import (
    AUDIT_DECISION,
    Audit,
    CovidVsRest,
    Loso,
    Metrics,
    OperatingPoint,
    PooledRates,
    Rates,
    RunInfo,
    read_json_file,
)
from covidxr.runtime.runs import BUNDLED, INFO_FILE

BUNDLE_FILES = ("config.yaml", "head.safetensors", "ood.safetensors", "history.csv")
EVIDENCE_FILES = ("metrics.json", "audit.json", "loso.json")  # copied without the training machine's paths
SPLIT_COLUMNS = ("filename", "label", "source", "split")  # the bundle's splits.csv, with site and age_group if known
INTENDED_USE = (
    "Research on shortcut learning and generalisation in chest X-ray classification (COVID-19 / NORMAL / "
    "PNEUMONIA); teaching; a baseline to beat. Not a medical device: never use it for diagnosis, triage or "
    "any decision about a patient."
)


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV written by covidxr, as text (an empty cell stays ""): its columns and its rows."""
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def _ci(value: float | None, interval: list | None) -> str:
    """A rate with its 95% interval, written as the reports write it."""
    return with_ci(value, interval, label="95% CI ")


def model_card(run_dir: str | Path) -> dict:
    """The card of a run folder (or of the bundled model) as a dictionary."""
    folder = Path(run_dir)
    if not (folder / INFO_FILE).is_file():
        raise CovidxrError(f"{folder}: not a covidxr run folder (no {INFO_FILE})")
    info = RunInfo.from_dict(read_json_file(folder / INFO_FILE), folder / INFO_FILE)
    metrics = Metrics.load(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
    audit = Audit.load(folder / "audit.json") if (folder / "audit.json").is_file() else None
    loso = Loso.load(folder / "loso.json") if (folder / "loso.json").is_file() else None
    threshold = info.fitted.covid_threshold or OperatingPoint()
    card: dict = {
        "model": info.model["name"],
        "weights": {
            "kind": info.weights["kind"],
            "sha256": info.weights["sha256"],
            # How the weights want images prepared, and how the backbone was built for them (runs made
            # before these were recorded: torchvision's/timm's reference build).
            "preprocessing": info.weights.get("preprocessing"),
            "variant": info.weights.get("variant", "reference"),
        },
        "design": info.design_summary,
        "labels": info.labels,
        "training_data": {
            "datasets": [Path(d).name for d in info.datasets],
            "images_by_split_and_source": {part: s.get("by_source") for part, s in info.split_sizes.items()},
        },
        "calibration": {"temperature": info.temperature, "covid_threshold": info.covid_threshold},
        "operating_point": {
            "covid_threshold": info.covid_threshold,
            "rule": describe_operating_point(threshold.to_dict()),
            "val_sensitivity": threshold.val_sensitivity,
            "val_specificity": threshold.val_specificity,
            "decision": "COVID-19 when the calibrated COVID-19 probability reaches the threshold, otherwise the "
            "more probable of the other classes; no answer for an image unlike the training X-rays",
        },
        "out_of_distribution": info.out_of_distribution,
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
    }
    if metrics is not None:
        covid = metrics.covid_vs_rest or CovidVsRest()
        card["test_metrics"] = {
            "data": f"{' + '.join(card['training_data']['datasets'])}, {metrics.split} split",
            "n": metrics.n,
            "accuracy": metrics.accuracy,
            "accuracy_ci95": metrics.accuracy_ci95,
            "covid_sensitivity": covid.sensitivity,
            "covid_sensitivity_ci95": covid.sensitivity_ci95,
            "covid_specificity": covid.specificity,
            "covid_specificity_ci95": covid.specificity_ci95,
            "by_source": _plain_rates(metrics.by_source),
        }
    if audit is not None:
        card["audit"] = {"verdict": audit.verdict, **{k: v.verdict for k, v in audit.checks.items()}}
        card["audit_summaries"] = {k: v.summary for k, v in audit.checks.items()}
        card["audit_decision"] = audit.decision
    card["within_site"] = _within_site(loso)
    if loso is not None:
        card["leave_one_source_out"] = {
            "pooled": (loso.pooled or PooledRates()).to_dict(),
            "units": [
                {k: getattr(u, k) for k in ("unit", "status", "n", "covid_sensitivity", "other_called_covid")}
                for u in loso.units
            ],
        }
    card["confounders"] = _confounders(folder)
    card["failure_modes"] = _failure_modes(card)
    return card


def _plain_rates(by_source: dict[str, Rates] | None) -> dict | None:
    """The per-source rates as metrics.json holds them."""
    return None if by_source is None else {source: rates.to_dict() for source, rates in by_source.items()}


def _within_site(loso: Loso | None) -> dict:
    """The test the source cannot pass (``covidxr.lab.generalisation.within_site``), or why it was not run."""
    within = loso.within_site if loso is not None else None
    if within is None:
        return {"auc": None, "note": "not measured: this run's leave-one-source-out predates the within-site test"}
    return {
        "auc": loso.within_site_auc,
        "auc_ci95": loso.within_site_auc_ci95,
        "n_covid": within.pooled.n_covid,
        "n_other": within.pooled.n_other,
        "sites": [
            {k: getattr(site, k) for k in ("site", "status", "n_covid", "n_other", "auc", "auc_ci95", "reason")}
            for site in within.sites
        ],
        "what": within.what,
    }


def _within_site_lines(within: dict) -> list[str]:
    """The card's first figure, in Markdown."""
    if within.get("auc") is None:
        return [f"- Within-site COVID-19 vs other pneumonia AUC: {within.get('note', 'not measured')}"]
    low, high = within["auc_ci95"] or (float("nan"), float("nan"))
    lines = [
        f"- **Within-site COVID-19 vs other pneumonia AUC: {within['auc']:.2f} (95% CI {low:.2f}-{high:.2f})**, "
        f"{within['n_covid']} COVID-19 and {within['n_other']} other-pneumonia images; 0.5 is chance.",
        "- Inside a site that published both, the source cannot give the answer: each site was held out "
        "(the model retrained without it) and p(COVID-19) ranked its images.",
    ]
    for site in within["sites"]:
        if site.get("auc") is not None:
            lines.append(f"- {site['site']}: AUC {site['auc']:.2f} ({site['n_covid']} vs {site['n_other']} images)")
    return lines


def _confounders(folder: Path) -> list[str]:
    """Where a class comes from one source only, or one age group only, in the training table."""
    path = folder / "splits.csv"
    if not path.is_file():
        return []
    columns, rows = _read_table(path)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    notes = []
    for label in sorted(by_label):
        group = by_label[label]
        sources = Counter(row["source"] for row in group)
        if len(sources) == 1:
            notes.append(f"every {label} image comes from one source ({next(iter(sources))})")
        if "age_group" in columns:
            ages = Counter(row["age_group"] for row in group if row["age_group"] != "")
            if ages:
                age, count = ages.most_common(1)[0]
                share = count / sum(ages.values())
                if share >= 0.95:
                    notes.append(f"{share:.0%} of the {label} images of known age are {age}")
    return notes


def _failure_modes(card: dict) -> list[str]:
    modes = [
        "COVID-19 images all come from one public collection (ieee8023, figures from publications and case "
        "sites): nothing here shows how it behaves on a hospital's own COVID-19 radiographs.",
        "The out-of-distribution guard flags photographs, drawings and blank images, not X-rays from another "
        "hospital: a chest X-ray it has never seen the like of still gets a confident answer.",
    ]
    for unit in card.get("leave_one_source_out", {}).get("units", []):
        if unit["status"] == "evaluated" and unit.get("other_called_covid") is not None:
            modes.append(
                f"Trained without {unit['unit']}, it called {pct(unit['other_called_covid'])} of that source's "
                f"{unit['n']} non-COVID images COVID-19."
            )
    if card.get("audit", {}).get("verdict") in {"fail", "warning"}:
        modes.append(f"The shortcut audit's verdict is {card['audit']['verdict']}: see the audit summaries.")
    return modes


def _audit_decision(decision: str | None) -> str:
    """How the audit called each image, so its accuracies can be read against the test metrics'."""
    return decision or AUDIT_DECISION


def render_model_card(card: dict) -> str:
    """The card as Markdown."""
    lines = [f"# Model card: covidxr {card['model']}", "", f"**{card['disclaimer']}**", ""]
    lines += ["## Does it learn the disease, not the collection?", "", *_within_site_lines(card["within_site"]), ""]
    lines += ["## Intended use", ""]
    lines += [card["intended_use"], "", "## Model", ""]
    weights = card["weights"]
    built = "built as keras.applications builds it" if weights.get("variant") == "keras" else "reference build"
    preprocessing = f", {weights['preprocessing']} preprocessing" if weights.get("preprocessing") else ""
    lines += [
        f"- Backbone: {card['model']} ({weights['kind']} weights, sha256 {weights['sha256'][:12]}, {built}"
        f"{preprocessing})"
    ]
    lines += [f"- Design: {card['design']}", f"- Classes: {', '.join(card['labels'])}"]
    point = card["operating_point"]
    lines += [
        f"- Calibration: temperature {dec(card['calibration']['temperature'])} (fitted on validation data)",
        f"- Operating point: COVID-19 threshold {dec(point['covid_threshold'])}, {point['rule']}; on validation "
        f"data sensitivity {pct(point['val_sensitivity'])}, specificity {pct(point['val_specificity'])}",
        f"- Decision: {point['decision']}",
        "",
        "## Training data",
        "",
        f"- Datasets: {', '.join(card['training_data']['datasets'])}",
    ]
    for part, counts in card["training_data"]["images_by_split_and_source"].items():
        lines.append(f"- {part}: " + ", ".join(f"{source} {n}" for source, n in (counts or {}).items()))
    lines += ["", "## Confounders", ""] + [f"- {note}" for note in card["confounders"] or ["none found in the table"]]
    if "test_metrics" in card:
        t = card["test_metrics"]
        lines += ["", f"## Test metrics ({t['data']}, n={t['n']})", ""]
        lines += [f"- Accuracy: {_ci(t['accuracy'], t['accuracy_ci95'])}"]
        lines += [f"- COVID-19 sensitivity: {_ci(t['covid_sensitivity'], t['covid_sensitivity_ci95'])}"]
        lines += [f"- COVID-19 specificity: {_ci(t['covid_specificity'], t['covid_specificity_ci95'])}"]
        lines += ["", "Internal test splits share their sources with training; read the next section."]
    if "leave_one_source_out" in card:
        pooled = card["leave_one_source_out"]["pooled"]
        lines += ["", "## Leave-one-source-out (each source unseen in training)", ""]
        sensitivity = _ci(pooled.get("covid_sensitivity"), pooled.get("covid_sensitivity_ci95"))
        false_alarms = _ci(pooled.get("other_called_covid"), pooled.get("other_called_covid_ci95"))
        lines += [f"- Held-out COVID-19 sensitivity: {sensitivity}"]
        lines += [f"- Held-out non-COVID images called COVID-19: {false_alarms}"]
        lines += [f"- Pooled COVID-19-versus-rest AUC: {dec(pooled.get('covid_vs_rest_auc'))}"]
    if "audit" in card:
        lines += ["", f"## Shortcut audit: {card['audit']['verdict']}", ""]
        lines += [f"- {name}: {card['audit'][name]} — {summary}" for name, summary in card["audit_summaries"].items()]
        lines += [f"- How the audit called each image: {_audit_decision(card.get('audit_decision'))}"]
    lines += ["", "## Known failure modes", ""] + [f"- {mode}" for mode in card["failure_modes"]]
    return "\n".join(lines) + "\n"


def render_model_card_html(card: dict) -> str:
    """The card as one readable HTML page (the Markdown's headings, lists and paragraphs, through the
    reports' renderer), for the web page's "model card" link."""
    lines = render_model_card(card).splitlines()
    title = lines[0].removeprefix("# ")
    blocks: list[Block] = []
    for line in lines[1:]:
        if line.startswith("## "):
            blocks.append(Heading(2, line.removeprefix("## ")))
        elif line.startswith("- "):
            if not (blocks and isinstance(blocks[-1], Items)):
                blocks.append(Items([]))
            blocks[-1].items.append(line.removeprefix("- ").replace("**", ""))  # HTML has no Markdown bold
        elif line.startswith("**") and line.endswith("**"):
            blocks.append(Text(line.strip("*"), warning=True))
        elif line:
            blocks.append(Text(line))
    return render_html(title, blocks)


def bundle_run(run_dir: str | Path, dest: str | Path = BUNDLED) -> Path:
    """Copy a finished run into ``dest`` as the packaged default model, with its card."""
    run_dir, dest = Path(run_dir), Path(dest)
    missing = [name for name in (*BUNDLE_FILES, *EVIDENCE_FILES, "run.json") if not (run_dir / name).is_file()]
    if missing:
        raise CovidxrError(f"{run_dir}: cannot be bundled without {', '.join(missing)} (evaluate, audit, hold out)")
    dest.mkdir(parents=True, exist_ok=True)
    info = RunInfo.from_dict(read_json_file(run_dir / INFO_FILE), run_dir / INFO_FILE)
    fine_tuned = [info.fine_tuned_backbone["file"]] if info.fine_tuned_backbone else []
    for name in (*BUNDLE_FILES, *fine_tuned):  # a fine-tuned backbone ships with its head
        shutil.copy2(run_dir / name, dest / name)
    info = replace(
        info,
        weights={**info.weights, "location": "pip package"},  # no paths of the training machine in the package
        data=Path(info.data).name,
        datasets=[Path(d).name for d in info.datasets],
        environment={key: value for key, value in info.environment.items() if key != "command"},
    )
    (dest / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=2))
    for name in EVIDENCE_FILES:
        text = (run_dir / name).read_text()
        evidence = json.loads(text)
        # Paths also appear inside sentences (an audit's summary names its data), so replace them as text.
        for path, plain in (
            (evidence.get("run"), "bundled"),
            (evidence.get("data"), Path(evidence.get("data") or "").name),
        ):
            if path:
                text = text.replace(json.dumps(path)[1:-1], plain)
        (dest / name).write_text(text)
    _copy_splits(run_dir / "splits.csv", dest / "splits.csv")
    (dest / "model_card.md").write_text(render_model_card(model_card(dest)))
    return dest


def _copy_splits(source: Path, dest: Path) -> None:
    """The run's split table without the training machine's extra columns (paths, patients' metadata)."""
    columns, rows = _read_table(source)
    missing = [column for column in SPLIT_COLUMNS if column not in columns]
    if missing:
        raise CovidxrError(f"{source}: no {', '.join(missing)} column; it cannot be bundled")
    kept = [*SPLIT_COLUMNS, *(column for column in ("site", "age_group", HASH_COLUMN) if column in columns)]
    with dest.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, kept, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
