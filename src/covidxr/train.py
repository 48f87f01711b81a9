"""Training the new head on frozen backbone features, and the run folder that records how.

A run folder holds ``config.yaml``, ``run.json`` (model, weights source and hash, labels, data,
versions, command), ``splits.csv``, ``history.csv`` and ``head.safetensors``; ``evaluate`` adds
``metrics.json``, ``predictions.csv`` and the figures.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from covidxr import __version__
from covidxr.calibration import POSITIVE, choose_threshold, expected_calibration_error, fit_temperature, softmax
from covidxr.config import TrainConfig
from covidxr.data import LABELS, SPLITS, Dataset, load_dataset, split_by_patient
from covidxr.duplicates import crossing_pairs, near_duplicate_pairs, patient_groups
from covidxr.errors import CovidxrError
from covidxr.features import extract_features
from covidxr.models import CovidxrNet, create_model


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_state: dict[str, torch.Tensor]


def fit_head(
    head: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    config: TrainConfig,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``head`` with the configured optimiser; keep the epoch with the lowest validation loss.

    ``train_x``/``val_x`` are cached features, or, with ``encode`` (the frozen backbone), image
    batches encoded at every step: both paths draw the same shuffles and dropout masks.
    """
    encode = encode or (lambda x: x)
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    optimizer = (
        torch.optim.Adam(head.parameters(), lr=config.learning_rate)
        if config.optimizer == "adam"
        else torch.optim.SGD(head.parameters(), lr=config.learning_rate, momentum=0.9)
    )
    loss_fn = nn.CrossEntropyLoss()
    rows, best_loss, best_epoch, best_state = [], float("inf"), 0, None
    epochs = tqdm(range(1, config.epochs + 1), desc="train head", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        head.train()
        total_loss, correct = 0.0, 0
        for batch in torch.randperm(len(train_y), generator=order).split(config.batch_size):
            with torch.no_grad():
                inputs = encode(train_x[batch])
            logits = head(inputs)
            loss = loss_fn(logits, train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(1) == train_y[batch]).sum())
        val_loss, val_acc = evaluate_head(head, val_x, val_y, encode, config.extract_batch_size)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / len(train_y),
                "train_accuracy": correct / len(train_y),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
            }
        )
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(head.state_dict())
        epochs.set_postfix(val_loss=f"{val_loss:.4f}")
    head.load_state_dict(best_state)
    head.eval()
    return FitResult(pd.DataFrame(rows), best_epoch, best_state)


@torch.no_grad()
def evaluate_head(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], batch: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``head`` in inference mode."""
    head.eval()
    logits = torch.cat([head(encode(chunk)) for chunk in x.split(batch)])
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, float((logits.argmax(1) == y).float().mean())


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


def _label_indices(labels: pd.Series) -> torch.Tensor:
    return torch.tensor([LABELS.index(label) for label in labels], dtype=torch.long)


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


def model_from_config(
    config: TrainConfig,
    pretrained: bool = True,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
) -> CovidxrNet:
    """The model a configuration describes: its backbone, input size and head, over all labels."""
    return create_model(
        config.model,
        pretrained=pretrained,
        num_classes=len(LABELS),
        image_size=config.image_size,
        hidden=config.hidden_units,
        dropout=config.dropout,
        weights=weights,
        weights_dir=weights_dir,
        seed=config.seed,
    )


def prepare_out_dir(out: str | Path) -> Path:
    """Create a run folder, refusing one that already holds a run (outputs are never overwritten)."""
    out = Path(out)
    if (out / "run.json").exists():
        raise CovidxrError(f"{out}: already holds a run; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The paper's protocol on one dataset: split by patient, cache frozen features, train the head."""
    dataset = load_dataset(data, require_classes=2)
    frame, near_duplicates = make_splits(dataset, config, cache_dir)
    model = model_from_config(config, weights=weights, weights_dir=weights_dir)
    out = prepare_out_dir(out)
    config.save(out / "config.yaml")
    frame.to_csv(out / "splits.csv", index=False)

    started = time.perf_counter()
    features = extract_features(
        model, dataset.paths(), cache_dir, config.extract_batch_size, config.num_workers, progress
    )
    extract_seconds = time.perf_counter() - started
    tensors = {part: torch.from_numpy(features[(frame["split"] == part).values]) for part in SPLITS}
    targets = {part: _label_indices(frame.loc[frame["split"] == part, "label"]) for part in SPLITS}

    started = time.perf_counter()
    result = fit_head(
        model.head, tensors["train"], targets["train"], tensors["val"], targets["val"], config, progress=progress
    )
    train_seconds = time.perf_counter() - started
    result.history.to_csv(out / "history.csv", index=False)
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, str(out / "head.safetensors"))
    run_info = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.spec.describe(),
        "weights": model.weights.to_dict(),
        "model_key": model.model_key(),
        "labels": list(LABELS),
        "data": str(Path(data).resolve()),
        "split_sizes": {
            part: {
                "images": int((frame["split"] == part).sum()),
                "patients": int(frame.loc[frame["split"] == part, "patient_id"].nunique()),
            }
            for part in SPLITS
        },
        "near_duplicates": near_duplicates,
        "engine": "torch",
        "best_epoch": result.best_epoch,
        "calibration": calibrate(model.head, tensors["val"], targets["val"]),
        "seconds": {"feature_extraction": round(extract_seconds, 2), "training": round(train_seconds, 2)},
        "environment": _environment(),
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=2))
    return out


@dataclass
class Run:
    """A trained run loaded back: its configuration, metadata and the full model with its head."""

    path: Path
    config: TrainConfig
    info: dict
    model: CovidxrNet

    @property
    def labels(self) -> list[str]:
        return self.info["labels"]

    @property
    def temperature(self) -> float:
        """The validation-fitted temperature (1.0 for runs made before calibration existed)."""
        return float(self.info.get("calibration", {}).get("temperature", 1.0))

    @property
    def covid_threshold(self) -> float:
        return float(self.info.get("calibration", {}).get("covid_threshold", {}).get("value", 0.5))

    def splits(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "splits.csv", dtype=str, keep_default_na=False)

    def history(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "history.csv")


def load_run(path: str | Path, weights: str | Path | None = None, weights_dir: str | Path | None = None) -> Run:
    """Rebuild a run's model; refuses backbone weights that differ from those it was trained on."""
    path = Path(path)
    for name in ("run.json", "config.yaml", "head.safetensors"):
        if not (path / name).is_file():
            raise CovidxrError(f"{path}: not a covidxr run folder (no {name})")
    try:
        info = json.loads((path / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise CovidxrError(f"{path / 'run.json'}: damaged ({exc})") from None
    config = TrainConfig.load(path / "config.yaml")
    pretrained = info["weights"]["kind"] != "random"
    recorded = Path(info["weights"]["location"])
    if weights is None and info["weights"]["kind"] in {"file", "weights-dir"} and recorded.is_file():
        weights = recorded
    model = model_from_config(config, pretrained, weights, weights_dir)
    if model.weights.sha256 != info["weights"]["sha256"]:
        raise CovidxrError(
            f"{path}: was trained on {config.model} weights {info['weights']['sha256'][:12]} "
            f"({info['weights']['location']}), but the weights found now are {model.weights.sha256[:12]} "
            f"({model.weights.location}); pass the original with --weights"
        )
    try:
        model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CovidxrError(f"{path / 'head.safetensors'}: damaged or incompatible ({type(exc).__name__})") from None
    return Run(path, config, info, model.eval())
