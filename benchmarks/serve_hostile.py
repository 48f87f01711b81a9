"""Benchmark: ``covidxr serve`` under the hostile clients of issue 29 (F1–F4), before and after, in one run.

Two servers are measured one after the other on the same machine: **before**, the source tree of
``--before`` (a commit, default 364599e, the code the issue was filed against: ``git archive`` unpacked into a
temporary folder and put on ``PYTHONPATH``), and **after**, this checkout. Each is ``python -m covidxr serve``
with the bundled model in its own process (``benchmarks/serve.py``'s ``Server``). Against each:

- **F1, memory follows pixels**: ``--burst`` (32) client threads each send one ``POST /api/predict`` at the same
  moment, a small PNG (a smooth grey gradient, ~0.3 MB) of ``--side`` x ``--side`` pixels (7700: 59 Mpx, under
  the 60 Mpx limit). Printed: the server's resident memory before (idle), its peak during the burst
  (``VmHWM``, reset through ``clear_refs`` just before), its ``VmRSS`` ``--settle`` seconds after the last
  answer, and the answers (200, 503 with ``Retry-After``, other; 0: no answer within ``--f1-timeout`` s).
  Should free memory on the machine fall under 2 GiB, the server is killed and the row says so.
- **F2, slow clients**: ``--slow`` (32) connections from 127.0.0.2 each send the headers of an upload, then one
  byte every 2 s. One second later a normal upload (a real X-ray) is sent from 127.0.0.1, and again every
  0.5 s until one gets 200 (at most 20 s): printed, the first answer's status and the seconds until a 200.
- **F3, multipart abuse**: a form of ``--parts`` (280,000) small fields and no ``file`` (~29 MB) is sent while a
  thread asks ``/healthz`` every 50 ms: printed, the status, the answer's size and the slowest ``/healthz``.
- **F4, explain starves predict**: ``--predictions`` (20) sequential ``/api/predict`` of a real X-ray, idle,
  then again while 4 client threads keep sending the F1 image to ``/api/explain`` (each sends its next one as
  soon as it is answered, or after ``--f4-limit`` s; 503s included): p50/p95 of the predictions in both, and
  their ratio (with at most ``--f4-limit`` seconds of predictions under load: the row says how many were
  answered in that time).

Every figure is measured in this run; the machine's load average is printed at the start and end (other
processes share the cores). Not part of the test suite; writes nothing into the repository::

    .venv/bin/python benchmarks/serve_hostile.py
    .venv/bin/python benchmarks/serve_hostile.py --before 364599e --burst 16 --predictions 12
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

from machine import describe_load, isolated_cache, load_average, machine_lines
from serve import Server, proc_status

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
MIB = 1024 * 1024
MIN_AVAILABLE_MIB = 2048  # the F1 burst is stopped (the server killed) when the machine has less free memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--before", default="364599e", help="the commit measured as 'before' (default: %(default)s)")
    parser.add_argument("--side", type=int, default=7700, help="pixels a side of the F1 image (default: %(default)s)")
    parser.add_argument("--burst", type=int, default=32, help="F1 uploads sent at once (default: %(default)s)")
    parser.add_argument("--settle", type=float, default=10, help="F1 seconds after the burst (default: %(default)s)")
    parser.add_argument(
        "--f1-timeout", type=float, default=120, help="F1 seconds a client waits (default: %(default)s)"
    )
    parser.add_argument("--slow", type=int, default=32, help="F2 slow connections (default: %(default)s)")
    parser.add_argument("--parts", type=int, default=280_000, help="F3 form parts (default: %(default)s)")
    parser.add_argument("--predictions", type=int, default=20, help="F4 predictions timed (default: %(default)s)")
    parser.add_argument(
        "--faults", default="F1,F2,F3,F4", help="comma-separated faults to measure (default: %(default)s)"
    )
    parser.add_argument("--trees", default="before,after", help="which servers to measure (default: %(default)s)")
    parser.add_argument("--f4-limit", type=float, default=120, help="F4 seconds at most (default: %(default)s)")
    args = parser.parse_args(argv)
    args.max_queue, args.engine, args.model = 32, "auto", None
    return args


def source_tree(commit: str, root: Path) -> Path:
    """``src/`` of ``commit`` unpacked under ``root`` (``git archive``: the repository is not touched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return root / "src"


def gradient_png(side: int) -> bytes:
    """A smooth grey gradient of ``side`` x ``side`` pixels: a small file that decodes to many pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grey = ((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def xray(data: Path) -> bytes:
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    return (data / meta["filename"].iloc[0]).read_bytes()


def kib(pid: int, key: str) -> int:
    value = proc_status(pid, key)
    return 0 if value is None else int(value.split()[0])


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def post(url: str, path: str, content: bytes, timeout: float = 300) -> tuple[int, float, httpx.Response | None]:
    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}{path}", files={"file": ("x.png", content)}, timeout=timeout)
        return response.status_code, time.perf_counter() - started, response
    except httpx.HTTPError:
        return 0, time.perf_counter() - started, None


def f1_memory(server: Server, image: bytes, args: argparse.Namespace) -> str:
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak below is the burst's
    idle = kib(pid, "VmRSS") / 1024
    statuses: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.burst)
    done = threading.Event()
    killed = []

    def watchdog() -> None:
        while not done.wait(0.1):
            if available_mib() < MIN_AVAILABLE_MIB:
                killed.append(kib(pid, "VmHWM") / 1024)
                server.process.kill()
                return

    def send() -> None:
        barrier.wait()
        status, _, response = post(server.url, "/api/predict", image, timeout=args.f1_timeout)
        retry = response is not None and response.headers.get("retry-after") == "1"
        with lock:
            statuses.append("503+RA" if status == 503 and retry else str(status))

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    threads = [threading.Thread(target=send) for _ in range(args.burst)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    peak = kib(pid, "VmHWM") / 1024
    done.set()
    if killed:
        return f"killed at {killed[0]:.0f} MiB peak (machine under {MIN_AVAILABLE_MIB} MiB free); idle {idle:.0f} MiB"
    time.sleep(args.settle)
    after = kib(pid, "VmRSS") / 1024
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    return (
        f"idle {idle:.0f} MiB, peak {peak:.0f} MiB (+{peak - idle:.0f}), {args.settle:g} s after: {after:.0f} MiB "
        f"(+{after - idle:.0f}); answers {counts} in {seconds:.1f} s"
    )


def f2_slow_clients(server: Server, normal: bytes, args: argparse.Namespace) -> str:
    port = int(server.url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(args.slow):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        sockets.append(sock)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(2):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(b"\x89")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    time.sleep(1)
    first = None
    started = time.perf_counter()
    waited = None
    while time.perf_counter() - started < 20:
        status, _, _ = post(server.url, "/api/predict", normal, timeout=20)
        first = first or status
        if status == 200:
            waited = time.perf_counter() - started
            break
        time.sleep(0.5)
    stop.set()
    for sock in sockets:
        sock.close()
    answered = f"200 after {waited:.2f} s" if waited is not None else "no 200 within 20 s"
    return f"first answer {first}; {answered} (with {args.slow} slow connections open)"


def f3_multipart(server: Server, args: argparse.Namespace) -> str:
    boundary = "hostileboundary"
    parts = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="field{i:07d}"\r\n\r\nvalue{i}\r\n'
        for i in range(args.parts)
    )
    body = (parts + f"--{boundary}--\r\n").encode()
    slowest = [0.0]
    done = threading.Event()

    def health() -> None:
        while not done.wait(0.05):
            started = time.perf_counter()
            httpx.get(f"{server.url}/healthz", timeout=60)
            slowest[0] = max(slowest[0], time.perf_counter() - started)

    checker = threading.Thread(target=health, daemon=True)
    checker.start()
    response = httpx.post(
        f"{server.url}/api/predict",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=120,
    )
    time.sleep(0.2)
    done.set()
    checker.join()
    return (
        f"{len(body) / MIB:.1f} MiB form: {response.status_code}, answer {len(response.content):,} bytes, "
        f"slowest /healthz {slowest[0]:.2f} s"
    )


def f4_explain_lane(server: Server, normal: bytes, image: bytes, args: argparse.Namespace) -> str:
    def timed(limit: float) -> list[float]:
        times, started = [], time.perf_counter()
        while len(times) < args.predictions and time.perf_counter() - started < limit:
            status, seconds, _ = post(server.url, "/api/predict", normal, timeout=limit)
            if status == 200:
                times.append(seconds)
        return times

    timed(30)  # warm-up
    idle = timed(60)
    stop = threading.Event()
    explained: list[int] = []

    def explain() -> None:
        while not stop.is_set():
            explained.append(post(server.url, "/api/explain", image, timeout=args.f4_limit)[0])

    threads = [threading.Thread(target=explain, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    loaded = timed(args.f4_limit)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    p95_idle = np.percentile(idle, 95)
    head = f"idle p50/p95 {np.median(idle) * 1000:.0f}/{p95_idle * 1000:.0f} ms; with 4 explains "
    if not loaded:
        return head + f"no prediction answered within {args.f4_limit:g} s; explain answers {sorted(set(explained))}"
    p95_loaded = np.percentile(loaded, 95)
    return head + (
        f"p50/p95 {np.median(loaded) * 1000:.0f}/{p95_loaded * 1000:.0f} ms ({len(loaded)} answered), "
        f"p95 x{p95_loaded / p95_idle:.1f}; explain answers {sorted(set(explained))}"
    )


def measure(name: str, pythonpath: Path, args: argparse.Namespace, tmp: Path, images: dict[str, bytes]) -> None:
    os.environ["PYTHONPATH"] = str(pythonpath)
    print(f"\n{name} ({pythonpath})")
    for fault, run in (
        ("F1", lambda server: f1_memory(server, images["large"], args)),
        ("F2", lambda server: f2_slow_clients(server, images["xray"], args)),
        ("F3", lambda server: f3_multipart(server, args)),
        ("F4", lambda server: f4_explain_lane(server, images["xray"], images["large"], args)),
    ):
        if fault not in args.faults.split(","):
            continue
        server = Server(args, tmp / f"{name}-{fault}.log")  # a fresh server for each: none inherits another's state
        try:
            server.start()
            print(f"  {fault}: {run(server)}", flush=True)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images = {"large": gradient_png(args.side), "xray": xray(args.data)}
    print("covidxr serve under hostile clients (issue 29, F1-F4), before and after")
    print(machine_lines())
    print(f"  load avg:    {describe_load(load_average())} at start")
    print(f"  F1 image:    {args.side}x{args.side} grey PNG, {len(images['large']) / 1024:.0f} KiB")
    with isolated_cache("serve-hostile") as tmp, tempfile.TemporaryDirectory(prefix="covidxr-before-") as old:
        if "before" in args.trees:
            measure(f"before ({args.before})", source_tree(args.before, Path(old)), args, tmp, images)
        if "after" in args.trees:
            measure("after (this checkout)", REPO / "src", args, tmp, images)
    print(f"\n  load avg:    {describe_load(load_average())} at end")


if __name__ == "__main__":
    sys.exit(main())
