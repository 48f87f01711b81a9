"""Benchmark: training throughput with a frozen, partly unfrozen and fully unfrozen backbone, on images or
on a cached front, fp32 vs. bf16, and the epoch time of 2 torchrun processes vs. 1.

The paper trains only a new head on a frozen ImageNet backbone; covidxr can also fine-tune the last
``unfreeze_blocks`` backbone stages, in fp32 or under bfloat16 autocast, and run under torchrun. This script
measures, on real X-rays, what each of these costs per training image on this machine:

1. **frozen backbone** (the paper's design), two ways: *images in* (the frozen backbone runs in every step,
   as it does when augmentation is drawn afresh every epoch) and, for reference, *features in* (the head
   alone on pooled features computed once, which is what covidxr does by default);
2. **last block unfrozen** (``CovidxrNet.unfreeze_last_blocks(1)``);
3. **last 2 blocks unfrozen** (``unfreeze_last_blocks(2)``), two ways: *images in* (the whole backbone runs
   in every step, as ``covidxr train --unfreeze-blocks 2``) and *cached front in* (``cache_front: true``:
   ``covidxr.lab.front.split_model(model, 2)`` cuts the backbone before its last 2 blocks, the frozen front's
   maps are computed once by ``covidxr.lab.front.front_maps`` (not counted in the steps; its one-time cost per
   image is timed separately and printed), and each step runs only ``nn.Sequential(split.tail, model.pool)``
   and the head, as ``covidxr.lab.train`` does); ``--skip-front`` leaves these rows out;
4. **fully unfrozen** (every stage the registry names: ``unfreeze_last_blocks(len(spec.blocks(body)))``);

each in fp32 and, where ``covidxr.lab.loop.bf16_supported`` says this CPU can, under bf16 autocast.
Every measurement runs the real loop, ``covidxr.lab.loop.fit`` with a ``Trainee`` on a ``TensorSet``, for one
epoch of ``--warmup + --steps`` batches of ``--batch-size`` (the same optimizer, parameter groups, autocast,
loss and bookkeeping as ``covidxr train``). ``fit`` validates after every epoch, so ``fit`` itself is not
timed as a whole: the training set notes the time at which the loader fetches the first item of each
batch, and the validation set the time of its first item, so each step is timed from one batch fetch to
the next (forward + loss + backward + optimizer step + the loop's bookkeeping and the in-memory batch
collation), and validation falls outside. The first ``--warmup`` steps (one-time kernel set-up) are
dropped; images/s is ``--steps`` x ``--batch-size`` over the remaining steps' time. The ``--images`` real
images are decoded and preprocessed once into memory (not timed; decoding is not measured) and cycled to fill
the batches; every configuration starts from the same pretrained weights and head. Each row also gets an
estimated epoch time for ``EPOCH_IMAGES`` (1,750) training images: that many images over its images/s.

5. **2 processes vs. 1**: the real ``covidxr train --unfreeze-blocks 1`` command, run once as one process
   and once under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo over 127.0.0.1), on a
   temporary dataset folder of about 60 real images (symlinks to ``--data``), with a temporary feature
   cache; the per-epoch training time is ``seconds.training / epochs_run`` from each run's ``run.json``
   (each epoch: training steps with decoding in a loader worker, validation, checkpoint). On a CPU the two
   processes share the same cores (covidxr gives each ``cores / 2`` torch threads), so no speed-up is
   expected there: this shows that it works and what it costs. On GPUs each process gets its own device.

Run from the repository root (not part of the test suite; it writes nothing into the repository)::

    .venv/bin/python benchmarks/finetune.py
    .venv/bin/python benchmarks/finetune.py --images 32 --steps 3 --epochs 1
    .venv/bin/python benchmarks/finetune.py --batch-size 32 --skip-ddp
    .venv/bin/python benchmarks/finetune.py --images 32 --steps 4 --skip-ddp --skip-front
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from covidxr.lab.data import load_dataset
from covidxr.lab.front import front_maps, split_model
from covidxr.lab.labels import LABELS
from covidxr.lab.loop import TensorSet, Trainee, bf16_supported, fit
from covidxr.lab.models import CovidxrNet, create_model
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.images import read_image
from machine import cpu_bf16_flags, cpu_model, describe_load, linked_dataset, load_average, small_subset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
MODEL = "efficientnet_lite0"
IMAGE_SIZE = 224
FEATURE_STEPS = 100  # the head alone takes well under a millisecond per step: time many
FRONT_BLOCKS = 2  # the blocks fine-tuned in the images-in vs cached-front comparison
FRONT_STEPS = 20  # at least this many timed steps with the cached front in (each runs only the tail)
EPOCH_IMAGES = 1750  # training images of the estimated epoch (a fixed size, to compare the rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument(
        "--images", type=int, default=72, help="real X-rays decoded once into memory (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per training step (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=4, help="timed training steps per configuration (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed first steps per configuration (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs of each `covidxr train` run in part 5 (default: %(default)s)"
    )
    parser.add_argument(
        "--ddp-images", type=int, default=20, help="images per class in part 5's dataset (default: %(default)s)"
    )
    parser.add_argument("--skip-ddp", action="store_true", help="skip part 5 (the two `covidxr train` runs)")
    parser.add_argument(
        "--skip-front",
        action="store_true",
        help=f"skip part 3 (last {FRONT_BLOCKS} blocks unfrozen, images in vs cached front in)",
    )
    args = parser.parse_args(argv)
    if args.images < 3:
        parser.error("--images must be at least 3")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.epochs < 1:
        parser.error("--batch-size, --steps and --epochs must be at least 1, --warmup at least 0")
    if not args.skip_ddp and args.batch_size % 2:
        parser.error("--batch-size must be even for the 2-process run (or pass --skip-ddp)")
    return args


def choose_rows(frame: pd.DataFrame, n_images: int) -> pd.DataFrame:
    """About ``n_images`` rows, the same number per class, spread evenly over each class's rows."""
    per_class = max(1, n_images // frame["label"].nunique())
    rows = []
    for _, group in frame.groupby("label", sort=True):
        step = max(1, len(group) // per_class)
        rows.append(group.iloc[::step].head(per_class))
    return pd.concat(rows).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Parts 1-4: training steps of the real loop, timed from one batch fetch to the next
# ---------------------------------------------------------------------------------------------


class StepClock:
    """Times at which the loader fetches the first item of each training batch, and validation starts."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.marks: list[float] = []
        self.items = 0
        self.ended = False

    def fetch(self, count: int) -> None:
        """``count`` items fetched (1 per call item by item, a whole batch where the loader slices batches)."""
        if self.items % self.batch_size == 0:
            self.marks.append(time.perf_counter())
        self.items += count

    def end(self) -> None:
        if not self.ended:
            self.marks.append(time.perf_counter())
            self.ended = True

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


class ClockedTrainSet(TensorSet):
    """A ``TensorSet`` whose fetches mark the start of every step (item by item or a batch at a time,
    whichever ``covidxr.lab.loop`` asks for; always in the training process, never in a worker)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, clock: StepClock):
        super().__init__(inputs, targets)
        self.clock = clock

    def __getitem__(self, index):
        self.clock.fetch(torch.as_tensor(index).numel())
        return super().__getitem__(index)


class ClockedValSet(TensorSet):
    """A ``TensorSet`` whose first fetch marks the end of the last training step (validation starts)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, clock: StepClock):
        super().__init__(inputs, targets)
        self.clock = clock

    def __getitem__(self, index):
        self.clock.end()
        return super().__getitem__(index)


@dataclass
class Measurement:
    steps: list[float]  # seconds of every step, warm-up included
    warmup: int
    batch_size: int
    train_loss: float

    @property
    def timed(self) -> list[float]:
        return self.steps[self.warmup :]

    @property
    def images_per_second(self) -> float:
        return len(self.timed) * self.batch_size / sum(self.timed)

    @property
    def seconds_per_step(self) -> float:
        return sum(self.timed) / len(self.timed)


@dataclass(frozen=True)
class Setting:
    label: str
    short: str
    images_in: bool  # False: pooled features in (the head alone), or the front's maps with ``front``
    unfreeze: int  # backbone stages made trainable (0: frozen)
    front: bool = False  # the frozen front's cached maps in, the tail (last ``unfreeze`` blocks) trains


def cycled(tensor: torch.Tensor, count: int) -> torch.Tensor:
    return tensor[torch.arange(count) % len(tensor)]


def measure(
    base: CovidxrNet,
    setting: Setting,
    precision: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    steps: int,
    warmup: int,
) -> tuple[Measurement, int]:
    """One epoch of ``fit`` over ``warmup + steps`` full batches; returns the step times and trainable count."""
    model = copy.deepcopy(base)  # the same pretrained weights and head for every configuration
    backbone_parameters = model.unfreeze_last_blocks(setting.unfreeze) if setting.unfreeze else []
    encoder = nn.Sequential(model.backbone, model.pool) if setting.images_in else None  # as covidxr.lab.train does
    if setting.front:  # as covidxr.lab.train does with cache_front: the tail encodes the cached maps
        encoder = nn.Sequential(split_model(model, setting.unfreeze).tail, model.pool)
    trainee = Trainee(model.head, encoder, num_classes=len(LABELS))
    trainable = sum(p.numel() for p in trainee.parameters() if p.requires_grad)
    count = (warmup + steps) * batch_size
    clock = StepClock(batch_size)
    train_set = ClockedTrainSet(cycled(inputs, count), cycled(targets, count), clock)
    val_set = ClockedValSet(inputs[:1], targets[:1], clock)  # validation is not timed; keep it small
    config = TrainConfig(
        model=MODEL,
        image_size=IMAGE_SIZE,
        epochs=1,
        batch_size=batch_size,
        precision=precision,
        unfreeze_blocks=setting.unfreeze,
        cache_front=setting.front,
        extract_batch_size=1,
    )
    result = fit(trainee, train_set, val_set, config, backbone_parameters=backbone_parameters, progress=False)
    times = clock.steps()
    if len(times) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} timed steps, got {len(times)}")
    return Measurement(times, warmup, batch_size, float(result.history["train_loss"].iloc[-1])), trainable


@dataclass
class FrontCost:
    """The one-time cost of the frozen front's maps, fp32 as ``covidxr train`` computes them."""

    maps: torch.Tensor  # front_maps' output for the benchmark's image files, in their order
    files_seconds: float  # front_maps over the files: decoding in loader workers + the front, cold
    front_seconds: float  # the front alone on the pre-decoded images (after an untimed batch)
    backbone_seconds: float  # for scale: the whole backbone + pooling on the same images, the same way
    difference: float  # largest |front_maps - the front on the pre-decoded images|
    batch_size: int
    num_workers: int

    def per_image(self, seconds: float) -> float:
        return seconds / len(self.maps)


def front_cost(base: CovidxrNet, paths: list[Path], images: torch.Tensor) -> FrontCost:
    """``covidxr.lab.front.front_maps`` over ``paths`` with ``covidxr train``'s defaults (timed once, cold), and
    the front alone and the whole backbone on the pre-decoded ``images`` (timed after one untimed batch)."""
    defaults = TrainConfig()
    batch, workers = defaults.extract_batch_size, defaults.num_workers
    split = split_model(base, FRONT_BLOCKS)
    started = time.perf_counter()
    maps = front_maps(base, split, paths, batch, workers)
    files_seconds = time.perf_counter() - started

    def timed(call: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        call(images[:batch])  # kernel set-up for the batch shape
        started = time.perf_counter()
        out = torch.cat([call(images[i : i + batch]) for i in range(0, len(images), batch)])
        return time.perf_counter() - started, out

    base.eval()
    with torch.no_grad():
        front_seconds, direct = timed(split.front)
        backbone_seconds, _ = timed(base.features)
    difference = float((maps - direct).abs().max())
    return FrontCost(maps, files_seconds, front_seconds, backbone_seconds, difference, batch, workers)


def epoch_seconds(m: Measurement) -> float:
    """Estimated seconds of one epoch of ``EPOCH_IMAGES`` training images at the measured rate."""
    return EPOCH_IMAGES / m.images_per_second


def throughput(args: argparse.Namespace) -> None:
    dataset = load_dataset(args.data, require_classes=2)
    rows = choose_rows(dataset.frame, args.images)
    paths = [dataset.root / f for f in rows["filename"]]
    targets = torch.tensor([LABELS.index(label) for label in rows["label"]], dtype=torch.long)

    started = time.perf_counter()
    base = create_model(MODEL, num_classes=len(LABELS), image_size=IMAGE_SIZE)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    images = torch.stack([base.input_transform(read_image(p)) for p in paths])
    decode_seconds = time.perf_counter() - started
    with torch.no_grad():
        features = torch.cat([base.features(images[i : i + 32]) for i in range(0, len(images), 32)])
    stages = len(base.spec.blocks(base.backbone.body))
    bf16 = bf16_supported(torch.device("cpu"))
    front = None
    if not args.skip_front:
        print("  computing the front's maps (timed once) ...", file=sys.stderr, flush=True)
        front = front_cost(base, paths, images)

    counts = rows["label"].value_counts().reindex(list(LABELS), fill_value=0)
    print(f"  images:      {len(paths)} real X-rays ({', '.join(f'{k} {v}' for k, v in counts.items())}), decoded")
    print(
        f"               once into memory in {decode_seconds:.1f} s ({images.numel() * 4 / 2**20:.0f} MiB; "
        "decoding is not measured), cycled to fill the batches"
    )
    print(
        f"  model:       {MODEL} ({base.weights.kind} weights, {base.weights.location}), {IMAGE_SIZE} x {IMAGE_SIZE}, "
        f"{stages} backbone stages; loaded in {load_seconds:.1f} s"
    )
    print(
        f"  training:    covidxr.lab.loop.fit, Adam lr 1e-3 (backbone x0.1), batch {args.batch_size}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per row ({FEATURE_STEPS} timed for features in"
        + ("" if front is None else f", {max(args.steps, FRONT_STEPS)} for cached front in")
        + "); BatchNorm statistics stay frozen"
    )
    print(f"  bf16:        covidxr.lab.loop.bf16_supported(cpu) = {bf16}; CPU bf16 instructions: {cpu_bf16_flags()}")
    print()

    settings = [
        Setting("frozen, features in (the head alone; reference)", "features in", False, 0),
        Setting("frozen, images in (backbone runs every step)", "frozen, images in", True, 0),
        Setting("last block unfrozen (unfreeze_last_blocks(1))", "last block", True, 1),
    ]
    n = FRONT_BLOCKS
    two_images = Setting(f"last {n} blocks unfrozen, images in (whole backbone)", f"{n} blocks, images in", True, n)
    two_front = Setting(
        f"last {n} blocks unfrozen, cached front in (the tail)", f"{n} blocks, cached front", False, n, front=True
    )
    if front is not None:
        settings += [two_images, two_front]
    settings.append(Setting(f"fully unfrozen (unfreeze_last_blocks({stages}))", "fully unfrozen", True, stages))
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    results: dict[tuple[Setting, str], Measurement] = {}
    trainable: dict[Setting, int] = {}
    for setting in settings:
        if setting.front:
            data, steps = front.maps, max(args.steps, FRONT_STEPS)
        else:
            data = images if setting.images_in else features
            steps = args.steps if setting.images_in else FEATURE_STEPS
        for precision in precisions:
            print(f"  measuring: {setting.label}, {precision} ...", file=sys.stderr, flush=True)
            results[setting, precision], trainable[setting] = measure(
                base, setting, precision, data, targets, args.batch_size, steps, args.warmup
            )

    reference = results[settings[1], "fp32"].images_per_second
    print(
        "Training throughput (images/s; higher is better). 'x frozen' = time per image relative to the frozen "
        f"backbone, images in, fp32; 'epoch s' = estimated seconds per epoch of {EPOCH_IMAGES:,d} training "
        "images (images / images/s)."
    )
    print(
        f"   {'':<52s}{'trainable':>11s} | {'fp32 img/s':>10s} {'s/step':>7s} {'x frozen':>8s} {'epoch s':>8s} | "
        f"{'bf16 img/s':>10s} {'s/step':>7s} {'x frozen':>8s} {'epoch s':>8s} | {'bf16/fp32':>9s}"
    )
    for setting in settings:
        fp32 = results[setting, "fp32"]
        line = (
            f"   {setting.label:<52s}{trainable[setting]:>11,d} | {fp32.images_per_second:>10.1f} "
            f"{fp32.seconds_per_step:>7.3f} {reference / fp32.images_per_second:>7.2f}x {epoch_seconds(fp32):>8.1f} | "
        )
        if bf16:
            b = results[setting, "bf16"]
            line += (
                f"{b.images_per_second:>10.1f} {b.seconds_per_step:>7.3f} {reference / b.images_per_second:>7.2f}x "
                f"{epoch_seconds(b):>8.1f} | {b.images_per_second / fp32.images_per_second:>8.2f}x"
            )
        else:
            line += f"{'not supported on this CPU':>37s} | {'-':>9s}"
        print(line)
    print(
        "   (bf16/fp32 = the row's bf16 speed-up; s/step = mean of the timed steps; epoch s counts the steps only: "
        "no decoding, validation"
        + ("" if front is None else " or, for the cached front, the one-time maps below")
        + ")"
    )
    print("   every step's seconds, warm-up in brackets (a spread of many percent means the machine was busy):")
    for setting in settings:
        for precision in precisions:
            m = results[setting, precision]
            warm = "[" + " ".join(f"{t:.2f}" for t in m.steps[: m.warmup]) + "]"
            if len(m.timed) <= 12:
                timed = " ".join(f"{t:.2f}" for t in m.timed)
            else:
                timed = (
                    f"{len(m.timed)} steps: min {min(m.timed):.4f}, median {statistics.median(m.timed):.4f}, "
                    f"max {max(m.timed):.4f}"
                )
            print(f"     {setting.short + ', ' + precision:<30s} {warm} {timed}")
    bad = [f"{s.label} {p}" for (s, p), m in results.items() if not torch.isfinite(torch.tensor(m.train_loss))]
    if bad:
        print(f"   WARNING: non-finite training loss in: {'; '.join(bad)}")
    print(
        "   Timed: each step from one batch fetch to the next inside covidxr.lab.loop.fit (forward, loss, backward, "
        "optimizer step, bookkeeping, in-memory collation); not timed: decoding, warm-up, validation."
    )
    if front is not None:
        print_front(front, results, two_images, two_front, precisions)
    print()


def print_front(
    front: FrontCost,
    results: dict[tuple[Setting, str], Measurement],
    images_in: Setting,
    cached: Setting,
    precisions: list[str],
) -> None:
    """Part 3's comparison: cached front in vs images in, and what the cache costs once."""
    n = FRONT_BLOCKS
    ratios = [
        f"{p} {results[cached, p].images_per_second:.1f} / {results[images_in, p].images_per_second:.1f} = "
        f"{results[cached, p].images_per_second / results[images_in, p].images_per_second:.2f}x"
        for p in precisions
    ]
    print(f"   last {n} blocks unfrozen, cached front in / images in (images/s; above 1: the cache is faster): ")
    print(f"     {'; '.join(ratios)}")
    per_file = front.per_image(front.files_seconds)
    per_front = front.per_image(front.front_seconds)
    per_backbone = front.per_image(front.backbone_seconds)
    shape = " x ".join(str(d) for d in front.maps.shape[1:])
    print(
        f"   the front's maps, computed once (fp32, no gradients; not part of the steps above), {len(front.maps)} "
        f"images, {shape} = {front.maps[0].numel() * 4 / 1024:.0f} KiB per image:"
    )
    print(
        f"     covidxr.lab.front.front_maps on the files (decoding in {front.num_workers} loader worker(s), batch "
        f"{front.batch_size}, cold, as `covidxr train` runs it): {per_file * 1000:.1f} ms/image "
        f"({front.files_seconds:.1f} s)"
    )
    print(
        f"     the front alone on the pre-decoded images: {per_front * 1000:.1f} ms/image; for scale, the whole "
        f"backbone + pooling: {per_backbone * 1000:.1f} ms/image (the front is {per_front / per_backbone:.0%} of it)"
    )
    print(f"     largest |front_maps - the front on the pre-decoded images|: {front.difference:.2e}")
    once = EPOCH_IMAGES * per_file
    lines = []
    for p in precisions:
        saved = epoch_seconds(results[images_in, p]) - epoch_seconds(results[cached, p])
        lines.append(
            f"{p} {epoch_seconds(results[cached, p]):.1f} s vs {epoch_seconds(results[images_in, p]):.1f} s, "
            + (f"paid back after {once / saved:.2f} epoch(s)" if saved > 0 else "never paid back")
        )
    print(
        f"   for {EPOCH_IMAGES:,d} training images: the maps once, {once:.0f} s (per cached augmented view as much "
        "again), then an epoch with the cached front vs images in:"
    )
    print(f"     {'; '.join(lines)}")
    print(
        "     (images in also decodes every image in every epoch, which these epochs leave out: the estimate "
        "favours images in)"
    )


# ---------------------------------------------------------------------------------------------
# Part 5: `covidxr train` in one process and in two under torch.distributed.run
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(command: list[str], env: dict[str, str], out: Path) -> tuple[dict, pd.DataFrame, float]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(f"FAILED ({done.returncode}): {' '.join(command)}\n{done.stderr[-4000:]}")
        raise SystemExit(1)
    return json.loads((out / "run.json").read_text()), pd.read_csv(out / "history.csv"), wall


def distributed(args: argparse.Namespace) -> None:
    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    with tempfile.TemporaryDirectory(prefix="covidxr-bench-ddp-") as tmp:
        tmp = Path(tmp)
        data = linked_dataset(tmp / "data", args.data.resolve(), small_subset(meta, args.ddp_images))
        env = os.environ | {"COVIDXR_CACHE_DIR": str(tmp / "cache"), "COVIDXR_OFFLINE": "1"}
        train_args = ["-m", "covidxr", "train", "--data", str(data), "--model", MODEL, "--image-size"]
        train_args += [str(IMAGE_SIZE), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        train_args += ["--unfreeze-blocks", "1", "--seed", "0"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        runs = {}
        for name, command in (
            ("1 process", [sys.executable, *train_args, "--out", str(tmp / "one")]),
            ("2 processes", [*launcher, *train_args, "--out", str(tmp / "two")]),
        ):
            print(f"  running `covidxr train` in {name} ...", file=sys.stderr, flush=True)
            runs[name] = run_train(command, env, tmp / ("one" if name == "1 process" else "two"))

    info = runs["1 process"][0]
    sizes = info["split_sizes"]
    print(
        f"5. `covidxr train --unfreeze-blocks 1`: 1 process vs 2 (torch.distributed.run, gloo on 127.0.0.1), "
        f"{MODEL} {IMAGE_SIZE} px, batch {args.batch_size} (global), {args.epochs} epoch(s)"
    )
    print(
        f"   data: a temporary folder of {sum(s['images'] for s in sizes.values())} real images linked from "
        f"{args.data.resolve()} ({sizes['train']['images']} train, {sizes['val']['images']} val, "
        f"{sizes['test']['images']} test unused)"
    )
    print(
        f"   {'':<13s}{'processes':>10s}{'epochs':>8s}{'training s':>12s}{'s/epoch':>9s}{'last train_loss':>17s}"
        f"{'whole command':>15s}"
    )
    per_epoch = {}
    for name, (run, history, wall) in runs.items():
        seconds = run["seconds"]["training"]
        per_epoch[name] = seconds / run["epochs_run"]
        print(
            f"   {name:<13s}{run['processes']:>10d}{run['epochs_run']:>8d}{seconds:>12.2f}{per_epoch[name]:>9.2f}"
            f"{history['train_loss'].iloc[-1]:>17.4f}{wall:>13.1f} s"
        )
    ratio = per_epoch["2 processes"] / per_epoch["1 process"]
    print(f"   epoch time, 2 processes / 1 process: {ratio:.2f}x")
    print(
        f"   On this {os.cpu_count()}-core CPU the two processes share the same cores (each gets "
        f"{max(1, (os.cpu_count() or 1) // 2)} torch thread(s) instead of {torch.get_num_threads()}), so no "
        "speed-up is expected: this shows that it runs and what the process group, the gradient all-reduce "
        "and the per-process validation cost. On GPUs each process gets its own device."
    )
    print(
        "   s/epoch = run.json seconds.training / epochs_run (training steps with decoding in a loader worker, "
        "a validation pass and a checkpoint per epoch); 'whole command' adds start-up, splitting and calibration."
    )
    print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = load_average()
    started = time.perf_counter()
    print("covidxr fine-tuning benchmark: training throughput by unfrozen depth and precision; 2 processes vs 1")
    print(f"  data:        {Path(args.data).resolve()}")
    print(f"  CPU:         {cpu_model()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    print(f"  platform:    torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(f"  load avg:    {describe_load(load_at_start)} at start")
    throughput(args)
    if not args.skip_ddp:
        distributed(args)
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end: ", end="")
    print(describe_load(load_average(), torch.get_num_threads()))


if __name__ == "__main__":
    main()
