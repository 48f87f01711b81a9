"""Benchmark: the memory a burst of large uploads costs ``covidxr serve``, and how many get 503.

``--concurrency`` client threads (default 16) each send one ``POST /api/predict`` at the same moment, a
real X-ray (the first image of ``--data``) upscaled to a grey, uncompressed TIFF of ``--upload-mib`` MiB
(default 29, just under the 30 MB limit), as a raw ``image/tiff`` body, to ``python -m covidxr serve
--max-queue N`` (default 4, fewer than the clients, so most of the burst must be refused). The server's
peak resident memory during the burst is read from ``/proc/<pid>/status`` (``VmHWM``, reset with
``clear_refs`` just before the burst) against its ``VmRSS`` just before: the growth, and that per upload
sent. Printed with the count of 200, 503 (with ``Retry-After``) and other answers.

``--pythonpath DIR`` runs the server from another source tree (e.g. ``git archive`` of an older commit
unpacked into ``/tmp/old``), to measure before and after a change in one way::

    .venv/bin/python benchmarks/serve_uploads.py
    .venv/bin/python benchmarks/serve_uploads.py --pythonpath /tmp/old/src

Not part of the test suite; it writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
from PIL import Image

from machine import describe_load, isolated_cache, load_average, machine_lines
from serve import Server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="uploads sent at once (default: %(default)s)")
    parser.add_argument("--upload-mib", type=float, default=29, help="size of each upload (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=4, help="the server's --max-queue (default: %(default)s)")
    parser.add_argument("--engine", default="auto", help="the server's --engine (default: %(default)s)")
    parser.add_argument("--pythonpath", type=Path, default=None, help="run the server from this source tree")
    args = parser.parse_args(argv)
    args.model = None
    return args


def big_tiff(data: Path, mib: float) -> bytes:
    """A real X-ray, upscaled to a square-ish grey uncompressed TIFF of about ``mib`` MiB."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    image = Image.open(data / meta["filename"].iloc[0]).convert("L")
    side = int((mib * MIB) ** 0.5)
    buffer = io.BytesIO()
    image.resize((side, side), Image.Resampling.BILINEAR).save(buffer, format="TIFF")
    return buffer.getvalue()


def kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {key} in /proc/{pid}/status")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.pythonpath:
        os.environ["PYTHONPATH"] = str(args.pythonpath.resolve())
    body = big_tiff(args.data, args.upload_mib)
    print("covidxr serve under a burst of large uploads")
    print(machine_lines())
    print(f"  load avg:    {describe_load(load_average())} at start")
    print(f"  server:      {args.pythonpath or 'this checkout'}, --max-queue {args.max_queue}, --engine {args.engine}")
    print(f"  burst:       {args.concurrency} uploads of {len(body) / MIB:.1f} MiB (grey TIFF), sent at once")
    with isolated_cache("serve-uploads") as tmp:
        server = Server(args, tmp / "server.log")
        try:
            server.start()
            pid = server.process.pid
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak below is the burst's
            before = kib(pid, "VmRSS")
            answers: list[tuple[int, str | None]] = []
            lock = threading.Lock()
            start = threading.Barrier(args.concurrency)

            def send() -> None:
                start.wait()
                try:
                    response = httpx.post(
                        f"{server.url}/api/predict", content=body, headers={"Content-Type": "image/tiff"}, timeout=300
                    )
                    answer = (response.status_code, response.headers.get("retry-after"))
                except httpx.HTTPError as exc:
                    answer = (0, type(exc).__name__)
                with lock:
                    answers.append(answer)

            started = time.perf_counter()
            threads = [threading.Thread(target=send) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            growth = (kib(pid, "VmHWM") - before) / 1024
        finally:
            server.stop()
    statuses = [status for status, _ in answers]
    refused = sum(status == 503 and retry == "1" for status, retry in answers)
    print(
        f"  answers:     {statuses.count(200)} x 200, {refused} x 503 with Retry-After, "
        f"{len(answers) - statuses.count(200) - refused} other, in {seconds:.1f} s"
    )
    print(
        f"  memory:      {before / 1024:.0f} MiB before the burst; peak +{growth:.0f} MiB during it "
        f"({growth / args.concurrency:.1f} MiB per upload sent)"
    )


if __name__ == "__main__":
    main()
