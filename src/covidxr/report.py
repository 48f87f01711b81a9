"""Reports of a run or of a ``reproduce`` folder: ``report.md`` beside the PNGs, ``report.html`` self-contained.

Everything is read back from what the run left (metrics.json, run.json, config.yaml, splits.csv, figures)
and from the dataset itself, so the limitations describe the data that was used, not the data one expects.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from covidxr import DISCLAIMER
from covidxr.data import LABELS, SPLITS, load_dataset
from covidxr.errors import CovidxrError

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
# Columns whose values may coincide with the label: (column, noun, verb, the verb's part kept after
# the first clause, plural) -- "every A image comes from x and every B image from y".
CONFOUNDERS = (
    ("source", "source", "comes from", "from", "sources"),
    ("site", "site", "comes from", "from", "sites"),
    ("age_group", "age group", "is", "", "age groups"),
)
# A class/value overlap this small on both sides is reported as an exception rather than as mixing.
MINOR_SHARE = 0.05
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
.warning { border: 2px solid #b00; background: #fee; padding: .6rem 1rem; font-weight: bold; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #bbb; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #eee; }
figure { margin: 1rem 0; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #444; }
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
class Figure:
    anchor: str
    path: Path
    link: str  # relative to the report, for Markdown
    alt: str
    caption: str


Block = Heading | Text | Items | Table | Figure


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


def _metrics_blocks(metrics: dict) -> list[Block]:
    low, high = metrics.get("accuracy_ci95") or [None, None]
    summary = (
        f"Evaluated on {metrics.get('data')} ({metrics.get('split')} split): n = {metrics.get('n')}. "
        f"Accuracy {_pct(metrics.get('accuracy'))} (95% Wilson interval {_pct(low)} to {_pct(high)}), "
        f"{metrics.get('correct')} of {metrics.get('n')} correct. "
        f"Macro one-vs-rest AUC {_dec(metrics.get('macro_auc'))}."
    )
    per_class = [
        [
            label,
            str(m.get("n")),
            _pct(m.get("sensitivity")),
            _pct(m.get("specificity")),
            _pct(m.get("ppv")),
            _dec(m.get("f1")),
            _dec(m.get("auc")),
        ]
        for label, m in metrics.get("per_class", {}).items()
    ]
    confusion = metrics.get("confusion_matrix", {})
    labels = confusion.get("labels", [])
    matrix = [[label, *(str(v) for v in row)] for label, row in zip(labels, confusion.get("matrix", []), strict=True)]
    return [
        Text(summary),
        Table(["class", "n", "sensitivity", "specificity", "PPV", "F1", "AUC (one-vs-rest)"], per_class),
        Text("Confusion matrix (rows = truth, columns = prediction):"),
        Table(["truth \\ prediction", *labels], matrix),
    ]


def _paper_blocks(metrics: dict) -> list[Block]:
    model = metrics.get("model")
    rows = [
        [f"{row['paper_model']} (paper)", _pct(row["paper_accuracy"]), "not reported", str(row["paper_n"]), "by image"]
        for row in PAPER_RESULTS.values()
    ]
    same = PAPER_RESULTS.get(model, {}).get("paper_model")
    name = f"{model} (covidxr; the paper's {same} backbone)" if same else f"{model} (covidxr; not in the paper)"
    low, high = metrics.get("accuracy_ci95") or [None, None]
    data = Path(str(metrics.get("data"))).name
    drawn = f"every image of {data}" if metrics.get("split") == "all" else f"by patient ({metrics.get('split')} split)"
    rows.append([name, _pct(metrics.get("accuracy")), f"{_pct(low)} to {_pct(high)}", str(metrics.get("n")), drawn])
    return [
        Table(["model", "test accuracy", "95% CI (Wilson)", "n test", "test set"], rows),
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


def _explanation_blocks(metrics: dict) -> list[Block]:
    """Generic: one row per method with whatever numbers it has, flags and verdict last."""
    explanations = metrics.get("explanations")
    if not explanations:
        return [Text("Explanation checks: not computed.")]
    blocks: list[Block] = []
    geometry = explanations.get("geometry") or {}
    facts = [f"{_name(k)}: {_num(v)}" for k, v in explanations.items() if k not in {"methods", "geometry"}]
    facts += [f"geometry {_name(k)}: {_num(v)}" for k, v in geometry.items()]
    if facts:
        blocks.append(Items(facts))
    methods = {name: _flatten(values) for name, values in (explanations.get("methods") or {}).items()}
    columns = list(dict.fromkeys(key for values in methods.values() for key in values))
    columns = [c for c in columns if c not in {"flags", "verdict"}] + ["flags", "verdict"]
    rows = [[name, *(_num(values.get(c)) for c in columns)] for name, values in methods.items()]
    blocks.append(Table(["method", *columns], rows) if rows else Text("No explanation method was checked."))
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
    try:
        evaluated = load_dataset(metrics["data"]).frame
    except CovidxrError as exc:
        return [Text(f"Not computed: {exc}.")]
    name = Path(metrics["data"]).name
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
# The two reports
# ---------------------------------------------------------------------------------------------


def write_run_report(folder: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` for an evaluation output folder (by default the run folder)."""
    folder = Path(folder)
    metrics = _read_metrics(folder)
    run = _run_folder(folder, metrics)
    splits = _read_splits(run)
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Heading(2, "Run"),
        *_run_blocks(metrics, run),
        Heading(2, "Configuration"),
        *(_config_blocks(run / "config.yaml") if run else [Text("Missing: the run's config.yaml.")]),
        Heading(2, "Split"),
        _split_table(splits) if splits is not None else Text("Missing: the run's splits.csv."),
        Heading(2, "Metrics"),
        *_metrics_blocks(metrics),
        Heading(2, "Against the paper"),
        *_paper_blocks(metrics),
        Heading(2, "Figures"),
        *_figure_blocks(folder, folder, str(metrics.get("model"))),
        Heading(2, "Explanation checks"),
        *_explanation_blocks(metrics),
        Heading(2, "Limitations"),
        *_limitation_blocks(metrics, run),
    ]
    return _write(folder, f"covidxr report: {metrics.get('model')}", blocks)


def _results_table(rows: list[dict]) -> Table:
    cells = []
    for row in rows:
        paper = row.get("paper_accuracy")
        paper_cell = f"{_pct(paper)} (n={row.get('paper_n')})" if paper is not None else "not in the paper"
        trained = row.get("status") == "trained"
        ci = f"{_pct(row.get('accuracy_ci95_low'))} to {_pct(row.get('accuracy_ci95_high'))}"
        cells.append(
            [
                str(row.get("model")),
                str(row.get("paper_model")),
                paper_cell,
                _pct(row.get("accuracy")) if trained else "",
                ci if trained else "",
                f"{row.get('correct')} / {row.get('n_test')}" if trained else "",
                _dec(row.get("macro_auc")) if trained else "",
                _pct(row.get("covid_sensitivity")) if trained else "",
                "trained" if trained else "skipped (see Skipped models)",
            ]
        )
    header = [
        "model",
        "paper's name",
        "paper accuracy",
        "covidxr test accuracy",
        "95% CI (Wilson)",
        "correct / n",
        "macro AUC",
        "COVID-19 sensitivity",
        "status",
    ]
    return Table(header, cells)


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
    blocks: list[Block] = [
        Text(DISCLAIMER, warning=True),
        Heading(2, "Results against the paper"),
        _results_table(rows),
        Text(
            "The paper (Soares & Soares, 2020) tested on 75 images drawn at random from 375, so one patient could be "
            "in training and test; covidxr splits by patient, on different data. Rows marked (not in the paper) "
            "use a backbone the paper did not use and replicate no paper row."
        ),
        Heading(2, "Configuration"),
        *_config_blocks(folder / "config.yaml"),
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
        blocks += [
            Heading(2, model),
            Heading(3, "Metrics"),
            *_metrics_blocks(metrics[model]),
            Heading(3, "Figures"),
            *_figure_blocks(folder / model, folder, model, prefix=f"{model}-"),
            Heading(3, "Explanation checks"),
            *_explanation_blocks(metrics[model]),
        ]
    blocks.append(Heading(2, "Skipped models"))
    blocks.append(
        Items([f"{row.get('model')} ({row.get('paper_model')}): {row.get('reason')}" for row in skipped])
        if skipped
        else Text("None.")
    )
    return _write(folder, "covidxr reproduce report: Soares & Soares (2020) protocol", blocks)
