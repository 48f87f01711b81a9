"""Benchmark: where prediction's time goes on one machine, and what Ray Data costs on one node (issue 27).

On ``--images`` real X-rays evenly spaced over ``metadata.csv`` of ``--data``, in one run:

1. **Stages**, one image at a time on one thread, summed over the images: decode (``read_image`` with the draft
   size prediction uses), the lung segmenter (the resize to its input, its onnxruntime session with the z-score
   of its input, and the post-processing into a mask and box), the lung crop and z-score, the resize and
   normalisation to the classifier's input, and the classifier (its session, in batches of ``--batch-size``).
   Each as ms per image and its share of the total.
2. **Bare loop**: the two onnxruntime sessions ``predict`` uses (``make_engine(run, "auto")``: the classifier on
   the physical cores; ``lung_segmenter()``: the segmenter on one thread) run back to back over pre-decoded
   inputs in batches of ``--batch-size``: what prediction would cost if decoding and preprocessing were free.
3. **Local predict**: ``predict_to_file`` over the same files into a fresh CSV, as ``covidxr predict --out`` runs.
4. **Ray, one node**: ``predict_archive`` on a local Ray cluster of this machine's cores (``ray.init(num_cpus=...)``,
   started once; its start-up is printed, not counted), into a fresh CSV: actors' start-up included.
5. With ``--torch``: ``covidxr predict DIR --out`` as a subprocess with the default engine and with
   ``--engine torch``, start-up included (the issue's "auto vs torch at 256 images").

2-4 (and 5) are interleaved over ``--repeats`` rounds and the median of each is reported; the ratios are taken
from those medians, side by side in one run. Run from the repository root::

    .venv/bin/python benchmarks/archive.py
    .venv/bin/python benchmarks/archive.py --images 96 --repeats 1 --torch
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.runtime.archive import predict_archive
from covidxr.runtime.engines import physical_cores
from covidxr.runtime.images import read_image
from covidxr.runtime.lungs import lung_segmenter, model_input, normalise
from covidxr.runtime.preprocess import LUNG_CROP_MARGIN, normalise_intensity, to_input_array
from covidxr.runtime.runners import input_transform, make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.writer import predict_to_file
from machine import REPO, cpu_model, describe_load, load_average

TARGETS = {"local predict / bare loop": 0.85, "Ray one node / local predict": 0.8, "auto / torch (CLI)": 4.0}


def stages(paths: list[Path], batch: int) -> dict[str, float]:
    """Seconds per stage over ``paths``, one image at a time on this thread (the classifier in batches)."""
    run = load_run(default_model_path())
    engine = make_engine(run, "auto", threads=1)
    transform = input_transform(run, engine)
    segmenter = lung_segmenter()
    names = ["decode", "segmenter resize", "segmenter session", "segmenter mask and box", "lung crop + z-score"]
    spent = dict.fromkeys([*names, "resize + normalise", "classifier"], 0.0)

    def timed(stage: str, call: Callable, *args):
        started = time.perf_counter()
        result = call(*args)
        spent[stage] += time.perf_counter() - started
        return result

    inputs = []
    for path in paths:
        grey = np.asarray(timed("decode", read_image, path, transform.decode_side).convert("L"))
        small = timed("segmenter resize", model_input, grey, segmenter.size)
        [soft] = timed("segmenter session", segmenter.probabilities, [small])
        fields = timed("segmenter mask and box", segmenter.fields, soft, grey.shape)
        cropped = timed("lung crop + z-score", crop_and_normalise, grey, fields.box, transform.pipeline.intensity)
        image = Image.fromarray(cropped, mode="L")
        inputs.append(timed("resize + normalise", to_input_array, image, transform.image_size, transform.preprocessing))
    stacked = np.stack(inputs)
    for start in range(0, len(stacked), batch):
        timed("classifier", engine, stacked[start : start + batch])
    return spent


def crop_and_normalise(grey: np.ndarray, box: tuple[int, int, int, int] | None, intensity: str) -> np.ndarray:
    """The lung crop of ``lung_input`` from an already found box (the whole image where none), then the intensity
    normalisation: the pipeline's steps after the segmenter, timed apart from it."""
    if box is not None:
        left, top, right, bottom = box
        grow_x, grow_y = round(LUNG_CROP_MARGIN * (right - left)), round(LUNG_CROP_MARGIN * (bottom - top))
        grey = grey[max(top - grow_y, 0) : bottom + grow_y, max(left - grow_x, 0) : right + grow_x]
    return normalise_intensity(grey, intensity)


def bare_loop(paths: list[Path], batch: int) -> Callable[[], float]:
    """A call that runs predict's two sessions over pre-decoded inputs and returns its seconds."""
    run = load_run(default_model_path())
    engine = make_engine(run, "auto")
    transform = input_transform(run, engine)
    segmenter = lung_segmenter()
    greys = [np.asarray(read_image(path, transform.decode_side).convert("L")) for path in paths]
    smalls = np.stack([normalise(model_input(grey, segmenter.size)) for grey in greys])[:, None]
    inputs = np.stack([transform(read_image(path, transform.decode_side)) for path in paths])

    def call() -> float:
        started = time.perf_counter()
        for start in range(0, len(paths), batch):
            segmenter.session.run(None, {segmenter.input_name: smalls[start : start + batch]})
            engine(inputs[start : start + batch])
        return time.perf_counter() - started

    call()  # warm-up
    return call


def timed_file(predict: Callable[[Path], object], folder: Path) -> float:
    out = folder / f"p{time.monotonic_ns()}.csv"
    started = time.perf_counter()
    predict(out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="also time the CLI with --engine torch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("COVIDXR_OFFLINE", "1")

    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    step = max(1, len(meta) // args.images)
    paths = [args.data / name for name in meta["filename"].iloc[::step].head(args.images)]
    n = len(paths)
    cores = physical_cores()
    print(f"covidxr archive benchmark: {n} real X-rays from {args.data}")
    print(f"  CPU: {cpu_model()}, {os.cpu_count()} logical / {cores} physical cores; load at start: ", end="")
    print(describe_load(load_average()))

    spent = stages(paths, args.batch_size)
    total = sum(spent.values())
    print("\n1. Stages, one thread (ms per image, share):")
    for stage, seconds in spent.items():
        print(f"   {stage:22s} {1000 * seconds / n:7.1f} ms  {seconds / total:5.1%}")

    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    print(f"\nRay local cluster of {cores} CPUs started in {time.perf_counter() - started:.1f} s (not counted)")
    run = load_run(default_model_path())
    bare = bare_loop(paths, args.batch_size)
    workspace = Path(tempfile.mkdtemp(prefix="covidxr-archive-bench-"))
    folder = workspace / "images"
    folder.mkdir()
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())
    variants: dict[str, Callable[[], float]] = {
        "bare loop": bare,
        "local predict": lambda: timed_file(lambda out: predict_to_file(run, [folder], out, progress=False), workspace),
        "Ray one node": lambda: timed_file(
            lambda out: predict_archive(run, [folder], out, address=None, progress=False), workspace
        ),
    }
    if args.torch:
        for name, extra in (("CLI auto", []), ("CLI torch", ["--engine", "torch"])):
            command = [sys.executable, "-m", "covidxr", "predict", str(folder), *extra]
            variants[name] = lambda command=command: timed_file(
                lambda out: subprocess.run([*command, "--out", str(out)], check=True, capture_output=True), workspace
            )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, call in variants.items():
            times[name].append(call())
    rate = {name: n / statistics.median(values) for name, values in times.items()}
    print(f"\n2-5. Throughput, median of {args.repeats} interleaved rounds (images/s):")
    for name, value in rate.items():
        print(f"   {name:16s} {value:7.1f} img/s  ({', '.join(f'{t:.1f}' for t in times[name])} s)")
    ratios = {
        "local predict / bare loop": rate["local predict"] / rate["bare loop"],
        "Ray one node / local predict": rate["Ray one node"] / rate["local predict"],
    }
    if args.torch:
        ratios["auto / torch (CLI)"] = rate["CLI auto"] / rate["CLI torch"]
    print("\nRatios (one run, side by side):")
    for name, value in ratios.items():
        verdict = "PASS" if value >= TARGETS[name] else "MISS"
        print(f"   {name:30s} {value:5.2f}x  target >= {TARGETS[name]}x  {verdict}")
    print("   service concurrency 16 / 1: measured by benchmarks/serve.py")
    print(f"load at end: {describe_load(load_average(), own_threads=cores)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
