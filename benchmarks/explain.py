"""Benchmark: the cost of a class activation map per image, as a multiple of one bare forward + backward pass.

Grad-CAM needs one forward pass (to record the target layer's activations) and one backward pass (to get
the predicted class's gradient at that layer), so a map of one image on a CPU should cost little more than
a bare forward + backward of that image. This script measures that, for one model loaded once and one
batch of real, preprocessed chest X-rays held in memory, side by side in one run:

* **forward only**: ``model(x)`` under ``torch.no_grad()``, what a prediction costs;
* **forward + backward**: the input with ``requires_grad``, the predicted class's logit of every image
  summed and backpropagated. This is exactly the work Grad-CAM asks of the network: the backbone is
  frozen, so gradients reach the target layer only through an input that requires them;
* **per method** (``gradcam``, ``gradcam++``, ``eigencam``, ``scorecam``): ``Explainer(model, method)``
  created once per method and reused for every call, its maps computed for each image's predicted class.

Every measurement is taken in two ways: in batches of ``--batch`` images (how maps for a figure should
be made: ``explain_files`` batches them too), and one image per call. The seconds per image of each
method are printed beside the bare forward + backward per image of the same way of calling, as a ratio.

ScoreCAM runs one forward pass per channel of the target layer (1,280 for EfficientNet-Lite), in batches
of 16, so it is timed on only ``--scorecam-images`` images and ``--scorecam-repeats`` times.

Every measurement is run once before timing (warm-up: the first pass of each batch shape pays one-time
kernel set-up), then ``--repeats`` times, interleaved so that a change of machine load hits all
measurements alike; the best (least disturbed) and median times are printed, the ratios use the best.
The batched and the one-image maps of each method are also compared: batching must not change them.

Run from the repository root (it is not part of the test suite; with the defaults it takes about
1-2 minutes on 2 otherwise idle CPU cores, most of it ScoreCAM)::

    .venv/bin/python benchmarks/explain.py
    .venv/bin/python benchmarks/explain.py --images 32 --batch 16 --scorecam-images 0
    .venv/bin/python benchmarks/explain.py --model resnet50 --random-weights --image-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from covidxr.lab.data import load_dataset
from covidxr.lab.explain import METHODS, Explainer
from covidxr.lab.models import CovidxrNet, create_model, to_input_tensor
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from machine import describe_load, load_average

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
PAPER_IMAGE_SIZE = 237
# ScoreCAM last: it is timed separately, on fewer images.
ORDER = ("gradcam", "gradcam++", "eigencam", "scorecam")

Step = Callable[[torch.Tensor, np.ndarray], object]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the backbone with random weights (for timing models whose pretrained weights are absent)",
    )
    parser.add_argument(
        "--image-size", type=int, default=PAPER_IMAGE_SIZE, help="square input size (default: %(default)s, the paper's)"
    )
    parser.add_argument("--images", type=int, default=16, help="real X-rays timed (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per call when batched (default: %(default)s)")
    parser.add_argument(
        "--scorecam-images", type=int, default=1, help="images ScoreCAM is timed on; 0 skips it (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (default: 3)")
    parser.add_argument("--scorecam-repeats", type=int, default=1, help="timed repeats of ScoreCAM (default: 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default (default: 0)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.repeats < 1 or args.scorecam_repeats < 1:
        parser.error("--images, --batch, --repeats and --scorecam-repeats must be at least 1")
    if not 0 <= args.scorecam_images <= args.images:
        parser.error("--scorecam-images must be between 0 and --images")
    return args


def choose_paths(data: Path, n_images: int) -> tuple[list[Path], list[str]]:
    """``n_images`` rows spread evenly over the metadata (so over its sources and classes), in its order."""
    dataset = load_dataset(data)
    frame = dataset.frame
    if n_images > len(frame):
        raise CovidxrError(f"{data}: asked for {n_images} images, the dataset has {len(frame)}")
    rows = np.unique(np.linspace(0, len(frame) - 1, n_images).round().astype(int))
    paths = dataset.paths()
    return [paths[i] for i in rows], [str(frame["label"].iloc[i]) for i in rows]


def decode(paths: list[Path], model: CovidxrNet) -> torch.Tensor:
    """Every image decoded and preprocessed once, as the model's input batch (N, 3, size, size)."""
    return torch.stack([to_input_tensor(read_image(p), model.image_size, model.preprocessing) for p in paths])


def forward_only(model: CovidxrNet) -> Step:
    def step(inputs: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs)

    return step


def forward_backward(model: CovidxrNet) -> Step:
    """What Grad-CAM asks of the network: forward with an input that requires grad, backward of the class logit."""
    # The backbone is frozen: without an input that requires grad, nothing would flow back into it.

    def step(inputs: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        x = inputs.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, torch.as_tensor(classes, dtype=torch.long)[:, None]).sum().backward()
        return logits

    return step


def explain_step(explainer: Explainer, quiet: bool = False) -> Step:
    def step(inputs: torch.Tensor, classes: np.ndarray) -> np.ndarray:
        if not quiet:
            return explainer(inputs, classes)
        # ScoreCAM draws a tqdm progress bar per image on stderr; keep the table readable.
        with contextlib.redirect_stderr(io.StringIO()):
            return explainer(inputs, classes)

    return step


def run_all(step: Step, inputs: torch.Tensor, classes: np.ndarray, batch: int) -> tuple[float, list[object]]:
    """Seconds per image for ``step`` over all ``inputs`` in calls of ``batch`` images, and the outputs."""
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        outputs.append(step(inputs[start : start + batch], classes[start : start + batch]))
    return (time.perf_counter() - started) / len(inputs), outputs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = load_average()

    paths, labels = choose_paths(args.data, args.images)
    started = time.perf_counter()
    try:
        model = create_model(args.model, pretrained=not args.random_weights, image_size=args.image_size)
    except CovidxrError as exc:
        hint = "(for timing only, --random-weights builds the model without pretrained weights)"
        raise SystemExit(f"{exc}\n{hint}") from None
    load_seconds = time.perf_counter() - started
    model.eval()

    started = time.perf_counter()
    inputs = decode(paths, model)
    decode_seconds = time.perf_counter() - started
    with torch.no_grad():
        classes = torch.cat([model(inputs[i : i + args.batch]) for i in range(0, len(inputs), args.batch)]).argmax(1)
    classes = classes.numpy()

    explainers = {method: Explainer(model, method) for method in ORDER if method in METHODS}
    steps: dict[str, Step] = {
        "forward only (no grad)": forward_only(model),
        "forward + backward (bare)": forward_backward(model),
    }
    for method in ORDER:
        if method != "scorecam":
            steps[method] = explain_step(explainers[method])
    modes = {"batched": args.batch, "single": 1}

    counts = {label: labels.count(label) for label in sorted(set(labels))}
    weights = "RANDOM weights, timing only" if args.random_weights else f"{model.weights.kind} weights"
    print("covidxr explanation benchmark: time per image of each CAM method vs. a bare forward + backward")
    print(f"  data:        {Path(args.data).resolve()}")
    print(
        f"  images:      {len(paths)} real X-rays, evenly spaced over metadata.csv ("
        + ", ".join(f"{label} {n}" for label, n in counts.items())
        + f"), decoded once in {decode_seconds:.2f} s, held in memory"
    )
    print(f"  model:       {args.model} ({weights}, loaded once in {load_seconds:.2f} s; not timed below)")
    print(f"  image size:  {model.image_size} x {model.image_size}; Grad-CAM layer {model.spec.gradcam_layer!r}")
    print(f"  threads:     torch {torch.get_num_threads()} (CPU cores: {os.cpu_count()})")
    print(f"  platform:    torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(
        f"  calls:       batched = {args.batch} images per call; single = 1 image per call; one Explainer "
        "per method, reused for every call"
    )
    print(
        f"  repeats:     1 warm-up + {args.repeats} timed (interleaved); ScoreCAM: 1 warm-up forward + "
        f"{args.scorecam_repeats} timed on {args.scorecam_images} image(s)"
    )
    print(f"  load avg:    {describe_load(load_at_start)} at start")
    print()

    # Warm-up: every step once per batch shape (batched, the last partial batch, single).
    for step in steps.values():
        for batch in {args.batch, len(inputs) % args.batch or args.batch, 1}:
            step(inputs[:batch], classes[:batch])

    times: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in steps for mode in modes}
    maps: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            for mode, batch in modes.items():
                seconds, outputs = run_all(step, inputs, classes, batch)
                times[name, mode].append(seconds)
                if name in explainers:
                    maps[name, mode] = np.concatenate(outputs)

    scorecam_note = ""
    if args.scorecam_images:
        step = explain_step(explainers["scorecam"], quiet=True)
        sub_inputs, sub_classes = inputs[: args.scorecam_images], classes[: args.scorecam_images]
        with torch.no_grad():  # ScoreCAM's own forward passes run in batches of 16 masked copies
            model(sub_inputs[:1].expand(16, -1, -1, -1).contiguous())
        score_modes = {"batched": min(args.batch, args.scorecam_images), "single": 1}
        for mode, batch in score_modes.items():
            times["scorecam", mode] = []
            if mode == "single" and score_modes["batched"] == 1:
                continue  # the same calls as "batched"; reported once in both columns
            for _ in range(args.scorecam_repeats):
                seconds, outputs = run_all(step, sub_inputs, sub_classes, batch)
                times["scorecam", mode].append(seconds)
            maps["scorecam", mode] = np.concatenate(outputs)
        if not times["scorecam", "single"]:
            times["scorecam", "single"] = times["scorecam", "batched"]
            maps["scorecam", "single"] = maps["scorecam", "batched"]
            scorecam_note = f" (batch of {score_modes['batched']} = one image per call: the same measurement twice)"

    bare = {mode: min(times["forward + backward (bare)", mode]) for mode in modes}
    names = [name for name in times if name[1] == "batched"]
    header = (
        f"   {'':<28s}| {'batched, ' + str(args.batch) + ' images per call':^33s}"
        f"| {'single, 1 image per call':^33s}| {'images':>6s}"
    )
    print("seconds per image (best of the repeats; median in brackets) and the ratio to a bare forward + backward")
    print("of the same way of calling; ratios use the best times")
    print(header)
    columns = f"{'s/image':>9s} {'(median)':>10s} {'x fwd+bwd':>11s} "
    print(f"   {'':<28s}| " + "| ".join([columns] * 2) + "|")
    print("   " + "-" * (len(header) - 3))
    for name, _ in names:
        cells = []
        for mode in modes:
            best = min(times[name, mode])
            median = statistics.median(times[name, mode])
            cells.append(f"{best:9.4f} {'(' + format(median, '.4f') + ')':>10s} {best / bare[mode]:10.2f}x ")
        n_images = args.scorecam_images if name == "scorecam" else len(inputs)
        print(f"   {name:<28s}| " + "| ".join(cells) + f"| {n_images:>6d}")
    print()
    if args.scorecam_images:
        print(
            f"ScoreCAM is measured on {args.scorecam_images} image(s) only (--scorecam-images), "
            f"best of {args.scorecam_repeats} run(s){scorecam_note}: it runs one forward pass per feature channel."
        )
    else:
        print("ScoreCAM skipped (--scorecam-images 0).")
    single_gradcam = min(times["gradcam", "single"])
    print(
        f"Grad-CAM of one image (one image per call): {single_gradcam:.4f} s = "
        f"{single_gradcam / bare['single']:.2f} x a bare forward + backward of one image "
        f"({bare['single']:.4f} s); batched: {min(times['gradcam', 'batched']):.4f} s/image = "
        f"{min(times['gradcam', 'batched']) / bare['batched']:.2f} x"
    )
    print(
        f"batching ({args.batch} per call) vs one image per call, bare forward + backward: "
        f"{bare['single'] / bare['batched']:.2f} x faster per image"
    )
    print()
    print("max |batched map - single-image map| (maps in [0, 1]; batching must not change them):")
    print(
        "   "
        + ", ".join(
            f"{method} {np.abs(maps[method, 'batched'] - maps[method, 'single']).max():.1e}"
            for method in ORDER
            if (method, "batched") in maps
        )
    )
    print(f"load average at the end: {describe_load(load_average(), torch.get_num_threads())}")


if __name__ == "__main__":
    main()
