"""``reproduce``: the preprint's protocol for every backbone whose weights can be had, beside its numbers.

Backbones without weights are skipped with the reason; backbones the paper did not use
(EfficientNet-Lite) are labelled as such so the table is never empty and never misleading.
Finished models are reused when the command is run again on the same output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from covidxr.audit import run_audit
from covidxr.config import TrainConfig
from covidxr.data import load_dataset
from covidxr.errors import CovidxrError
from covidxr.evaluate import evaluate_run
from covidxr.models import PAPER_MODELS, get_spec, resolve_weights
from covidxr.report import PAPER_RESULTS, write_reproduce_report, write_run_report
from covidxr.train import train

DEFAULT_MODELS = (*PAPER_MODELS, "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


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
        "feature_seconds": seconds["feature_extraction"],
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
) -> list[dict]:
    """Train and evaluate each model per seed (split and training both follow the seed); write results and report.

    The first seed's run is ``out/<model>`` (evaluated with explanations and every figure); further
    seeds are ``out/<model>-seed<N>``. With several seeds each model's row carries the spread. With
    ``audit`` the first seed's run also gets the shortcut audit (``audit.json``, in both reports).
    """
    config = config or TrainConfig()
    seeds = seeds or (config.seed,)
    load_dataset(data, require_classes=2)  # fail on bad data before any model is trained
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
            print(f"skipped {name}: {exc}")
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
            if first_seed and audit:
                run_audit(run_dir, cache_dir=cache_dir, progress=progress, seed=seed)
                write_run_report(run_dir)
            per_seed_rows.append({"model": name, "seed": seed, "run": run_dir.name, **_summary_row(metrics, run_dir)})
            print(f"{name} seed {seed}: test accuracy {metrics['accuracy']:.1%} ({metrics['correct']}/{metrics['n']})")
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
