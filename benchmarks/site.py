"""Benchmark: site calibration (issue 23), measured side by side in one run.

1. **Calibration time for 1,000 images**: ``covidxr.lab.site.calibrate_site`` (what ``covidxr calibrate``
   runs: prediction of every image with the bundled model, then the threshold and its Clopper–Pearson
   intervals) on a dataset folder of ``--images`` real labelled images (NIH adult controls first, then cxr3,
   linked into a temporary folder), ``--repeats`` runs; median seconds, and the share that is prediction
   alone (``predict_files`` on the same paths, the "without" runs of 2).
2. **Added cost of ``--site`` per prediction**: ``predict_files`` on the same images with the bundled run and
   with the same run under the site file just written (``with_site``), interleaved A, B, A, B after one untimed
   call each; medians. Target: at most 2% added.

Timings are wall clock on shared cores: compare the ratios, measured in the same rounds. Run from the
repository root (not part of the test suite; it writes nothing into the repository)::

    .venv/bin/python benchmarks/site.py
    .venv/bin/python benchmarks/site.py --images 300 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

from covidxr.lab.site import calibrate_site
from covidxr.runtime.engines import int8_instructions
from covidxr.runtime.inference import predict_files
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.site import with_site
from machine import REPO, cpu_model, describe_load, isolated_cache, linked_dataset, load_average

SHARED = REPO.parent / "shared" / "data"


def labelled_dataset(root: Path, count: int) -> Path:
    """A dataset folder of ``count`` real labelled images linked from the shared data: the NIH adult controls,
    then cxr3 (their file names do not collide: each carries its source)."""
    taken = []
    for name in ("adult-controls", "cxr3"):
        meta = pd.read_csv(SHARED / name / "metadata.csv", dtype=str, keep_default_na=False)
        rows = meta.head(count - sum(map(len, taken)))
        linked_dataset(root, SHARED / name, rows)
        taken.append(rows)
    pd.concat(taken).to_csv(root / "metadata.csv", index=False)
    return root


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = load_average()
    with isolated_cache("site") as tmp:
        data = labelled_dataset(tmp / "data", args.images)
        run = load_run(default_model_path())
        meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
        paths = [data / name for name in meta["filename"]]
        engine = make_engine(run)
        site_file = calibrate_site(run, data, "specificity", 0.95).save(tmp / "site.json")
        sited = with_site(run, site_file)
        predict_files(run, paths, progress=False, engine=engine)  # untimed: warm-up of both
        predict_files(sited, paths, progress=False, engine=engine)
        calibration, plain, with_file = [], [], []
        for _ in range(args.repeats):
            calibration.append(timed(lambda: calibrate_site(run, data, "specificity", 0.95)))
            plain.append(timed(lambda: predict_files(run, paths, progress=False, engine=engine)))
            with_file.append(timed(lambda: predict_files(sited, paths, progress=False, engine=engine)))
    median = statistics.median
    added = median(with_file) / median(plain) - 1
    print(f"covidxr site calibration benchmark ({len(paths)} real images, {args.repeats} rounds, medians)")
    print(f"  CPU:         {cpu_model()}; int8: {int8_instructions()}")
    print(f"  load:        before {describe_load(load_before)}, after {describe_load(load_average(), 2)}")
    seconds = median(calibration)
    print(f"  calibrate:   {seconds:.2f} s for {len(paths)} images ({len(paths) / seconds:.0f} img/s); prediction")
    print(f"               alone {median(plain):.2f} s ({median(plain) / seconds:.0%} of it)")
    print(f"  --site:      {median(plain):.3f} s without, {median(with_file):.3f} s with: {added:+.1%} (target <= +2%)")
    print(f"               rounds without {[round(s, 3) for s in plain]}, with {[round(s, 3) for s in with_file]}")


if __name__ == "__main__":
    main()
