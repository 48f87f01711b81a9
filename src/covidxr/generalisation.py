"""Leave-one-source-out: the closest thing to "a new hospital" that the data allows.

Internal test accuracy rewards shortcuts: a test split drawn from the same sources as training
shares their scanners, markers and patient ages. Here every hold-out unit (a hospital, or for
the many-site ieee8023 collection a publishing site) is removed from training altogether; the
run's protocol is retrained on the rest (same configuration, same train/validation patients,
calibrated on that validation split) and tested on every image of the held-out unit. Datasets
the run never trained on at all count as held-out units of the run's own model.

Reported per unit, with 95% Wilson intervals: COVID-19 sensitivity where the unit has COVID-19
images, the share of its non-COVID images called COVID-19 where it has those; pooled over units:
the same two rates and the COVID-19-versus-rest AUC (patient bootstrap), since no single unit here
has both kinds of image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from covidxr import DISCLAIMER
from covidxr.calibration import POSITIVE, softmax
from covidxr.data import LABELS, load_dataset
from covidxr.errors import CovidxrError
from covidxr.evaluate import called_covid_rates
from covidxr.features import AugmentedView, extract_features
from covidxr.inference import head_probabilities
from covidxr.loop import TensorSet, Trainee, fit
from covidxr.models import make_head
from covidxr.preprocess import AcquisitionAugment
from covidxr.train import Run, calibrate, load_run

MIN_UNIT_IMAGES = 25  # sites with fewer images are held out together, as "other sites"
BOOTSTRAP_REPLICATES = 1000


@dataclass(frozen=True)
class Unit:
    """One held-out group of images: a hospital, a publishing site, or the small sites together."""

    name: str
    source: str
    rows: np.ndarray  # boolean mask over the run's table


def holdout_units(frame: pd.DataFrame, min_images: int = MIN_UNIT_IMAGES) -> list[Unit]:
    """Every source with one site is one unit; a source with many sites (ieee8023) gives one unit per
    site with at least ``min_images`` images, and one unit of all its smaller sites together."""
    site = frame["site"].astype(str) if "site" in frame.columns else frame["source"].astype(str)
    site = site.where(site != "", frame["source"].astype(str))
    units = []
    for source in sorted(frame["source"].astype(str).unique()):
        in_source = (frame["source"].astype(str) == source).to_numpy()
        sites = site[in_source].value_counts()
        if len(sites) == 1:
            units.append(Unit(source, source, in_source))
            continue
        large = sorted(name for name, n in sites.items() if n >= min_images)
        for name in large:
            units.append(Unit(f"{source}: {name}", source, in_source & (site == name).to_numpy()))
        small = [name for name in sites.index if name not in large]
        if small:
            rows = in_source & site.isin(small).to_numpy()
            units.append(Unit(f"{source}: {len(small)} other sites", source, rows))
    return units


def _pooled_auc(truth: np.ndarray, score: np.ndarray, patients: np.ndarray, seed: int) -> dict:
    """COVID-19-versus-rest AUC over pooled held-out predictions, with a patient-bootstrap interval."""
    covid = truth == POSITIVE
    if covid.all() or not covid.any():
        return {"auc": None, "auc_ci95": None}
    rng = np.random.default_rng(seed)
    codes, members = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(members == i) for i in range(len(codes))]
    draws = []
    for _ in range(BOOTSTRAP_REPLICATES):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(codes), len(codes))])
        if 0 < covid[rows].sum() < len(rows):
            draws.append(roc_auc_score(covid[rows], score[rows]))
    interval = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else None
    return {"auc": float(roc_auc_score(covid, score)), "auc_ci95": interval}


def _train_without(run: Run, frame: pd.DataFrame, features: np.ndarray, keep: np.ndarray, cache_dir, progress):
    """The run's protocol retrained on its own train/validation rows outside the held-out unit."""
    config = run.config
    torch.manual_seed(config.seed)
    head = make_head(run.model.spec.num_features, len(LABELS), config.hidden_units, config.dropout)
    rows = {part: keep & (frame["split"] == part).to_numpy() for part in ("train", "val")}
    targets = {part: torch.tensor([LABELS.index(v) for v in frame.loc[r, "label"]]) for part, r in rows.items()}
    domain_names = sorted(frame.loc[rows["train"], config.domain_column].astype(str).unique())
    domains = {
        part: torch.tensor([domain_names.index(v) for v in frame.loc[r, config.domain_column].astype(str)])
        if config.adversarial_weight
        else None
        for part, r in rows.items()
    }
    views = None
    if config.augment and config.augment_views:
        paths = [Path(run.info["data"]) / f for f in frame.loc[rows["train"], "filename"]]
        augment = AcquisitionAugment()
        views = torch.from_numpy(
            np.stack(
                [
                    extract_features(run.model, paths, cache_dir, config.extract_batch_size, progress=progress, view=v)
                    for v in (AugmentedView(augment, config.seed, k) for k in range(1, config.augment_views + 1))
                ]
            )
        )
    train_set = TensorSet(
        torch.from_numpy(features[rows["train"]]), targets["train"], domains["train"], views, config.seed
    )
    val_set = TensorSet(torch.from_numpy(features[rows["val"]]), targets["val"], domains["val"])
    weight = config.adversarial_weight if len(domain_names) > 1 else 0.0
    fit(
        Trainee(head, None, len(domain_names), weight, len(LABELS), config.seed),
        train_set,
        val_set,
        config,
        progress=False,
    )
    return head, calibrate(head, val_set.choices[0], targets["val"])["temperature"]


def leave_one_source_out(
    run: str | Path | Run,
    external: Sequence[str | Path] = (),
    cache_dir: str | Path | None = None,
    progress: bool = False,
    min_images: int = MIN_UNIT_IMAGES,
) -> dict:
    """Hold out every unit of the run's data in turn (retraining without it), plus every ``external``
    dataset as a whole (the run's own model); write ``loso.json`` and ``loso_predictions.csv``."""
    run = run if isinstance(run, Run) else load_run(run)
    if run.config.trains_on_images:
        raise CovidxrError(
            f"{run.path}: leave-one-source-out retrains the run once per held-out source, which needs cached "
            "features; this run fine-tunes or augments afresh every epoch (too slow to repeat here)"
        )
    frame = run.splits().reset_index(drop=True)
    root = Path(run.info["data"])
    extraction = (cache_dir, run.config.extract_batch_size, run.config.num_workers)
    features = extract_features(run.model, [root / f for f in frame["filename"]], *extraction, progress)
    records, predictions = [], []
    for unit in holdout_units(frame, min_images):
        keep = ~unit.rows
        present = set(frame.loc[keep & (frame["split"] == "train").to_numpy(), "label"])
        unseen = sorted(set(frame.loc[unit.rows, "label"]) - present)
        record = {"unit": unit.name, "source": unit.source, "kind": "retrained without it", "n": int(unit.rows.sum())}
        if len(present) < 2 or unseen:
            reason = (
                f"without it the training split has only {sorted(present)}: nothing to learn a distinction from"
                if len(present) < 2
                else f"without it the training split has no {', '.join(unseen)} image: a wrong answer by construction"
            )
            records.append({**record, "status": "skipped", "reason": reason})
            continue
        head, temperature = _train_without(run, frame, features, keep, cache_dir, progress)
        with torch.no_grad():
            probabilities = softmax(head(torch.from_numpy(features[unit.rows])).double().numpy(), temperature)
        held = frame[unit.rows]
        predicted = [LABELS[k] for k in probabilities.argmax(1)]
        records.append({**record, "status": "evaluated", **called_covid_rates(held["label"], predicted)})
        predictions.append(_prediction_rows(held, probabilities, unit.name))
        if progress:
            print(f"  held out {unit.name}: {records[-1]['n']} images")
    for folder in external:
        dataset = load_dataset(folder)
        external_features = extract_features(run.model, dataset.paths(), *extraction, progress)
        probabilities = head_probabilities(run.model, external_features, run.temperature)
        predicted = [LABELS[k] for k in probabilities.argmax(1)]
        name = f"{dataset.name} (external)"
        records.append(
            {
                "unit": name,
                "source": ", ".join(sorted(dataset.frame["source"].astype(str).unique())),
                "kind": "never in this run's data",
                "n": len(dataset.frame),
                "status": "evaluated",
                **called_covid_rates(dataset.frame["label"], predicted),
            }
        )
        predictions.append(_prediction_rows(dataset.frame, probabilities, name))
    pooled_rows = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    result = {
        "run": str(run.path.resolve()),
        "model": run.config.model,
        "design": run.info.get("design", {}).get("summary", "the paper's protocol"),
        "min_unit_images": min_images,
        "units": records,
        "pooled": _pooled(pooled_rows, run.config.seed),
        "disclaimer": DISCLAIMER,
    }
    pooled_rows.to_csv(run.path / "loso_predictions.csv", index=False)
    (run.path / "loso.json").write_text(json.dumps(result, indent=2))
    return result


def _prediction_rows(frame: pd.DataFrame, probabilities: np.ndarray, unit: str) -> pd.DataFrame:
    rows = frame[["filename", "label", "patient_id", "source"]].copy()
    rows["patient_id"] = unit + "/" + rows["patient_id"].astype(str)  # units never share a patient
    rows.insert(0, "unit", unit)
    rows["predicted"] = [LABELS[k] for k in probabilities.argmax(1)]
    for k, label in enumerate(LABELS):
        rows[f"p_{label}"] = probabilities[:, k]
    return rows


def _pooled(rows: pd.DataFrame, seed: int) -> dict:
    """Rates over every held-out prediction; each image was predicted by a model that never saw its unit."""
    if rows.empty:
        return {"n": 0}
    truth = rows["label"].to_numpy()
    pooled = called_covid_rates(truth, rows["predicted"].to_numpy())
    auc = _pooled_auc(truth, rows[f"p_{POSITIVE}"].to_numpy(), rows["patient_id"].astype(str).to_numpy(), seed)
    return {**pooled, "covid_vs_rest_auc": auc["auc"], "covid_vs_rest_auc_ci95": auc["auc_ci95"]}
