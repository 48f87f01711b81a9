"""Benchmark: where prediction's time goes on one machine, and the four throughput ratios of issue 27, in one run.

On real X-rays evenly spaced over ``metadata.csv`` of ``--data``:

1. **Stages**, one image at a time on one thread, summed over ``--images`` images: decode (``read_image`` with the
   draft size prediction uses), the lung segmenter (the resize to its input, its onnxruntime session with the
   z-score of its input, the post-processing into a mask and box), the lung crop and z-score, the resize and
   normalisation to the classifier's input, the orientation check (``find_orientation``: the segmenter on the
   image turned 180 degrees and flipped; the upright view's confidence is kept from the lung crop's call), the
   other checks (blank image, colour photograph) and the classifier (its session, in batches of
   ``--batch-size``). Each as ms per image and its share of the total.
2. **Bare loop**: the two onnxruntime sessions ``predict`` uses (the classifier on every physical core, its best
   alone; the segmenter on one thread) run back to back over pre-decoded inputs in batches of ``--batch-size``:
   what prediction would cost if decoding and preprocessing were free. Also, for reference, the same loop with the
   two turned views the orientation check segments (the model work ``predict`` does by design).
3. **Local predict**: ``predict_to_file`` over the files into a fresh CSV, as ``covidxr predict --out`` runs
   (default engine and threads, batches of ``--batch-size``), on ``--images`` and on twice as many images.
4. **Ray, one node**: ``predict_archive`` on a local Ray cluster of this machine's cores into a fresh CSV, actors'
   start-up included, on the same two folders (the cluster's start and a first run on 16 images are printed, not
   counted). The ratio Ray / local is given on ``--images`` (start-up included) and on the second half alone
   (``N / (T(2N) - T(N))``: the rate once the actors run, which a million-image run sees); what the single
   driver spends per row (parse, row, CSV line), the bound of a large cluster; and, once, local prediction of
   ``--dicom-images`` of the X-rays written as 3000 x 2500 12-bit DICOMs (an archive's size; upscaled).
5. **CLI, auto vs torch**: ``covidxr predict DIR --out`` as a subprocess with the default engine and with
   ``--engine torch``, start-up included, on ``--cli-images`` of the images (skip with ``--no-torch``).
6. **Service, concurrency 16 vs 1**: ``covidxr serve`` as a subprocess (``benchmarks/serve.py``'s server and
   clients: real HTTP uploads, answers checked), ``--requests`` requests at concurrency 1, then 16, then again;
   with ``--compare-threads`` also a server with ``--threads`` = the physical cores (the setting before issue 27).

2-5 are interleaved over ``--repeats`` rounds and the median of each is reported; every ratio is taken from
measurements of this run. Run from the repository root::

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/archive.py
    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/archive.py --images 128 --repeats 1 --no-torch
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

from covidxr.runtime.archive import predict_archive
from covidxr.runtime.cam import colour_reason
from covidxr.runtime.engines import physical_cores, shared_engine_threads
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import FILE_BATCH, predict_files
from covidxr.runtime.lungs import TURNS, find_orientation, lung_segmenter, model_input, normalise
from covidxr.runtime.ood import is_blank
from covidxr.runtime.preprocess import LUNG_CROP_MARGIN, normalise_intensity, to_input_array
from covidxr.runtime.runners import input_transform, make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.writer import csv_line, flat_row, predict_to_file
from machine import REPO, cpu_model, describe_load, load_average
from serve import Level, Server, load_images, run_level

TARGETS = {
    "local predict / bare loop": 0.85,
    "auto / torch (CLI, start-up included)": 4.0,
    "service concurrency 16 / 1": 1.8,
    "Ray one node / local predict": 0.8,
}


def stages(paths: list[Path], batch: int) -> dict[str, float]:
    """Seconds per stage over ``paths``, one image at a time on this thread (the classifier in batches)."""
    run = load_run(default_model_path())
    engine = make_engine(run, "auto", threads=1)
    transform = input_transform(run, engine)
    segmenter = lung_segmenter()
    names = ["decode", "segmenter resize", "segmenter session", "segmenter mask and box", "lung crop + z-score"]
    names += ["resize + normalise", "orientation check", "blank + colour checks", "classifier"]
    spent = dict.fromkeys(names, 0.0)

    def timed(stage: str, call: Callable, *args):
        started = time.perf_counter()
        result = call(*args)
        spent[stage] += time.perf_counter() - started
        return result

    inputs = []
    for path in paths:
        decoded = timed("decode", read_image, path, transform.decode_side)
        grey = np.asarray(decoded.convert("L"))
        small = timed("segmenter resize", model_input, grey, segmenter.size)
        [soft] = timed("segmenter session", segmenter.probabilities, [small])
        fields = timed("segmenter mask and box", segmenter.fields, soft, grey.shape)
        cropped = timed("lung crop + z-score", crop_and_normalise, grey, fields.box, transform.pipeline.intensity)
        image = Image.fromarray(cropped, mode="L")
        inputs.append(timed("resize + normalise", to_input_array, image, transform.image_size, transform.preprocessing))
        segmenter.segment(grey)  # untimed: the lung crop's call, which leaves the upright view's confidence
        timed("orientation check", find_orientation, grey, fields.reason is not None)
        timed("blank + colour checks", lambda image=decoded: (is_blank(image), colour_reason(image)))
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


def bare_loop(paths: list[Path], batch: int, turned: bool = False) -> Callable[[], float]:
    """A call that runs predict's two sessions over pre-decoded inputs and returns its seconds; with ``turned``
    the segmenter also runs on each image turned 180 degrees and flipped, as the orientation check does."""
    run = load_run(default_model_path())
    engine = make_engine(run, "auto", threads=physical_cores())  # alone, the classifier's best is every core
    transform = input_transform(run, engine)
    segmenter = lung_segmenter()
    greys = [np.asarray(read_image(path, transform.decode_side).convert("L")) for path in paths]
    smalls = [model_input(grey, segmenter.size) for grey in greys]
    views = [[small, *(TURNS[turn](small) for turn in list(TURNS)[:2])] if turned else [small] for small in smalls]
    normalised = [np.stack([normalise(np.ascontiguousarray(view)) for view in group])[:, None] for group in views]
    inputs = np.stack([transform(read_image(path, transform.decode_side)) for path in paths])

    def call() -> float:
        started = time.perf_counter()
        for start in range(0, len(paths), batch):
            for group in normalised[start : start + batch]:  # one session call per image, as predict makes
                segmenter.session.run(None, {segmenter.input_name: group})
            engine(inputs[start : start + batch])
        return time.perf_counter() - started

    call()  # warm-up
    return call


def timed_file(predict: Callable[[Path], object], folder: Path) -> float:
    out = folder / f"p{time.monotonic_ns()}.csv"
    started = time.perf_counter()
    predict(out)
    return time.perf_counter() - started


def driver_seconds_per_row(run, paths: list[Path], rows: int = 20_000) -> float:
    """What the Ray driver spends on one row: ``json.loads`` of an actor's result, ``flat_row`` and its CSV line
    (``archive._checked`` and ``writer.predict_locked``), timed over ``rows`` copies of real results."""
    results = [json.dumps(result) for result in predict_files(run, paths[:32], progress=False)]
    texts = [results[i % len(results)] for i in range(rows)]
    columns = [*flat_row({"file": ""}, run.labels), "model"]
    started = time.perf_counter()
    for text in texts:
        row = {**flat_row(json.loads(text), run.labels), "model": "m"}
        csv_line(row[column] for column in columns)
    return (time.perf_counter() - started) / rows


def large_dicoms(paths: list[Path], folder: Path, rows: int = 3000, columns: int = 2500) -> Path:
    """Real X-rays written as uncompressed 12-bit DX DICOMs of a detector's size (upscaled: the time depends on the
    pixel count, not on the detail), as an archive holds them."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    for path in paths:
        grey = read_image(path).convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
        ds.Modality, ds.PatientID, ds.StudyInstanceUID = "DX", "bench", generate_uid()
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.asarray(grey, dtype=np.uint16) * 16).tobytes()
        ds.save_as(folder / f"{path.stem}.dcm", enforce_file_format=True)
    return folder


def linked_folder(workspace: Path, name: str, paths: list[Path]) -> Path:
    folder = workspace / name
    folder.mkdir()
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def service_rates(data: Path, requests: int, threads: int | None) -> tuple[float, float, list[str]]:
    """Answers per second of ``covidxr serve`` at concurrency 1 and 16 (each measured twice, 1, 16, 1, 16; the
    medians), and anything that went wrong."""
    images = load_images(data, 32)
    with tempfile.TemporaryDirectory(prefix="covidxr-archive-serve-") as tmp:
        server = Server(SimpleNamespace(max_queue=64, engine="auto", model=None), Path(tmp) / "server.log")
        if threads is not None:
            server.command += ["--threads", str(threads)]
        rates: dict[int, list[float]] = {1: [], 16: []}
        problems: list[str] = []
        try:
            server.start()
            references: dict[int, dict] = {}
            run_level(server, images, Level("warm-up", 1, len(images)), references)
            for concurrency in (1, 16, 1, 16):
                level = run_level(server, images, Level("level", concurrency, requests), references)
                rates[concurrency].append(level.ok / level.seconds)
                problems += level.problems()
        finally:
            server.stop()
    return statistics.median(rates[1]), statistics.median(rates[16]), problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--images", type=int, default=512, help="N: the folder of the ratios (2N also measured)")
    parser.add_argument("--dicom-images", type=int, default=32, help="large DICOMs predicted once (0: none)")
    parser.add_argument("--cli-images", type=int, default=256, help="images of the CLI's auto vs torch comparison")
    parser.add_argument("--batch-size", type=int, default=FILE_BATCH)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300, help="requests per service level")
    parser.add_argument("--no-torch", action="store_true", help="skip the CLI's --engine torch comparison")
    parser.add_argument("--compare-threads", action="store_true", help="also serve with --threads = physical cores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("COVIDXR_OFFLINE", "1")

    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    if 2 * args.images > len(meta) or args.cli_images > args.images:
        raise SystemExit(f"--images {args.images}: {args.data} needs twice that many images (and --cli-images fewer)")
    rows = np.linspace(0, len(meta) - 1, 2 * args.images).round().astype(int)
    every = [args.data / name for name in meta["filename"].iloc[rows]]
    paths = every[::2]  # N evenly spaced; the 2N folder holds them and N more
    n = len(paths)
    cores = physical_cores()
    print(f"covidxr archive benchmark: {n} and {2 * n} real X-rays from {args.data}, batches of {args.batch_size}")
    print(f"  CPU: {cpu_model()}, {os.cpu_count()} logical / {cores} physical cores; load at start: ", end="")
    print(describe_load(load_average()))
    print(f"  predicting engine: onnxruntime on {shared_engine_threads()} thread(s) (shared_engine_threads)")

    spent = stages(paths, args.batch_size)
    total = sum(spent.values())
    print("\n1. Stages, one thread (ms per image, share):")
    for stage, seconds in spent.items():
        print(f"   {stage:22s} {1000 * seconds / n:7.2f} ms  {seconds / total:5.1%}")

    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    print(f"\nRay local cluster of {cores} CPUs started in {time.perf_counter() - started:.1f} s (not counted)")
    run = load_run(default_model_path())
    workspace = Path(tempfile.mkdtemp(prefix="covidxr-archive-bench-"))
    folders = {n: linked_folder(workspace, "n", paths), 2 * n: linked_folder(workspace, "2n", every)}
    started = time.perf_counter()  # the cluster's first dataset pays one-time costs (worker processes, imports)
    predict_archive(run, [linked_folder(workspace, "warm-up", paths[:16])], workspace / "warm-up.csv", address=None)
    print(f"Ray warm-up run of 16 images in {time.perf_counter() - started:.1f} s (not counted)")
    variants: dict[str, Callable[[], float]] = {
        "bare loop": bare_loop(paths, args.batch_size),
        "bare + turned views": bare_loop(paths, args.batch_size, turned=True),
    }
    for count, folder in folders.items():
        variants[f"local predict {count}"] = lambda folder=folder: timed_file(
            lambda out: predict_to_file(run, [folder], out, batch_size=args.batch_size, progress=False), workspace
        )
        variants[f"Ray one node {count}"] = lambda folder=folder: timed_file(
            lambda out: predict_archive(run, [folder], out, address=None, progress=False), workspace
        )
    if not args.no_torch:
        cli_folder = linked_folder(workspace, "cli", paths[: args.cli_images])
        for name, extra in (("CLI auto", []), ("CLI torch", ["--engine", "torch"])):
            command = [sys.executable, "-m", "covidxr", "predict", str(cli_folder), *extra]
            variants[name] = lambda command=command: timed_file(
                lambda out: subprocess.run([*command, "--out", str(out)], check=True, capture_output=True), workspace
            )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, call in variants.items():
            times[name].append(call())
    ray.shutdown()
    seconds = {name: statistics.median(values) for name, values in times.items()}
    counts = {
        name: 2 * n if name.endswith(f" {2 * n}") else args.cli_images if name.startswith("CLI") else n
        for name in seconds
    }
    rate = {name: counts[name] / value for name, value in seconds.items()}
    print(f"\n2-5. Median of {args.repeats} interleaved rounds:")
    for name, value in seconds.items():
        print(f"   {name:20s} {counts[name]:5d} images {counts[name] / value:7.1f} img/s  ", end="")
        print(f"({', '.join(f'{t:.2f}' for t in times[name])} s)")
    marginal = {
        kind: n / max(seconds[f"{kind} {2 * n}"] - seconds[f"{kind} {n}"], 1e-9)
        for kind in ("local predict", "Ray one node")
    }
    print(
        f"   second {n} images alone, N / (T(2N) - T(N)): local {marginal['local predict']:.1f} img/s, "
        f"Ray {marginal['Ray one node']:.1f} img/s"
    )

    if args.dicom_images:
        dicoms = large_dicoms(paths[: args.dicom_images], workspace / "dicom")
        size = sum(path.stat().st_size for path in dicoms.iterdir()) / args.dicom_images
        spent = timed_file(lambda out: predict_to_file(run, [dicoms], out, progress=False), workspace)
        print(
            f"   local predict, {args.dicom_images} 3000 x 2500 12-bit DICOMs ({size / 2**20:.1f} MiB each): "
            f"{args.dicom_images / spent:.1f} img/s"
        )
    per_row = driver_seconds_per_row(run, paths)
    print(f"   Ray driver: {1e6 * per_row:.0f} us per row (json.loads, flat_row, CSV line): {1 / per_row:,.0f} rows/s")

    print(f"\n6. Service: covidxr serve, {args.requests} requests per level at concurrency 1 and 16, twice each")
    one, sixteen, problems = service_rates(args.data, args.requests, None)
    print(f"   default threads ({shared_engine_threads()}): {one:.1f} vs {sixteen:.1f} answers/s")
    ratios = {
        "local predict / bare loop": rate[f"local predict {n}"] / rate["bare loop"],
        "auto / torch (CLI, start-up included)": rate["CLI auto"] / rate["CLI torch"] if not args.no_torch else None,
        "service concurrency 16 / 1": sixteen / one,
        "Ray one node / local predict": rate[f"Ray one node {n}"] / rate[f"local predict {n}"],
    }
    if args.compare_threads:
        old_one, old_sixteen, old_problems = service_rates(args.data, args.requests, cores)
        problems += old_problems
        print(f"   --threads {cores}: {old_one:.1f} vs {old_sixteen:.1f} answers/s ({old_sixteen / old_one:.2f}x)")
    if problems:
        print(f"   PROBLEMS: {'; '.join(problems)}")

    print(f"\nRatios (one run, side by side; {n} images, the CLI's {args.cli_images}):")
    for name, value in ratios.items():
        if value is not None:
            verdict = "PASS" if value >= TARGETS[name] else "MISS"
            print(f"   {name:38s} {value:5.2f}x  target >= {TARGETS[name]}x  {verdict}")
    print(
        "   (info) local predict / bare + turned views "
        f"{rate[f'local predict {n}'] / rate['bare + turned views']:5.2f}x"
    )
    print(
        f"   (info) Ray / local on {2 * n} images "
        f"{rate[f'Ray one node {2 * n}'] / rate[f'local predict {2 * n}']:5.2f}x"
    )
    print(
        f"   (info) Ray / local, second {n} images alone  "
        f"{marginal['Ray one node'] / marginal['local predict']:5.2f}x  (the actors' start-up left out)"
    )
    print(f"load at end: {describe_load(load_average(), own_threads=cores)}")


if __name__ == "__main__":
    main()
