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

from covidxr.config import TrainConfig
from covidxr.data import load_dataset
from covidxr.errors import CovidxrError
from covidxr.evaluate import evaluate_run
from covidxr.models import PAPER_MODELS, get_spec, resolve_weights
from covidxr.report import PAPER_RESULTS, write_reproduce_report
from covidxr.train import train

DEFAULT_MODELS = (*PAPER_MODELS, "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def reproduce(
    data: str | Path,
    out: str | Path,
    models: tuple[str, ...] = DEFAULT_MODELS,
    config: TrainConfig | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train and evaluate each model on one shared patient-disjoint split; write results and the report."""
    config = config or TrainConfig()
    load_dataset(data, require_classes=2)  # fail on bad data before any model is trained
    for name in models:
        get_spec(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    rows = []
    for name in models:
        row = {"model": name, **PAPER_RESULTS.get(name, {"paper_model": "(not in the paper)"})}
        try:
            resolve_weights(get_spec(name), weights_dir=weights_dir)
        except CovidxrError as exc:
            rows.append({**row, "status": "skipped", "reason": str(exc)})
            print(f"skipped {name}: {exc}")
            continue
        run_dir = out / name
        started = time.perf_counter()
        if not (run_dir / "run.json").exists():
            train(
                data,
                run_dir,
                replace(config, model=name),
                weights_dir=weights_dir,
                cache_dir=cache_dir,
                progress=progress,
            )
        metrics = evaluate_run(run_dir, weights_dir=weights_dir, cache_dir=cache_dir, progress=progress)
        seconds = json.loads((run_dir / "run.json").read_text())["seconds"]
        rows.append(
            {
                **row,
                "status": "trained",
                "accuracy": metrics["accuracy"],
                "accuracy_ci95_low": metrics["accuracy_ci95"][0],
                "accuracy_ci95_high": metrics["accuracy_ci95"][1],
                "correct": metrics["correct"],
                "n_test": metrics["n"],
                "macro_auc": metrics["macro_auc"],
                "covid_sensitivity": metrics["per_class"].get("COVID-19", {}).get("sensitivity"),
                "feature_seconds": seconds["feature_extraction"],
                "train_seconds": seconds["training"],
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"{name}: test accuracy {metrics['accuracy']:.1%} ({metrics['correct']}/{metrics['n']})")
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    write_reproduce_report(out)
    return table
