"""Benchmark: a soak of ``covidxr serve`` with mixed requests, good and bad, checking memory and unexpected errors.

``python -m covidxr serve`` (this checkout, the bundled model; ``benchmarks/serve.py``'s ``Server``) gets
``--requests`` (10,000) requests from ``--concurrency`` (8) client threads, each with its own keep-alive
``httpx.Client``, taking the next request from a shared list drawn with ``--seed``. The mix (weights in
``MIX``): predictions of real X-rays from ``--data`` (some with ``?preview=true``), explanations, ``/healthz``,
``/api/model``, text sent as an image (415), a truncated PNG (400), a form without ``file`` (422), a raw PNG
body, and a small PNG of 59 Mpx (200, or 503 with ``Retry-After`` when the pixel budget is full).

Each request kind has its expected statuses; 503 with ``Retry-After`` is expected for uploads (the server says
it is busy) and counted apart. An *unexpected error* is any other status, a 200 prediction without a label or
disclaimer, a wrong label for an X-ray (each image's first answer is the reference), or an exception
(timeout, dropped connection). The server's ``VmRSS`` is read after the warm-up (the first
``--warmup`` requests, sent the same way and counted in the total) and at the end: the growth must stay under
``--max-growth`` MiB (50); it is also printed every 1000 requests. The script prints requests/s, p50/p95/p99
latency, the statuses per kind, the memory, the server's log problems (tracebacks, 500s) and how it stopped on
SIGTERM (and how long that took); the exit status is 1 when any check fails. Not part of the test suite; writes
nothing into the repository::

    .venv/bin/python benchmarks/serve_soak.py
    .venv/bin/python benchmarks/serve_soak.py --requests 2000 --concurrency 4
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

from covidxr import DISCLAIMER
from machine import describe_load, isolated_cache, load_average, machine_lines
from serve import Server, rss_mib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
LARGE_SIDE = 7700
# kind: (weight, expected statuses besides 503 with Retry-After)
MIX = {
    "predict": (30, {200}),
    "predict_preview": (4, {200}),
    "predict_raw": (4, {200}),
    "explain": (2, {200}),
    "large": (0.5, {200}),
    "healthz": (25, {200}),
    "model": (8, {200}),
    "text": (10, {415}),
    "truncated": (8, {400}),
    "wrong_field": (8, {422}),
}
UPLOADS = {"predict", "predict_preview", "predict_raw", "explain", "large", "text", "truncated", "wrong_field"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="real X-rays in the mix (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before memory (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default: %(default)s)")
    parser.add_argument("--max-growth", type=float, default=50, help="MiB of growth allowed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=29, help="draws the mix (default: %(default)s)")
    args = parser.parse_args(argv)
    args.max_queue, args.engine, args.model = 32, "auto", None
    return args


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    problem: str | None


def inputs(data: Path, count: int) -> dict:
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    rows = np.linspace(0, len(meta) - 1, count).round().astype(int)
    xrays = [(data / name).read_bytes() for name in meta["filename"].iloc[rows]]
    ramp = np.linspace(0, 255, LARGE_SIDE, dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)).save(buffer, format="PNG", compress_level=9)
    png = io.BytesIO()
    Image.open(io.BytesIO(xrays[0])).convert("L").save(png, format="PNG")
    return {"xrays": xrays, "large": buffer.getvalue(), "png": png.getvalue()}


def send(client: httpx.Client, kind: str, index: int, data: dict) -> httpx.Response:
    xray = data["xrays"][index % len(data["xrays"])]
    if kind in {"predict", "predict_preview", "explain"}:
        path = {"predict": "/api/predict", "predict_preview": "/api/predict?preview=true", "explain": "/api/explain"}
        return client.post(path[kind], files={"file": ("x", xray)})
    if kind == "predict_raw":
        return client.post("/api/predict", content=data["png"], headers={"Content-Type": "image/png"})
    if kind == "large":
        return client.post("/api/predict", files={"file": ("x.png", data["large"])})
    if kind in {"healthz", "model"}:
        return client.get("/healthz" if kind == "healthz" else "/api/model")
    content = {"text": b"not an image at all", "truncated": data["png"][:2000], "wrong_field": xray}[kind]
    return client.post("/api/predict", files={"image" if kind == "wrong_field" else "file": ("x.png", content)})


def judge(kind: str, key: int, response: httpx.Response, references: dict, lock: threading.Lock) -> str | None:
    """What is wrong with an answer, or None; ``key``: the X-ray it was for (its first label is the reference)."""
    if response.status_code == 503 and kind in UPLOADS:
        return None if response.headers.get("retry-after") == "1" else "503 without Retry-After"
    if response.status_code not in MIX[kind][1]:
        return f"status {response.status_code}: {response.text[:120]}"
    if response.status_code != 200 or kind in {"healthz", "model", "large"}:
        return None
    answer = response.json()
    if answer.get("disclaimer") != DISCLAIMER or "probabilities" not in answer:
        return "an answer without disclaimer or probabilities"
    if kind == "predict_raw":
        return None
    with lock:
        expected = references.setdefault(key, answer["label"])
    return None if answer["label"] == expected else f"label {answer['label']} after {expected}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = inputs(args.data, args.images)
    rng = random.Random(args.seed)
    kinds = rng.choices(list(MIX), weights=[weight for weight, _ in MIX.values()], k=args.requests)
    print("covidxr serve: soak of mixed requests")
    print(machine_lines())
    print(f"  load avg:    {describe_load(load_average())} at start")
    print(
        f"  load:        {args.requests:,} requests ({args.warmup} warm-up), {args.concurrency} clients, "
        f"seed {args.seed}"
    )
    outcomes: list[Outcome] = []
    references: dict[int, str | None] = {}
    lock = threading.Lock()
    next_index = iter(range(args.requests))
    memory: dict[str, float] = {}
    curve: list[int] = []  # MiB every 1000 requests
    with isolated_cache("serve-soak") as tmp:
        server = Server(args, tmp / "server.log")
        try:
            server.start()
            pid = server.process.pid
            memory["start"] = rss_mib(pid)

            def work() -> None:
                with httpx.Client(base_url=server.url, timeout=120) as client:
                    while True:
                        with lock:
                            index = next(next_index, None)
                            if index == args.warmup:
                                memory["warm"] = rss_mib(pid)
                            if index is not None and index % 1000 == 0:
                                curve.append(round(rss_mib(pid)))
                        if index is None:
                            return
                        kind = kinds[index]
                        started = time.perf_counter()
                        try:
                            response = send(client, kind, index, data)
                            problem = judge(kind, index % len(data["xrays"]), response, references, lock)
                            status = response.status_code
                        except httpx.HTTPError as exc:
                            status, problem = 0, type(exc).__name__
                        with lock:
                            outcomes.append(Outcome(kind, status, time.perf_counter() - started, problem))

            started = time.perf_counter()
            threads = [threading.Thread(target=work) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            time.sleep(2)  # the last answers' buffers are released
            memory["end"] = rss_mib(pid)
            waiting = httpx.get(f"{server.url}/healthz", timeout=10).json()["waiting"]
        finally:
            stopping = time.perf_counter()
            status = server.stop()
            stop_seconds = time.perf_counter() - stopping
        problems = server.log_problems()
        finished = server.finished()
    errors = [o for o in outcomes if o.problem]
    latencies = np.array([o.seconds for o in outcomes]) * 1000
    print(f"  wall:        {seconds:.0f} s, {len(outcomes) / seconds:.1f} requests/s")
    print(f"  latency:     p50 {np.percentile(latencies, 50):.0f} ms, p95 {np.percentile(latencies, 95):.0f} ms, "
          f"p99 {np.percentile(latencies, 99):.0f} ms (all kinds)")  # fmt: skip
    for kind in MIX:
        statuses = Counter(o.status for o in outcomes if o.kind == kind)
        print(f"  {kind:16} {sum(statuses.values()):6,}  {dict(sorted(statuses.items()))}")
    growth = memory["end"] - memory["warm"]
    print(f"  memory:      start {memory['start']:.0f} MiB, after warm-up {memory['warm']:.0f} MiB, "
          f"end {memory['end']:.0f} MiB: growth {growth:+.0f} MiB (limit {args.max_growth:g})")  # fmt: skip
    print(f"  memory curve: {curve} MiB, every 1000 requests")
    print(f"  unexpected:  {len(errors)} errors" + "".join(f"\n    {o.kind}: {o.problem}" for o in errors[:10]))
    print(
        f"  stop:        SIGTERM -> exit {status} in {stop_seconds:.1f} s, clean: {finished}; "
        f"/healthz waiting {waiting}"
    )
    print(f"  server log:  {len(problems)} problem lines" + "".join(f"\n    {line}" for line in problems[:5]))
    print(f"  load avg:    {describe_load(load_average())} at end")
    ok = not errors and growth < args.max_growth and not problems and finished and waiting == 0
    print(f"  verdict:     {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
