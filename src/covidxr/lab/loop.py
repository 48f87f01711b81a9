"""The training loop shared by every design: cached features or images, one process or many.

One loop serves the paper's frozen head on cached features, fine-tuning on images and the
source-adversarial head. It runs unchanged under ``torchrun`` (DistributedDataParallel, a
distributed sampler, rank-0 logging and checkpoints) and resumes from its last complete epoch.

Determinism: the sample order of epoch ``e`` is drawn from ``seed + e`` (identically in every
process, then dealt out rank by rank), and dropout is reseeded from ``(seed, epoch, rank)`` at the
start of every epoch. So a resumed run continues exactly where the uninterrupted one would be, and
N processes with a per-process batch of ``batch_size / N`` see the same global batches as one when
the training set divides by the batch (otherwise the sampler repeats up to N-1 items per epoch);
their dropout masks differ from one process's, so losses match exactly only without dropout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.storage import atomic_path, stable_digest

__all__ = [
    "CHECKPOINT",
    "Distributed",
    "FitResult",
    "ImageSet",
    "TensorSet",
    "Trainee",
    "bf16_supported",
    "config_fingerprint",
    "decision_teachers",
    "fit",
    "group_balanced_weights",
    "init_distributed",
    "predict_logits",
    "staged_loss",
]

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (identity in a single process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(tensor)
        return tensor.tolist()


def init_distributed() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if there is one.

    GPUs use NCCL; CPUs use gloo. A single process (no ``WORLD_SIZE`` or 1) needs nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    if not torch.cuda.is_available():
        # Each process gets its share of the cores instead of all of them (no oversubscription).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Distributed(rank, world_size, local_rank)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that can also draw class-balanced epochs (with replacement).

    With ``weights`` every process draws the same weighted sample of the whole set from
    ``seed + epoch`` and keeps its own share, as ``DistributedSampler`` does with a permutation.
    """

    def __init__(self, dataset, world: Distributed, seed: int, weights: torch.Tensor | None = None):
        super().__init__(dataset, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=seed)
        self.weights = weights

    def __iter__(self) -> Iterator[int]:
        if self.weights is None:
            return super().__iter__()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class TensorSet(torch.utils.data.Dataset):
    """In-memory inputs (cached features, or image tensors) with class and domain targets.

    ``views`` (shape ``(views, items, ...)``) holds augmented alternatives to ``inputs``: every epoch
    each item is drawn from the original or one of its views, chosen from ``seed + epoch``.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        domains: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
        seed: int = 0,
    ):
        self.choices = inputs.unsqueeze(0) if views is None else torch.cat([inputs.unsqueeze(0), views])
        self.targets = targets
        self.domains = domains if domains is not None else torch.zeros_like(targets)
        self.seed = seed
        self.choice = torch.zeros(len(targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        if len(self.choices) > 1:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.choice = torch.randint(len(self.choices), (len(self.targets),), generator=generator)

    def __getitem__(self, index: int | list[int]):
        """One item, or (for a list of indices) a whole batch in one indexing operation."""
        index = torch.as_tensor(index)
        return self.choices[self.choice[index], index], self.targets[index], self.domains[index]


def make_loader(dataset, batch_size: int, sampler=None, workers: int = 0) -> DataLoader:
    """Batches of ``dataset``; an in-memory ``TensorSet`` is sliced a batch at a time, not item by item."""
    if isinstance(dataset, TensorSet):
        order = sampler if sampler is not None else range(len(dataset))
        return DataLoader(dataset, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=False))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)


class ImageSet(torch.utils.data.Dataset):
    """Image files as model inputs for training on images (fine-tuning or fresh augmentation).

    Each image's augmentation in each epoch comes from its own generator seeded by
    ``(seed, epoch, index)``, so it is the same in any worker, process or resumed run.
    """

    def __init__(
        self,
        paths: list[Path],
        targets: torch.Tensor,
        domains: torch.Tensor,
        transform: Callable,
        augment: Callable | None = None,
        seed: int = 0,
    ):
        self.paths, self.targets, self.domains = paths, targets, domains
        self.transform, self.augment, self.seed, self.epoch = transform, augment, seed, 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        image = read_image(self.paths[index])
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng([self.seed, self.epoch, index]))
        return self.transform(image), self.targets[index], self.domains[index]


def class_balanced_weights(targets: torch.Tensor) -> torch.Tensor:
    """Sampling weight per item so that every class is drawn equally often."""
    counts = torch.bincount(targets).double()
    return (1.0 / counts[targets]).double()


def group_balanced_weights(targets: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Sampling weight per item so that every (domain, class) group present is drawn equally often."""
    groups = domains * (int(targets.max()) + 1) + targets
    return class_balanced_weights(groups)


# Class indices in covidxr.lab.labels.LABELS order (COVID-19, NORMAL, PNEUMONIA), as StagedHead outputs them.
_COVID, _NORMAL, _PNEUMONIA = 0, 1, 2


def decision_teachers(targets: torch.Tensor, domains: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Which of the staged decisions each domain may teach, shape ``(num_domains, 2)``: abnormal-vs-normal
    where the domain holds normal and abnormal images, COVID-19-vs-other where it holds both of those."""
    teaches = torch.zeros(num_domains, 2, dtype=torch.bool)
    for domain in range(num_domains):
        present = set(targets[domains == domain].tolist())
        teaches[domain, 0] = _NORMAL in present and bool(present - {_NORMAL})
        teaches[domain, 1] = {_COVID, _PNEUMONIA} <= present
    return teaches


def staged_loss(log_probs: torch.Tensor, targets: torch.Tensor, teaches: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the two staged decisions, each counted only for items whose domain
    teaches it (``teaches``: ``(items, 2)``); the COVID-19 decision only for abnormal items."""
    log_abnormal = torch.logsumexp(log_probs[:, [_COVID, _PNEUMONIA]], dim=1)
    abnormal = targets != _NORMAL
    loss_abnormal = -torch.where(abnormal, log_abnormal, log_probs[:, _NORMAL])
    given = torch.where(targets == _COVID, log_probs[:, _COVID], log_probs[:, _PNEUMONIA]) - log_abnormal
    first, second = teaches[:, 0], teaches[:, 1] & abnormal
    return ((loss_abnormal * first).sum() - (given * second).sum()) / len(targets)


# ---------------------------------------------------------------------------------------------
# The trained module
# ---------------------------------------------------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


class Trainee(nn.Module):
    """What the loop optimises: an optional encoder (backbone + pooling, when images are the input),
    the classification head and, optionally, a source adversary behind a gradient-reversal layer.

    The adversary sees the head's hidden layer and the true class (one-hot), so it learns to tell
    the sources apart *within* a class; the reversed gradient pushes the hidden layer to hide that.
    Conditioning on the class matters here: where one source holds all of a class (ieee8023 and
    COVID-19), an unconditional adversary would fight the diagnosis itself.
    """

    def __init__(
        self,
        head: nn.Sequential,
        encoder: nn.Module | None = None,
        num_domains: int = 0,
        adversarial_weight: float = 0.0,
        num_classes: int = 3,
        seed: int = 0,
        teaches: torch.Tensor | None = None,
    ):
        super().__init__()
        self.head = head
        self.teaches = teaches  # per domain, the staged decisions it teaches (a StagedHead), else None
        self.encoder = encoder
        self.adversarial_weight = adversarial_weight
        self.num_classes = num_classes
        self.adversary = None
        if adversarial_weight > 0:
            if not isinstance(head[0], nn.Linear) or len(head) < 4:
                raise CovidxrError("adversarial training needs a head with a hidden layer (hidden_units > 0)")
            width = head[0].out_features
            with torch.random.fork_rng(devices=[]):  # the same initial adversary in every process and rerun
                torch.manual_seed(seed)
                self.adversary = nn.Sequential(
                    nn.Linear(width + num_classes, width), nn.ReLU(inplace=True), nn.Linear(width, num_domains)
                )

    def train(self, mode: bool = True) -> Trainee:
        """The encoder stays in inference mode (see ``CovidxrNet.unfreeze_last_blocks``)."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.encoder is None else self.encoder(x)

    def class_loss(self, logits: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor, smoothing: float = 0.0):
        """Cross-entropy, or for a staged head the staged loss over the decisions each domain teaches."""
        if self.teaches is None:
            return nn.functional.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        return staged_loss(logits.float(), targets, self.teaches.to(domains.device)[domains])

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        features = self.encode(x)
        if self.adversary is None or targets is None:
            return self.head(features), None
        hidden = self.head[1](self.head[0](features))
        logits = self.head[3](self.head[2](hidden))
        reversed_hidden = _ReverseGradient.apply(hidden, self.adversarial_weight)
        one_hot = nn.functional.one_hot(targets, self.num_classes).to(hidden.dtype)
        return logits, self.adversary(torch.cat([reversed_hidden, one_hot], 1))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    resumed_from: int
    stopped_early: bool


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast for ``precision: bf16`` (refused without hardware support) and, where the hardware
    has it, for ``precision: auto``; fp32 otherwise."""
    if config.precision == "auto":
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported(device))
    if config.precision != "bf16":
        return torch.autocast(device.type, enabled=False)
    if not bf16_supported(device):
        raise CovidxrError(f"precision bf16: this {device.type.upper()} has no bfloat16 support; use fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def config_fingerprint(config: TrainConfig, extra: dict | None = None) -> str:
    """What must be equal for a checkpoint to be resumed: the whole configuration and the data."""
    return stable_digest({"config": config.to_dict(), **(extra or {})})


def _optimizer(trainee: Trainee, backbone_parameters: list[nn.Parameter], config: TrainConfig):
    groups = [{"params": [p for n, p in trainee.named_parameters() if not n.startswith("encoder")]}]
    if backbone_parameters:
        groups.append({"params": backbone_parameters, "lr": config.learning_rate * config.backbone_lr_scale})
    # foreach: one kernel per step for all parameters instead of one per tensor (several times faster on CPU).
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.learning_rate, foreach=True)
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, foreach=True)


def _scheduler(optimizer, config: TrainConfig):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
    return None


@torch.no_grad()
def predict_logits(trainee: Trainee, dataset, batch_size: int, config: TrainConfig, workers: int = 0) -> torch.Tensor:
    """Logits of ``trainee`` in inference mode over a dataset of ``(x, target, domain)`` items."""
    trainee.eval()
    device = next(trainee.head.parameters()).device
    loader = make_loader(dataset, batch_size, workers=workers)
    outputs = []
    with _autocast(config, device):
        for x, _, _ in loader:
            outputs.append(trainee(x.to(device))[0].float().cpu())
    return torch.cat(outputs)


def _trainable_state(trainee: Trainee) -> dict[str, torch.Tensor]:
    """The parameters and buffers that training can change (not a frozen backbone's)."""
    trainable = {n for n, p in trainee.named_parameters() if p.requires_grad}
    state = trainee.state_dict()
    keep = {k for k in state if not k.startswith("encoder") or k in trainable}
    return {k: v.detach().clone() for k, v in state.items() if k in keep}


def _save_atomic(payload: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def fit(
    trainee: Trainee,
    train_set,
    val_set,
    config: TrainConfig,
    world: Distributed | None = None,
    backbone_parameters: list[nn.Parameter] | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    workers: int = 0,
    progress: bool = True,
) -> FitResult:
    """Train ``trainee``; keep the epoch with the lowest validation loss (cross-entropy, or a
    staged head's staged loss).

    With ``checkpoint_dir`` the state after every complete epoch is written there (by rank 0), and a
    checkpoint with the same ``fingerprint`` found there at the start is resumed from.
    """
    world = world or Distributed()
    backbone_parameters = backbone_parameters or []
    if config.batch_size % world.world_size:
        raise CovidxrError(
            f"batch_size {config.batch_size} must be divisible by the number of processes ({world.world_size})"
        )
    device = world.device
    trainee.to(device)
    model = trainee
    if world.enabled:
        # The frozen backbone's BatchNorm statistics never change, so they need no broadcasting.
        model = nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    weights = class_balanced_weights(train_set.targets) if config.balanced_sampling else None
    if config.group_balanced_sampling:
        weights = group_balanced_weights(train_set.targets, train_set.domains)
    sampler = EpochSampler(train_set, world, config.seed, weights)
    loader = make_loader(train_set, config.batch_size // world.world_size, sampler, workers)
    optimizer = _optimizer(trainee, backbone_parameters, config)
    scheduler = _scheduler(optimizer, config)
    val_targets, val_domains = val_set.targets, val_set.domains

    rows: list[dict] = []
    best_loss, best_epoch, best_state, bad_epochs, start = math.inf, 0, None, 0, 1
    checkpoint = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if checkpoint and checkpoint.is_file():
        try:
            saved = torch.load(checkpoint, map_location=device, weights_only=True)  # no code runs
        except Exception as exc:  # torch raises several types for damaged files
            raise CovidxrError(f"{checkpoint}: damaged ({type(exc).__name__}); delete it to start afresh") from None
        if saved.get("fingerprint") != fingerprint:
            raise CovidxrError(
                f"{checkpoint}: belongs to a different configuration or data; use a new --out folder or delete it"
            )
        trainee.load_state_dict(saved["trainee"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        rows, best_loss, best_epoch = saved["history"], saved["best_loss"], saved["best_epoch"]
        best_state, bad_epochs, start = saved["best_state"], saved["bad_epochs"], saved["epoch"] + 1

    stopped_early = bool(config.early_stopping_patience and bad_epochs >= config.early_stopping_patience)
    epochs = range(start, config.epochs + 1) if not stopped_early else range(0)
    bar = tqdm(epochs, desc="train", unit="epoch", disable=not (progress and world.is_main), leave=False)
    for epoch in bar:
        torch.manual_seed(config.seed * 1_000_003 + epoch * 1_009 + world.rank)
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        trainee.train()
        sums = [0.0, 0.0, 0.0, 0.0]  # class loss x n, domain loss x n, correct, n
        for x, y, domain in loader:
            x, y, domain = x.to(device), y.to(device), domain.to(device)
            with _autocast(config, device):
                logits, domain_logits = model(x, y)
            loss = trainee.class_loss(logits, y, domain, config.label_smoothing)
            total = loss
            if domain_logits is not None:
                domain_loss = nn.functional.cross_entropy(domain_logits.float(), domain)
                total = loss + domain_loss  # the reversal layer already carries the weight and the sign
                sums[1] += domain_loss.item() * len(y)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            sums[0] += loss.item() * len(y)
            sums[2] += int((logits.argmax(1) == y).sum())
            sums[3] += len(y)
        sums = world.sum(sums)
        val_logits = predict_logits(trainee, val_set, config.extract_batch_size, config, workers)
        val_loss = trainee.class_loss(val_logits, val_targets, val_domains).item()
        val_accuracy = float((val_logits.argmax(1) == val_targets).float().mean())
        row = {
            "epoch": epoch,
            "train_loss": sums[0] / sums[3],
            "train_accuracy": sums[2] / sums[3],
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        if trainee.adversary is not None:
            row["domain_loss"] = sums[1] / sums[3]
        rows.append(row)
        if val_loss < best_loss:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = _trainable_state(trainee)
        else:
            bad_epochs += 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        if checkpoint and world.is_main:
            _save_atomic(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "trainee": _trainable_state(trainee),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "history": rows,
                    "best_loss": best_loss,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "bad_epochs": bad_epochs,
                },
                checkpoint,
            )
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if config.early_stopping_patience and bad_epochs >= config.early_stopping_patience:
            stopped_early = True
            break
    world.barrier()
    trainee.load_state_dict(best_state, strict=False)
    trainee.eval()
    return FitResult(pd.DataFrame(rows), best_epoch, best_state, start - 1, stopped_early)
