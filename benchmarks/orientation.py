"""Benchmark: how often the orientation check catches films turned 90° or 180° or flipped, and how often it
refuses an upright one (target: at most 1%), on the shared real X-rays, in one run.

Every image of ``--data`` folders (each ``metadata.csv`` + ``images/``; ``--limit`` takes evenly spaced ones) is
checked as given (upright) and turned: 180°, flipped top to bottom, 90° clockwise and anticlockwise, and
mirrored left to right (for reference: a mirrored film keeps its lungs upright, so the check is not meant to
catch it). Each view goes through the checks every route shares (``covidxr.runtime.batches.input_reason``:
colour photograph, lung check, orientation). Per view it prints the share the orientation check names
("detected"), the share refused for any reason (no answer), and, for upright images, the false refusals by the
orientation check. The images with a hand-drawn lung mask (``lung-masks/``: the segmenter's training and
validation images) are counted apart, since the segmenter has seen them.

It also prices the check: ``predict_files`` with the bundled model over ``--cost-images`` of the files, with
the orientation check and with it switched off, interleaved ``--repeats`` times in this run (medians compared).

Run from the repository root (writes nothing)::

    .venv/bin/python benchmarks/orientation.py
    .venv/bin/python benchmarks/orientation.py --limit 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.runtime import batches
from covidxr.runtime.batches import input_reason
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import predict_files
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import default_model_path, load_run
from machine import describe_load, load_average, machine_lines

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = [SHARED / "cxr3", SHARED / "adult-controls", SHARED / "ieee8023-other"]
TARGET_FALSE_REFUSALS = 0.01
NOT_UPRIGHT = "not upright"

VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "upright": lambda image: image,
    "turned 180°": lambda image: image.transpose(Image.Transpose.ROTATE_180),
    "flipped top to bottom": lambda image: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "turned 90° clockwise": lambda image: image.transpose(Image.Transpose.ROTATE_270),
    "turned 90° anticlockwise": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "mirrored left to right": lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


def images_of(folders: list[Path], limit: int | None) -> list[Path]:
    """Every image listed in the folders' metadata, or ``limit`` of them evenly spaced (no randomness)."""
    paths = [
        folder / name
        for folder in folders
        for name in pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)["filename"]
    ]
    if limit is not None and limit < len(paths):
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))]
    return paths


def masked_names() -> set[str]:
    """File names of the images with a hand-drawn lung mask (what the segmenter was trained and validated on)."""
    meta = SHARED / "lung-masks" / "metadata.csv"
    if not meta.is_file():
        return set()
    return {Path(name).name for name in pd.read_csv(meta, dtype=str, keep_default_na=False)["image"]}


def predict_cost(paths: list[Path], repeats: int) -> tuple[float, float]:
    """Median seconds per image of ``predict_files`` (the bundled model, onnxruntime) with the orientation check,
    and with it switched off, timed alternately on the same files after a warm-up."""
    run = load_run(default_model_path())
    engine = make_engine(run, "auto")
    check = batches.find_orientation
    predict_files(run, paths[:4], progress=False, engine=engine)  # warm-up: the sessions, the segmenter
    timings: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(repeats):
            for checked in (True, False):
                batches.find_orientation = check if checked else (lambda grey, sideways=False: None)
                started = time.perf_counter()
                predict_files(run, paths, progress=False, engine=engine)
                timings[checked].append((time.perf_counter() - started) / len(paths))
    finally:
        batches.find_orientation = check
    return statistics.median(timings[True]), statistics.median(timings[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA, help="dataset folders")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images (default: all)")
    parser.add_argument("--cost-images", type=int, default=64, help="files predicted to price the check")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats of the cost")
    args = parser.parse_args()

    paths = images_of(args.data, args.limit)
    masked = masked_names()
    load_before = load_average()
    started = time.perf_counter()
    reasons: dict[str, list[str]] = {view: [] for view in VIEWS}
    for path in paths:
        image = read_image(path)
        for view, turn in VIEWS.items():
            reasons[view].append(input_reason(turn(image)))
    seconds = time.perf_counter() - started
    in_masks = np.array([path.name in masked for path in paths])

    print(machine_lines())
    print(
        f"{len(paths)} real X-rays from {', '.join(folder.name for folder in args.data)} ({in_masks.sum()} have a "
        f"hand-drawn lung mask, the segmenter's own images); {len(VIEWS)} views each, {seconds:.0f} s "
        f"({1000 * seconds / (len(paths) * len(VIEWS)):.1f} ms a check); load {describe_load(load_before)}"
    )
    print(f"{'view':<26} {'images':>7} {'detected (not upright)':>23} {'no answer (any reason)':>23}")
    for subset, keep in (("all", np.ones(len(paths), bool)), ("without a hand mask", ~in_masks)):
        print(f"-- {subset}")
        for view, found in reasons.items():
            found = [reason for reason, kept in zip(found, keep, strict=True) if kept]
            detected = sum(NOT_UPRIGHT in reason for reason in found) / max(1, len(found))
            refused = sum(bool(reason) for reason in found) / max(1, len(found))
            print(f"{view:<26} {len(found):>7} {detected:>23.1%} {refused:>23.1%}")
    upright = reasons["upright"]
    false = sum(NOT_UPRIGHT in reason for reason in upright)
    verdict = "met" if false / len(upright) <= TARGET_FALSE_REFUSALS else "missed"
    print(
        f"false refusals of upright films by the orientation check: {false} of {len(upright)} "
        f"({false / len(upright):.2%}; target ≤ {TARGET_FALSE_REFUSALS:.0%}: {verdict})"
    )
    for path, reason in zip(paths, upright, strict=True):
        if NOT_UPRIGHT in reason:
            print(f"  refused upright: {path.name}: {reason}")
    sample = paths[:: max(1, len(paths) // args.cost_images)][: args.cost_images]
    load_before = load_average()
    with_check, without = predict_cost(sample, args.repeats)
    print(
        f"cost: predict_files over {len(sample)} files, {args.repeats} interleaved repeats (medians): "
        f"{1000 * with_check:.1f} ms an image with the orientation check, {1000 * without:.1f} ms without "
        f"(ratio {with_check / without:.2f}); load {describe_load(load_before)}"
    )


if __name__ == "__main__":
    main()
