"""Benchmark: the lung segmenter's post-processing and the orientation check, before and after issue 27 item 3.

On ``--images`` real X-rays evenly spaced over ``metadata.csv`` of ``--data``, one thread, in one run: the
runtime's ``lungs.py`` as it is now and as it was at git ``--before`` (loaded from ``git show`` into a module of
its own, so both run in this process on the same decoded images), interleaved over ``--repeats`` rounds:

1. **post-processing**: ``LungSegmenter.fields`` (keep the lungs, fill their holes, scale the mask to the
   image, the box) on each image's probability map;
2. **lung crop + orientation**: ``segment`` then ``orientation``, as ``prepare`` calls them for every image.

Both must give the same masks, boxes, reasons and verdicts (checked, the run stops otherwise); the medians' ratios
(before / now, > 1 is faster now) are side by side in one run. Run from the repository root::

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/lung_checks.py --images 64
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from covidxr.runtime import lungs
from covidxr.runtime.images import read_image
from machine import REPO, cpu_model, describe_load, load_average


def module_at(ref: str) -> ModuleType:
    """``covidxr/runtime/lungs.py`` as it was at git ``ref``, imported under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{ref}:src/covidxr/runtime/lungs.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="covidxr-lungs-")) / "lungs_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lungs_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def timed(call: Callable[[np.ndarray], object], greys: list[np.ndarray]) -> tuple[float, list]:
    started = time.perf_counter()
    results = [call(grey) for grey in greys]
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="a830f9a", help="the git commit to compare with")
    args = parser.parse_args()
    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    step = max(1, len(meta) // args.images)
    paths = [args.data / name for name in meta["filename"].iloc[::step].head(args.images)]
    greys = [np.asarray(read_image(path, 1024).convert("L")) for path in paths]
    greys += [grey[::-1, ::-1].copy() for grey in greys[::8]]  # some upside down, so the verdicts differ too
    print(f"covidxr lung checks benchmark: {len(greys)} real X-rays from {args.data}, one thread")
    print(f"  CPU: {cpu_model()}, {os.cpu_count()} logical cores; load at start: ", end="")
    print(describe_load(load_average()))

    segmenters = {"before": module_at(args.before).LungSegmenter(), "now": lungs.LungSegmenter()}
    softs = segmenters["now"].probabilities([lungs.model_input(grey, segmenters["now"].size) for grey in greys])
    maps = {id(grey): soft for grey, soft in zip(greys, softs, strict=True)}

    def post(segmenter: lungs.LungSegmenter) -> Callable[[np.ndarray], object]:
        return lambda grey: segmenter.fields(maps[id(grey)], grey.shape)

    def checks(segmenter: lungs.LungSegmenter) -> Callable[[np.ndarray], object]:
        return lambda grey: (segmenter.segment(grey), segmenter.orientation(grey))

    variants = {(task, name): make(segmenter) for task, make in (("post-processing", post), ("crop + orientation",
                checks)) for name, segmenter in segmenters.items()}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(args.repeats):
        results = {}
        for key, call in variants.items():
            seconds, results[key] = timed(call, greys)
            times[key].append(seconds)
        for task in ("post-processing", "crop + orientation"):
            for before, now in zip(results[(task, "before")], results[(task, "now")], strict=True):
                fields = (before, now) if task == "post-processing" else (before[0], now[0])
                same = np.array_equal(fields[0].mask, fields[1].mask) and fields[0].box == fields[1].box
                same = same and fields[0].reason == fields[1].reason
                if not same or (task != "post-processing" and before[1] != now[1]):
                    sys.exit(f"{task}: an answer differs between {args.before} and now")
    verdicts = sum(verdict is not None for _, verdict in results[("crop + orientation", "now")])
    print(f"  identical masks, boxes, reasons and verdicts ({verdicts} images called not upright)")
    print(f"\nms per image, median of {args.repeats} interleaved rounds, and before / now:")
    for task in ("post-processing", "crop + orientation"):
        before, now = (1000 * statistics.median(times[(task, name)]) / len(greys) for name in ("before", "now"))
        print(f"   {task:20s} before {before:6.2f} ms  now {now:6.2f} ms  ratio {before / now:4.2f}x")
    print(f"load at end: {describe_load(load_average(), own_threads=1)}")


if __name__ == "__main__":
    main()
