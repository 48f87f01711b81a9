"""Leave-one-source-out: the closest thing to "a new hospital" that the data allows.

Internal test accuracy rewards shortcuts: a test split drawn from the same sources as training
shares their scanners, markers and patient ages. Here every hold-out unit (a hospital, or for
the many-site ieee8023 collection a publishing site) is removed from training altogether; the
run's protocol is retrained on the rest (same configuration, same train/validation patients,
calibrated on that validation split) and tested on every image of the held-out unit. Datasets
the run never trained on at all count as held-out units of the run's own model.

Reported per unit, with 95% Wilson intervals: COVID-19 sensitivity where the unit has COVID-19
images, the share of its non-COVID images called COVID-19 where it has those; pooled over units:
the same two rates and the COVID-19-versus-rest AUC (patient bootstrap).

Pooled over units, "which collection is this" still helps: a unit with only COVID-19 images and one
with only controls differ in source as well as disease. ``within_site`` is the test the source cannot
pass: inside a site that published both COVID-19 and other pneumonia, held out, how well does
p(COVID-19) rank them (``within_site_auc`` in ``loso.json``)?
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidxr import DISCLAIMER
from covidxr.lab.data import load_dataset
from covidxr.lab.features import AugmentedView, extract_features
from covidxr.lab.front import FrontSplit, front_maps, split_model
from covidxr.lab.labels import LABELS
from covidxr.lab.loop import TensorSet, Trainee, decision_teachers, fit
from covidxr.lab.metrics import auc_or_none, called_covid_rates, patient_bootstrap
from covidxr.lab.models import CovidxrNet, head_probabilities, make_head, model_from_config, run_model
from covidxr.lab.train import cached_views, calibrate
from covidxr.runtime.calibration import POSITIVE, softmax
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import Loso
from covidxr.runtime.runs import Run, load_run

__all__ = ["MIN_UNIT_IMAGES", "Unit", "WITHIN_SITE_PREDICTIONS", "holdout_units", "leave_one_source_out", "within_site"]

MIN_UNIT_IMAGES = 25  # sites with fewer images are held out together, as "other sites"
MIN_WITHIN_SITE_IMAGES = 10  # COVID-19 and other-pneumonia images a site needs for the within-site test
OTHER_PNEUMONIA = "PNEUMONIA"
WITHIN_SITE_PREDICTIONS = "within_site_predictions.csv"

logger = logging.getLogger(__name__)


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
    intervals = patient_bootstrap(lambda rows: {"auc": auc_or_none(covid[rows], score[rows])}, patients, seed)
    return {"auc": auc_or_none(covid, score), "auc_ci95": intervals.get("auc")}


@dataclass
class _Retraining:
    """What the run's protocol is retrained from: its cached pooled features, or, for a run that
    fine-tuned its last blocks on a cached front (``cache_front``), the front's maps; each retraining
    then starts again from the pretrained blocks of ``base``."""

    run: Run
    cache_dir: str | Path | None
    progress: bool
    base: CovidxrNet | None = None
    split: FrontSplit | None = None

    @classmethod
    def of(cls, run: Run, cache_dir, progress: bool) -> _Retraining:
        if not run.config.cache_front:
            return cls(run, cache_dir, progress)
        base = model_from_config(run.config)
        return cls(run, cache_dir, progress, base, split_model(base, run.config.unfreeze_blocks))

    def inputs(self, paths: Sequence[Path], view: AugmentedView | None = None) -> torch.Tensor:
        config = self.run.config
        if self.split is not None:
            return front_maps(self.base, self.split, paths, config.extract_batch_size, config.num_workers, view)
        extraction = (self.cache_dir, config.extract_batch_size, config.num_workers, self.progress)
        engine = self.run.config.feature_engine
        return torch.tensor(extract_features(run_model(self.run), paths, *extraction, view=view, engine=engine))

    def train_without(self, frame: pd.DataFrame, inputs: torch.Tensor, keep: np.ndarray):
        """The run's protocol retrained on its own train/validation rows outside the held-out unit:
        returns the model (inputs -> logits) and its validation-fitted temperature."""
        config = self.run.config
        torch.manual_seed(config.seed)
        head = make_head(
            run_model(self.run).spec.num_features, len(LABELS), config.hidden_units, config.dropout, config.decision
        )
        rows = {part: keep & (frame["split"] == part).to_numpy() for part in ("train", "val")}
        targets = {part: torch.tensor([LABELS.index(v) for v in frame.loc[r, "label"]]) for part, r in rows.items()}
        domain_names = sorted(frame.loc[rows["train"], config.domain_column].astype(str).unique())
        # A validation domain absent from training (possible once a unit is removed) teaches nothing.
        domains = {
            part: torch.tensor(
                [
                    domain_names.index(v) if v in domain_names else len(domain_names)
                    for v in frame.loc[r, config.domain_column].astype(str)
                ]
            )
            for part, r in rows.items()
        }
        train_paths = [Path(self.run.info.data) / f for f in frame.loc[rows["train"], "filename"]]
        views = [self.inputs(train_paths, view) for view in cached_views(config)]
        train_set = TensorSet(
            inputs[rows["train"]],
            targets["train"],
            domains["train"],
            torch.stack(views) if views else None,
            config.seed,
        )
        val_set = TensorSet(inputs[rows["val"]], targets["val"], domains["val"])
        weight = config.adversarial_weight if len(domain_names) > 1 else 0.0
        teaches = None
        if config.decision == "staged":
            teaches = decision_teachers(targets["train"], domains["train"], len(domain_names) + 1)
        encoder = None if self.split is None else nn.Sequential(self.split.fresh_tail(), self.base.pool)
        trainee = Trainee(head, encoder, len(domain_names), weight, len(LABELS), config.seed, teaches)
        tail_parameters = [] if encoder is None else list(encoder.parameters())
        fit(trainee, train_set, val_set, config, backbone_parameters=tail_parameters, progress=False)
        model = head if encoder is None else nn.Sequential(encoder, head).eval()
        with torch.no_grad():
            pooled = val_set.choices[0] if encoder is None else encoder.eval()(val_set.choices[0])
        return model, calibrate(head, pooled, targets["val"])["temperature"]


def leave_one_source_out(
    run: str | Path | Run,
    external: Sequence[str | Path] = (),
    cache_dir: str | Path | None = None,
    progress: bool = False,
    min_images: int = MIN_UNIT_IMAGES,
    only: Sequence[str] | None = None,
) -> dict:
    """Hold out every unit of the run's data in turn (retraining without it), plus every ``external``
    dataset as a whole (the run's own model); write ``loso.json`` and ``loso_predictions.csv``.

    ``only`` names the units to retrain for (the others are recorded as not run): for designs whose
    every retraining is expensive (fine-tuning on a CPU), at the cost of a pooled figure over fewer units.
    """
    run = run if isinstance(run, Run) else load_run(run)
    if run.config.trains_on_images:
        raise CovidxrError(
            f"{run.path}: leave-one-source-out retrains the run once per held-out source, which needs cached "
            "features or a cached front (cache_front); this run fine-tunes or augments afresh every epoch "
            "(too slow to repeat here)"
        )
    frame = run.splits().reset_index(drop=True)
    root = Path(run.info.data)
    extraction = (cache_dir, run.config.extract_batch_size, run.config.num_workers)
    retraining = _Retraining.of(run, cache_dir, progress)
    features = retraining.inputs([root / f for f in frame["filename"]])
    records, predictions, retrained = [], [], {}
    units = holdout_units(frame, min_images)
    for unit in units:
        record = {"unit": unit.name, "source": unit.source, "kind": "retrained without it", "n": int(unit.rows.sum())}
        reason = _untrainable_without(frame, unit.rows)
        if only is not None and unit.name not in only:
            reason = "not run: this design retrains for the named units only (compute), see min_unit_images/only"
        if reason:
            records.append({**record, "status": "skipped", "reason": reason})
            continue
        head, temperature = retrained[unit.name] = retraining.train_without(frame, features, ~unit.rows)
        probabilities = _probabilities(head, temperature, features[np.flatnonzero(unit.rows)])
        held = frame[unit.rows]
        predicted = [LABELS[k] for k in probabilities.argmax(1)]
        records.append({**record, "status": "evaluated", **called_covid_rates(held["label"], predicted)})
        predictions.append(_prediction_rows(held, probabilities, unit.name))
        if progress:
            logger.info(f"  held out {unit.name}: {records[-1]['n']} images")
    external_sets = []
    for folder in external:
        dataset = load_dataset(folder)
        external_features = extract_features(
            run_model(run), dataset.paths(), *extraction, progress, engine=run.config.feature_engine
        )
        same_inputs = (
            torch.from_numpy(external_features.copy())
            if retraining.split is None
            else retraining.inputs(dataset.paths())
        )
        external_sets.append((dataset.frame, same_inputs))
        probabilities = head_probabilities(run_model(run), external_features, run.temperature)
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
    within = within_site(run, frame, features, external_sets, units, retrained, retraining)
    within_rows = within.pop("predictions")
    result = Loso.new(
        {
            "run": str(run.path.resolve()),
            "model": run.config.model,
            "design": run.info.design_summary,
            "min_unit_images": min_images,
            "only_units": None if only is None else list(only),
            "units": records,
            "pooled": _pooled(pooled_rows, run.config.seed),
            "within_site_auc": within["pooled"].get("auc"),
            "within_site_auc_ci95": within["pooled"].get("auc_ci95"),
            "within_site": within,
            "disclaimer": DISCLAIMER,
        }
    ).to_dict()
    pooled_rows.to_csv(run.path / "loso_predictions.csv", index=False)
    within_rows.to_csv(run.path / WITHIN_SITE_PREDICTIONS, index=False)
    (run.path / "loso.json").write_text(json.dumps(result, indent=2))
    return result


def _untrainable_without(frame: pd.DataFrame, held: np.ndarray) -> str | None:
    """Why the protocol cannot be retrained without ``held`` rows (None when it can)."""
    present = set(frame.loc[~held & (frame["split"] == "train").to_numpy(), "label"])
    unseen = sorted(set(frame.loc[held, "label"]) - present)
    if len(present) < 2:
        return f"without it the training split has only {sorted(present)}: nothing to learn a distinction from"
    if unseen:
        return f"without it the training split has no {', '.join(unseen)} image: a wrong answer by construction"
    return None


@torch.no_grad()
def _probabilities(model: nn.Module, temperature: float, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    return softmax(model(inputs).double().numpy(), temperature)


def _sites(frame: pd.DataFrame) -> pd.Series:
    """Each row's site, or its source where no site is recorded."""
    source = frame["source"].astype(str)
    if "site" not in frame.columns:
        return source
    site = frame["site"].fillna("").astype(str)
    return site.where(site != "", source)


def within_site(
    run: Run,
    frame: pd.DataFrame,
    features: torch.Tensor,
    external_sets: Sequence[tuple[pd.DataFrame, torch.Tensor]],
    units: Sequence[Unit],
    retrained: dict,
    retraining: _Retraining,
    min_images: int = MIN_WITHIN_SITE_IMAGES,
) -> dict:
    """COVID-19 against other pneumonia inside each site that holds at least ``min_images`` of each.

    The source cannot answer this: both classes come from the same web site or hospital. The run's
    protocol is retrained without the site (the unit's model when the site is a hold-out unit already)
    and scores the site's COVID-19 and other-pneumonia images, from the run's data and from datasets
    it never trained on (e.g. ieee8023-other for a run without it). Pooled AUC with a patient bootstrap.
    """
    pools = [(frame, features, True)] + [(f, x, False) for f, x in external_sets]
    keys = pd.concat(
        [pd.DataFrame({"source": f["source"].astype(str), "site": _sites(f), "label": f["label"]}) for f, _, _ in pools]
    )
    keys = keys[keys["label"].isin([POSITIVE, OTHER_PNEUMONIA])]
    counts = keys.groupby(["source", "site", "label"]).size().unstack(fill_value=0)
    for label in (POSITIVE, OTHER_PNEUMONIA):
        if label not in counts.columns:
            counts[label] = 0
    eligible = counts[(counts[POSITIVE] >= min_images) & (counts[OTHER_PNEUMONIA] >= min_images)]
    records, rows = [], []
    for source, site in eligible.index:
        in_frame = ((frame["source"].astype(str) == source) & (_sites(frame) == site)).to_numpy()
        record = {"source": source, "site": site}
        unit = next((u for u in units if np.array_equal(u.rows, in_frame)), None)
        if unit is not None and unit.name in retrained:
            head, temperature = retrained[unit.name]
        else:
            reason = _untrainable_without(frame, in_frame)
            if reason:
                records.append({**record, "status": "skipped", "reason": reason})
                continue
            head, temperature = retraining.train_without(frame, features, ~in_frame)
        held = []
        for pool, pool_features, trained_on in pools:
            at_site = (pool["source"].astype(str) == source) & (_sites(pool) == site)
            picked = (at_site & pool["label"].isin([POSITIVE, OTHER_PNEUMONIA])).to_numpy()
            if picked.any():
                index = np.flatnonzero(picked)  # a writable index (pandas hands out read-only arrays)
                part = _prediction_rows(pool[picked], _probabilities(head, temperature, pool_features[index]), site)
                part["in_run_data"] = trained_on
                held.append(part)
        site_rows = pd.concat(held, ignore_index=True)
        records.append({**record, "status": "evaluated", **_covid_vs_other(site_rows, run.config.seed)})
        rows.append(site_rows)
    predictions = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    pooled: dict = {"n": len(predictions)}
    if rows:
        pooled.update(_covid_vs_other(predictions, run.config.seed))
    return {
        "what": f"COVID-19 vs {OTHER_PNEUMONIA} inside each site with at least {min_images} of each, the site held out",
        "min_images": min_images,
        "sites": records,
        "pooled": pooled,
        "predictions": predictions,
    }


def _covid_vs_other(rows: pd.DataFrame, seed: int) -> dict:
    """Counts and the AUC (patient-bootstrap interval) of p(COVID-19) over COVID-19 vs other-pneumonia rows."""
    return {
        "n_covid": int((rows["label"] == POSITIVE).sum()),
        "n_other": int((rows["label"] == OTHER_PNEUMONIA).sum()),
        **_pooled_auc(
            rows["label"].to_numpy(),
            rows[f"p_{POSITIVE}"].to_numpy(),
            rows["patient_id"].astype(str).to_numpy(),
            seed,
        ),
    }


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
