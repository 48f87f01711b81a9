"""Reports of a run or of a ``reproduce`` folder: ``report.md`` beside the PNGs, ``report.html`` self-contained.

Everything is read back from what the run left (metrics.json, run.json, config.yaml, splits.csv, figures,
audit.json when `covidxr audit` has run; results.json and seeds.csv for reproduce) and from the dataset
itself, so the limitations describe the data that was used, not the data one expects.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from covidxr import DISCLAIMER
from covidxr.calibration import ECE_BINS, describe_operating_point
from covidxr.data import load_dataset, load_datasets
from covidxr.errors import CovidxrError
from covidxr.labels import LABELS, SPLITS

# Soares & Soares (2020), test set of 75 images split at random from 375.
PAPER_RESULTS = {
    "vgg16": {"paper_model": "VGG-16", "paper_accuracy": 0.973, "paper_n": 75},
    "xception": {"paper_model": "Xception", "paper_accuracy": 0.959, "paper_n": 75},
    "resnet50": {"paper_model": "ResNet", "paper_accuracy": 0.946, "paper_n": 75},
}
# (id suffix, file, caption), in the order of the paper's Figures 1-4, as evaluate writes them.
FIGURES = (
    ("curves", "curves.png", "Training curves: accuracy and loss per epoch, training and validation"),
    ("confusion", "confusion_matrix.png", "Confusion matrix of the evaluated images, rows = truth"),
    ("predictions", "predictions.png", 'Evaluated images captioned "Predict = X / Correct = Y"'),
    ("gradcam", "gradcam.png", "Grad-CAM maps per class"),
)
# Not one of the paper's figures: evaluate's reliability diagram, shown in the Calibration section.
CALIBRATION_FIGURE = (
    "calibration",
    "calibration.png",
    "Reliability diagram of the evaluated images: accuracy against confidence, before and after temperature scaling",
)
# The checks `covidxr audit` writes into audit.json, in its order; unknown checks are shown after them.
AUDIT_CHECKS = ("lungs_hidden", "source_probe", "resolution_format")
# Columns whose values may coincide with the label: (column, noun, verb, the verb's part kept after
# the first clause, plural) -- "every A image comes from x and every B image from y".
CONFOUNDERS = (
    ("source", "source", "comes from", "from", "sources"),
    ("site", "site", "comes from", "from", "sites"),
    ("age_group", "age group", "is", "", "age groups"),
)
# A class/value overlap this small on both sides is reported as an exception rather than as mixing.
MINOR_SHARE = 0.05
# A COVID-19 threshold chosen on fewer validation positives than this is called a rough choice.
FEW_VAL_POSITIVES = 20
# Below this many images a class share moves by several percentage points by chance alone.
FEW_IMAGES = 100
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
.warning { border: 2px solid #b00; background: #fee; padding: .6rem 1rem; font-weight: bold; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #bbb; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #eee; }
figure { margin: 1rem 0; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #444; }
.verdict { border: 2px solid #1f5fbf; background: #eef4fd; padding: .2rem 1rem; margin: 1rem 0; }
.verdict h2 { margin: .5rem 0 .2rem; }
details { margin: .3rem 0 .8rem; font-size: .9rem; }
summary { cursor: pointer; color: #1f5fbf; }
"""


# ---------------------------------------------------------------------------------------------
# A tiny document model, rendered to Markdown and to HTML
# ---------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str
    warning: bool = False


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Links:
    """A list of relative links, (text, target): e.g. from a designs report to each run's own report."""

    links: list[tuple[str, str]]


@dataclass
class Figure:
    anchor: str
    path: Path
    link: str  # relative to the report, for Markdown
    alt: str
    caption: str


@dataclass
class Verdict:
    """The bottom line a report opens with: a few sentences in a box, before any table."""

    items: list[str]


@dataclass
class Details:
    """Raw numbers behind a summary, folded away (``<details>`` in HTML) so the summary stays readable."""

    summary: str
    items: list[str]


Block = Heading | Text | Items | Links | Table | Figure | Verdict | Details


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list[Block]) -> str:
    """Markdown that references the figures by relative path."""
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [f"**{block.text}**" if block.warning else block.text, ""]
        elif isinstance(block, Items):
            lines += [*(f"- {item}" for item in block.items), ""]
        elif isinstance(block, Links):
            lines += [*(f"- [{_md_cell(text)}]({target})" for text, target in block.links), ""]
        elif isinstance(block, Verdict):
            lines += ["> **Bottom line**", ">", *(f"> - {item}" for item in block.items), ""]
        elif isinstance(block, Details):
            lines += [f"<details><summary>{block.summary}</summary>", "", *(f"- {i}" for i in block.items), ""]
            lines += ["</details>", ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{_md_cell(block.alt)}]({block.link})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, blocks: list[Block]) -> str:
    """One HTML file with inline CSS and every figure inlined as a data URI; it loads nothing else."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            opening = '<p class="warning">' if block.warning else "<p>"
            parts.append(f"{opening}{esc(block.text)}</p>")
        elif isinstance(block, Items):
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Links):
            items = "".join(f'<li><a href="{esc(target)}">{esc(text)}</a></li>' for text, target in block.links)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Verdict):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            parts.append(f'<section class="verdict" id="verdict"><h2>Bottom line</h2><ul>{items}</ul></section>')
        elif isinstance(block, Details):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            parts.append(f"<details><summary>{esc(block.summary)}</summary><ul>{items}</ul></details>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img id="{esc(block.anchor)}" alt="{esc(block.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _write(folder: Path, title: str, blocks: list[Block]) -> tuple[Path, Path]:
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(render_markdown(title, blocks), encoding="utf-8")
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return md, page


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _pct(value: float | None) -> str:
    return "n/a" if _missing(value) else f"{value:.1%}"


def _dec(value: float | None) -> str:
    return "n/a" if _missing(value) else f"{value:.3f}"


def _num(value: object) -> str:
    if _missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "; ".join(_num(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{_name(k)} {_num(v)}" for k, v in value.items())
    return str(value)


def _range(interval: object, percent: bool = True) -> str | None:
    """ "93.6–100.0%" (or "0.950–1.000"), None when there is no interval."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or any(_missing(v) for v in interval):
        return None
    low, high = interval
    if percent:
        return f"{100 * low:.1f}–{100 * high:.1f}%"
    return f"{low:.3f}–{high:.3f}"


def _with_ci(value: object, interval: object, percent: bool = True, label: str = "") -> str:
    """ "97.3% (95% CI 93.6–100.0%)" with ``label`` "95% CI ", "100.0% (100.0–100.0%)" without."""
    shown = _pct(value) if percent else _dec(value)
    if _missing(value):
        return shown
    span = _range(interval, percent)
    return f"{shown} ({label}{span})" if span else f"{shown} (no interval)"


def _mean_sd(mean: object, sd: object, percent: bool = True) -> str:
    fmt = _pct if percent else _dec
    if _missing(mean):
        return "n/a"
    return f"{fmt(mean)} ± {fmt(sd)}" if not _missing(sd) else f"{fmt(mean)} (sd n/a)"


def _threshold(value: object) -> str:
    """A probability cut-off; one within 0.001 of 0 or 1 keeps its distance from the edge visible."""
    if _missing(value):
        return "n/a"
    if 0.999 < value < 1:
        return f"1 − {1 - value:.1e}"
    if 0 < value < 0.001:
        return f"{value:.1e}"
    return f"{value:.3f}"


def _or(words: list[str]) -> str:
    return " or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1]


def _name(key: str) -> str:
    return str(key).replace("_", " ")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _counts(values: pd.Series) -> str:
    counts = values.replace("", "unknown").value_counts()
    return ", ".join(f"{value} {count}" for value, count in counts.items())


def _ordered_labels(labels: pd.Series) -> list[str]:
    present = set(labels)
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


def _read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise CovidxrError(f"{folder}: no metrics.json; run `covidxr evaluate` first")
    return json.loads(path.read_text())


def _run_folder(folder: Path, metrics: dict) -> Path | None:
    """The run behind an evaluation; metrics.json records its path relative to where evaluate ran."""
    candidates = [Path(metrics["run"])] if metrics.get("run") else []
    return next((path for path in [*candidates, folder] if (path / "run.json").is_file()), None)


def _read_json(path: Path) -> dict | None:
    """A JSON object written by another command, or None when it is missing or damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _run_info(run: Path | None) -> dict:
    return (_read_json(run / "run.json") if run else None) or {}


def _same_path(a: object, b: object) -> bool:
    return bool(a) and bool(b) and Path(str(a)).resolve() == Path(str(b)).resolve()


def _is_external(metrics: dict, info: dict) -> bool:
    """Evaluated on every image of a dataset other than the one the run was trained on."""
    if metrics.get("split") != "all":
        return False
    if info.get("data"):
        return not _same_path(metrics.get("data"), info["data"])
    return "predicted_class_shift" in metrics


def _read_splits(run: Path | None) -> pd.DataFrame | None:
    if run is None or not (run / "splits.csv").is_file():
        return None
    return pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _run_blocks(metrics: dict, run: Path | None) -> list[Block]:
    if run is None:
        return [Text(f"Run folder {metrics.get('run')} not found: configuration and split are not shown.")]
    info = json.loads((run / "run.json").read_text())
    weights = info.get("weights", {})
    rows = [
        ["model", str(metrics.get("model"))],
        ["run folder", str(run.resolve())],
        ["trained on", str(info.get("data"))],
        ["evaluated on", f"{metrics.get('data')} ({metrics.get('split')} split)"],
        ["backbone weights", f"{weights.get('kind')}: {weights.get('location')} (sha256 {weights.get('sha256')})"],
        ["best epoch (lowest validation loss)", str(info.get("best_epoch"))],
        ["created", str(info.get("created"))],
        ["covidxr", str(info.get("environment", {}).get("covidxr"))],
    ]
    return [Table(["item", "value"], rows)]


def _config_blocks(path: Path) -> list[Block]:
    if not path.is_file():
        return [Text(f"Missing: {path}.")]
    config = yaml.safe_load(path.read_text()) or {}
    return [Table(["setting", "value"], [[str(k), _num(v).replace("; ", ", ")] for k, v in config.items()])]


def _split_table(splits: pd.DataFrame) -> Table:
    """Images / patients per split and class: shows how small each test class is."""
    labels = _ordered_labels(splits["label"])
    rows = []
    order = {part: i for i, part in enumerate(SPLITS)}
    for part, group in sorted(splits.groupby("split"), key=lambda item: order.get(item[0], len(order))):
        cells = [
            f"{(group['label'] == label).sum()} / {group.loc[group['label'] == label, 'patient_id'].nunique()}"
            for label in labels
        ]
        rows.append([str(part), *cells, f"{len(group)} / {group['patient_id'].nunique()}"])
    return Table(["split", *(f"{label} images / patients" for label in labels), "all images / patients"], rows)


def _bootstrap_note(metrics: dict) -> str:
    boot = metrics.get("bootstrap")
    if not isinstance(boot, dict):
        return (
            "This metrics.json has no bootstrap intervals (it predates them): only accuracy has an interval, "
            "the Wilson one. Run `covidxr evaluate` again for intervals on every rate."
        )
    return (
        f"Intervals are 95% percentile intervals from a {boot.get('unit', 'patient')}-level bootstrap: "
        f"{_num(boot.get('replicates'))} replicates, each drawing the {_num(boot.get('patients'))} patients with "
        f"replacement and keeping all images of a drawn patient (seed {_num(boot.get('seed'))}), because images of "
        "one patient are not independent. Accuracy also gets the Wilson interval, which treats images as "
        "independent. PPV and F1 have no interval."
    )


def _zero_width(metrics: dict) -> bool:
    intervals = [metrics.get("accuracy_bootstrap_ci95"), metrics.get("macro_auc_ci95")]
    for m in (metrics.get("per_class") or {}).values():
        intervals += [m.get(f"{rate}_ci95") for rate in ("sensitivity", "specificity", "auc")]
    return any(_range(ci) is not None and ci[0] == ci[1] for ci in intervals)


def _metrics_blocks(metrics: dict) -> list[Block]:
    """Headline numbers and per-class rates, each with its 95% interval, and the confusion matrix."""
    boot = metrics.get("bootstrap") if isinstance(metrics.get("bootstrap"), dict) else None
    accuracy, wilson = metrics.get("accuracy"), metrics.get("accuracy_ci95")
    patients = f" of {_num(boot.get('patients'))} patients" if boot else ""
    intervals = [f"95% CI {_range(wilson) or 'n/a'}, Wilson"]
    if boot:
        intervals.append(f"95% CI {_range(metrics.get('accuracy_bootstrap_ci95')) or 'n/a'}, patient bootstrap")
    auc = metrics.get("macro_auc")
    summary = (
        f"Evaluated on {metrics.get('data')} ({metrics.get('split')} split): n = {metrics.get('n')} images{patients}. "
        f"Accuracy {_pct(accuracy)}" + ("" if _missing(accuracy) else f" ({'; '.join(intervals)})") + ", "
        f"{metrics.get('correct')} of {metrics.get('n')} correct. Macro one-vs-rest AUC "
        + (_with_ci(auc, metrics.get("macro_auc_ci95"), False, "95% CI ") if boot else _dec(auc))
        + "."
    )
    replicates = f", {_num(boot.get('replicates'))} replicates" if boot else ""
    headline = [
        ["accuracy", _with_ci(accuracy, wilson, label="95% CI "), "Wilson score interval (images as independent)"],
    ]
    if boot:
        headline += [
            [
                "accuracy",
                _with_ci(accuracy, metrics.get("accuracy_bootstrap_ci95"), label="95% CI "),
                f"patient-level bootstrap{replicates}",
            ],
            [
                "macro one-vs-rest AUC",
                _with_ci(metrics.get("macro_auc"), metrics.get("macro_auc_ci95"), False, "95% CI "),
                f"patient-level bootstrap{replicates}",
            ],
        ]
    else:
        headline.append(["macro one-vs-rest AUC", _dec(metrics.get("macro_auc")), "no interval computed"])

    def rate(m: dict, key: str, percent: bool = True) -> str:
        if not boot:
            return _pct(m.get(key)) if percent else _dec(m.get(key))
        return _with_ci(m.get(key), m.get(f"{key}_ci95"), percent)

    per_class = [
        [
            label,
            str(m.get("n")),
            rate(m, "sensitivity"),
            rate(m, "specificity"),
            _pct(m.get("ppv")),
            _dec(m.get("f1")),
            rate(m, "auc", percent=False),
        ]
        for label, m in (metrics.get("per_class") or {}).items()
    ]
    ci = " (95% CI)" if boot else ""
    confusion = metrics.get("confusion_matrix", {})
    labels = confusion.get("labels", [])
    matrix = [[label, *(str(v) for v in row)] for label, row in zip(labels, confusion.get("matrix", []), strict=True)]
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


def _paper_blocks(metrics: dict) -> list[Block]:
    model = metrics.get("model")
    rows = [
        [
            f"{row['paper_model']} (paper)",
            _pct(row["paper_accuracy"]),
            "not reported",
            "not reported",
            str(row["paper_n"]),
            "by image",
        ]
        for row in PAPER_RESULTS.values()
    ]
    same = PAPER_RESULTS.get(model, {}).get("paper_model")
    name = f"{model} (covidxr; the paper's {same} backbone)" if same else f"{model} (covidxr; not in the paper)"
    data = Path(str(metrics.get("data"))).name
    drawn = f"every image of {data}" if metrics.get("split") == "all" else f"by patient ({metrics.get('split')} split)"
    wilson = _range(metrics.get("accuracy_ci95")) or "n/a"
    boot = _range(metrics.get("accuracy_bootstrap_ci95")) or "not computed"
    rows.append([name, _pct(metrics.get("accuracy")), wilson, boot, str(metrics.get("n")), drawn])
    return [
        Table(["model", "test accuracy", "95% CI (Wilson)", "95% CI (patient bootstrap)", "n test", "test set"], rows),
        Text(
            "The paper's test images were drawn at random from 375 images, so one patient could be in training and "
            "test; covidxr splits by patient, on different data. The numbers are not directly comparable."
        ),
    ]


def _figure_blocks(folder: Path, base: Path, model: str, prefix: str = "") -> list[Block]:
    """Each of the paper's figures that exists, and a sentence for each that does not."""
    blocks: list[Block] = []
    for number, (key, name, caption) in enumerate(FIGURES, start=1):
        path = folder / name
        if path.is_file():
            link = path.relative_to(base).as_posix()
            text = f"{caption} (the paper's Fig. {number})."
            blocks.append(Figure(f"{prefix}fig-{key}", path, link, f"{model}: {caption}", text))
        else:
            blocks.append(Text(f"Missing figure: {name}, the paper's Fig. {number}, is not in {folder}."))
    return blocks


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}: "))
        else:
            flat[_name(f"{prefix}{key}")] = value
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


def _explanation_blocks(metrics: dict) -> list[Block]:
    """Per method: its verdict and what it means in one sentence, the key figures, the raw numbers folded."""
    explanations = metrics.get("explanations")
    if not explanations:
        return [Text("Explanation checks: not computed.")]
    blocks: list[Block] = []
    methods = explanations.get("methods") or {}
    for name, values in methods.items():
        flat = _flatten(values)
        sentence = f"{name}: {values.get('verdict', 'n/a')}. {_explanation_sentence(values)}"
        wanted = [_name(key) for key in EXPLANATION_KEY_FIGURES]
        figures = [_figure(key, flat[key]) for key in wanted if key in flat]
        raw = [f"{k} = {_num(v)}" for k, v in flat.items() if k not in {"flags", "verdict"}]
        blocks.append(Text(sentence))
        if figures:
            blocks.append(Items(figures))
        if raw:
            blocks.append(Details(f"raw numbers of {name}", raw))
    if not methods:
        blocks.append(Text("No explanation method was checked."))
    geometry = explanations.get("geometry") or {}
    facts = [f"{_name(k)}: {_num(v)}" for k, v in explanations.items() if k not in {"methods", "geometry"}]
    facts += [f"geometry {_name(k)}: {_num(v)}" for k, v in geometry.items()]
    if facts:
        blocks.append(Details("how the maps were checked", facts))
    return blocks


def _covid_blocks(metrics: dict) -> list[Block]:
    """COVID-19 against everything else at the run's validation-chosen threshold."""
    covid = metrics.get("covid_vs_rest")
    if not isinstance(covid, dict):
        return [Text("Not computed: this metrics.json predates the COVID-19 threshold; run `covidxr evaluate` again.")]
    n_covid, n_other = int(covid.get("n_covid") or 0), int(covid.get("n_other") or 0)
    sensitivity, specificity = covid.get("sensitivity"), covid.get("specificity")
    share = covid.get("called_covid_share")

    row = [
        _threshold(covid.get("threshold")),
        str(n_covid),
        str(n_other),
        _dec(covid.get("auc")),
        _with_ci(sensitivity, covid.get("sensitivity_ci95")),
        _with_ci(specificity, covid.get("specificity_ci95")),
        _with_ci(share, covid.get("called_covid_share_ci95")),
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
            f"No evaluated image is COVID-19, so sensitivity and AUC are undefined; {_pct(share)} of the "
            f"{n_other} non-COVID images were nonetheless called COVID-19."
        )
    elif n_other == 0:
        notes.append("Every evaluated image is COVID-19, so specificity and AUC are undefined.")
    return [Table(header, [row]), Items(notes)]


def _true_shares(labels: list[str], counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: counts.get(label, 0) / total for label in labels} if total else {}


def _travel_blocks(metrics: dict, info: dict, splits: pd.DataFrame | None, external: bool) -> list[Block]:
    """The predicted-class mix on this data against the mix on the run's internal test set."""
    shift = metrics["predicted_class_shift"]
    internal, here = shift.get("internal_test") or {}, shift.get("this_data") or {}
    difference = shift.get("difference") or {}
    labels = list(dict.fromkeys([*internal, *here]))
    confusion = metrics.get("confusion_matrix") or {}
    true_here = _true_shares(
        labels,
        {label: sum(row) for label, row in zip(confusion.get("labels", []), confusion.get("matrix", []), strict=False)},
    )
    true_internal: dict[str, float] = {}
    if splits is not None:
        test = splits.loc[splits["split"] == "test", "label"]
        true_internal = _true_shares(labels, test.value_counts().to_dict())
    rows = [
        [
            label,
            _pct(true_internal.get(label)),
            _pct(internal.get(label)),
            _pct(true_here.get(label)),
            _pct(here.get(label)),
            "n/a" if _missing(difference.get(label)) else f"{100 * difference[label]:+.1f} points",
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
    trained_on = Path(str(info.get("data"))).name if info.get("data") else "its training data"
    lead = (
        f"External evaluation: the model was trained on {trained_on} and is evaluated on every image of "
        f"{Path(str(metrics.get('data'))).name}, which it has never seen. Numbers from its internal test set do "
        "not carry over; this is how its predictions moved."
        if external
        else "The predicted-class mix here against the mix on the run's internal test set."
    )
    tv = shift.get("total_variation")
    n_internal = None if splits is None else int((splits["split"] == "test").sum())
    n_here = int(metrics.get("n") or 0)
    few = min(n_here, n_internal if n_internal is not None else n_here) < FEW_IMAGES
    sentences = [
        f"Total variation distance between the two predicted-class mixes: {_dec(tv)} (0: the same mix; 1: no "
        "class in common). Part of a shift is expected where the true mix differs; compare the true shares.",
        "Compared: the run's internal test set"
        + ("" if n_internal is None else f" ({_plural(n_internal, 'image')})")
        + f" and the {_plural(n_here, 'image')} evaluated here"
        + ("; on so few images a share moves by several points by chance alone." if few else "."),
    ]
    if "COVID-19" in here and "COVID-19" in true_here:
        sentences.append(
            f"Here the model calls {_pct(here['COVID-19'])} of the images COVID-19 (by its label), "
            f"while {_pct(true_here['COVID-19'])} are COVID-19."
        )
    return [Text(lead, warning=external), Table(header, rows), Items(sentences)]


def _ece_change(before: object, after: object, where: str) -> str:
    if _missing(before) or _missing(after):
        return f"On {where} the ECE was not computed."
    if after < before:
        return f"On {where} temperature scaling lowered the ECE from {_dec(before)} to {_dec(after)}."
    return (
        f"On {where} temperature scaling did not lower the ECE ({_dec(before)} before, {_dec(after)} after): "
        "the calibrated probabilities are no better calibrated there."
    )


def _calibration_blocks(
    metrics: dict, info: dict, folder: Path, base: Path, model: str, prefix: str = ""
) -> list[Block]:
    """Temperature, ECE before and after on validation and on the evaluated images, the COVID-19 threshold."""
    fitted = info.get("calibration") if isinstance(info.get("calibration"), dict) else {}
    here = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else {}
    if not fitted and not here:
        return [
            Text(
                "No calibration recorded in run.json or metrics.json: a run made before temperature scaling uses "
                "its raw probabilities (temperature 1) and a COVID-19 threshold of 0.5."
            )
        ]
    temperature = fitted.get("temperature", here.get("temperature"))
    val = (info.get("split_sizes") or {}).get("val") or {}
    known = isinstance(val, dict) and {"images", "patients"} <= set(val)
    val_size = f" ({_plural(val['images'], 'image')} of {_plural(val['patients'], 'patient')})" if known else ""
    blocks: list[Block] = []
    if _missing(temperature):
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
                f"Temperature T = {_threshold(temperature)}, fitted by {fitted.get('method', 'temperature scaling')}"
                f"{val_size} by minimising its negative log-likelihood; every probability in this report is "
                f"softmax(logits / T). {direction}. Scaling by one temperature never changes the predicted class."
            )
        )
    data = Path(str(metrics.get("data"))).name
    evaluated = f"evaluated images ({data}, {metrics.get('split')} split, n = {metrics.get('n')})"
    rows = [
        [
            "validation split (where T was fitted)",
            _dec(fitted.get("val_ece_uncalibrated")),
            _dec(fitted.get("val_ece_calibrated")),
        ],
        [evaluated, _dec(here.get("ece_uncalibrated")), _dec(here.get("ece_calibrated"))],
    ]
    blocks.append(Table(["images", "ECE before (T = 1)", f"ECE after (T = {_threshold(temperature)})"], rows))
    notes = [
        f"ECE: expected calibration error, the mean gap between confidence and accuracy over {ECE_BINS} "
        "equal-width confidence bins (0 is perfect); on few images it is itself very noisy.",
        _ece_change(fitted.get("val_ece_uncalibrated"), fitted.get("val_ece_calibrated"), "the validation split"),
        _ece_change(here.get("ece_uncalibrated"), here.get("ece_calibrated"), "the evaluated images"),
    ]
    threshold = fitted.get("covid_threshold") if isinstance(fitted.get("covid_threshold"), dict) else None
    if threshold is None:
        notes.append("COVID-19 threshold: not recorded in run.json.")
    elif not threshold.get("val_positives"):
        notes.append(
            f"COVID-19 threshold {_threshold(threshold.get('value'))}: the validation split had no COVID-19 image, "
            "so this is the default, not a chosen operating point."
        )
    else:
        value, positives = threshold.get("value"), int(threshold["val_positives"])
        rough = "; with so few positives the cut-off is a rough choice" if positives < FEW_VAL_POSITIVES else ""
        notes.append(
            f"Operating point: COVID-19 threshold {_threshold(value)} on the temperature-scaled COVID-19 "
            f"probability, {describe_operating_point(threshold)}: there it gave sensitivity "
            f"{_pct(threshold.get('val_sensitivity'))} and specificity {_pct(threshold.get('val_specificity'))}, on "
            f"{_plural(positives, 'COVID-19 image')}{rough}. It is the decision: an image is labelled COVID-19 when "
            "its probability reaches it, otherwise the more probable other class (every label in this report)."
        )
        if not _missing(value) and (value > 0.999 or value < 0.001):
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


# The 3-5 figures that carry each audit check; the rest go into its folded raw numbers.
AUDIT_KEY_FIGURES = {
    "lungs_hidden": ("accuracy", "accuracy_lungs_hidden", "accuracy_border_only", "chance", "p_value"),
    "source_probe": ("balanced_accuracy", "chance", "confounded", "every_class_from_one_source"),
    "resolution_format": ("accuracy", "accuracy_common_format", "accuracy_drop", "changed_share"),
}


def _figure(key: str, value: object) -> str:
    """ "accuracy lungs hidden 47.1%": rates and shares in percent, the rest as numbers."""
    rate = isinstance(value, float) and any(word in key for word in ("accuracy", "share", "chance", "drop", "mass"))
    return f"{_name(key)} {_pct(value) if rate else _num(value)}"


def _key_figures(check: dict, keys: tuple[str, ...] = ()) -> list[str]:
    """The named figures of a check, or for a check covidxr does not know its first four plain numbers."""
    plain = [k for k, v in check.items() if isinstance(v, int | float | bool) and k not in {"verdict", "summary"}]
    chosen = [k for k in keys if k in check] or plain[:4]
    return [_figure(k, check[k]) for k in chosen]


def _shown_verdict(check: dict) -> str:
    """The verdict, except that a "pass" whose own sentence calls the test weak is shown as inconclusive."""
    verdict = str(check.get("verdict", "n/a"))
    if verdict == "pass" and "weak" in str(check.get("summary", "")).lower():
        return "inconclusive (a weak test; see the sentence)"
    return verdict


def _check_blocks(name: str, check: dict, keys: tuple[str, ...] = ()) -> list[Block]:
    """One check: its verdict and sentence, 3-5 key figures, and every raw number folded away."""
    sentence = str(check.get("summary") or "")
    figures = _key_figures(check, keys)
    raw = _flatten({k: v for k, v in check.items() if k not in {"verdict", "summary"}})
    blocks: list[Block] = [
        Text(f"{_name(name)}: {_shown_verdict(check)}." + (f" {sentence}" if sentence else ""), warning=False)
    ]
    if figures:
        blocks.append(Items(figures))
    if raw:
        blocks.append(Details(f"raw numbers of {_name(name)}", [f"{k} = {_num(v)}" for k, v in raw.items()]))
    return blocks


def _audit_blocks(candidates: list[Path], command: str) -> list[Block]:
    """The first audit.json among ``candidates``: the overall verdict, then per check a sentence, its key
    figures and its raw numbers folded away; or how to make one."""
    path = next((c / "audit.json" for c in candidates if (c / "audit.json").is_file()), None)
    audit = _read_json(path) if path else None
    if audit is None:
        damaged = f" ({path} is damaged)" if path else ""
        return [Text(f"No shortcut audit yet{damaged}: run `{command}`.")]
    verdict = str(audit.get("verdict") or "not recorded")
    blocks: list[Block] = [
        Text(f"Overall verdict: {verdict}. {audit.get('summary', '')}".strip(), warning=verdict in {"fail", "warning"})
    ]
    checks = audit.get("checks") if isinstance(audit.get("checks"), dict) else {}
    names = [name for name in AUDIT_CHECKS if name in checks] + [name for name in checks if name not in AUDIT_CHECKS]
    for name in names:
        check = checks[name] if isinstance(checks[name], dict) else {"value": checks[name]}
        blocks += _check_blocks(name, check, AUDIT_KEY_FIGURES.get(name, ()))
    if not names:
        blocks.append(Text("The audit lists no check."))
    facts = [f"from: {path}"]
    facts += [f"{_name(k)}: {_num(audit[k])}" for k in ("model", "images", "n_images") if k in audit]
    geometry = audit.get("geometry")
    if isinstance(geometry, dict):
        facts += [f"geometry {key}: {_num(value)}" for key, value in _flatten(geometry).items()]
    blocks.append(Details("where these numbers come from", facts))
    return blocks


# ---------------------------------------------------------------------------------------------
# Limitations, computed from the data
# ---------------------------------------------------------------------------------------------


def _composition_table(frame: pd.DataFrame) -> Table:
    """Per class: sizes, sources, and the age groups and age range where the metadata has them."""
    header = ["class", "images", "patients", "sources"]
    header += ["age groups"] if "age_group" in frame.columns else []
    header += ["age (years)"] if "age" in frame.columns else []
    rows = []
    for label in _ordered_labels(frame["label"]):
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
        return _or(values) if len(values) <= 3 else f"one of {len(values)} {plural}"

    parts = [
        " ".join(filter(None, ["every", "/".join(classes), "image", verb if i == 0 else gap, said(values)]))
        for i, (classes, values) in enumerate(groups)
    ]
    text = ", ".join(parts[:-1]) + " and " + parts[-1]
    exceptions = [
        f"{_plural(int(counts.loc[label, value]), label + ' image')} with {noun} {value}"
        for label, value in minor.stack().loc[lambda s: s].index
    ]
    if exceptions:
        text += ", except " + ", ".join(exceptions)
    unknown = len(frame) - len(known)
    lead = f"leaving out {_plural(unknown, 'image')} of unknown {noun}, " if unknown else ""
    return f"{lead}{text}: the label is {'nearly ' if exceptions else ''}confounded with the {noun}."


def _scope_sentences(name: str, frame: pd.DataFrame) -> list[str]:
    found = [confounding(frame, *confounder) for confounder in CONFOUNDERS if confounder[0] in frame.columns]
    nouns = _or([noun for column, noun, *_ in CONFOUNDERS if column in frame.columns])
    sentences = [f"In the {name}, {s}" for s in found if s]
    return sentences or [f"In the {name}, no {nouns} coincides with a class."]


def _size_sentences(metrics: dict, evaluated: pd.DataFrame) -> list[str]:
    sizes = evaluated["label"].value_counts()
    low, high = metrics.get("accuracy_ci95") or [None, None]
    width = (
        ""
        if _missing(low) or _missing(high)
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
        f"{_plural(len(shared), 'patient')} of the evaluated rows {'is' if len(shared) == 1 else 'are'} also in "
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


def _limitation_blocks(metrics: dict, run: Path | None) -> list[Block]:
    """Sources, age groups, sizes and patient overlap of the evaluated rows and of the training split."""
    splits = _read_splits(run)
    if splits is None:
        return [Text("Not computed: the run's splits.csv was not found.")]
    info = _run_info(run)
    # A run on several folders records their common parent as its data: read the folders themselves.
    roots = info.get("datasets") if _same_path(metrics.get("data"), info.get("data")) else None
    try:
        dataset = load_datasets(roots) if roots else load_dataset(metrics["data"])
    except CovidxrError as exc:
        return [Text(f"Not computed: {exc}.")]
    evaluated, name = dataset.frame, dataset.name
    if metrics.get("split") == "all":
        scope = f"evaluated rows (all images of {name})"
    else:
        chosen = set(splits.loc[splits["split"] == metrics.get("split"), "filename"])
        evaluated = evaluated[evaluated["filename"].isin(chosen)]
        scope = f"evaluated rows ({metrics.get('split')} split of {name})"
    training = splits[splits["split"] == "train"]
    return [
        Text(f"The {scope}:"),
        _composition_table(evaluated),
        Text("The training split:"),
        _composition_table(training),
        Items(
            _scope_sentences(scope, evaluated)
            + _scope_sentences("training split", training)
            + _size_sentences(metrics, evaluated)
            + _patient_sentences(evaluated, training)
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Rates per source and per held-out source (metrics.json "by_source", loso.json)
# ---------------------------------------------------------------------------------------------

CALLED_BY_ARGMAX = (
    "Here an image is called COVID-19 when COVID-19 is its most probable class (not the validation-chosen "
    "threshold of the COVID-19-versus-the-rest table); intervals are 95% Wilson intervals, which treat images "
    "as independent."
)
CALLED_BY_LABEL = (
    "Here an image is called COVID-19 when it is labelled COVID-19 (its probability reaches the operating "
    "threshold); intervals are 95% Wilson intervals, which treat images as independent."
)


def _rate_n(value: object, interval: object, n: object) -> str:
    """ "93.3% (78.7–98.2%), n = 30"; "n/a" where there were no images to compute it on."""
    return "n/a" if _missing(value) else f"{_with_ci(value, interval)}, n = {_num(n)}"


def _image_counts(rates: dict) -> str:
    """ "30 (0 COVID-19, 30 other)" """
    if _missing(rates.get("n_covid")):
        return _num(rates.get("n"))
    return f"{_num(rates.get('n'))} ({_num(rates.get('n_covid'))} COVID-19, {_num(rates.get('n_other'))} other)"


def _rate_cells(rates: dict) -> list[str]:
    """Accuracy, COVID-19 sensitivity and the share of other images called COVID-19, each with its interval."""
    return [
        _with_ci(rates.get("accuracy"), rates.get("accuracy_ci95")),
        _with_ci(rates.get("covid_sensitivity"), rates.get("covid_sensitivity_ci95")),
        _with_ci(rates.get("other_called_covid"), rates.get("other_called_covid_ci95")),
    ]


RATE_HEADER = ["accuracy (95% CI)", "COVID-19 sensitivity (95% CI)", "non-COVID images called COVID-19 (95% CI)"]


def _by_source_table(by_source: dict) -> Table:
    """metrics.json "by_source": one row per source of the evaluated images."""
    rows = [[str(source), _image_counts(rates), *_rate_cells(rates)] for source, rates in by_source.items()]
    return Table(["source", "images", *RATE_HEADER], rows)


def _loso_unit_table(loso: dict) -> Table:
    """loso.json "units": one row per held-out unit, evaluated or skipped with the reason."""
    rows = []
    for unit in loso.get("units") or []:
        status = str(unit.get("status", "n/a"))
        if unit.get("reason"):
            status += f": {unit['reason']}"
        rows.append(
            [str(unit.get("unit")), str(unit.get("kind", "n/a")), _image_counts(unit), status, *_rate_cells(unit)]
        )
    return Table(["held-out unit", "how it was held out", "images", "status", *RATE_HEADER], rows)


def _pooled_loso_table(pooled: dict) -> Table:
    rows = [
        [
            "held-out COVID-19 images called COVID-19 (sensitivity)",
            _with_ci(pooled.get("covid_sensitivity"), pooled.get("covid_sensitivity_ci95")),
            _num(pooled.get("n_covid")),
        ],
        [
            "held-out non-COVID images called COVID-19",
            _with_ci(pooled.get("other_called_covid"), pooled.get("other_called_covid_ci95")),
            _num(pooled.get("n_other")),
        ],
        [
            "accuracy (three classes)",
            _with_ci(pooled.get("accuracy"), pooled.get("accuracy_ci95")),
            _num(pooled.get("n")),
        ],
        [
            "COVID-19-versus-rest AUC (patient bootstrap)",
            _with_ci(pooled.get("covid_vs_rest_auc"), pooled.get("covid_vs_rest_auc_ci95"), False),
            _num(pooled.get("n")),
        ],
    ]
    return Table(["pooled over every held-out unit", "value (95% CI)", "images"], rows)


def _units_with_every_covid(loso: dict, splits: pd.DataFrame | None) -> list[str]:
    """Held-out units, retrained without, that hold every COVID-19 image of the run's data: the model
    retrained without them never saw COVID-19, so its sensitivity there is zero by construction."""
    total = 0 if splits is None else int((splits["label"] == "COVID-19").sum())
    return [
        f"{unit.get('unit')} ({_plural(total, 'COVID-19 image')})"
        for unit in loso.get("units") or []
        if total
        and unit.get("status") == "evaluated"
        and unit.get("n_covid") == total
        and unit.get("kind") != "never in this run's data"
    ]


def _every_covid_note(units: list[str]) -> str:
    return (
        "Where a held-out unit holds every COVID-19 image of the run's data, the model retrained without it never "
        "saw a COVID-19 image and can hardly call one COVID-19: its held-out sensitivity says nothing about new "
        f"hospitals ({'; '.join(units)})."
    )


def _loso_blocks(loso: dict, path: Path, splits: pd.DataFrame | None) -> list[Block]:
    """The pooled held-out rates and the per-unit table of one run's loso.json."""
    whole = _units_with_every_covid(loso, splits)
    return [
        Text(
            "Each unit (a source, or for a many-site source a publishing site; sites with fewer than "
            f"{_num(loso.get('min_unit_images'))} images together) was removed from training, the run's protocol "
            "retrained on the rest and tested on the unit's images; a dataset the run never trained on is a unit "
            f"of the run's own model. From {path}."
        ),
        _pooled_loso_table(loso.get("pooled") or {}),
        _loso_unit_table(loso),
        Items(
            [
                CALLED_BY_ARGMAX,
                "The pooled AUC mixes units, each predicted by a model that never saw it (one retrained model per "
                "unit, the run's own model for data it never trained on).",
                *([_every_covid_note(whole)] if whole else []),
            ]
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The bottom line a report opens with
# ---------------------------------------------------------------------------------------------


def _paper_line(metrics: dict) -> str:
    """The paper's figure for this backbone against ours (or the paper's best, for a backbone it did not use)."""
    model = str(metrics.get("model"))
    ours = (
        f"{_with_ci(metrics.get('accuracy'), metrics.get('accuracy_ci95'), label='95% CI ')} on "
        f"{_plural(int(metrics.get('n') or 0), 'image')} ({metrics.get('split')} split, by patient)"
    )
    paper = PAPER_RESULTS.get(model)
    if paper:
        return (
            f"Accuracy against the paper: the paper's {paper['paper_model']} {_pct(paper['paper_accuracy'])} on "
            f"{paper['paper_n']} images split at random; covidxr's {model} {ours}. Different data and split: "
            "not directly comparable."
        )
    return (
        f"Accuracy: covidxr's {model} {ours}. The paper did not use this backbone (its best, VGG-16, reported "
        "97.3% on 75 images split at random)."
    )


def _audit_line(candidates: list[Path], command: str) -> str:
    path = next((c / "audit.json" for c in candidates if (c / "audit.json").is_file()), None)
    audit = _read_json(path) if path else None
    if audit is None:
        return f"Shortcut audit: not run yet (`{command}`)."
    checks = audit.get("checks") if isinstance(audit.get("checks"), dict) else {}
    shown = ", ".join(f"{_name(k)} {_shown_verdict(v)}" for k, v in checks.items() if isinstance(v, dict))
    return f"Shortcut audit: {audit.get('verdict', 'not recorded')}" + (f" ({shown})." if shown else ".")


def _external_line(name: str, metrics: dict) -> str:
    """One sentence on an evaluation of data the model never saw."""
    covid = metrics.get("covid_vs_rest") or {}
    parts = [f"accuracy {_with_ci(metrics.get('accuracy'), metrics.get('accuracy_ci95'))}"]
    if covid.get("auc") is not None:
        parts.append(f"COVID-19-versus-rest AUC {_dec(covid['auc'])}")
    if covid.get("n_covid"):
        parts.append(f"COVID-19 sensitivity {_with_ci(covid.get('sensitivity'), covid.get('sensitivity_ci95'))}")
    if covid.get("n_other"):
        called = 1 - covid["specificity"] if covid.get("specificity") is not None else None
        parts.append(f"non-COVID images called COVID-19 {_pct(called)} of {covid['n_other']}")
    n = _plural(int(metrics.get("n") or 0), "image")
    return f"On {name} ({n}, never seen in training): " + "; ".join(parts) + "."


def _externals(run: Path | None) -> dict[str, dict]:
    """The evaluations ``evaluate RUN --data OTHER`` wrote under ``RUN/external/``, by dataset name."""
    if run is None or not (run / "external").is_dir():
        return {}
    found = {folder.name: _read_json(folder / "metrics.json") for folder in sorted((run / "external").iterdir())}
    return {name: metrics for name, metrics in found.items() if metrics}


def _generalisation_lines(run: Path | None, loso: dict | None, command: str) -> list[str]:
    """How the model fares on data it never saw: other datasets, and every source held out in turn."""
    lines = [_external_line(name, metrics) for name, metrics in _externals(run).items()]
    pooled = (loso or {}).get("pooled") or {}
    if pooled:
        lines.append(
            "Leave-one-source-out (each source held out of training in turn): COVID-19 sensitivity "
            f"{_with_ci(pooled.get('covid_sensitivity'), pooled.get('covid_sensitivity_ci95'))}, non-COVID images "
            f"called COVID-19 {_with_ci(pooled.get('other_called_covid'), pooled.get('other_called_covid_ci95'))}, "
            f"pooled COVID-19-versus-rest AUC {_dec(pooled.get('covid_vs_rest_auc'))}."
        )
    return lines or [f"On data it never saw: not measured yet (`{command}`); internal test figures do not travel."]


# ---------------------------------------------------------------------------------------------
# The two reports
# ---------------------------------------------------------------------------------------------


def write_run_report(folder: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` for an evaluation output folder (by default the run folder)."""
    folder = Path(folder)
    metrics = _read_metrics(folder)
    run = _run_folder(folder, metrics)
    splits = _read_splits(run)
    info = _run_info(run)
    model = str(metrics.get("model"))
    external = _is_external(metrics, info)
    travels: list[Block] = []
    if "predicted_class_shift" in metrics:
        travels = [Heading(2, "How the model travels"), *_travel_blocks(metrics, info, splits, external)]
    sources: list[Block] = []
    if isinstance(metrics.get("by_source"), dict):
        sources = [
            Heading(2, "By source"),
            _by_source_table(metrics["by_source"]),
            Items([CALLED_BY_LABEL]),
        ]
    loso_path = next((c / "loso.json" for c in [folder, *([run] if run else [])] if (c / "loso.json").is_file()), None)
    loso = _read_json(loso_path) if loso_path else None
    if loso is not None:
        sources += [Heading(2, "Leave-one-source-out"), *_loso_blocks(loso, loso_path, splits)]
    audit_folders = list(dict.fromkeys([folder, *([run] if run else [])]))
    audit_command = f"covidxr audit {run or 'RUN'}"
    never_seen = (
        [_external_line(Path(str(metrics.get("data"))).name, metrics)]
        if external
        else _generalisation_lines(run, loso, f"covidxr evaluate {run or 'RUN'} --data OTHER")
    )
    bottom_line = [_paper_line(metrics), _audit_line(audit_folders, audit_command), *never_seen]
    others = _externals(run) if not external else {}
    elsewhere: list[Block] = []
    if others:
        elsewhere = [
            Heading(2, "On other datasets"),
            Text("Each evaluation of a dataset the model never saw, written by `covidxr evaluate RUN --data OTHER`:"),
            Links(
                [
                    (_external_line(name, m), os.path.relpath(run / "external" / name / "report.html", folder))
                    for name, m in others.items()
                ]
            ),
        ]
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Verdict(bottom_line),
        Heading(2, "Metrics"),
        *_metrics_blocks(metrics),
        *(travels if external else []),
        Heading(2, "COVID-19 versus the rest"),
        *_covid_blocks(metrics),
        *([] if external else travels),
        *sources,
        Heading(2, "Calibration"),
        *_calibration_blocks(metrics, info, folder, folder, model),
        Heading(2, "Against the paper"),
        *_paper_blocks(metrics),
        Heading(2, "Figures"),
        *_figure_blocks(folder, folder, model),
        Heading(2, "Explanation checks"),
        *_explanation_blocks(metrics),
        Heading(2, "Shortcut audit"),
        *_audit_blocks(audit_folders, audit_command),
        *elsewhere,
        Heading(2, "Limitations"),
        *_limitation_blocks(metrics, run),
        Heading(2, "Appendix: run"),
        *_run_blocks(metrics, run),
        Heading(2, "Appendix: configuration"),
        *(_config_blocks(run / "config.yaml") if run else [Text("Missing: the run's config.yaml.")]),
        Heading(2, "Appendix: split"),
        _split_table(splits) if splits is not None else Text("Missing: the run's splits.csv."),
    ]
    return _write(folder, f"covidxr report: {metrics.get('model')}", blocks)


def _results_table(rows: list[dict], metrics: dict[str, dict]) -> Table:
    """One row per model; the covidxr numbers are its first seed's run, each with its 95% interval."""
    cells = []
    for row in rows:
        paper = row.get("paper_accuracy")
        paper_cell = f"{_pct(paper)} (n={row.get('paper_n')})" if paper is not None else "not in the paper"
        if row.get("status") != "trained":
            continue  # folded into one line under the table
        m = metrics.get(str(row.get("model")), {})
        covid = (m.get("per_class") or {}).get("COVID-19", {})
        wilson = [row.get("accuracy_ci95_low"), row.get("accuracy_ci95_high")]
        cells.append(
            [
                str(row.get("model")),
                str(row.get("paper_model")),
                paper_cell,
                _with_ci(row.get("accuracy"), wilson, label="95% CI "),
                _range(m.get("accuracy_bootstrap_ci95")) or "not computed",
                f"{row.get('correct')} / {row.get('n_test')}",
                _with_ci(row.get("macro_auc"), m.get("macro_auc_ci95"), False),
                _with_ci(row.get("covid_sensitivity"), covid.get("sensitivity_ci95")),
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
    inside = "" if _missing(low) or _missing(high) else ("inside" if low <= paper <= high else "outside")
    where = f", {inside} the seeds' range" if inside else ""
    if _missing(z):
        return (
            f"the paper's {_pct(paper)} against a mean of {_pct(row.get('accuracy_mean'))} over {n} seeds{where}; "
            "the accuracy did not vary over the seeds, so there is no distance in sd"
        )
    side = "above" if z > 0 else "below"
    return f"the paper's {_pct(paper)} lies {abs(z):.1f} sd {side} the mean over {n} seeds{where}"


def _seed_blocks(folder: Path, rows: list[dict]) -> list[Block]:
    """Mean ± sd and range over seeds per model, the paper's number against that spread, and each seed's run."""
    trained = [row for row in rows if row.get("status") == "trained"]
    if not any(_several_seeds(row) for row in trained):
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        seed = (config or {}).get("seed", "from the configuration")
        data = next((_run_info(folder / str(r.get("model"))).get("data") for r in trained), None) or "DATA"
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
            fmt = _pct if percent else _dec
            cells.append(_mean_sd(row.get(f"{key}_mean"), row.get(f"{key}_sd"), percent))
            low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
            cells.append("n/a" if _missing(low) else f"{fmt(low)} to {fmt(high)}")
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
        for r in pd.read_csv(per_seed).to_dict("records"):
            m = _read_json(folder / str(r.get("run")) / "metrics.json") or {}
            covid = (m.get("per_class") or {}).get("COVID-19", {})
            wilson = [r.get("accuracy_ci95_low"), r.get("accuracy_ci95_high")]
            table.append(
                [
                    str(r.get("model")),
                    _num(r.get("seed")),
                    str(r.get("run")),
                    _with_ci(r.get("accuracy"), wilson, label="95% CI "),
                    f"{_num(r.get('correct'))} / {_num(r.get('n_test'))}",
                    _with_ci(r.get("macro_auc"), m.get("macro_auc_ci95"), False),
                    _with_ci(r.get("covid_sensitivity"), covid.get("sensitivity_ci95")),
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
    splits = {model: _read_splits(folder / model) for model in models}
    found = {model: frame for model, frame in splits.items() if frame is not None}
    if not found:
        return [Text("No trained model's splits.csv was found.")]
    first = next(iter(found.values()))
    same = all(frame[["filename", "split"]].equals(first[["filename", "split"]]) for frame in found.values())
    if same:
        return [Text(f"One split, shared by {', '.join(found)}:"), _split_table(first)]
    return [block for model, frame in found.items() for block in (Text(f"{model}:"), _split_table(frame))]


def write_reproduce_report(folder: Path) -> tuple[Path, Path]:
    """One report for a ``covidxr reproduce`` folder: the table against the paper, then each trained model."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise CovidxrError(f"{folder}: no results.json; run `covidxr reproduce` first")
    rows = json.loads(path.read_text())
    trained = [row["model"] for row in rows if row.get("status") == "trained"]
    skipped = [row for row in rows if row.get("status") != "trained"]
    metrics = {model: _read_metrics(folder / model) for model in trained}
    bottom_line = [_paper_line(metrics[model]) for model in trained] or [
        "No model was trained here (none has weights): there is no figure to set against the paper's."
    ]
    bottom_line += [f"{model}: {_audit_line([folder / model], f'covidxr audit {folder / model}')}" for model in trained]
    for model in trained:
        command = f"covidxr evaluate {folder / model} --data OTHER, or reproduce with --external DIR"
        bottom_line += [f"{model}: {line}" for line in _generalisation_lines(folder / model, None, command)]
    folded = [
        Text(
            "Skipped (no weights here): "
            + ", ".join(f"{row.get('model')} ({row.get('paper_model')})" for row in skipped)
            + " — see Skipped models; the README says how to supply their weights."
        )
    ]
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Verdict(bottom_line),
        Heading(2, "Results against the paper"),
        _results_table(rows, metrics),
        *(folded if skipped else []),
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
        blocks += [Text(f"Computed for {first}'s evaluation:"), *_limitation_blocks(metrics[first], folder / first)]
    else:
        blocks.append(Text("No model was trained, so there is nothing to describe."))
    for model in trained:
        run = folder / model
        blocks += [
            Heading(2, model),
            Heading(3, "Metrics"),
            *_metrics_blocks(metrics[model]),
            Heading(3, "COVID-19 versus the rest"),
            *_covid_blocks(metrics[model]),
            Heading(3, "Calibration"),
            *_calibration_blocks(metrics[model], _run_info(run), run, folder, model, prefix=f"{model}-"),
            Heading(3, "Figures"),
            *_figure_blocks(run, folder, model, prefix=f"{model}-"),
            Heading(3, "Explanation checks"),
            *_explanation_blocks(metrics[model]),
            Heading(3, "Shortcut audit"),
            *_audit_blocks([run], f"covidxr audit {run}"),
        ]
        others = _externals(run)
        if others:
            links = [(_external_line(name, m), f"{model}/external/{name}/report.html") for name, m in others.items()]
            blocks += [Heading(3, "On other datasets"), Links(links)]
    blocks.append(Heading(2, "Skipped models"))
    blocks.append(
        Items([f"{row.get('model')} ({row.get('paper_model')}): {row.get('reason')}" for row in skipped])
        if skipped
        else Text("None.")
    )
    blocks += [Heading(2, "Appendix: configuration"), *_config_blocks(folder / "config.yaml")]
    return _write(folder, "covidxr reproduce report: Soares & Soares (2020) protocol", blocks)


# ---------------------------------------------------------------------------------------------
# The designs report: the paper's design beside the deconfounded variants
# ---------------------------------------------------------------------------------------------

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


@dataclass
class _Design:
    """One row of designs.json with what its run folder holds (None where a file is missing or damaged)."""

    row: dict
    folder: Path
    info: dict
    metrics: dict | None
    audit: dict | None
    loso: dict | None
    splits: pd.DataFrame | None

    @property
    def name(self) -> str:
        return str(self.row.get("run") or self.folder.name)

    @property
    def description(self) -> str:
        return str(self.row.get("description") or "n/a")

    @property
    def trained_on(self) -> str:
        scope = "first dataset only" if self.row.get("design") == "paper" else "every dataset merged"
        return f"{self.row.get('datasets', 'n/a')} ({scope})"

    @property
    def units(self) -> list[dict]:
        return [u for u in (self.loso or {}).get("units") or [] if isinstance(u, dict)]

    @property
    def pooled(self) -> dict:
        return (self.loso or {}).get("pooled") or {}


def _read_designs(out: Path) -> list[_Design]:
    path = out / "designs.json"
    rows = json.loads(path.read_text()) if path.is_file() else None
    if not isinstance(rows, list):
        raise CovidxrError(f"{out}: no designs.json; run `covidxr reproduce --design deconfounded` first")
    designs = []
    for row in rows:
        folder = out / str(row.get("run"))
        designs.append(
            _Design(
                row,
                folder,
                _run_info(folder if (folder / "run.json").is_file() else None),
                _read_json(folder / "metrics.json"),
                _read_json(folder / "audit.json"),
                _read_json(folder / "loso.json"),
                _read_splits(folder),
            )
        )
    return designs


def _adult_sources(designs: list[_Design]) -> list[str]:
    """Sources of non-COVID images most of whose non-COVID images of known age are adults, over every run's rows."""
    frames = [d.splits for d in designs if d.splits is not None and "age_group" in d.splits.columns]
    if not frames:
        return []
    rows = pd.concat(frames).drop_duplicates("filename")
    rows = rows[rows["label"] != "COVID-19"]
    known = rows[rows["age_group"].astype(str).str.strip() != ""]
    adult = (known["age_group"] == "adult").groupby(known["source"].astype(str)).mean()
    return sorted(adult[adult > 0.5].index)


def _unit_sources(unit: dict) -> set[str]:
    return {s.strip() for s in str(unit.get("source", "")).split(",") if s.strip()}


def _adult_units(design: _Design, adult: list[str]) -> list[dict]:
    """Evaluated held-out units of non-COVID images whose sources are all adult sources."""
    return [
        u
        for u in design.units
        if u.get("status") == "evaluated"
        and not _missing(u.get("other_called_covid"))
        and _unit_sources(u)
        and _unit_sources(u) <= set(adult)
    ]


def _non_covid_units(designs: list[_Design]) -> list[str]:
    """Names of held-out units with non-COVID images in any run, in order of first appearance."""
    names = [str(u.get("unit")) for d in designs for u in d.units if (u.get("n_other") or 0) > 0]
    return list(dict.fromkeys(names))


def _unit_called(unit: dict) -> str:
    return _rate_n(unit.get("other_called_covid"), unit.get("other_called_covid_ci95"), unit.get("n_other"))


def _pooled_sensitivity(design: _Design) -> str:
    pooled = design.pooled
    return _rate_n(pooled.get("covid_sensitivity"), pooled.get("covid_sensitivity_ci95"), pooled.get("n_covid"))


# Issue 17's targets for a model that learns the disease, not the collection (held-out figures).
VALIDITY_TARGETS = {
    "within_site_auc": 0.80,
    "loso_auc": 0.75,
    "nih_called_covid": 0.20,
    "kermany_called_covid": 0.20,
    "covid_sensitivity": 0.80,
    "lung_share": 0.6,
}


def _unit_of_source(d: _Design, source: str) -> dict | None:
    """The evaluated held-out unit that is ``source`` as a whole (retrained without it, or external)."""
    for unit in d.units:
        if unit.get("status") == "evaluated" and unit.get("source") == source and unit.get("n_other"):
            return unit
    return None


def validity_figures(d: _Design) -> dict[str, float | None]:
    """The held-out figures the validity targets name, for one design (None where not measured)."""
    figures: dict[str, float | None] = {
        "within_site_auc": d.row.get("within_site_auc"),
        "loso_auc": d.pooled.get("covid_vs_rest_auc"),
        "covid_sensitivity": d.pooled.get("covid_sensitivity"),
        "lung_share": d.row.get("gradcam_lung_share_covid_calls"),
    }
    for source in ("nih", "kermany"):
        unit = _unit_of_source(d, source)
        figures[f"{source}_called_covid"] = None if unit is None else unit.get("other_called_covid")
    return figures


def targets_met(figures: dict[str, float | None]) -> int:
    """How many validity targets a design's figures meet (a figure not measured meets none)."""
    met = 0
    for name, target in VALIDITY_TARGETS.items():
        value = figures.get(name)
        if value is not None and (value <= target if name.endswith("called_covid") else value >= target):
            met += 1
    return met


def shortfall(figures: dict[str, float | None]) -> float:
    """How far a design's figures fall short of the validity targets, summed over the six (AUCs and shares on
    the same 0-1 scale; a target met adds 0, a figure not measured adds its whole target)."""
    total = 0.0
    for name, target in VALIDITY_TARGETS.items():
        value = figures.get(name)
        if name.endswith("called_covid"):
            total += 1.0 - target if value is None else max(0.0, value - target)
        else:
            total += target if value is None else max(0.0, target - value)
    return total


def above_chance_within_site(d: _Design) -> bool:
    """Whether the within-site AUC's 95% interval lies above 0.5: the design tells COVID-19 from other
    pneumonia at sites it never saw better than chance."""
    interval = d.row.get("within_site_auc_ci95")
    return bool(interval) and interval[0] > 0.5


def best_design(designs: list[_Design]) -> _Design | None:
    """The design to ship, by held-out figures only (never internal accuracy): among the designs that pass
    the within-site test above chance (all designs if none does), the smallest total shortfall from the
    validity targets, then the higher within-site AUC."""

    def key(d: _Design) -> tuple:
        figures = validity_figures(d)
        return (shortfall(figures), -(figures["within_site_auc"] or 0.0))

    measured = [d for d in designs if d.loso is not None and d.row.get("design") != "paper"]
    candidates = [d for d in measured if above_chance_within_site(d)] or measured
    return min(candidates, key=key) if candidates else None


def _validity_table(designs: list[_Design]) -> Table:
    """One row per design with every figure of the validity targets, each with its interval."""
    rows = []
    for d in designs:
        within = _with_ci(d.row.get("within_site_auc"), d.row.get("within_site_auc_ci95"), False)
        within += f", n={d.row['within_site_n']}" if d.row.get("within_site_n") else ""
        auc = _with_ci(d.pooled.get("covid_vs_rest_auc"), d.pooled.get("covid_vs_rest_auc_ci95"), False)
        called = []
        for source in ("nih", "kermany"):
            unit = _unit_of_source(d, source)
            called.append(
                "n/a"
                if unit is None
                else _rate_n(unit.get("other_called_covid"), unit.get("other_called_covid_ci95"), unit.get("n_other"))
            )
        share = d.row.get("gradcam_lung_share_covid_calls")
        lungs = "n/a" if share is None else f"{share:.2f} (n={d.row.get('gradcam_lung_share_covid_calls_n')})"
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


def _best_sentence(designs: list[_Design]) -> str:
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


def _loso_overview_table(designs: list[_Design], units: list[str]) -> Table:
    """One row per design: pooled held-out sensitivity, false-COVID share per held-out unit, pooled AUC."""
    rows = []
    for d in designs:
        if d.loso is None:
            rows.append([d.name, d.trained_on, d.description, "no loso.json", *["n/a"] * (len(units) + 1)])
            continue
        by_name = {str(u.get("unit")): u for u in d.units}
        cells = []
        for name in units:
            unit = by_name.get(name)
            if unit is None:
                cells.append("n/a (not a unit of this run)")
            elif unit.get("status") != "evaluated":
                cells.append("n/a (skipped)")
            else:
                cells.append(_unit_called(unit))
        auc = _with_ci(d.pooled.get("covid_vs_rest_auc"), d.pooled.get("covid_vs_rest_auc_ci95"), False)
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


def _loso_findings(designs: list[_Design], adult: list[str]) -> list[str]:
    """Which design called the fewest held-out adult non-COVID images COVID-19, and whether any met the bar."""
    named = ", ".join(adult) or "none"
    candidates = [(d, u) for d in designs for u in _adult_units(d, adult)]
    if not candidates:
        return [
            "No run has held-out non-COVID images from an adult source (sources whose non-COVID images of known "
            f"age are mostly adults: {named}), so the false-COVID rate on adult controls is not measured here."
        ]
    lowest = min(u["other_called_covid"] for _, u in candidates)
    best = [(d, u) for d, u in candidates if u["other_called_covid"] == lowest]
    described = "; ".join(
        f"{d.name} ({d.trained_on}; {d.description}) called {_unit_called(u)} of held-out {u.get('unit')} "
        f"COVID-19, with a held-out COVID-19 sensitivity of {_pooled_sensitivity(d)}"
        for d, u in best
    )
    findings = [
        "Lowest share of held-out adult non-COVID images called COVID-19 (sources whose non-COVID images of known "
        f"age are mostly adults: {named}): {described}."
    ]
    bar = (
        f"held-out COVID-19 sensitivity of at least {_pct(TARGET_HELD_OUT_SENSITIVITY)} while calling at most "
        f"{_pct(MAX_HELD_OUT_ADULT_CALLED_COVID)} of held-out adult non-COVID images ({named}) COVID-19 "
        "(point estimates)"
    )
    passed = [
        d.name
        for d in designs
        if _adult_units(d, adult)
        and not _missing(d.pooled.get("covid_sensitivity"))
        and d.pooled["covid_sensitivity"] >= TARGET_HELD_OUT_SENSITIVITY
        and all(u["other_called_covid"] <= MAX_HELD_OUT_ADULT_CALLED_COVID for u in _adult_units(d, adult))
    ]
    findings.append(
        f"Runs that kept a {bar}: {', '.join(passed)}."
        if passed
        else f"No run kept a {bar}: none of these designs separates COVID-19 from adult controls on sources it "
        "never trained on."
    )
    return findings


def _whole_class_units(designs: list[_Design]) -> list[str]:
    return [f"{unit} in {d.name}" for d in designs for unit in _units_with_every_covid(d.loso or {}, d.splits)]


def _designs_figure(out: Path, designs: list[_Design], adult: list[str]) -> list[Block]:
    """Held-out COVID-19 sensitivity against the share of held-out adult non-COVID images called COVID-19."""
    import matplotlib.pyplot as plt

    from covidxr.figures import save_with_disclaimer

    points = []
    for d in designs:
        sensitivity = d.pooled.get("covid_sensitivity")
        for u in _adult_units(d, adult):
            if not _missing(sensitivity):
                points.append((d, u, sensitivity))
    if not points:
        return [Text("No figure: no run has both a held-out COVID-19 sensitivity and held-out adult non-COVID images.")]

    def error(value: float, interval: object) -> list[float]:
        span = interval if _range(interval) else [value, value]
        return [value - span[0], span[1] - value]

    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_patch(
        plt.Rectangle(
            (0, TARGET_HELD_OUT_SENSITIVITY),
            MAX_HELD_OUT_ADULT_CALLED_COVID,
            1.05 - TARGET_HELD_OUT_SENSITIVITY,
            color="tab:green",
            alpha=0.12,
            label=f"the bar: sensitivity ≥ {_pct(TARGET_HELD_OUT_SENSITIVITY)}, adult non-COVID called "
            f"COVID-19 ≤ {_pct(MAX_HELD_OUT_ADULT_CALLED_COVID)}",
        )
    )
    for d, u, sensitivity in points:
        x = u["other_called_covid"]
        ax.errorbar(
            x,
            sensitivity,
            xerr=[[v] for v in error(x, u.get("other_called_covid_ci95"))],
            yerr=[[v] for v in error(sensitivity, d.pooled.get("covid_sensitivity_ci95"))],
            fmt="s" if d.row.get("design") == "paper" else "o",
            capsize=3,
            label=f"{d.name}: held-out {u.get('unit')}",
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


def _internal_table(designs: list[_Design]) -> Table:
    rows = []
    for d in designs:
        m = d.metrics or {}
        covid = m.get("covid_vs_rest") if isinstance(m.get("covid_vs_rest"), dict) else {}
        rows.append(
            [
                d.name,
                d.trained_on,
                _num(m.get("n")),
                _with_ci(m.get("accuracy"), m.get("accuracy_ci95")),
                _with_ci(covid.get("sensitivity"), covid.get("sensitivity_ci95")),
                _with_ci(covid.get("specificity"), covid.get("specificity_ci95")),
                _threshold(covid.get("threshold")),
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


def _audit_verdict_blocks(designs: list[_Design]) -> list[Block]:
    """Overall and per-check verdicts, one row per run, then each check's summary."""
    checks = list(AUDIT_CHECKS)
    for d in designs:
        for name in (d.audit or {}).get("checks") or {}:
            if name not in checks:
                checks.append(name)
    verdicts, summaries = [], []
    for d in designs:
        if d.audit is None:
            verdicts.append([d.name, "no audit.json", *["n/a"] * len(checks)])
            continue
        found = d.audit.get("checks") if isinstance(d.audit.get("checks"), dict) else {}
        found = {name: check for name, check in found.items() if isinstance(check, dict)}
        overall = str(d.audit.get("verdict") or "n/a")
        verdicts.append([d.name, overall, *(str(found.get(c, {}).get("verdict") or "n/a") for c in checks)])
        if d.audit.get("summary"):
            summaries.append([d.name, "overall", overall, str(d.audit["summary"])])
        summaries += [
            [d.name, _name(c), str(found[c].get("verdict") or "n/a"), str(found[c].get("summary") or "n/a")]
            for c in checks
            if c in found
        ]
    return [
        Table(["run", "overall", *(_name(c) for c in checks)], verdicts),
        Table(["run", "check", "verdict", "summary"], summaries),
    ]


def _split_by_source(info: dict) -> str:
    parts = []
    for part, sizes in (info.get("split_sizes") or {}).items():
        by_source = sizes.get("by_source") if isinstance(sizes, dict) else None
        if isinstance(by_source, dict):
            parts.append(f"{part}: " + ", ".join(f"{source} {_num(n)}" for source, n in by_source.items()))
    return "; ".join(parts) or "n/a"


def _made_blocks(out: Path, designs: list[_Design]) -> list[Block]:
    rows = []
    for d in designs:
        datasets = d.info.get("datasets") or ([d.info["data"]] if d.info.get("data") else [])
        rows.append(
            [
                d.name,
                str(d.row.get("design", "n/a")),
                "; ".join(str(x) for x in datasets) or "n/a",
                str((d.info.get("design") or {}).get("summary") or d.description),
                _split_by_source(d.info),
                str(d.info.get("feature_cache") or "n/a"),
                _num(d.row.get("wall_seconds")),
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
        *_config_blocks(out / "config.yaml"),
    ]


def _designs_limitations(designs: list[_Design]) -> list[str]:
    frames = [d.splits for d in designs if d.splits is not None]
    rows = pd.concat(frames).drop_duplicates("filename") if frames else pd.DataFrame(columns=["label", "source"])
    covid_sources = sorted(rows.loc[rows["label"] == "COVID-19", "source"].astype(str).unique())
    covid_units = sorted({str(u.get("unit")) for d in designs for u in d.units if (u.get("n_covid") or 0) > 0})
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
    mixed = sorted(
        {
            str(u.get("unit"))
            for d in designs
            for u in d.units
            if (u.get("n_covid") or 0) > 0 and (u.get("n_other") or 0) > 0
        }
    )
    notes.append(
        f"Held-out units with both COVID-19 and non-COVID images: {', '.join(mixed)}."
        if mixed
        else "No held-out unit has both COVID-19 and non-COVID images, so no unit has an AUC of its own: the "
        "COVID-19-versus-rest AUC pools units, each predicted by its own retrained model (or the run's own model for "
        "data it never trained on), and partly measures how the units differ rather than how one model ranks images."
    )
    pooled = sorted(
        {
            f"{u.get('unit')} ({_num(u.get('n'))} images)"
            for d in designs
            for u in d.units
            if "other sites" in str(u.get("unit"))
        }
    )
    if pooled:
        minimum = next((d.loso.get("min_unit_images") for d in designs if d.loso), None)
        notes.append(
            f"Sites with fewer than {_num(minimum)} images are held out together, so one result mixes several sites: "
            f"{'; '.join(pooled)}."
        )
    sources = set(rows["source"].astype(str)) | {s for d in designs for u in d.units for s in _unit_sources(u)}
    notes += [text for source, text in TEXT_MINED_LABELS.items() if source in sources]
    sizes = [
        u.get("n") for d in designs for u in d.units if u.get("status") == "evaluated" and not _missing(u.get("n"))
    ]
    if sizes:
        notes.append(
            f"The smallest evaluated held-out unit has {_plural(int(min(sizes)), 'image')}; Wilson intervals treat "
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
    designs = _read_designs(out)
    for d in designs:
        if d.metrics is not None:
            write_run_report(d.folder)
    adult = _adult_sources(designs)
    paper = next((d for d in designs if d.row.get("design") == "paper"), designs[0] if designs else None)
    confounded = (
        _scope_sentences(f"data of the {paper.name} run ({paper.row.get('datasets')})", paper.splits)
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
        loso_notes.append(_every_covid_note(whole))
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
        blocks.append(_loso_unit_table(d.loso) if d.loso else Text(f"No loso.json in {d.folder}."))
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
        by_source = (d.metrics or {}).get("by_source")
        blocks += [Heading(3, f"{d.name}: by source")]
        blocks.append(
            _by_source_table(by_source)
            if isinstance(by_source, dict)
            else Text("Not computed: no by_source in metrics.json.")
        )
    blocks += [
        Heading(2, "Shortcut audit"),
        *_audit_verdict_blocks(designs),
        Heading(2, "How each run was made"),
        *_made_blocks(out, designs),
        Heading(2, "Limitations"),
        Items(_designs_limitations(designs)),
    ]
    return _write(out, "covidxr designs report: the paper's design against deconfounded training", blocks)
