"""Benchmark: the lung segmenter's forward pass against the bundled classifier's, per image, in one run.

Both graphs run in onnxruntime on the same ``--threads`` intra-op threads (default 1, as inside a decoding
worker) at batch 1, on the same real X-rays (``--images``, evenly spaced over cxr3's ``metadata.csv``,
decoded and preprocessed once into memory, each with its own model's preprocessing). Every repeat times
the classifier then the segmenter over all images (interleaved, after a warm-up); the medians over
``--repeats`` are compared and the ratio printed against the target of 0.25. For reference it also times
the segmenter's whole ``segment()`` per image (resize, normalisation, forward, post-processing, mask at
the image's size), which is what a pipeline pays.

Run from the repository root (writes nothing)::

    .venv/bin/python benchmarks/segment.py
    .venv/bin/python benchmarks/segment.py --images 64 --repeats 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

import covidxr
from covidxr.lab.models import run_model
from covidxr.runtime.engines import OnnxEngine
from covidxr.runtime.images import read_image
from covidxr.runtime.lungs import LungSegmenter, model_input, normalise
from machine import describe_load, isolated_cache, load_average, machine_lines

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
TARGET = 0.25


def per_image_seconds(call, inputs: list) -> float:
    """Mean seconds per call of ``call`` over ``inputs``, one input per call."""
    started = time.perf_counter()
    for item in inputs:
        call(item)
    return (time.perf_counter() - started) / len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="real X-rays timed (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: %(default)s)")
    args = parser.parse_args()

    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    rows = np.unique(np.linspace(0, len(meta) - 1, args.images).round().astype(int))
    images = [read_image(args.data / meta["filename"].iloc[i]) for i in rows]
    greys = [np.asarray(image.convert("L")) for image in images]
    load_before = load_average()
    with isolated_cache("segment") as tmp:
        model = covidxr.load_model(engine="onnx", cache_dir=tmp / "cache")
        classifier = OnnxEngine(model.engine.session._model_path, threads=args.threads, spin=False)
        segmenter = LungSegmenter(threads=args.threads)
        classifier_inputs = [run_model(model.run).input_transform(image)[None].numpy() for image in images]
        segmenter_inputs = [normalise(model_input(grey, segmenter.size))[None, None] for grey in greys]

        def classify(batch):
            return classifier(batch)

        def segment_forward(batch):
            return segmenter.session.run(None, {segmenter.input_name: batch})

        for _ in range(2):  # warm-up
            per_image_seconds(classify, classifier_inputs[:4])
            per_image_seconds(segment_forward, segmenter_inputs[:4])
            per_image_seconds(segmenter.segment, greys[:4])
        timings: dict[str, list[float]] = {"classifier": [], "segmenter": [], "segment()": []}
        for _ in range(args.repeats):
            timings["classifier"].append(per_image_seconds(classify, classifier_inputs))
            timings["segmenter"].append(per_image_seconds(segment_forward, segmenter_inputs))
            timings["segment()"].append(per_image_seconds(segmenter.segment, greys))
    median = {name: statistics.median(values) for name, values in timings.items()}
    ratio = median["segmenter"] / median["classifier"]
    print("Lung segmenter vs the bundled classifier (onnxruntime, batch 1, per image)")
    print(machine_lines())
    print(
        f"  images:      {len(images)} from {args.data}, {args.repeats} interleaved repeats, {args.threads} thread(s)"
    )
    print(f"  load:        before {describe_load(load_before)}, after {describe_load(load_average(), args.threads)}")
    print(
        f"  classifier forward ({run_model(model.run).input_transform.image_size} px): "
        f"{median['classifier'] * 1e3:.2f} ms"
    )
    print(f"  segmenter forward ({segmenter.size} px):  {median['segmenter'] * 1e3:.2f} ms")
    print(f"  segment() whole (resize, forward, post-processing): {median['segment()'] * 1e3:.2f} ms")
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"  ratio segmenter / classifier forward: {ratio:.3f} (target ≤ {TARGET}) {verdict}")
    print(f"  ratio segment() / classifier forward: {median['segment()'] / median['classifier']:.3f}")


if __name__ == "__main__":
    main()
