"""Training runs, and the run folder that records how each was made.

A run folder holds ``config.yaml``, ``run.json`` (model, weights source and hash, labels, data,
design, versions, command), ``splits.csv``, ``history.csv`` and ``head.safetensors`` (plus
``backbone.safetensors`` when blocks were fine-tuned); while training it also holds
``checkpoint.pt``, from which an interrupted run resumes. ``evaluate`` adds ``metrics.json``,
``predictions.csv`` and the figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from covidxr import __version__
from covidxr.lab.augment import AcquisitionAugment
from covidxr.lab.cache import default_cache_dir
from covidxr.lab.data import Dataset, load_datasets, split_by_patient
from covidxr.lab.duplicates import crossing_pairs, near_duplicate_pairs, patient_groups
from covidxr.lab.export import feature_engine
from covidxr.lab.features import AugmentedView, extract_features
from covidxr.lab.front import FrontSplit, front_maps, split_model
from covidxr.lab.labels import LABELS, SPLITS
from covidxr.lab.loop import (
    CHECKPOINT,
    Distributed,
    ImageSet,
    TensorSet,
    Trainee,
    config_fingerprint,
    decision_teachers,
    fit,
    init_distributed,
)
from covidxr.lab.models import CovidxrNet, hash_state_dict, model_from_config
from covidxr.runtime.answers import HASH_COLUMN
from covidxr.runtime.calibration import POSITIVE, choose_threshold, expected_calibration_error, fit_temperature, softmax
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256, read_image
from covidxr.runtime.ood import MARGIN, QUANTILE, fit_guard
from covidxr.runtime.runs import CONFIG_FILE, HEAD_FILE, HISTORY_FILE, INFO_FILE, OOD_FILE, SPLITS_FILE, RunInfo

__all__ = ["cached_views", "calibrate", "checkpoint_matches", "make_splits", "train"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(head: nn.Module, val_features: torch.Tensor, val_targets: torch.Tensor) -> dict:
    """Temperature and COVID-19 threshold fitted on the validation split (never on test)."""
    head.eval()
    logits = head(val_features).double().numpy()
    targets = val_targets.numpy()
    temperature = fit_temperature(logits, targets)
    raw, calibrated = softmax(logits), softmax(logits, temperature)
    covid = LABELS.index(POSITIVE)
    threshold = choose_threshold(calibrated[:, covid], targets == covid)
    return {
        "method": "temperature scaling on the validation split",
        "temperature": temperature,
        "val_ece_uncalibrated": expected_calibration_error(raw, targets),
        "val_ece_calibrated": expected_calibration_error(calibrated, targets),
        "covid_threshold": threshold.to_dict(),
    }


def make_splits(
    dataset: Dataset, config: TrainConfig, cache_dir: str | Path | None = None
) -> tuple[pd.DataFrame, dict]:
    """The dataset's rows with a ``split`` column, and what was done about near-duplicates.

    Patients linked by a near-duplicate image (the same radiograph filed under two ids) are split as
    one unit unless ``config.group_near_duplicates`` is off; a split in which a near-duplicate still
    crosses from one part to another is refused unless ``config.allow_near_duplicate_leakage``.
    """
    frame = dataset.frame.copy()
    pairs = near_duplicate_pairs(frame, dataset.root, cache_dir=cache_dir)
    groups = patient_groups(frame, pairs) if config.group_near_duplicates else None
    frame["split"] = split_by_patient(frame, config.seed, config.split_fractions, groups).values
    for part in ("train", "val"):
        if not (frame["split"] == part).any():
            raise CovidxrError(f"{dataset.root}: too few patients for a {part} split ({len(frame)} images)")
    crossing = crossing_pairs(pairs, frame["split"])
    if len(crossing) and not config.allow_near_duplicate_leakage:
        a, b = crossing.iloc[0]["a"], crossing.iloc[0]["b"]
        raise CovidxrError(
            f"{dataset.root}: {len(crossing)} near-duplicate pair(s) cross splits, e.g. {frame['filename'][a]} "
            f"({crossing.iloc[0]['split_a']}) and {frame['filename'][b]} ({crossing.iloc[0]['split_b']}); "
            "keep group_near_duplicates on, or set allow_near_duplicate_leakage to accept the leak"
        )
    across = int((frame["patient_id"].to_numpy()[pairs["a"]] != frame["patient_id"].to_numpy()[pairs["b"]]).sum())
    report = {
        "pairs": len(pairs),
        "pairs_across_patients": across,
        "grouped": config.group_near_duplicates,
        "pairs_crossing_splits": len(crossing),
    }
    return frame, report


def _environment() -> dict:
    import torchvision

    return {
        "covidxr": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }


def checkpoint_matches(out: Path, fingerprint: str) -> bool:
    """True when ``out`` holds an interrupted run of exactly this configuration and data."""
    path = out / CHECKPOINT
    if not path.is_file() or (out / INFO_FILE).exists():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code runs
    except Exception as exc:  # torch raises several types for damaged files
        raise CovidxrError(f"{path}: damaged ({type(exc).__name__}); delete it to start afresh") from None
    if saved.get("fingerprint") != fingerprint:
        raise CovidxrError(
            f"{path}: an interrupted run of a different configuration or data; choose a new --out folder"
        )
    return True


def prepare_out_dir(out: str | Path) -> Path:
    """Create a run folder, refusing one that already holds a run (outputs are never overwritten)."""
    out = Path(out)
    if (out / INFO_FILE).exists():
        raise CovidxrError(f"{out}: already holds a run; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _notice(world: Distributed, message: str) -> None:
    if world.is_main:
        logger.warning(message)


def _index(values: pd.Series, known: list[str]) -> torch.Tensor:
    return torch.tensor([known.index(v) if v in known else 0 for v in values], dtype=torch.long)


def _check_readable(paths: list[Path]) -> None:
    """Decode every image once before training on images, so a bad file stops the run at once."""
    for path in paths:
        read_image(path)


def _feature_sets(
    model: CovidxrNet,
    paths: dict[str, list[Path]],
    targets: dict[str, torch.Tensor],
    domains: dict[str, torch.Tensor],
    config: TrainConfig,
    world: Distributed,
    cache_dir: str | Path | None,
    progress: bool,
) -> tuple[TensorSet, TensorSet]:
    """Training and validation sets of cached features (and cached augmented views of training images)."""
    extraction, engine = (cache_dir, config.extract_batch_size, config.num_workers), config.feature_engine
    views = cached_views(config)
    if not world.is_main:
        world.barrier()  # rank 0 fills the cache first; the others then only read it
    encoded = {
        part: torch.from_numpy(extract_features(model, paths[part], *extraction, progress, engine=engine))
        for part in ("train", "val")
    }
    extra = [extract_features(model, paths["train"], *extraction, progress, view, engine) for view in views]
    if world.is_main:
        world.barrier()
    stacked = torch.from_numpy(np.stack(extra)) if views else None
    train_set = TensorSet(encoded["train"], targets["train"], domains["train"], stacked, config.seed)
    return train_set, TensorSet(encoded["val"], targets["val"], domains["val"])


def cached_views(config: TrainConfig) -> list[AugmentedView]:
    """The augmented views of every training image that are encoded once and cached (none without augment)."""
    if not config.augment:
        return []
    return [AugmentedView(AcquisitionAugment(), config.seed, k) for k in range(1, config.augment_views + 1)]


def _front_sets(
    model: CovidxrNet,
    split: FrontSplit,
    paths: dict[str, list[Path]],
    targets: dict[str, torch.Tensor],
    domains: dict[str, torch.Tensor],
    config: TrainConfig,
) -> tuple[TensorSet, TensorSet]:
    """Training and validation sets of the frozen front's maps (and of cached augmented views)."""
    extraction = (config.extract_batch_size, config.num_workers)
    maps = {part: front_maps(model, split, paths[part], *extraction) for part in ("train", "val")}
    views = [front_maps(model, split, paths["train"], *extraction, view) for view in cached_views(config)]
    stacked = torch.stack(views) if views else None
    train_set = TensorSet(maps["train"], targets["train"], domains["train"], stacked, config.seed)
    return train_set, TensorSet(maps["val"], targets["val"], domains["val"])


def train(
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    config: TrainConfig,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Split by patient within each source, then train: the paper's head on cached frozen features by
    default, or on images when the configuration fine-tunes or augments afresh every epoch.

    Runs as one of several processes under ``torchrun``; rerun after an interruption, it resumes
    from the last complete epoch in ``out``.
    """
    roots = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    world = init_distributed()
    dataset = load_datasets(roots, require_classes=2)
    frame, near_duplicates = make_splits(dataset, config, cache_dir)
    # Each image's content hash, so that `predict` can tell an image this model was trained on (seen_in_training).
    frame[HASH_COLUMN] = [file_sha256(dataset.root / name) for name in frame["filename"]]
    model = model_from_config(config, weights=weights, weights_dir=weights_dir)
    if config.lungs != "none":  # repeated designs on the same images never segment them twice
        model.pipeline = replace(model.pipeline, lung_cache=str(cache_dir or default_cache_dir()))
    out = Path(out)
    fingerprint = config_fingerprint(
        config,
        {
            "data": [str(root.resolve()) for root in roots],
            "splits": hashlib.sha256(frame[["filename", "split"]].to_csv().encode()).hexdigest(),
            "weights": model.weights.sha256,
            "world_size": world.world_size,
        },
    )
    resuming = checkpoint_matches(out, fingerprint)
    if world.is_main:
        if not resuming:
            prepare_out_dir(out)
            config.save(out / CONFIG_FILE)
            frame.to_csv(out / SPLITS_FILE, index=False)
        else:
            _notice(world, f"{out}: resuming from {out / CHECKPOINT}")
    world.barrier()

    parts = {part: frame[frame["split"] == part] for part in ("train", "val")}
    paths = {part: [dataset.root / f for f in rows["filename"]] for part, rows in parts.items()}
    targets = {part: _index(rows["label"], list(LABELS)) for part, rows in parts.items()}
    if config.domain_column not in frame.columns:
        raise CovidxrError(f"config: domain_column {config.domain_column!r} is not a column of the metadata")
    domain_names = sorted(parts["train"][config.domain_column].astype(str).unique())
    domains = {part: _index(rows[config.domain_column].astype(str), domain_names) for part, rows in parts.items()}
    if config.adversarial_weight > 0 and len(domain_names) < 2:
        raise CovidxrError(
            f"adversarial training needs at least two values of {config.domain_column!r} in the training split, "
            f"found {domain_names}; pass several --data folders or set adversarial_weight 0"
        )

    started = time.perf_counter()
    backbone_parameters: list[nn.Parameter] = []
    if config.trains_on_images:
        reasons = [f"last {config.unfreeze_blocks} backbone blocks unfrozen"] if config.unfreeze_blocks else []
        reasons += ["augmentation drawn afresh every epoch"] if config.augment and not config.augment_views else []
        feature_cache = f"bypassed ({'; '.join(reasons)}): the backbone runs on every image in every epoch"
        _notice(world, f"feature cache {feature_cache}")
        _check_readable(paths["train"] + paths["val"])
        if config.unfreeze_blocks:
            backbone_parameters = model.unfreeze_last_blocks(config.unfreeze_blocks)
        augment = AcquisitionAugment() if config.augment else None
        train_set = ImageSet(
            paths["train"], targets["train"], domains["train"], model.input_transform, augment, config.seed
        )
        val_set = ImageSet(paths["val"], targets["val"], domains["val"], model.input_transform)
        encoder = nn.Sequential(model.backbone, model.pool)
    elif config.cache_front:
        split = split_model(model, config.unfreeze_blocks)
        backbone_parameters = model.unfreeze_last_blocks(config.unfreeze_blocks)
        train_set, val_set = _front_sets(model, split, paths, targets, domains, config)
        encoder = nn.Sequential(split.tail, model.pool)
        feature_cache = (
            f"bypassed: the last {config.unfreeze_blocks} backbone blocks are fine-tuned on the frozen front's "
            "outputs, computed once per image"
            + (f" and per cached view ({config.augment_views})" if config.augment else "")
        )
    else:
        feature_cache = "used" + (f", with {config.augment_views} cached augmented views" if config.augment else "")
        train_set, val_set = _feature_sets(model, paths, targets, domains, config, world, cache_dir, progress)
        encoder = None
    # On images this is the one decode of every file that checks them; on features, the extraction.
    preparation = "image_check" if config.trains_on_images else "feature_extraction"
    prepare_seconds = time.perf_counter() - started

    teaches = (
        decision_teachers(targets["train"], domains["train"], len(domain_names))
        if config.decision == "staged"
        else None
    )
    trainee = Trainee(
        model.head, encoder, len(domain_names), config.adversarial_weight, len(LABELS), config.seed, teaches
    )
    started = time.perf_counter()
    result = fit(
        trainee,
        train_set,
        val_set,
        config,
        world,
        backbone_parameters,
        checkpoint_dir=out,
        fingerprint=fingerprint,
        workers=config.num_workers if config.trains_on_images else 0,
        progress=progress,
    )
    train_seconds = time.perf_counter() - started
    if result.resumed_from:
        _notice(world, f"resumed after epoch {result.resumed_from}")
    if not world.is_main:
        return out

    model = model.cpu().eval()
    pd.DataFrame(result.history).to_csv(out / HISTORY_FILE, index=False)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE))
    fine_tuned = None
    if backbone_parameters:
        fine_tuned = save_backbone(model, out / BACKBONE_FILE)
    extraction = (cache_dir, config.extract_batch_size, config.num_workers, progress)
    engine = config.feature_engine
    val_features = torch.from_numpy(extract_features(model, paths["val"], *extraction, engine=engine))
    guard = fit_guard(extract_features(model, paths["train"], *extraction, engine=engine), val_features.numpy())
    guard.save(out / OOD_FILE)
    run_info = RunInfo(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model.spec.describe(),
        weights=model_weights_record(model, fine_tuned),
        fine_tuned_backbone=fine_tuned,
        model_key=model.model_key(),
        labels=list(LABELS),
        data=str(dataset.root.resolve()),
        datasets=[str(root.resolve()) for root in roots],
        design=describe_design(config),
        split_sizes={
            part: {
                "images": int((frame["split"] == part).sum()),
                "patients": int(frame.loc[frame["split"] == part, "patient_id"].nunique()),
                "by_source": {k: int(v) for k, v in frame.loc[frame["split"] == part, "source"].value_counts().items()},
            }
            for part in SPLITS
        },
        domains={"column": config.domain_column, "values": domain_names},
        near_duplicates=near_duplicates,
        feature_engine=(
            None if config.trains_on_images else feature_engine(model, config.feature_engine, cache_dir).description
        ),
        feature_cache=feature_cache,
        processes=world.world_size,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stopped_early=result.stopped_early,
        resumed_after_epoch=result.resumed_from,
        calibration=calibrate(model.head, val_features, targets["val"]),
        out_of_distribution={
            "file": OOD_FILE,
            "method": "Mahalanobis distance in the training features' principal components + residual",
            "threshold": guard.threshold,
            "threshold_rule": f"{MARGIN} x the {QUANTILE:.0%} quantile of the validation split's scores",
        },
        # Training includes the validation pass and the checkpoint after every epoch.
        seconds={preparation: round(prepare_seconds, 2), "training": round(train_seconds, 2)},
        environment=_environment(),
    )
    (out / INFO_FILE).write_text(json.dumps(run_info.to_dict(), indent=2))
    (out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete; the checkpoint is no longer needed
    return out


BACKBONE_FILE = "backbone.safetensors"


def save_backbone(model: CovidxrNet, path: Path) -> dict:
    """Write a fine-tuned backbone and point the model's feature key at it (its features changed)."""
    state = {k: v.detach().contiguous() for k, v in model.backbone.body.state_dict().items()}
    save_file(state, str(path))
    pretrained = model.weights.to_dict()
    model.weights = replace(
        model.weights, kind="fine-tuned", location=str(path.resolve()), sha256=hash_state_dict(state)
    )
    return {"file": path.name, "sha256": model.weights.sha256, "pretrained": pretrained}


def model_weights_record(model: CovidxrNet, fine_tuned: dict | None) -> dict:
    """The pretrained weights a run started from (what ``load_run`` must find again)."""
    return fine_tuned["pretrained"] if fine_tuned else model.weights.to_dict()


def describe_design(config: TrainConfig) -> dict:
    """The run's choices beyond the paper's protocol, in words and as values."""
    pipeline = config.pipeline()
    parts = [] if pipeline.is_identity else [pipeline.describe()]
    if config.augment:
        parts.append(
            "acquisition augmentation" + (f" ({config.augment_views} cached views)" if config.augment_views else "")
        )
    if config.adversarial_weight:
        parts.append(f"source-adversarial head (weight {config.adversarial_weight})")
    if config.unfreeze_blocks:
        parts.append(f"last {config.unfreeze_blocks} backbone blocks fine-tuned")
    if config.balanced_sampling:
        parts.append("class-balanced sampling")
    if config.group_balanced_sampling:
        parts.append(f"{config.domain_column}-and-class-balanced sampling")
    if config.decision == "staged":
        parts.append("staged decision (abnormal, then COVID-19 vs other; each learnt where a source holds both)")
    return {
        "summary": ", ".join(parts) or "the paper's protocol (frozen backbone, no preprocessing beyond resizing)",
        "pipeline": pipeline.to_dict(),
        "augment": AcquisitionAugment().to_dict() if config.augment else None,
    }
