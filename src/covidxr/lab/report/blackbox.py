"""The black-box audit's report, ``audit.md`` and ``audit.html``, from what ``audit.json`` holds: the verdict
first, then every check with its rule beside its figures, then the data and the model, and the research-use
disclaimer. The figures are computed by ``covidxr.lab.blackbox``; this module only lays them out."""

from __future__ import annotations

from pathlib import Path

from covidxr.runtime.document import Block, Heading, Items, Table, Text, Verdict, render_html, render_markdown

__all__ = ["blackbox_blocks", "write_blackbox_report"]

CHECK_TITLES = {
    "per_source": "Per source, and the source probe within class",
    "transplant": "Transplants: does the answer follow the chest, or the periphery and look?",
    "lungs_hidden": "Lungs hidden",
    "lungs_only": "Lungs only",
    "periphery": "Corners, border and text masked",
    "acquisition": "Acquisition perturbations",
    "explanation": "Occlusion explanation: attribution inside the lungs",
    "calibration": "Calibration per source",
}


def _n(value: object, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: object) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _rate(rate: dict | None) -> str:
    if rate is None:
        return "n/a"
    low, high = rate["ci95"]
    return f"{_pct(rate['value'])} ({100 * low:.1f}–{100 * high:.1f}%), {rate['successes']}/{rate['n']}"


def _variant_rows(table: dict) -> list[list[str]]:
    return [
        [
            name,
            _pct(f["flip_rate"]),
            f"{f['flips']}/{f['answered_both']}",
            _n(f["accuracy"]),
            _n(f["balanced_accuracy"]),
            _n(f["balanced_accuracy_loss"]),
            f["verdict"],
        ]
        for name, f in table.items()
    ]


VARIANT_HEADER = ["variant", "flip rate", "flips", "accuracy", "balanced accuracy", "loss", "verdict"]


def _figures(name: str, figures: dict) -> list[Block]:
    """The figures of one check as tables (the raw numbers are all in audit.json)."""
    if name == "transplant":
        rows = [
            [
                region,
                _n(e["effect"], 3),
                "n/a" if e["ci95"] is None else f"{e['ci95'][0]:.3f} to {e['ci95'][1]:.3f}",
                str(e["n"]),
                e.get("verdict", "n/a"),
            ]
            for region, e in figures["effects"].items()
        ]
        return [Table(["region from the donor", "change of p(COVID-19)", "95% interval", "images", "verdict"], rows)]
    if name == "per_source":
        rows = [
            [
                source,
                str(t["n"]),
                ", ".join(f"{label} {count}" for label, count in t["per_label"].items()),
                _n(t["auc"], 3),
                _rate(t["sensitivity"]),
                _rate(t["specificity"]),
                _n(t["accuracy"]),
                _n(t["balanced_accuracy"]),
            ]
            for source, t in figures["sources"].items()
        ]
        blocks: list[Block] = [
            Table(
                [
                    "source",
                    "n",
                    "labels",
                    "AUC p(COVID-19)",
                    "sensitivity (95% CI)",
                    "specificity (95% CI)",
                    "accuracy",
                    "balanced accuracy",
                ],
                rows,
            )
        ]
        probes = figures["source_probe_within_class"]
        if probes:
            blocks.append(
                Table(
                    ["true class", "images per source", "probe balanced accuracy", "chance", "folds"],
                    [
                        [
                            label,
                            ", ".join(f"{s} {c}" for s, c in p["counts"].items()),
                            _n(p.get("balanced_accuracy")),
                            _n(p.get("chance")),
                            _n(p.get("folds")),
                        ]
                        for label, p in probes.items()
                    ],
                )
            )
        else:
            blocks.append(Text("Source probe: no class holds two sources with enough images."))
        return blocks
    if name in ("lungs_hidden", "lungs_only"):
        keys = [
            "balanced_accuracy_unchanged",
            "balanced_accuracy",
            "balanced_accuracy_loss",
            "accuracy",
            "flip_rate",
            "flips",
            "answered_both",
            "chance",
            "skill_retained",
            "lungs_found",
        ]
        return [Table(["figure", "value"], [[k.replace("_", " "), _n(figures[k])] for k in keys if k in figures])]
    if name == "periphery":
        geometry = figures["geometry"]
        return [
            Table(VARIANT_HEADER, _variant_rows(figures["masks"])),
            Text(
                f"Corners: squares of {geometry['corner_size']:.0%} of the shorter side; border: a band of "
                f"{geometry['border_band']:.0%}; text: {geometry['text']} (mean area "
                f"{_pct(geometry['text_mean_area_share'])}); fill: {geometry['fill']}."
            ),
        ]
    if name == "acquisition":
        settings = figures["settings"]
        return [
            Table(VARIANT_HEADER, _variant_rows(figures["perturbations"])),
            Text(
                f"Down-up: {settings['down_up']}; JPEG: {settings['jpeg']}; gamma: {settings['gamma']}; "
                f"contrast: {settings['contrast']}."
            ),
        ]
    if name == "explanation":
        return [
            Table(
                ["figure", "value"],
                [
                    ["method", figures["method"]],
                    ["images", str(figures["images"])],
                    ["images with an attribution", str(figures["images_with_attribution"])],
                    ["mean share inside the lungs", _pct(figures["mean_lung_share"])],
                    ["mean lung area", _pct(figures["mean_lung_area"])],
                    ["enrichment", _n(figures["enrichment"])],
                ],
            )
        ]
    if name == "calibration":
        return [
            Table(
                ["source", "n", "ECE", "Brier", "mean p(COVID-19)", "COVID-19 share", "judged"],
                [
                    [
                        source,
                        str(t["n"]),
                        _n(t["ece"], 3),
                        _n(t["brier"], 3),
                        _n(t["mean_p_covid"], 3),
                        _n(t["covid_share"], 3),
                        _n(t["judged"]),
                    ]
                    for source, t in figures["sources"].items()
                ],
            )
        ]
    return [Items([f"{key}: {value}" for key, value in figures.items()])]


def blackbox_blocks(audit: dict) -> list[Block]:
    """The report's blocks: the verdict, the disclaimer, each check (verdict, rule, summary, figures), the
    data and the model."""
    estimate = audit["estimate"]
    model, data = audit["model"], audit["data"]
    opening = [
        audit["verdict_line"],
        "Checks: " + ", ".join(f"{name} {check['verdict']}" for name, check in audit["checks"].items()) + ".",
        f"Estimated balanced accuracy on images free of the shortcut: {_n(estimate['value'])} (limited by "
        f"{estimate['limited_by'] or 'n/a'}; unchanged {_n(estimate['unchanged'])}). Estimator: "
        f"{estimate['estimator']}.",
        f"Model {model['name']} ({model['kind']}); {data['images']} images from "
        f"{len(data['per_source'])} source(s); scored as {audit['scored_as']}.",
    ]
    blocks: list[Block] = [Verdict(opening), Text(audit["disclaimer"], warning=True)]
    for name, check in audit["checks"].items():
        blocks += [
            Heading(2, f"{CHECK_TITLES.get(name, name)}: {check['verdict']}"),
            Text(check["summary"]),
            Text(f"Rule: {check['rule']}"),
            *_figures(name, check["figures"]),
        ]
    blocks += [
        Heading(2, "Data"),
        Table(
            ["source", "images audited"],
            [
                [source, ", ".join(f"{label} {n}" for label, n in counts.items())]
                for source, counts in data["per_source"].items()
            ],
        ),
        Items(
            [f"{f['folder']}: {f['images']} images" for f in data["folders"]]
            + [
                f"At most {data['limit_per_source']} images per source (stratified by label, seed {audit['seed']}).",
                f"Lungs found by the bundled segmenter in {data['lungs_found']} of {data['images']} images (the "
                "others use the central box).",
                f"{len(data['unanswered'])} images got no answer from the model (listed in audit.json).",
            ]
        ),
        Heading(2, "Model"),
        Items(
            [f"{key}: {value}" for key, value in model.items()]
            + [f"covidxr {audit['covidxr_version']}, {audit['date']}"]
        ),
        Heading(2, "Limits"),
        Items(
            [
                "A black-box audit sees only the model's answers: it finds shortcuts that these masks and "
                "perturbations remove, not every shortcut.",
                "Filled regions and perturbed images are themselves unlike the training images; a sound model can "
                "move on them a little, which the rules' margins allow for.",
                "The estimate of shortcut-free accuracy is an estimate from perturbed images of this data, not a "
                "measurement on another hospital's images.",
            ]
        ),
        Text(audit["disclaimer"], warning=True),
    ]
    return blocks


def write_blackbox_report(folder: Path, audit: dict) -> tuple[Path, Path]:
    """``audit.md`` and ``audit.html`` in ``folder``, from the same blocks."""
    from covidxr.runtime.storage import atomic_write

    blocks = blackbox_blocks(audit)
    title = f"Black-box shortcut audit: {audit['model']['name']}"
    md, page = Path(folder) / "audit.md", Path(folder) / "audit.html"
    atomic_write(md, render_markdown(title, blocks))
    atomic_write(page, render_html(title, blocks))
    return md, page
