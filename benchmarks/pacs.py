"""Benchmark: the DICOM node against a real PACS. Latency from C-STORE in to SR stored in Orthanc, and the node's
throughput beside ``predict`` on the same images, measured side by side in one run.

Debian's Orthanc is started on 127.0.0.1 ports with its storage in a temporary folder, and ``covidxr dicom-node``
(the bundled model, default engine) in a subprocess sending its results back to it. Real chest X-rays from
``../shared/data/cxr3`` are written as 12-bit DX studies (``benchmarks/orthanc.write_study``) and uploaded to
Orthanc through its REST API (not timed). Then, timed:

* **one image**: ``--single`` studies of one image each, one after the other: the clock starts as Orthanc is
  asked to C-STORE the study to the node (``POST /modalities/covidxr/store``) and stops when Orthanc holds the
  image's SR (its study is polled every 10 ms); median and p95;
* **a study of ``--study-images``**: the whole study sent in one association; each SR's latency runs from the
  same start to the moment Orthanc holds it; ``--studies`` studies, median and p95 over all their images, and
  the median time until the study's last SR is stored. The node's throughput is the study's images over that;
* **predict**, interleaved with the studies, on the very same DICOM files: ``predict_files`` with the engine
  ``predict`` makes by default, model loaded once (so start-up is not counted, as for the node, which is
  warm), and ``Model.write_dicom`` (what ``predict --dicom-out`` adds: Grad-CAM, the SR and the SC, written to
  disk). Their images per second beside the node's, as ratios.

One warm-up image goes first through the node and through each in-process path (a first call pays
onnxruntime's set-up). The machine's
load is printed: on a shared machine, compare the ratios, not the absolute figures.

Run from the repository root (about 2 minutes with the defaults on 2 CPU cores)::

    .venv/bin/python benchmarks/pacs.py
    .venv/bin/python benchmarks/pacs.py --single 20 --studies 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import describe_load, load_average, machine_lines
from orthanc import Orthanc, write_study

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(port: int, dicom_port: int, spool: Path) -> subprocess.Popen:
    """``covidxr dicom-node`` sending to Orthanc, once it listens."""
    log = spool.with_suffix(".log")
    command = [sys.executable, "-m", "covidxr", "dicom-node", "--port", str(port), "--spool", str(spool)]
    with open(log, "wb") as handle:
        node = subprocess.Popen(
            [*command, "--send-to", f"ORTHANC@127.0.0.1:{dicom_port}"], stdout=handle, stderr=subprocess.STDOUT
        )
    while "covidxr DICOM node" not in log.read_text(errors="replace"):
        if node.poll() is not None:
            raise SystemExit(f"the node exited: {log.read_text()}")
        time.sleep(0.1)
    return node


def sr_series(orthanc: Orthanc, study: str) -> set[str]:
    """The IDs of the SR instances Orthanc holds in ``study``."""
    return {
        instance
        for series in orthanc.get(f"/studies/{study}/series")
        if series["MainDicomTags"].get("Modality") == "SR"
        for instance in series["Instances"]
    }


def send_study(orthanc: Orthanc, paths: list[Path], timeout: float = 600) -> tuple[list[float], float]:
    """Upload a study, then time its C-STORE to the node until every SR is in Orthanc: each SR's latency, and
    the time to the last."""
    study = [orthanc.upload(path) for path in paths][0]["ParentStudy"]
    seen: dict[str, float] = {}
    started = time.perf_counter()
    orthanc.store("covidxr", [study])
    while len(seen) < len(paths):
        now = time.perf_counter()
        for instance in sr_series(orthanc, study) - set(seen):
            seen[instance] = now - started
        if now - started > timeout:
            raise SystemExit(f"only {len(seen)} of {len(paths)} SRs stored after {timeout:.0f} s")
        time.sleep(0.01)
    latencies = sorted(seen.values())
    return latencies, latencies[-1]


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--single", type=int, default=10, help="One-image studies sent one after the other.")
    parser.add_argument("--studies", type=int, default=3, help="Studies of --study-images images.")
    parser.add_argument("--study-images", type=int, default=20)
    args = parser.parse_args()

    import covidxr
    from covidxr.runtime.inference import predict_files
    from covidxr.runtime.runners import make_engine
    from covidxr.runtime.runs import default_model_path, load_run

    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    pool = [args.data / name for name in meta.sample(frac=1.0, random_state=0)["filename"]]
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="covidxr-pacs-") as tmp:
        root = Path(tmp)
        http, dicom, node_port = free_port(), free_port(), free_port()
        with Orthanc(root / "orthanc", http, dicom, {"covidxr": ("COVIDXR", "127.0.0.1", node_port)}) as orthanc:
            node = start_node(node_port, dicom, root / "spool")
            try:
                send_study(orthanc, write_study(pool[:1], root / "warm-up", seed=999))
                single = []
                for i in range(args.single):
                    paths = write_study(pool[1 + i : 2 + i], root / f"single-{i}", seed=i)
                    single += send_study(orthanc, paths)[0]
                run = load_run(default_model_path())
                engine = make_engine(run, "auto")
                model = covidxr.load_model()
                warm = write_study(pool[:1], root / "warm-up-2", seed=998)
                predict_files(run, warm, engine=engine, progress=False)
                model.write_dicom(warm, root / "warm-up-out")
                per_image, totals, predict_s, dicom_out_s = [], [], [], []
                for s in range(args.studies):
                    first = 100 + s * args.study_images
                    paths = write_study(pool[first : first + args.study_images], root / f"study-{s}", seed=100 + s)
                    latencies, total = send_study(orthanc, paths)
                    per_image += latencies
                    totals.append(total)
                    started = time.perf_counter()
                    predict_files(run, paths, engine=engine, progress=False)
                    predict_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    rows = model.write_dicom(paths, root / f"dicom-out-{s}")
                    dicom_out_s.append(time.perf_counter() - started)
                    assert all("sr" in row for row in rows), rows
            finally:
                node.send_signal(signal.SIGTERM)
                node.wait(60)
    n = args.study_images
    node_rate = n / statistics.median(totals)
    predict_rate = n / statistics.median(predict_s)
    dicom_out_rate = n / statistics.median(dicom_out_s)
    print(machine_lines())
    print(f"load before: {describe_load(load_before)}; after: {describe_load(load_average())}")
    print(f"C-STORE in -> SR stored in Orthanc, one-image studies ({len(single)}):")
    print(f"  median {statistics.median(single) * 1000:.0f} ms, p95 {p95(single) * 1000:.0f} ms")
    print(f"C-STORE in -> SR stored, {args.studies} studies of {n} images ({len(per_image)} SRs):")
    print(f"  per image: median {statistics.median(per_image):.2f} s, p95 {p95(per_image):.2f} s")
    print(f"  whole study (last SR stored): median {statistics.median(totals):.2f} s")
    print(f"throughput on the same {n}-image studies (medians of {args.studies}):")
    print(f"  node (C-STORE in, Grad-CAM, SR + SC, C-STORE out): {node_rate:.2f} images/s")
    print(f"  predict_files (answer only, warm):                 {predict_rate:.2f} images/s")
    print(f"  Model.write_dicom (predict --dicom-out's work):    {dicom_out_rate:.2f} images/s")
    print(f"  node / predict: {node_rate / predict_rate:.2f}x; node / write_dicom: {node_rate / dicom_out_rate:.2f}x")
    print(f"(ran on {os.cpu_count()} logical CPUs; the node and this script share them)")


if __name__ == "__main__":
    main()
