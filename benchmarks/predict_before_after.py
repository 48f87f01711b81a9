"""Benchmark: ``covidxr predict DIR --out`` with this checkout against an earlier commit, side by side in one run.

The earlier commit's ``src/`` is unpacked with ``git archive`` into a temporary folder (the repository is not
touched); both run as ``python -m covidxr predict FOLDER --out FILE.csv`` subprocesses with the same interpreter
and packages, differing only in ``PYTHONPATH``, interleaved (before, after, before, after, ...) ``--repeats``
times, start-up included; medians compared. Two folders: ``--images`` real cxr3 X-rays evenly spaced over
``metadata.csv`` (JPEGs of about 500 px), and ``--dicom-images`` of them written as 3000 x 2500 12-bit DX DICOMs
(an archive's size; ``archive.large_dicoms``). It also checks that both give every file the same label and
probabilities within ``--tolerance``, and prints the largest difference.

Run from the repository root::

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/predict_before_after.py --before df96524
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from archive import large_dicoms, linked_folder
from machine import REPO, cpu_model, describe_load, load_average
from serve_hostile import source_tree


def predict(source: Path, folder: Path, out: Path) -> float:
    """Seconds of one ``covidxr predict FOLDER --out OUT`` with ``source`` (a ``src/`` folder) on the path."""
    environment = {**os.environ, "PYTHONPATH": str(source), "COVIDXR_OFFLINE": "1"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "covidxr", "predict", str(folder), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, env=environment)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="df96524", help="the earlier commit (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--dicom-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    rows = np.linspace(0, len(meta) - 1, args.images).round().astype(int)
    paths = [args.data / name for name in meta["filename"].iloc[rows]]
    print(f"covidxr predict, {args.before} against this checkout: {len(paths)} X-rays and {args.dicom_images} DICOMs")
    print(f"  CPU: {cpu_model()}, {os.cpu_count()} cores; load at start: {describe_load(load_average())}")
    with tempfile.TemporaryDirectory(prefix="covidxr-before-after-") as tmp:
        workspace = Path(tmp)
        sources = {"before": source_tree(args.before, workspace / "before"), "after": REPO / "src"}
        folders = {"JPEG": linked_folder(workspace, "jpeg", paths)}
        if args.dicom_images:
            folders["DICOM"] = large_dicoms(paths[: args.dicom_images], workspace / "dicom")
        times = {(kind, version): [] for kind in folders for version in sources}
        for repeat in range(args.repeats):
            for kind, folder in folders.items():
                for version, source in sources.items():
                    out = workspace / f"{kind}-{version}-{repeat}.csv"
                    times[kind, version].append(predict(source, folder, out))
        print("\nimages/s (median of interleaved runs, start-up included) and after / before:")
        for kind, folder in folders.items():
            count = len(list(folder.iterdir()))
            before, after = (count / statistics.median(times[kind, version]) for version in sources)
            tables = [pd.read_csv(workspace / f"{kind}-{version}-0.csv") for version in sources]
            labels = (tables[0]["label"].fillna("") == tables[1]["label"].fillna("")).mean()
            columns = [column for column in tables[0] if column.startswith("p_")]
            gap = float(np.nanmax(np.abs(tables[0][columns].to_numpy() - tables[1][columns].to_numpy())))
            verdict = "within" if gap <= args.tolerance else "OVER"
            print(
                f"  {kind:5s} ({count} files): before {before:6.1f}, after {after:6.1f}, {after / before:5.2f}x; "
                f"same label {labels:.1%}, largest probability difference {gap:.2e} ({verdict} {args.tolerance})"
            )
    print(f"load at end: {describe_load(load_average())}")


if __name__ == "__main__":
    main()
