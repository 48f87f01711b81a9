"""The report of a ``covidxr reproduce`` folder: the table against the paper, the spread over seeds, then
each trained model's sections as in its own run report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from covidxr import DISCLAIMER
from covidxr.lab.report.checks import audit_blocks, audit_line, explanation_blocks
from covidxr.lab.report.holdout import external_line, generalisation_lines
from covidxr.lab.report.limitations import limitation_blocks
from covidxr.lab.report.paper import PAPER_RESULTS, figure_blocks
from covidxr.lab.report.reading import externals, read_metrics, read_record, read_splits, run_info
from covidxr.lab.report.run import calibration_blocks, config_blocks, covid_blocks, metrics_blocks, split_table
from covidxr.runtime.document import (
    Block,
    Figure,
    Fold,
    Heading,
    Items,
    Links,
    Table,
    Text,
    Verdict,
    anchor,
    write_report,
)
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.formatting import ci_range, counted, dec, mean_sd, missing, num, pct, with_ci
from covidxr.runtime.records import Metrics

__all__ = ["write_reproduce_report"]


def _results_table(rows: list[dict], metrics: dict[str, Metrics]) -> Table:
    """One row per model; the covidxr numbers are its first seed's run, each with its 95% interval."""
    cells = []
    for row in rows:
        paper = row.get("paper_accuracy")
        paper_cell = f"{pct(paper)} (n={row.get('paper_n')})" if paper is not None else "not in the paper"
        if row.get("status") != "trained":
            continue  # folded into one line under the table
        m = metrics.get(str(row.get("model"))) or Metrics()
        wilson = [row.get("accuracy_ci95_low"), row.get("accuracy_ci95_high")]
        cells.append(
            [
                str(row.get("model")),
                str(row.get("paper_model")),
                paper_cell,
                with_ci(row.get("accuracy"), wilson, label="95% CI "),
                ci_range(m.accuracy_bootstrap_ci95) or "not computed",
                f"{row.get('correct')} / {row.get('n_test')}",
                with_ci(row.get("macro_auc"), m.macro_auc_ci95, False),
                with_ci(row.get("covid_sensitivity"), m.covid_class.sensitivity_ci95),
                "trained",
            ]
        )
    header = [
        "model",
        "paper's name",
        "paper accuracy",
        "covidxr test accuracy (Wilson)",
        "accuracy 95% CI (patient bootstrap)",
        "correct / n",
        "macro AUC (95% CI)",
        "COVID-19 sensitivity (95% CI)",
        "status",
    ]
    return Table(header, cells)


def _several_seeds(row: dict) -> bool:
    return len(str(row.get("seeds") or "").split()) > 1


def _paper_against_seeds(row: dict) -> str:
    """Where the paper's single-split accuracy lies in this model's spread over seeds."""
    paper, n = row.get("paper_accuracy"), len(str(row.get("seeds")).split())
    if paper is None:
        return f"not comparable: different backbone (the paper did not use {row.get('model')})"
    z = row.get("paper_accuracy_z")
    low, high = row.get("accuracy_min"), row.get("accuracy_max")
    inside = "" if missing(low) or missing(high) else ("inside" if low <= paper <= high else "outside")
    where = f", {inside} the seeds' range" if inside else ""
    if missing(z):
        return (
            f"the paper's {pct(paper)} against a mean of {pct(row.get('accuracy_mean'))} over {n} seeds{where}; "
            "the accuracy did not vary over the seeds, so there is no distance in sd"
        )
    side = "above" if z > 0 else "below"
    return f"the paper's {pct(paper)} lies {abs(z):.1f} sd {side} the mean over {n} seeds{where}"


def _seed_blocks(folder: Path, rows: list[dict]) -> list[Block]:
    """Mean ± sd and range over seeds per model, the paper's number against that spread, and each seed's run."""
    trained = [row for row in rows if row.get("status") == "trained"]
    if not any(_several_seeds(row) for row in trained):
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        seed = (config or {}).get("seed", "from the configuration")
        first = run_info(folder / str(trained[0].get("model"))) if trained else None
        data = (first.data if first is not None else None) or "DATA"
        return [
            Text(
                f"One seed was run (seed {seed}): every number above comes from one patient split and one training "
                "run, and says nothing about how much another split would move it. To see that spread, run "
                f"`covidxr reproduce --data {data} --out {folder} --seeds 0,1,2,3,4` (finished runs are reused)."
            )
        ]
    spreads = (
        ("accuracy", "accuracy", True),
        ("macro_auc", "macro AUC", False),
        ("covid_sensitivity", "COVID-19 sensitivity", True),
    )
    header = ["model", "seeds"]
    for _, label, _ in spreads:
        header += [f"{label} mean ± sd", f"{label} range"]
    header.append("the paper's accuracy against the spread")
    table = []
    for row in trained:
        if not _several_seeds(row):
            table.append([str(row.get("model")), str(row.get("seeds", "one")), *["n/a"] * 6, "one seed only"])
            continue
        cells = [str(row.get("model")), str(row.get("seeds"))]
        for key, _, percent in spreads:
            fmt = pct if percent else dec
            cells.append(mean_sd(row.get(f"{key}_mean"), row.get(f"{key}_sd"), percent))
            low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
            cells.append("n/a" if missing(low) else f"{fmt(low)} to {fmt(high)}")
        cells.append(_paper_against_seeds(row))
        table.append(cells)
    blocks: list[Block] = [
        Text(
            "Each seed draws its own patient split and trains its own head; sd is the sample standard deviation "
            "over the seeds. The paper reported one random split, so its number is one draw from a spread like "
            "this one, on its own (smaller, by-image) split of different data; with few seeds the sd is itself "
            "uncertain."
        ),
        Table(header, table),
    ]
    per_seed = folder / "seeds.csv"
    if per_seed.is_file():
        table = []
        for r in pd.read_csv(per_seed).to_dict("records"):  # every column of seeds.csv is in every row
            m = read_record(Metrics, folder / str(r["run"]) / "metrics.json") or Metrics()
            wilson = [r["accuracy_ci95_low"], r["accuracy_ci95_high"]]
            table.append(
                [
                    str(r["model"]),
                    num(r["seed"]),
                    str(r["run"]),
                    with_ci(r["accuracy"], wilson, label="95% CI "),
                    f"{num(r['correct'])} / {num(r['n_test'])}",
                    with_ci(r["macro_auc"], m.macro_auc_ci95, False),
                    with_ci(r["covid_sensitivity"], m.covid_class.sensitivity_ci95),
                ]
            )
        header = [
            "model",
            "seed",
            "run folder",
            "test accuracy (Wilson)",
            "correct / n",
            "macro AUC (95% CI)",
            "COVID-19 sensitivity (95% CI)",
        ]
        blocks += [
            Text("Each seed's run (the first seed's run is the one described in detail below):"),
            Table(header, table),
        ]
    return blocks


def _shared_split_blocks(folder: Path, models: list[str]) -> list[Block]:
    splits = {model: read_splits(folder / model) for model in models}
    found = {model: frame for model, frame in splits.items() if frame is not None}
    if not found:
        return [Text("No trained model's splits.csv was found.")]
    first = next(iter(found.values()))
    same = all(frame[["filename", "split"]].equals(first[["filename", "split"]]) for frame in found.values())
    if same:
        return [Text(f"One split, shared by {', '.join(found)}:"), split_table(first)]
    return [block for model, frame in found.items() for block in (Text(f"{model}:"), split_table(frame))]


def _bottom_line_table(folder: Path, trained: list[str], metrics: dict[str, Metrics]) -> Table:
    """One row per trained model: the paper's figure, ours, the audit's verdict, and every figure on data the
    model never saw, so the whole verdict fits on the first screen."""
    rows = []
    for model in trained:
        m, paper = metrics[model], PAPER_RESULTS.get(model)
        paper_cell = (
            f"{paper['paper_model']}: {pct(paper['paper_accuracy'])} on {paper['paper_n']} images split at random"
            if paper
            else "not in the paper (its best, VGG-16: 97.3% on 75 images)"
        )
        ours = f"{with_ci(m.accuracy, m.accuracy_ci95, label='95% CI ')} on {counted(int(m.n or 0), 'image')}"
        audit = audit_line([folder / model], f"covidxr audit {folder / model}").removeprefix("Shortcut audit: ")
        command = f"covidxr evaluate {folder / model} --data OTHER, or reproduce with --external DIR"
        unseen = " ".join(generalisation_lines(folder / model, None, command))
        rows.append([model, paper_cell, ours, audit, unseen])
    header = ["model", "the paper", "covidxr test accuracy (by patient)", "shortcut audit", "on data it never saw"]
    return Table(header, rows)


def _model_blocks(folder: Path, model: str, metrics: Metrics) -> list[Block]:
    """One model's sections, folded in the report: its figures linked, not embedded (its own report has them)."""
    run = folder / model
    blocks: list[Block] = [
        Links([(f"{model}'s own report, with every figure", f"{model}/report.html")]),
        Heading(3, "Metrics"),
        *metrics_blocks(metrics),
        Heading(3, "COVID-19 versus the rest"),
        *covid_blocks(metrics),
        Heading(3, "Calibration"),
        *calibration_blocks(metrics, run_info(run), run, folder, model, prefix=f"{model}-"),
        Heading(3, "Figures"),
        *figure_blocks(run, folder, model, prefix=f"{model}-"),
        Heading(3, "Explanation checks"),
        *explanation_blocks(metrics),
        Heading(3, "Shortcut audit"),
        *audit_blocks([run], f"covidxr audit {run}"),
    ]
    others = externals(run)
    if others:
        links = [(external_line(name, m), f"{model}/external/{name}/report.html") for name, m in others.items()]
        blocks += [Heading(3, "On other datasets"), Links(links)]
    return [replace(block, inline=False) if isinstance(block, Figure) else block for block in blocks]


def write_reproduce_report(folder: Path) -> tuple[Path, Path]:
    """One report for a ``covidxr reproduce`` folder: the table against the paper, then each trained model."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise CovidxrError(f"{folder}: no results.json; run `covidxr reproduce` first")
    rows = json.loads(path.read_text())
    trained = [row["model"] for row in rows if row.get("status") == "trained"]
    skipped = [row for row in rows if row.get("status") != "trained"]
    metrics = {model: read_metrics(folder / model) for model in trained}
    bottom_line = [
        "The paper tested on 75 images drawn at random from 375 (one patient could be in training and test); "
        "covidxr splits by patient, on different data: the two accuracies are not directly comparable."
        if trained
        else "No model was trained here (none has weights): there is no figure to set against the paper's."
    ]
    skipped_line = (
        "Skipped (no weights here): "
        + ", ".join(f"{row.get('model')} ({row.get('paper_model')})" for row in skipped)
        + " — see Skipped models; docs/user-guide.md (Models and weights) says how to supply their weights."
    )
    bottom_line += [skipped_line] if skipped else []
    sections = ["Results against the paper", "Seeds", "Split", "Limitations", *trained, "Skipped models"]
    contents = [("Bottom line", "#verdict"), *((name, f"#{anchor(name)}") for name in sections)]
    contents.append(("Appendix: configuration", "#appendix-configuration"))
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Verdict(bottom_line, _bottom_line_table(folder, trained, metrics)),
        Heading(2, "Contents"),
        Links(contents),
        Heading(2, "Results against the paper"),
        _results_table(rows, metrics),
        *([Text(skipped_line)] if skipped else []),
        Text(
            "The paper (Soares & Soares, 2020) tested on 75 images drawn at random from 375, so one patient could be "
            "in training and test; covidxr splits by patient, on different data. Rows marked (not in the paper) "
            "use a backbone the paper did not use and replicate no paper row. The covidxr numbers are each model's "
            "first seed; intervals: Wilson for accuracy, patient-level bootstrap for the rest."
        ),
        Heading(2, "Seeds"),
        *_seed_blocks(folder, rows),
        Heading(2, "Split"),
        *_shared_split_blocks(folder, trained),
        Heading(2, "Limitations"),
    ]
    if trained:
        first = trained[0]
        blocks += [Text(f"Computed for {first}'s evaluation:"), *limitation_blocks(metrics[first], folder / first)]
    else:
        blocks.append(Text("No model was trained, so there is nothing to describe."))
    blocks += [Fold(model, _model_blocks(folder, model, metrics[model])) for model in trained]
    blocks.append(Heading(2, "Skipped models"))
    blocks.append(
        Items([f"{row.get('model')} ({row.get('paper_model')}): {row.get('reason')}" for row in skipped])
        if skipped
        else Text("None.")
    )
    blocks += [Heading(2, "Appendix: configuration"), *config_blocks(folder / "config.yaml")]
    return write_report(folder, "covidxr reproduce report: Soares & Soares (2020) protocol", blocks)
