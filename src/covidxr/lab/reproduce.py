"""``reproduce``: the preprint's protocol for every backbone whose weights can be had, beside its numbers.

Backbones without weights are skipped with the reason; backbones the paper did not use
(EfficientNet-Lite) are labelled as such so the table is never empty and never misleading.
Finished models are reused when the command is run again on the same output folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from covidxr.lab.audit import run_audit
from covidxr.lab.data import load_dataset
from covidxr.lab.evaluate import evaluate_run, external_folder
from covidxr.lab.generalisation import MIN_UNIT_IMAGES, leave_one_source_out
from covidxr.lab.models import PAPER_MODELS, get_spec, resolve_weights
from covidxr.lab.report import PAPER_RESULTS, write_designs_report, write_reproduce_report, write_run_report
from covidxr.lab.train import train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Audit, CovidVsRest, DesignRow, Loso, Metrics, PooledRates
from covidxr.runtime.runs import load_run

__all__ = ["DEFAULT_MODELS", "DESIGN_VARIANTS", "reproduce", "reproduce_designs", "seed_spread"]

DEFAULT_MODELS = (*PAPER_MODELS, "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

logger = logging.getLogger(__name__)


def _summary_row(metrics: dict, run_dir: Path) -> dict:
    seconds = json.loads((run_dir / "run.json").read_text())["seconds"]
    return {
        "accuracy": metrics["accuracy"],
        "accuracy_ci95_low": metrics["accuracy_ci95"][0],
        "accuracy_ci95_high": metrics["accuracy_ci95"][1],
        "correct": metrics["correct"],
        "n_test": metrics["n"],
        "macro_auc": metrics["macro_auc"],
        "covid_sensitivity": metrics["per_class"].get("COVID-19", {}).get("sensitivity"),
        "feature_seconds": seconds.get("feature_extraction"),
        "train_seconds": seconds["training"],
    }


def seed_spread(per_seed: pd.DataFrame, paper_accuracy: float | None) -> dict:
    """Mean, standard deviation and range over seeds, and where the paper's single number falls."""
    spread: dict = {"seeds": " ".join(str(int(s)) for s in per_seed["seed"])}
    for column in ("accuracy", "macro_auc", "covid_sensitivity"):
        values = per_seed[column].dropna().astype(float)
        spread[f"{column}_mean"] = float(values.mean()) if len(values) else None
        spread[f"{column}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
        spread[f"{column}_min"] = float(values.min()) if len(values) else None
        spread[f"{column}_max"] = float(values.max()) if len(values) else None
    if paper_accuracy is not None and spread["accuracy_sd"]:
        spread["paper_accuracy_z"] = (paper_accuracy - spread["accuracy_mean"]) / spread["accuracy_sd"]
    return spread


def reproduce(
    data: str | Path,
    out: str | Path,
    models: tuple[str, ...] = DEFAULT_MODELS,
    config: TrainConfig | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    seeds: tuple[int, ...] | None = None,
    audit: bool = True,
    external: Sequence[str | Path] = (),
) -> list[dict]:
    """Train and evaluate each model per seed (split and training both follow the seed); write results and report.

    Each first-seed run is also evaluated on every ``external`` dataset it never saw (into
    ``<run>/external/<name>/``, reused when there), so the report's bottom line has a number for it.

    The first seed's run is ``out/<model>`` (evaluated with explanations and every figure); further
    seeds are ``out/<model>-seed<N>``. With several seeds each model's row carries the spread. With
    ``audit`` the first seed's run also gets the shortcut audit (``audit.json``, in both reports).
    """
    config = config or TrainConfig()
    seeds = seeds or (config.seed,)
    load_dataset(data, require_classes=2)  # fail on bad data before any model is trained
    for folder in external:
        load_dataset(folder, require_classes=1)
    for name in models:
        get_spec(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    rows, per_seed_rows = [], []
    for name in models:
        row = {"model": name, **PAPER_RESULTS.get(name, {"paper_model": "(not in the paper)"})}
        try:
            resolve_weights(get_spec(name), weights_dir=weights_dir)
        except CovidxrError as exc:
            rows.append({**row, "status": "skipped", "reason": str(exc)})
            logger.info(f"skipped {name}: {exc}")
            continue
        started = time.perf_counter()
        for seed in seeds:
            run_dir = out / name if seed == seeds[0] else out / f"{name}-seed{seed}"
            if not (run_dir / "run.json").exists():
                train(
                    data,
                    run_dir,
                    replace(config, model=name, seed=seed),
                    weights_dir=weights_dir,
                    cache_dir=cache_dir,
                    progress=progress,
                )
            first_seed = seed == seeds[0]
            metrics = evaluate_run(
                run_dir, weights_dir=weights_dir, cache_dir=cache_dir, progress=progress, explain=first_seed
            )
            if first_seed:
                _evaluate_external(run_dir, external, weights_dir, cache_dir, progress)
            if first_seed and audit:
                run_audit(run_dir, cache_dir=cache_dir, progress=progress, seed=seed)
                write_run_report(run_dir)
            per_seed_rows.append({"model": name, "seed": seed, "run": run_dir.name, **_summary_row(metrics, run_dir)})
            logger.info(
                f"{name} seed {seed}: test accuracy {metrics['accuracy']:.1%} ({metrics['correct']}/{metrics['n']})"
            )
        mine = [r for r in per_seed_rows if r["model"] == name]
        first = {k: v for k, v in mine[0].items() if k not in {"model", "seed", "run"}}
        row = {**row, "status": "trained", **first}
        if len(seeds) > 1:
            row.update(seed_spread(pd.DataFrame(mine), row.get("paper_accuracy")))
        rows.append({**row, "wall_seconds": round(time.perf_counter() - started, 1)})
    if per_seed_rows:
        pd.DataFrame(per_seed_rows).to_csv(out / "seeds.csv", index=False)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    write_reproduce_report(out)
    return rows


def _evaluate_external(run_dir: Path, external: Sequence[str | Path], weights_dir, cache_dir, progress: bool) -> None:
    """Evaluate a run on each dataset it never saw, once (a finished evaluation is reused)."""
    for folder in external:
        if not (external_folder(run_dir, folder) / "metrics.json").is_file():
            metrics = evaluate_run(
                run_dir, data=folder, weights_dir=weights_dir, cache_dir=cache_dir, progress=progress, explain=False
            )
            logger.info(f"{run_dir.name} on {Path(folder).name} (never seen): accuracy {metrics['accuracy']:.1%}")


# ---------------------------------------------------------------------------------------------
# Designs: the paper's, and the deconfounded one with each shortcut-resistant choice
# ---------------------------------------------------------------------------------------------

# Fine-tuning as the designs run it: the last two backbone blocks on the cached front, two cached augmented
# views per training image, bf16 autocast where the CPU/GPU has it. At 160 px and at most 5 epochs (batch 32)
# so that leave-one-source-out, one retraining per held-out unit, fits in hours on 2 CPU cores.
FINE_TUNING = {
    "unfreeze_blocks": 2,
    "cache_front": True,
    "augment": True,
    "augment_views": 2,
    "precision": "auto",
    "image_size": 160,
    "batch_size": 32,
    "epochs": 5,
    "early_stopping_patience": 2,
}

# Each deconfounded variant trains on every --data folder with these changes to the configuration.
DESIGN_VARIANTS: dict[str, dict] = {
    "none": {},
    "clahe": {"intensity": "clahe"},
    "zscore": {"intensity": "zscore"},
    "resolution": {"effective_resolution": 192},
    "thorax": {"crop_thorax": True},
    "mask": {"mask_text": True},
    "augment": {"augment": True, "augment_views": 3},
    "adversarial": {"adversarial_weight": 0.5},
    # Issue 17: the validity designs. z-score is the bundled model's preprocessing, kept in all of them.
    "zscore-without-other": {"intensity": "zscore"},
    "balanced": {"intensity": "zscore", "group_balanced_sampling": True},
    "staged": {"intensity": "zscore", "decision": "staged"},
    "staged-balanced": {"intensity": "zscore", "decision": "staged", "group_balanced_sampling": True},
    "lungs-crop": {"intensity": "zscore", "lungs": "crop"},
    "lungs-mask": {"intensity": "zscore", "lungs": "mask"},
    "staged-lungs": {"intensity": "zscore", "lungs": "crop", "decision": "staged", "group_balanced_sampling": True},
    # Fine-tuning the last two blocks on lung crops, with cached acquisition-augmented views (bf16 autocast).
    "finetune-lungs": {"intensity": "zscore", "lungs": "crop", **FINE_TUNING},
    "finetune-staged-lungs": {
        "intensity": "zscore",
        "lungs": "crop",
        "decision": "staged",
        "group_balanced_sampling": True,
        **FINE_TUNING,
    },
    "combined": {
        "intensity": "clahe",
        "effective_resolution": 192,
        "crop_thorax": True,
        "mask_text": True,
        "augment": True,
        "augment_views": 3,
        "adversarial_weight": 0.5,
    },
}


# Fine-tuned designs retrain (on a CPU, minutes each) only for the units the validity targets name: NIH,
# Kermany and the three sites of the within-site test; the other ieee8023 sites are recorded as not run.
FINE_TUNED_UNITS = ("kermany", "nih", "ieee8023: radiopaedia.org", "ieee8023: eurorad.org", "ieee8023: pubs.rsna.org")

# Dataset folders (by name) a variant does not train on; they are held out whole instead, and still
# give the within-site test its other-pneumonia images. "zscore-without-other" is the bundled model's
# design before the same-site controls existed.
HELD_BACK: dict[str, tuple[str, ...]] = {"zscore-without-other": ("ieee8023-other",)}


def _design_row(run_dir: Path, design: str, variant: str, wall_seconds: float) -> DesignRow:
    """One line of the designs table: internal numbers, audit verdicts and leave-one-source-out figures."""
    info = load_run(run_dir).info
    metrics = Metrics.load(run_dir / "metrics.json")
    audit = Audit.load(run_dir / "audit.json")
    loso = Loso.load(run_dir / "loso.json")
    covid = metrics.covid_vs_rest or CovidVsRest()
    pooled = loso.pooled or PooledRates()
    gradcam = (metrics.explanations or {}).get("methods", {}).get("gradcam", {})
    lungs = gradcam.get("lungs") or {}
    row = {
        "design": design,
        "variant": variant,
        "run": run_dir.name,
        "description": info.design_summary,
        "datasets": " + ".join(Path(d).name for d in info.datasets),
        "within_site_auc": loso.within_site_auc,
        "within_site_auc_ci95": loso.within_site_auc_ci95,
        "within_site_n": None if loso.within_site is None else loso.within_site.pooled.n,
        "gradcam_lung_share_covid_calls": lungs.get("covid_calls_share"),
        "gradcam_lung_share_covid_calls_n": lungs.get("covid_calls_n"),
        "gradcam_lung_share": lungs.get("share"),
        "lungs_uniform_share": lungs.get("uniform_share"),
        "internal_accuracy": metrics.accuracy,
        "internal_accuracy_ci95": metrics.accuracy_ci95,
        "internal_n": metrics.n,
        "internal_covid_sensitivity": covid.sensitivity,
        "internal_covid_sensitivity_ci95": covid.sensitivity_ci95,
        "internal_covid_specificity": covid.specificity,
        "internal_covid_specificity_ci95": covid.specificity_ci95,
        "audit_verdict": audit.verdict,
        **{f"audit_{name}": check.verdict for name, check in audit.checks.items()},
        "loso_covid_sensitivity": pooled.covid_sensitivity,
        "loso_covid_sensitivity_ci95": pooled.covid_sensitivity_ci95,
        "loso_covid_n": pooled.n_covid,
        "loso_auc": pooled.covid_vs_rest_auc,
        "loso_auc_ci95": pooled.covid_vs_rest_auc_ci95,
    }
    for unit in loso.units:
        if unit.status == "evaluated" and unit.other_called_covid is not None:
            row[f"loso_called_covid[{unit.unit}]"] = unit.other_called_covid
            row[f"loso_called_covid[{unit.unit}]_ci95"] = unit.other_called_covid_ci95
            row[f"loso_called_covid[{unit.unit}]_n"] = unit.n_other
    return DesignRow.new({**row, "wall_seconds": wall_seconds})


def _finish_run(
    run_dir: Path,
    external: list[Path],
    weights_dir,
    cache_dir,
    progress: bool,
    seed: int,
    explain: bool,
    min_unit_images: int = MIN_UNIT_IMAGES,
) -> None:
    """Evaluate, audit and hold out sources for a trained run; steps already done are not redone."""
    if not (run_dir / "metrics.json").exists():
        evaluate_run(run_dir, weights_dir=weights_dir, cache_dir=cache_dir, progress=progress, explain=explain)
    if not (run_dir / "audit.json").exists():
        run_audit(run_dir, cache_dir=cache_dir, progress=progress, seed=seed)
    if not (run_dir / "loso.json").exists():
        only = FINE_TUNED_UNITS if TrainConfig.load(run_dir / "config.yaml").unfreeze_blocks else None
        leave_one_source_out(run_dir, external, cache_dir, progress, min_unit_images, only)
    write_run_report(run_dir)


def reproduce_designs(
    data: Sequence[str | Path],
    out: str | Path,
    model: str = "efficientnet_lite0",
    config: TrainConfig | None = None,
    variants: Sequence[str] = tuple(DESIGN_VARIANTS),
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    min_unit_images: int = MIN_UNIT_IMAGES,
) -> list[dict]:
    """The paper's design (first dataset only) beside the deconfounded one (every dataset) for each
    preprocessing variant, each with its test metrics, shortcut audit and leave-one-source-out figures.

    Writes ``out/paper``, ``out/deconfounded-<variant>``, ``designs.csv``/``designs.json`` and the report.
    Finished steps are reused when the command is run again on the same folder.
    """
    data = [Path(d) for d in data]
    if len(data) < 2:
        raise CovidxrError("--design deconfounded needs at least two --data folders (e.g. cxr3 and adult-controls)")
    unknown = [v for v in variants if v not in DESIGN_VARIANTS]
    if unknown:
        raise CovidxrError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(DESIGN_VARIANTS)}")
    for folder in data:
        load_dataset(folder, require_classes=1)  # fail on bad data before any model is trained
    config = replace(config or TrainConfig(), model=model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    plan = [("paper", "paper", [data[0]], config, data[1:])]
    plan += [
        (
            "deconfounded",
            name,
            [d for d in data if d.name not in HELD_BACK.get(name, ())],
            TrainConfig.from_dict(config.to_dict() | DESIGN_VARIANTS[name]),
            [d for d in data if d.name in HELD_BACK.get(name, ())],
        )
        for name in variants
    ]
    for _, variant, _, run_config, _ in plan:
        if run_config.trains_on_images:  # leave-one-source-out retrains on cached features only
            raise CovidxrError(f"variant {variant}: fine-tuning or fresh augmentation cannot be compared here")
    rows = []
    for design, variant, folders, run_config, external in plan:
        run_dir = out / (design if design == "paper" else f"deconfounded-{variant}")
        started = time.perf_counter()
        if (run_dir / "run.json").exists() and TrainConfig.load(run_dir / "config.yaml") != run_config:
            raise CovidxrError(f"{run_dir}: holds a run of another configuration; choose a new --out folder")
        if not (run_dir / "run.json").exists():
            train(folders, run_dir, run_config, weights_dir=weights_dir, cache_dir=cache_dir, progress=progress)
        # Grad-CAM and its checks for every design: where the maps fall (the lungs or not) is one of its figures.
        _finish_run(run_dir, external, weights_dir, cache_dir, progress, run_config.seed, True, min_unit_images)
        rows.append(_design_row(run_dir, design, variant, round(time.perf_counter() - started, 1)).to_dict())
        row = rows[-1]
        logger.info(
            f"{run_dir.name}: internal accuracy {row['internal_accuracy']:.1%}, audit {row['audit_verdict']}, "
            f"held-out COVID-19 sensitivity {_share(row['loso_covid_sensitivity'])}"
        )
    pd.DataFrame(rows).to_csv(out / "designs.csv", index=False)
    (out / "designs.json").write_text(json.dumps(rows, indent=2))
    write_designs_report(out)
    return rows


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
