"""The report of one evaluation: ``report.md`` beside its PNGs and a self-contained ``report.html``.

Everything is read back from what the run left (metrics.json, run.json, config.yaml, splits.csv, figures,
audit.json and loso.json when they exist) and from the dataset itself. The sections written here (metrics,
COVID-19 versus the rest, calibration, configuration, split) are reused per model by the reproduce report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

from covidxr import DISCLAIMER
from covidxr.lab.labels import SPLITS
from covidxr.lab.report.checks import audit_blocks, audit_line, explanation_blocks
from covidxr.lab.report.holdout import (
    CALLED_BY_LABEL,
    by_source_table,
    external_line,
    generalisation_lines,
    loso_blocks,
)
from covidxr.lab.report.limitations import limitation_blocks, ordered_labels
from covidxr.lab.report.paper import figure_blocks, paper_blocks, paper_line
from covidxr.lab.report.reading import (
    externals,
    is_external,
    read_metrics,
    read_record,
    read_splits,
    run_folder,
    run_info,
)
from covidxr.runtime.calibration import ECE_BINS, describe_operating_point
from covidxr.runtime.document import Block, Figure, Heading, Items, Links, Table, Text, Verdict, write_report
from covidxr.runtime.formatting import ci_range, counted, cutoff, dec, missing, num, pct, with_ci
from covidxr.runtime.records import ClassRates, ClassShift, EvalCalibration, FittedCalibration, Loso, Metrics, RunInfo

# Not one of the paper's figures: evaluate's reliability diagram, shown in the Calibration section.
CALIBRATION_FIGURE = (
    "calibration",
    "calibration.png",
    "Reliability diagram of the evaluated images: accuracy against confidence, before and after temperature scaling",
)
# A COVID-19 threshold chosen on fewer validation positives than this is called a rough choice.
FEW_VAL_POSITIVES = 20
# Below this many images a class share moves by several percentage points by chance alone.
FEW_IMAGES = 100


def _run_blocks(metrics: Metrics, run: Path | None, info: RunInfo | None) -> list[Block]:
    if run is None or info is None:
        return [Text(f"Run folder {metrics.run} not found: configuration and split are not shown.")]
    weights = {"kind": None, "location": None, "sha256": None, **info.weights}
    rows = [
        ["model", str(metrics.model)],
        ["run folder", str(run.resolve())],
        ["trained on", str(info.data)],
        ["evaluated on", f"{metrics.data} ({metrics.split} split)"],
        ["backbone weights", f"{weights['kind']}: {weights['location']} (sha256 {weights['sha256']})"],
        ["best epoch (lowest validation loss)", str(info.best_epoch)],
        ["created", str(info.created)],
        ["covidxr", str(info.environment.get("covidxr"))],
    ]
    return [Table(["item", "value"], rows)]


def config_blocks(path: Path) -> list[Block]:
    """The run's config.yaml as a table of settings, so a report says how the model was made."""
    if not path.is_file():
        return [Text(f"Missing: {path}.")]
    config = yaml.safe_load(path.read_text()) or {}
    return [Table(["setting", "value"], [[str(k), num(v).replace("; ", ", ")] for k, v in config.items()])]


def split_table(splits: pd.DataFrame) -> Table:
    """Images / patients per split and class: shows how small each test class is."""
    labels = ordered_labels(splits["label"])
    rows = []
    order = {part: i for i, part in enumerate(SPLITS)}
    for part, group in sorted(splits.groupby("split"), key=lambda item: order.get(item[0], len(order))):
        cells = [
            f"{(group['label'] == label).sum()} / {group.loc[group['label'] == label, 'patient_id'].nunique()}"
            for label in labels
        ]
        rows.append([str(part), *cells, f"{len(group)} / {group['patient_id'].nunique()}"])
    return Table(["split", *(f"{label} images / patients" for label in labels), "all images / patients"], rows)


def _bootstrap_note(metrics: Metrics) -> str:
    boot = metrics.bootstrap
    if boot is None:
        return (
            "This metrics.json has no bootstrap intervals (it predates them): only accuracy has an interval, "
            "the Wilson one. Run `covidxr evaluate` again for intervals on every rate."
        )
    return (
        f"Intervals are 95% percentile intervals from a {boot.unit or 'patient'}-level bootstrap: "
        f"{num(boot.replicates)} replicates, each drawing the {num(boot.patients)} patients with "
        f"replacement and keeping all images of a drawn patient (seed {num(boot.seed)}), because images of "
        "one patient are not independent. Accuracy also gets the Wilson interval, which treats images as "
        "independent. PPV and F1 have no interval."
    )


def _zero_width(metrics: Metrics) -> bool:
    intervals = [metrics.accuracy_bootstrap_ci95, metrics.macro_auc_ci95]
    for m in metrics.per_class.values():
        intervals += [m.sensitivity_ci95, m.specificity_ci95, m.auc_ci95]
    return any(ci_range(ci) is not None and ci[0] == ci[1] for ci in intervals)


def metrics_blocks(metrics: Metrics) -> list[Block]:
    """Headline numbers and per-class rates, each with its 95% interval, and the confusion matrix."""
    boot = metrics.bootstrap
    accuracy, wilson = metrics.accuracy, metrics.accuracy_ci95
    patients = f" of {num(boot.patients)} patients" if boot else ""
    intervals = [f"95% CI {ci_range(wilson) or 'n/a'}, Wilson"]
    if boot:
        intervals.append(f"95% CI {ci_range(metrics.accuracy_bootstrap_ci95) or 'n/a'}, patient bootstrap")
    auc = metrics.macro_auc
    summary = (
        f"Evaluated on {metrics.data} ({metrics.split} split): n = {metrics.n} images{patients}. "
        f"Accuracy {pct(accuracy)}" + ("" if missing(accuracy) else f" ({'; '.join(intervals)})") + ", "
        f"{metrics.correct} of {metrics.n} correct. Macro one-vs-rest AUC "
        + (with_ci(auc, metrics.macro_auc_ci95, False, "95% CI ") if boot else dec(auc))
        + "."
    )
    replicates = f", {num(boot.replicates)} replicates" if boot else ""
    headline = [
        ["accuracy", with_ci(accuracy, wilson, label="95% CI "), "Wilson score interval (images as independent)"],
    ]
    if boot:
        headline += [
            [
                "accuracy",
                with_ci(accuracy, metrics.accuracy_bootstrap_ci95, label="95% CI "),
                f"patient-level bootstrap{replicates}",
            ],
            [
                "macro one-vs-rest AUC",
                with_ci(metrics.macro_auc, metrics.macro_auc_ci95, False, "95% CI "),
                f"patient-level bootstrap{replicates}",
            ],
        ]
    else:
        headline.append(["macro one-vs-rest AUC", dec(metrics.macro_auc), "no interval computed"])

    def rate(m: ClassRates, key: str, percent: bool = True) -> str:
        if not boot:
            return pct(getattr(m, key)) if percent else dec(getattr(m, key))
        return with_ci(getattr(m, key), getattr(m, f"{key}_ci95"), percent)

    per_class = [
        [
            label,
            str(m.n),
            rate(m, "sensitivity"),
            rate(m, "specificity"),
            pct(m.ppv),
            dec(m.f1),
            rate(m, "auc", percent=False),
        ]
        for label, m in metrics.per_class.items()
    ]
    ci = " (95% CI)" if boot else ""
    labels = metrics.confusion_matrix.labels
    matrix = [
        [label, *(str(v) for v in row)] for label, row in zip(labels, metrics.confusion_matrix.matrix, strict=True)
    ]
    notes = [_bootstrap_note(metrics)]
    if boot and _zero_width(metrics):
        notes.append(
            "A bootstrap interval of zero width (such as 100.0–100.0%) means every replicate gave the same rate, "
            "as happens with a rate of 0% or 100% on few patients; it does not mean the rate is certain."
        )
    return [
        Text(summary),
        Table(["metric", "value (95% CI)", "interval"], headline),
        Table(["class", "n", f"sensitivity{ci}", f"specificity{ci}", "PPV", "F1", f"AUC one-vs-rest{ci}"], per_class),
        Items(notes),
        Text("Confusion matrix (rows = truth, columns = prediction):"),
        Table(["truth \\ prediction", *labels], matrix),
    ]


def covid_blocks(metrics: Metrics) -> list[Block]:
    """COVID-19 against everything else at the run's validation-chosen threshold."""
    covid = metrics.covid_vs_rest
    if covid is None:
        return [Text("Not computed: this metrics.json predates the COVID-19 threshold; run `covidxr evaluate` again.")]
    n_covid, n_other = int(covid.n_covid or 0), int(covid.n_other or 0)
    share = covid.called_covid_share

    row = [
        cutoff(covid.threshold),
        str(n_covid),
        str(n_other),
        dec(covid.auc),
        with_ci(covid.sensitivity, covid.sensitivity_ci95),
        with_ci(covid.specificity, covid.specificity_ci95),
        with_ci(share, covid.called_covid_share_ci95),
    ]
    header = [
        "threshold on p(COVID-19)",
        "COVID-19 images",
        "other images",
        "AUC",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        "called COVID-19 (95% CI)",
    ]
    notes = [
        "An image is called COVID-19 when its temperature-scaled COVID-19 probability reaches the threshold, "
        "which was chosen on the validation split (see Calibration), never on these images. The intervals here "
        "are Wilson intervals, which treat images as independent (covid_vs_rest has no bootstrap)."
    ]
    if n_covid == 0:
        notes.append(
            f"No evaluated image is COVID-19, so sensitivity and AUC are undefined; {pct(share)} of the "
            f"{n_other} non-COVID images were nonetheless called COVID-19."
        )
    elif n_other == 0:
        notes.append("Every evaluated image is COVID-19, so specificity and AUC are undefined.")
    return [Table(header, [row]), Items(notes)]


def _true_shares(labels: list[str], counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: counts.get(label, 0) / total for label in labels} if total else {}


def _travel_blocks(
    metrics: Metrics, shift: ClassShift, info: RunInfo | None, splits: pd.DataFrame | None, external: bool
) -> list[Block]:
    """The predicted-class mix on this data against the mix on the run's internal test set."""
    internal, here, difference = shift.internal_test, shift.this_data, shift.difference
    labels = list(dict.fromkeys([*internal, *here]))
    confusion = metrics.confusion_matrix
    true_here = _true_shares(
        labels, {label: sum(row) for label, row in zip(confusion.labels, confusion.matrix, strict=False)}
    )
    true_internal: dict[str, float] = {}
    if splits is not None:
        test = splits.loc[splits["split"] == "test", "label"]
        true_internal = _true_shares(labels, test.value_counts().to_dict())
    columns = [true_internal, internal, true_here, here]  # a class missing from one of them is n/a there
    rows = [
        [
            label,
            *(pct(column.get(label)) for column in columns),
            f"{100 * difference[label]:+.1f} points" if not missing(difference.get(label)) else "n/a",
        ]
        for label in labels
    ]
    header = [
        "class",
        "internal test: true share",
        "internal test: predicted share",
        "this data: true share",
        "this data: predicted share",
        "change in predicted share",
    ]
    trained_on = Path(str(info.data)).name if info is not None and info.data else "its training data"
    lead = (
        f"External evaluation: the model was trained on {trained_on} and is evaluated on every image of "
        f"{Path(str(metrics.data)).name}, which it has never seen. Numbers from its internal test set do "
        "not carry over; this is how its predictions moved."
        if external
        else "The predicted-class mix here against the mix on the run's internal test set."
    )
    tv = shift.total_variation
    n_internal = None if splits is None else int((splits["split"] == "test").sum())
    n_here = int(metrics.n or 0)
    few = min(n_here, n_internal if n_internal is not None else n_here) < FEW_IMAGES
    sentences = [
        f"Total variation distance between the two predicted-class mixes: {dec(tv)} (0: the same mix; 1: no "
        "class in common). Part of a shift is expected where the true mix differs; compare the true shares.",
        "Compared: the run's internal test set"
        + ("" if n_internal is None else f" ({counted(n_internal, 'image')})")
        + f" and the {counted(n_here, 'image')} evaluated here"
        + ("; on so few images a share moves by several points by chance alone." if few else "."),
    ]
    if "COVID-19" in here and "COVID-19" in true_here:
        sentences.append(
            f"Here the model calls {pct(here['COVID-19'])} of the images COVID-19 (by its label), "
            f"while {pct(true_here['COVID-19'])} are COVID-19."
        )
    return [Text(lead, warning=external), Table(header, rows), Items(sentences)]


def _ece_change(before: object, after: object, where: str) -> str:
    if missing(before) or missing(after):
        return f"On {where} the ECE was not computed."
    if after < before:
        return f"On {where} temperature scaling lowered the ECE from {dec(before)} to {dec(after)}."
    return (
        f"On {where} temperature scaling did not lower the ECE ({dec(before)} before, {dec(after)} after): "
        "the calibrated probabilities are no better calibrated there."
    )


def calibration_blocks(
    metrics: Metrics, info: RunInfo | None, folder: Path, base: Path, model: str, prefix: str = ""
) -> list[Block]:
    """Temperature, ECE before and after on validation and on the evaluated images, the COVID-19 threshold."""
    if not (info is not None and info.calibration) and metrics.calibration is None:
        return [
            Text(
                "No calibration recorded in run.json or metrics.json: a run made before temperature scaling uses "
                "its raw probabilities (temperature 1) and a COVID-19 threshold of 0.5."
            )
        ]
    fitted = info.fitted if info is not None else FittedCalibration()
    here = metrics.calibration or EvalCalibration()
    temperature = here.temperature if fitted.temperature is None else fitted.temperature
    val = info.split_sizes.get("val") if info is not None else None
    known = isinstance(val, dict) and {"images", "patients"} <= set(val)
    val_size = f" ({counted(val['images'], 'image')} of {counted(val['patients'], 'patient')})" if known else ""
    blocks: list[Block] = []
    if missing(temperature):
        blocks.append(Text("Temperature: not recorded."))
    else:
        direction = (
            "T > 1 softens the probabilities: the head was over-confident on validation"
            if temperature > 1
            else "T < 1 sharpens the probabilities: the head was under-confident on validation"
            if temperature < 1
            else "T = 1 leaves the probabilities as they were"
        )
        blocks.append(
            Text(
                f"Temperature T = {cutoff(temperature)}, fitted by {fitted.method or 'temperature scaling'}"
                f"{val_size} by minimising its negative log-likelihood; every probability in this report is "
                f"softmax(logits / T). {direction}. Scaling by one temperature never changes the predicted class."
            )
        )
    data = Path(str(metrics.data)).name
    evaluated = f"evaluated images ({data}, {metrics.split} split, n = {metrics.n})"
    rows = [
        [
            "validation split (where T was fitted)",
            dec(fitted.val_ece_uncalibrated),
            dec(fitted.val_ece_calibrated),
        ],
        [evaluated, dec(here.ece_uncalibrated), dec(here.ece_calibrated)],
    ]
    blocks.append(Table(["images", "ECE before (T = 1)", f"ECE after (T = {cutoff(temperature)})"], rows))
    notes = [
        f"ECE: expected calibration error, the mean gap between confidence and accuracy over {ECE_BINS} "
        "equal-width confidence bins (0 is perfect); on few images it is itself very noisy.",
        _ece_change(fitted.val_ece_uncalibrated, fitted.val_ece_calibrated, "the validation split"),
        _ece_change(here.ece_uncalibrated, here.ece_calibrated, "the evaluated images"),
    ]
    threshold = fitted.covid_threshold
    if threshold is None:
        notes.append("COVID-19 threshold: not recorded in run.json.")
    elif not threshold.val_positives:
        notes.append(
            f"COVID-19 threshold {cutoff(threshold.value)}: the validation split had no COVID-19 image, "
            "so this is the default, not a chosen operating point."
        )
    else:
        value, positives = threshold.value, int(threshold.val_positives)
        rough = "; with so few positives the cut-off is a rough choice" if positives < FEW_VAL_POSITIVES else ""
        notes.append(
            f"Operating point: COVID-19 threshold {cutoff(value)} on the temperature-scaled COVID-19 "
            f"probability, {describe_operating_point(threshold.to_dict())}: there it gave sensitivity "
            f"{pct(threshold.val_sensitivity)} and specificity {pct(threshold.val_specificity)}, on "
            f"{counted(positives, 'COVID-19 image')}{rough}. It is the decision: an image is labelled COVID-19 when "
            "its probability reaches it, otherwise the more probable other class (every label in this report)."
        )
        if not missing(value) and (value > 0.999 or value < 0.001):
            notes.append(
                "The threshold lies within 0.001 of 0 or 1: the validation probabilities are saturated, so a "
                "small change in the model can move many images across it."
            )
    blocks.append(Items(notes))
    key, name, caption = CALIBRATION_FIGURE
    path = folder / name
    if path.is_file():
        link = path.relative_to(base).as_posix()
        blocks.append(Figure(f"{prefix}fig-{key}", path, link, f"{model}: {caption}", f"{caption}."))
    else:
        blocks.append(Text(f"Missing figure: {name} (the reliability diagram) is not in {folder}."))
    return blocks


def write_run_report(folder: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` for an evaluation output folder (by default the run folder); a run's
    report also rewrites those of its evaluations under ``external/``, which quote its audit."""
    folder = Path(folder)
    metrics = read_metrics(folder)
    run = run_folder(folder, metrics)
    splits = read_splits(run)
    info = run_info(run)
    model = str(metrics.model)
    external = is_external(metrics, info)
    travels: list[Block] = []
    if metrics.predicted_class_shift is not None:
        shift = metrics.predicted_class_shift
        travels = [Heading(2, "How the model travels"), *_travel_blocks(metrics, shift, info, splits, external)]
    sources: list[Block] = []
    if metrics.by_source is not None:
        sources = [
            Heading(2, "By source"),
            by_source_table(metrics.by_source),
            Items([CALLED_BY_LABEL]),
        ]
    loso_path = next((c / "loso.json" for c in [folder, *([run] if run else [])] if (c / "loso.json").is_file()), None)
    loso = read_record(Loso, loso_path) if loso_path else None
    if loso is not None:
        sources += [Heading(2, "Leave-one-source-out"), *loso_blocks(loso, loso_path, splits)]
    audit_folders = list(dict.fromkeys([folder, *([run] if run else [])]))
    audit_command = f"covidxr audit {run or 'RUN'}"
    never_seen = (
        [external_line(Path(str(metrics.data)).name, metrics)]
        if external
        else generalisation_lines(run, loso, f"covidxr evaluate {run or 'RUN'} --data OTHER")
    )
    bottom_line = [paper_line(metrics, external), audit_line(audit_folders, audit_command), *never_seen]
    others = externals(run) if not external else {}
    elsewhere: list[Block] = []
    if others:
        elsewhere = [
            Heading(2, "On other datasets"),
            Text("Each evaluation of a dataset the model never saw, written by `covidxr evaluate RUN --data OTHER`:"),
            Links(
                [
                    (external_line(name, m), os.path.relpath(run / "external" / name / "report.html", folder))
                    for name, m in others.items()
                ]
            ),
        ]
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Verdict(bottom_line),
        Heading(2, "Metrics"),
        *metrics_blocks(metrics),
        *(travels if external else []),
        Heading(2, "COVID-19 versus the rest"),
        *covid_blocks(metrics),
        *([] if external else travels),
        *sources,
        Heading(2, "Calibration"),
        *calibration_blocks(metrics, info, folder, folder, model),
        Heading(2, "Against the paper"),
        *paper_blocks(metrics, external),
        Heading(2, "Figures"),
        *figure_blocks(folder, folder, model),
        Heading(2, "Explanation checks"),
        *explanation_blocks(metrics),
        Heading(2, "Shortcut audit"),
        *audit_blocks(audit_folders, audit_command),
        *elsewhere,
        Heading(2, "Limitations"),
        *limitation_blocks(metrics, run),
        Heading(2, "Appendix: run"),
        *_run_blocks(metrics, run, info),
        Heading(2, "Appendix: configuration"),
        *(config_blocks(run / "config.yaml") if run else [Text("Missing: the run's config.yaml.")]),
        Heading(2, "Appendix: split"),
        split_table(splits) if splits is not None else Text("Missing: the run's splits.csv."),
    ]
    written = write_report(folder, f"covidxr report: {metrics.model}", blocks)
    for name in {} if external else externals(folder):  # they quote this run's audit, which may be newer
        write_run_report(folder / "external" / name)
    return written
