"""Benchmark: training the head on cached frozen features vs. recomputing the frozen backbone every epoch.

covidxr trains only a small head (GAP → Dense 256 ReLU → Dropout 0.5 → Dense 3) on a frozen ImageNet
backbone, so it computes each image's pooled backbone features once (the feature cache) and trains the
head on them. This script trains the same head on the same real images, with the same split and seed,
both ways, in one run:

1. cached: ``extract_features`` into a fresh, empty temporary cache folder (so the extraction cost is
   paid and timed in full, separately), then ``covidxr.lab.loop.fit`` on the cached features for ``--epochs``;
2. recomputed: the images are decoded once into preprocessed tensors in memory (timed separately),
   then ``fit`` with the frozen backbone as the trainee's encoder runs the frozen backbone on every training batch and
   on the validation set in every epoch, as training a frozen-backbone model end to end would. Running
   all ``--epochs`` this way is too slow on a small CPU, so ``--bench-epochs`` epochs are timed and the
   total is extrapolated linearly: every epoch does the same forward passes, so its cost is constant,
   except the first, cold one (kernel set-up for each batch shape), which is run and timed on its own
   first: total = first epoch + (epochs - 1) x the mean of the ``--bench-epochs`` warm epochs.
   The backbone gets its input in the channels-last layout that ``backbone_features`` (the cache's
   extraction) uses, so both paths run the same kernels.

It prints the times of both paths, the ratio recomputed/cached for ``--epochs`` epochs, and checks that
the two paths are the same training: the per-epoch train and validation losses of the recomputed run
and of a cached run of exactly ``--bench-epochs`` epochs (same seed) must agree to float rounding
(the script exits with status 1 when they differ by 1e-4 or more).

The images are a stratified subset of ``--images`` real images of whole patients (classes in their
dataset proportions), split by patient 80/10/10; training uses the train and validation parts, the
test part is held out and never touched, by either path.

Run from the repository root (it is not part of the test suite; with the defaults it takes about 15 s on
2 otherwise idle CPU cores, since only ``--bench-epochs`` epochs of the slow path really run)::

    .venv/bin/python benchmarks/training.py
    .venv/bin/python benchmarks/training.py --images 240 --bench-epochs 3 --model efficientnet_lite0
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidxr.lab.data import Dataset, load_dataset, split_by_patient
from covidxr.lab.features import extract_features
from covidxr.lab.labels import LABELS
from covidxr.lab.loop import FitResult, TensorSet, Trainee, fit
from covidxr.lab.models import CovidxrNet, create_model, to_input_tensor
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.images import read_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    parser.add_argument(
        "--images", type=int, default=120, help="stratified subset size, whole patients (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=80, help="epochs of the full training (default: %(default)s)")
    parser.add_argument(
        "--bench-epochs",
        type=int,
        default=2,
        help="epochs of the recomputed path actually run and timed (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="subset, split, head and shuffle seed (default: 0)")
    args = parser.parse_args(argv)
    if args.images < 10:
        parser.error("--images must be at least 10")
    if not 1 <= args.bench_epochs <= args.epochs:
        parser.error("--bench-epochs must be between 1 and --epochs")
    return args


def stratified_subset(dataset: Dataset, n_images: int, seed: int) -> Dataset:
    """About ``n_images`` rows of whole patients, each class in its share of the dataset."""
    frame = dataset.frame
    if n_images >= len(frame):
        return dataset
    rng = np.random.default_rng(seed)
    patient_label = frame.groupby("patient_id")["label"].agg(lambda s: s.value_counts().index[0])
    patient_size = frame.groupby("patient_id").size()
    shares = frame["label"].value_counts(normalize=True)
    chosen: set[str] = set()
    for label in sorted(patient_label.unique()):
        quota = int(round(n_images * shares[label]))
        patients = sorted(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        count = 0
        for patient in patients:
            if count + patient_size[patient] <= quota:
                chosen.add(patient)
                count += int(patient_size[patient])
            if count == quota:
                break
    return dataset.subset(frame["patient_id"].isin(chosen))


def label_tensor(labels: pd.Series) -> torch.Tensor:
    return torch.tensor([LABELS.index(label) for label in labels], dtype=torch.long)


def decode_images(paths: list[Path], model: CovidxrNet) -> torch.Tensor:
    """Every image decoded and preprocessed once, as the model's input batch (N, 3, size, size)."""
    return torch.stack([to_input_tensor(read_image(p), model.image_size, model.preprocessing) for p in paths])


def load_average() -> str:
    """The 1-minute system load average, or "n/a" where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


class ChannelsLastEncoder(nn.Module):
    """The frozen backbone + pooling in the same layout as the cache's extraction (``backbone_features``),
    so both paths run the same kernels."""

    def __init__(self, model: CovidxrNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.contiguous(memory_format=torch.channels_last))


def timed_fit(
    model: CovidxrNet,
    initial_head: dict[str, torch.Tensor],
    data: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    config: TrainConfig,
    encoder: nn.Module | None = None,
) -> tuple[FitResult, float]:
    """``covidxr.lab.loop.fit`` from the same initial head weights; returns the result and its wall time."""
    model.head.load_state_dict(initial_head)
    started = time.perf_counter()
    result = fit(
        Trainee(model.head, encoder),
        TensorSet(data["train"], targets["train"]),
        TensorSet(data["val"], targets["val"]),
        config,
        progress=False,
    )
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig(model=args.model, epochs=args.epochs, seed=args.seed)

    dataset = stratified_subset(load_dataset(args.data, require_classes=2), args.images, args.seed)
    frame = dataset.frame.copy()
    frame["split"] = split_by_patient(frame, config.seed, config.split_fractions).values
    parts = ("train", "val")
    masks = {part: (frame["split"] == part).values for part in parts}
    paths = {part: [p for p, keep in zip(dataset.paths(), masks[part], strict=True) if keep] for part in parts}
    targets = {part: label_tensor(frame.loc[masks[part], "label"]) for part in parts}

    started = time.perf_counter()
    model = create_model(
        config.model,
        num_classes=len(LABELS),
        image_size=config.image_size,
        hidden=config.hidden_units,
        dropout=config.dropout,
        seed=config.seed,
    )
    load_seconds = time.perf_counter() - started
    initial_head = copy.deepcopy(model.head.state_dict())

    counts = frame.groupby("split")["label"].value_counts().unstack(fill_value=0).reindex(columns=list(LABELS))
    n_used = sum(len(paths[p]) for p in parts)
    print("covidxr training benchmark: cached frozen features vs. backbone recomputed every epoch")
    print(f"  data:        {Path(args.data).resolve()}")
    print(
        f"  images:      {len(frame)} selected ({frame['patient_id'].nunique()} patients, seed {args.seed}); "
        f"{len(paths['train'])} train + {len(paths['val'])} val = {n_used} used by both paths, "
        f"{int((frame['split'] == 'test').sum())} test held out"
    )
    for part in ("train", "val", "test"):
        if part in counts.index:
            print(f"    {part:5s}  " + ", ".join(f"{label} {counts.loc[part, label]}" for label in LABELS))
    print(f"  model:       {config.model} ({model.weights.kind} weights, {model.spec.num_features} features)")
    print(f"  image size:  {model.image_size} x {model.image_size}")
    print(
        f"  head:        Dense {config.hidden_units} ReLU, Dropout {config.dropout}, Dense {len(LABELS)}; "
        f"{config.optimizer} lr {config.learning_rate}, batch {config.batch_size}"
    )
    print(
        f"  threads:     torch {torch.get_num_threads()} (CPU cores: {os.cpu_count()}), decode workers for extraction: "
        f"{config.num_workers}"
    )
    print(f"  platform:    torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(f"  model load:  {load_seconds:.2f} s (not counted in either path)")
    print(f"  load avg:    {load_average()} at start (other busy processes on these cores slow every timing)")
    print()

    # 1. cached: extraction into a fresh cache, then training on the cached features.
    with tempfile.TemporaryDirectory(prefix="covidxr-bench-cache-") as cache_dir:
        started = time.perf_counter()
        used_paths = paths["train"] + paths["val"]
        matrix = extract_features(
            model, used_paths, cache_dir, config.extract_batch_size, config.num_workers, progress=False
        )
        extract_seconds = time.perf_counter() - started
    n_train = len(paths["train"])
    features = {"train": torch.from_numpy(matrix[:n_train]), "val": torch.from_numpy(matrix[n_train:])}
    cached_full, cached_train_seconds = timed_fit(model, initial_head, features, targets, config)
    bench_config = replace(config, epochs=args.bench_epochs)
    cached_short, cached_short_seconds = timed_fit(model, initial_head, features, targets, bench_config)
    cached_total = extract_seconds + cached_train_seconds

    # 2. recomputed: decode once, then the frozen backbone on every batch of every epoch.
    started = time.perf_counter()
    images = {part: decode_images(paths[part], model) for part in parts}
    decode_seconds = time.perf_counter() - started

    encode = ChannelsLastEncoder(model)
    # The first epoch is slower (one-time kernel set-up for each batch shape, memory pools): it is run
    # and timed on its own, then the steady-state epochs are measured from the same start.
    _, first_seconds = timed_fit(model, initial_head, images, targets, replace(config, epochs=1), encoder=encode)
    recomputed, recomputed_seconds = timed_fit(model, initial_head, images, targets, bench_config, encoder=encode)
    per_epoch = recomputed_seconds / args.bench_epochs
    recomputed_training = first_seconds + per_epoch * (args.epochs - 1)
    recomputed_total = decode_seconds + recomputed_training

    def row(label: str, seconds: float, note: str = "") -> None:
        print(f"   {label:<58s}{seconds:9.2f} s{'  ' + note if note else ''}")

    print("1. cached features (what covidxr does)")
    row(f"feature extraction into a fresh cache ({n_used} images)", extract_seconds)
    row(
        f"head training, {args.epochs} epochs on the cached features",
        cached_train_seconds,
        f"({cached_train_seconds / args.epochs * 1000:.1f} ms/epoch)",
    )
    row("total", cached_total)
    print()
    print("2. frozen backbone recomputed every epoch")
    mb = sum(t.numel() * t.element_size() for t in images.values()) / 2**20
    row(f"decode {n_used} images once into memory ({mb:.0f} MiB)", decode_seconds)
    row("first epoch, cold (one-time kernel set-up included)", first_seconds)
    row(
        f"measured: {args.bench_epochs} warm epoch(s)",
        recomputed_seconds,
        f"= {per_epoch:.2f} s/epoch ({len(paths['train'])} train + {len(paths['val'])} val forward passes each)",
    )
    extrapolated = args.bench_epochs < args.epochs - 1
    how = f"EXTRAPOLATED from {args.bench_epochs} measured" if extrapolated else "all measured"
    row(
        f"head training, {args.epochs} epochs: {how}",
        recomputed_training,
        f"= first epoch + {args.epochs - 1} x {per_epoch:.2f} s",
    )
    row(f"total (decode + {'extrapolated ' if extrapolated else ''}training)", recomputed_total)
    print()
    print(f"ratio recomputed / cached for {args.epochs} epochs: {recomputed_total / cached_total:.1f}x")
    print(
        f"  (training alone: {recomputed_training:.1f} s vs {cached_train_seconds:.2f} s = "
        f"{recomputed_training / cached_train_seconds:.0f}x; "
        + (
            f"the recomputed figure is an extrapolation from 1 cold + {args.bench_epochs} warm measured epoch(s))"
            if extrapolated
            else "both measured in full)"
        )
    )
    print()

    columns = ["train_loss", "val_loss"]
    a = cached_short.history[columns].to_numpy()
    b = recomputed.history[columns].to_numpy()
    diff = np.abs(a - b)
    print(
        f"equivalence over the {args.bench_epochs} measured epoch(s) "
        f"(cached run of {args.bench_epochs} epochs, {cached_short_seconds:.2f} s, vs recomputed; same seed):"
    )
    for epoch, (ca, re_) in enumerate(zip(a, b, strict=True), start=1):
        print(f"   epoch {epoch}: train_loss {ca[0]:.6f} vs {re_[0]:.6f}   val_loss {ca[1]:.6f} vs {re_[1]:.6f}")
    print(f"   max |difference|: train_loss {diff[:, 0].max():.2e}, val_loss {diff[:, 1].max():.2e}")
    same_prefix = np.abs(cached_full.history[columns].to_numpy()[: args.bench_epochs] - a).max()
    print(
        f"   (the full {args.epochs}-epoch cached run's first {args.bench_epochs} epochs differ by {same_prefix:.2e})"
    )
    ok = bool(diff.max() < 1e-4)
    print(f"   {'OK: the two paths train the same head' if ok else 'MISMATCH: the two paths disagree'}")
    print()
    best = cached_full.history.loc[cached_full.best_epoch - 1]
    print(
        f"full cached run: best epoch {cached_full.best_epoch}, val_loss {best['val_loss']:.4f}, "
        f"val_accuracy {best['val_accuracy']:.3f} (on {len(paths['val'])} validation images; not an evaluation)"
    )
    print(f"load average at the end: {load_average()}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
