"""Benchmark: ``covidxr serve`` under concurrent load, against the bare in-process model on the same images.

The service (``covidxr.runtime.serve``) answers every request in one inference thread and lets at most ``--max-queue``
requests wait for it; one more gets HTTP 503 with ``Retry-After``. This script measures, in one run, what
that costs and whether it holds under load:

1. **The bare in-process rate** (first, before the server is started, so the two never share the cores):
   ``covidxr.load_model(path=--model, engine=--engine)``, then one call of
   ``model.predict([covidxr.runtime.images.decode_bytes(data, name)])`` per image (the server decodes the upload
   too, so decoding is counted), cycling over the images held in memory: one untimed warm-up call per
   image (its answers are also the reference the server's are compared with), then ``--bare-requests``
   timed calls. It reports images/s and the median call. The server does a little more per request that
   this leaves out: reading and parsing the multipart upload and the JSON answer itself (no image
   preview: ``/api/predict`` encodes one only when asked with ``?preview=true``).
2. **The server**: ``python -m covidxr serve --host 127.0.0.1 --port <free port> --max-queue N --engine E
   [--model RUN]`` as a real subprocess (its output in a temporary log file), waited for on ``GET /healthz``,
   and stopped at the end, also on an error, Ctrl-C or SIGTERM. A warm-up pass sends each image once, one request
   at a time (the first answers for an image are the reference its later answers must repeat). Then, for
   each level of ``--concurrency``, ``--requests`` ``POST /api/predict`` requests (multipart field ``file``,
   cycling over the images) are sent by that many client threads, each with its own ``httpx.Client``
   (timeout 120 s, keep-alive), taking the next request from a shared queue until none is left. Measured
   per level: the wall time from the threads' common start to the last answer; ok/s: correct answers per
   second of it; p50/p95/p99 latency of the correct answers (from sending the request to having read the
   whole answer, in the client); and the count of correct answers, of 503 with ``Retry-After`` and of
   errors: other statuses (503 without ``Retry-After`` among them), wrong answers and exceptions
   (timeouts, refused or dropped connections); nothing is retried. A 200 answer is correct when its JSON
   has ``label`` in {COVID-19, NORMAL, PNEUMONIA}, ``probabilities`` for exactly those three summing to 1
   within 1e-6, covidxr's ``disclaimer``, and the same label as the first answer for the same image.
   ``x bare``: ok/s over the bare in-process images/s.

The server's resident memory (``VmRSS`` in ``/proc/<pid>/status``) is read at the start of every level
(and of the warm-up), every 0.5 s during it by a sampler thread, and at its end: start / peak / end in
MiB. Memory counts as flat when the end of the last level is at most 5 % above the end of the first.
After the last level the script checks ``/healthz`` (``waiting`` must be back to 0), whether the server
process is still alive, how it stops (SIGTERM; uvicorn shuts down, logs "Finished server process" and
re-raises the signal, so -15 is the exit status of a clean stop) and its log for tracebacks, error lines
and 500 answers.

The verdict line says whether, under the highest concurrency, every request was answered correctly or
with 503 and none failed or hung; the exit status is 1 when anything went wrong anywhere. The client
threads run in this process, on the same cores as the server (2 on the machine this was written on):
their HTTP and JSON work is part of what each level measures. The model is the bundled one unless
``--model`` names a run folder; the feature and onnx export cache is a fresh temporary folder
(``COVIDXR_CACHE_DIR``, shared by this process and the server) and ``COVIDXR_OFFLINE=1``.

Run from the repository root on an otherwise idle machine (not part of the test suite; it writes nothing
into the repository)::

    .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --engine torch --concurrency 1,8,32,64 --max-queue 16
    .venv/bin/python benchmarks/serve.py --requests 12 --concurrency 1,4 --images 4 --bare-requests 6
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from covidxr import DISCLAIMER, load_model
from covidxr.runtime.api import Model
from covidxr.runtime.images import decode_bytes
from machine import cpu_model, describe_load, isolated_cache, load_average

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
LABELS = {"COVID-19", "NORMAL", "PNEUMONIA"}
TOLERANCE = 1e-6  # |sum of the probabilities - 1|
TIMEOUT = 120.0  # seconds per request, in every client
STARTUP_TIMEOUT = 180.0  # seconds for the server to answer /healthz
RSS_INTERVAL = 0.5  # seconds between samples of the server's memory
FLAT_SHARE = 0.05  # growth of the server's memory from the end of the first level to the end of the last


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument(
        "--images", type=int, default=32, help="real X-rays, evenly spaced over metadata.csv (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        default="1,4,16",
        help="comma-separated client thread counts, one level each (default: %(default)s)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per level (default: %(default)s)")
    parser.add_argument(
        "--bare-requests", type=int, default=100, help="timed in-process predictions (default: %(default)s)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=32, help="passed to covidxr serve (default: %(default)s, the server's)"
    )
    parser.add_argument(
        "--engine", choices=["auto", "torch", "onnx"], default="auto", help="server and bare (default: %(default)s)"
    )
    parser.add_argument("--model", type=Path, default=None, help="a run folder (default: the bundled model)")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(level) for level in args.concurrency.split(",") if level.strip()]
    except ValueError:
        parser.error(f"--concurrency: comma-separated integers, not {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs at least one level, each at least 1")
    if min(args.images, args.requests, args.bare_requests, args.max_queue) < 1:
        parser.error("--images, --requests, --bare-requests and --max-queue must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# The images and the bare model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Xray:
    name: str
    data: bytes


def load_images(data: Path, count: int) -> list[Xray]:
    """``count`` image files evenly spaced over ``metadata.csv`` (every class, every source), read into memory."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    if count > len(meta):
        raise SystemExit(f"--images {count}: {data} has only {len(meta)} images")
    rows = np.linspace(0, len(meta) - 1, count).round().astype(int)
    return [Xray(Path(name).name, (data / name).read_bytes()) for name in meta["filename"].iloc[rows]]


def bare_rate(model: Model, images: list[Xray], requests: int) -> tuple[float, float, list[dict]]:
    """Images/s and the median seconds of one decode + predict call, and each image's answer from the warm-up."""
    answers = [model.predict([decode_bytes(x.data, x.name)])[0] for x in images]
    calls = []
    started = time.perf_counter()
    for i in range(requests):
        image = images[i % len(images)]
        before = time.perf_counter()
        model.predict([decode_bytes(image.data, image.name)])
        calls.append(time.perf_counter() - before)
    return requests / (time.perf_counter() - started), statistics.median(calls), answers


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int, key: str) -> str | None:
    """A field of ``/proc/<pid>/status`` (``VmRSS``: resident memory; ``VmHWM``: its peak), or None once the process
    is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def rss_mib(pid: int) -> float | None:
    value = proc_status(pid, "VmRSS")
    return None if value is None else int(value.split()[0]) / 1024


class Server:
    """``python -m covidxr serve`` in its own process on 127.0.0.1, its output in ``log``."""

    def __init__(self, args: argparse.Namespace, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        self.command = [sys.executable, "-m", "covidxr", "serve", "--host", "127.0.0.1"]
        self.command += ["--port", self.url.rsplit(":", 1)[1], "--max-queue", str(args.max_queue)]
        self.command += ["--engine", args.engine] + (["--model", str(args.model)] if args.model else [])
        self.process: subprocess.Popen | None = None

    def start(self) -> tuple[float, dict]:
        """Seconds until /healthz answers, and its answer."""
        started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        while time.perf_counter() - started < STARTUP_TIMEOUT:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with status {self.process.returncode}:\n{self.log.read_text()}")
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=2)
                if response.status_code == 200:
                    return time.perf_counter() - started, response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"the server did not answer /healthz within {STARTUP_TIMEOUT:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> int | None:
        """Terminate (kill after 30 s) and return the exit status; None if it was never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def finished(self) -> bool:
        """Whether uvicorn logged the end of a clean shutdown (it then re-raises SIGTERM: exit status -15)."""
        return "Finished server process" in self.log.read_text(errors="replace")

    def log_problems(self) -> list[str]:
        """Lines of the server's log that report an error (uvicorn logs each request at INFO)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith(("ERROR", "Traceback", "CRITICAL")) or " 500 " in line]


class RssSampler:
    """The server's VmRSS at the start, every ``RSS_INTERVAL`` s in a thread, and at the end of a ``with``."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _take(self) -> None:
        value = rss_mib(self.pid)
        if value is not None:
            self.samples.append(value)

    def _sample(self) -> None:
        while not self.done.wait(RSS_INTERVAL):
            self._take()

    def __enter__(self) -> RssSampler:
        self._take()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self._take()


# ---------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------


@dataclass
class Level:
    """What one level's requests got; every field is changed under ``lock`` by the client threads."""

    name: str
    concurrency: int
    requests: int
    latencies: list[float] = field(default_factory=list)  # seconds, correct answers only
    busy: int = 0  # 503 with Retry-After
    statuses: Counter = field(default_factory=Counter)  # other answers, by status
    wrong: list[str] = field(default_factory=list)  # 200 answers that failed the check: why
    exceptions: Counter = field(default_factory=Counter)  # by type
    seconds: float = float("nan")
    rss: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) + len(self.wrong) + sum(self.exceptions.values())

    @property
    def unaccounted(self) -> int:
        """Requests with no outcome at all: a client thread died."""
        return self.requests - self.ok - self.busy - self.errors

    def problems(self) -> list[str]:
        found = [f"{n} answered {status}" for status, n in sorted(self.statuses.items())]
        found += [f"{n} x {kind}" for kind, n in sorted(self.exceptions.items())]
        if self.wrong:
            found.append(f"{len(self.wrong)} wrong answer(s), e.g. {self.wrong[0]}")
        if self.unaccounted:
            found.append(f"{self.unaccounted} request(s) never completed (a client thread died)")
        return found


def check(response: httpx.Response, index: int, references: dict[int, dict], lock: threading.Lock) -> str | None:
    """Why a 200 answer is wrong, or None; the first correct answer for an image becomes its reference."""
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    label, probabilities = body.get("label"), body.get("probabilities")
    if label not in LABELS:
        return f"label {label!r}"
    if not isinstance(probabilities, dict) or set(probabilities) != LABELS:
        return f"probabilities {probabilities!r}"
    if abs(sum(probabilities.values()) - 1) > TOLERANCE:
        return f"probabilities sum to {sum(probabilities.values())!r}"
    if body.get("disclaimer") != DISCLAIMER:
        return f"disclaimer {body.get('disclaimer')!r}"
    with lock:
        first = references.setdefault(index, body)
    if first["label"] != label:
        return f"image {index} labelled {label}, first {first['label']}"
    return None


def client(
    url: str,
    images: list[Xray],
    jobs: queue.SimpleQueue,
    level: Level,
    references: dict[int, dict],
    ready: threading.Barrier,
) -> None:
    """One client thread: POST the next request's image until none is left, recording each outcome."""
    with httpx.Client(timeout=TIMEOUT) as http:
        ready.wait()
        while True:
            try:
                request = jobs.get_nowait()
            except queue.Empty:
                return
            index = request % len(images)
            image = images[index]
            started = time.perf_counter()
            try:
                response = http.post(url, files={"file": (image.name, image.data, "image/jpeg")})
            except httpx.HTTPError as exc:
                with level.lock:
                    level.exceptions[type(exc).__name__] += 1
                continue
            latency = time.perf_counter() - started
            if response.status_code == 200:
                why = check(response, index, references, level.lock)
                with level.lock:
                    if why:
                        level.wrong.append(why)
                    else:
                        level.latencies.append(latency)
            else:
                with level.lock:
                    if response.status_code == 503 and "retry-after" in response.headers:
                        level.busy += 1
                    else:
                        status = response.status_code
                        level.statuses[f"{status} without Retry-After" if status == 503 else status] += 1


def run_level(server: Server, images: list[Xray], level: Level, references: dict[int, dict]) -> Level:
    """``level.requests`` requests from ``level.concurrency`` threads, started together; memory sampled throughout."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for request in range(level.requests):
        jobs.put(request)
    ready = threading.Barrier(level.concurrency + 1)
    url = f"{server.url}/api/predict"
    threads = [
        threading.Thread(target=client, args=(url, images, jobs, level, references, ready), daemon=True)
        for _ in range(level.concurrency)
    ]
    with RssSampler(server.process.pid) as rss:
        for thread in threads:
            thread.start()
        ready.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        level.seconds = time.perf_counter() - started
    level.rss = rss.samples
    return level


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def print_table(levels: list[Level], bare: float) -> None:
    print(
        f"   {'':<8s}{'conc':>5s}{'requests':>9s}{'ok':>6s}{'503':>6s}{'errors':>7s}{'wall s':>8s}{'ok/s':>7s}"
        f"{'p50 ms':>8s}{'p95 ms':>8s}{'p99 ms':>8s}{'RSS start':>11s}{'peak':>7s}{'end MiB':>8s}{'x bare':>8s}"
    )
    for level in levels:
        p50, p95, p99 = np.percentile(level.latencies, [50, 95, 99]) * 1000 if level.latencies else [float("nan")] * 3
        rate = level.ok / level.seconds
        rss = level.rss or [float("nan")]
        print(
            f"   {level.name:<8s}{level.concurrency:>5d}{level.requests:>9d}{level.ok:>6d}{level.busy:>6d}"
            f"{level.errors + level.unaccounted:>7d}{level.seconds:>8.2f}{rate:>7.2f}{p50:>8.0f}{p95:>8.0f}{p99:>8.0f}"
            f"{rss[0]:>11.0f}{max(rss):>7.0f}{rss[-1]:>8.0f}{rate / bare:>7.2f}x"
        )
        for problem in level.problems():
            print(f"     {level.name} {level.concurrency}: {problem}")
    print(
        "   ok: correct 200 answers; 503: busy, with Retry-After; errors: other statuses, wrong answers, exceptions. "
        "wall s: first request sent to last answer read; ok/s: ok / wall s; p50/p95/p99: latency of the ok "
        "answers in the client; RSS: the server's VmRSS at the start, highest sample (every "
        f"{RSS_INTERVAL} s), end; x bare: ok/s over the bare in-process img/s."
    )


def memory_verdict(levels: list[Level]) -> tuple[str, bool]:
    """Growth from the end of the first level to the end of the last, and whether that is within FLAT_SHARE."""
    first, last = levels[0], levels[-1]
    if not first.rss or not last.rss:
        return "not measured (the server's /proc entry was gone)", False
    growth = last.rss[-1] - first.rss[-1]
    share = growth / first.rss[-1]
    flat = share <= FLAT_SHARE
    text = (
        f"{'flat' if flat else 'GREW'}: {growth:+.1f} MiB ({share:+.1%}) from the end of concurrency "
        f"{first.concurrency} ({first.rss[-1]:.0f} MiB) to the end of concurrency {last.concurrency} "
        f"({last.rss[-1]:.0f} MiB); flat means at most {FLAT_SHARE:+.0%}"
    )
    return text, flat


def compare_answers(references: dict[int, dict], answers: list[dict]) -> tuple[str, bool]:
    """The server's first answer for each image against the bare model's (same engine: they must agree)."""
    differ = [i for i, body in references.items() if body["label"] != answers[i]["label"]]
    diff = max(
        (
            abs(body["probabilities"][k] - answers[i]["probabilities"][k])
            for i, body in references.items()
            for k in LABELS
        ),
        default=float("nan"),
    )
    text = (
        f"labels agree on {len(references) - len(differ)} of {len(references)} images"
        + (f" (differ: images {', '.join(map(str, differ))})" if differ else "")
        + f"; max |dp| {diff:.1e}"
    )
    return text, not differ


# ---------------------------------------------------------------------------------------------


def stop_on_sigterm(signum: int, frame: object) -> None:
    """``kill`` ends the run as Ctrl-C does: through the ``finally`` that stops the server."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    load_at_start = load_average()
    started_all = time.perf_counter()
    images = load_images(args.data, args.images)
    problems: list[str] = []
    with isolated_cache("serve") as tmp:
        server = Server(args, tmp / "server.log")
        print("covidxr serve benchmark: POST /api/predict under concurrent load vs. the bare in-process model")
        print(f"  CPU:         {cpu_model()}, {os.cpu_count()} cores (the client threads share them with the server)")
        print(f"  load avg:    {describe_load(load_at_start)} at start")
        print(
            f"  images:      {len(images)} real X-rays evenly spaced over {args.data.resolve() / 'metadata.csv'}, "
            f"{sum(len(x.data) for x in images) / 2**20:.1f} MiB in memory"
        )
        print(f"  server:      {shlex.join(server.command)}")
        print(
            f"  load:        {args.requests} requests per level at concurrency {', '.join(map(str, args.concurrency))}"
            f" (client threads, one httpx.Client each, timeout {TIMEOUT:.0f} s)"
        )

        print("  measuring the bare in-process model ...", file=sys.stderr, flush=True)
        model = load_model(args.model, engine=args.engine)
        engine = type(model.engine).__name__
        bare, bare_call, answers = bare_rate(model, images, args.bare_requests)
        del model  # the server runs its own; this process only sends requests from here on
        print(
            f"  bare:        load_model(engine={args.engine!r}) -> {engine}; decode_bytes + predict, one image per "
            f"call: {bare:.2f} img/s, median {bare_call * 1000:.0f} ms/call over {args.bare_requests} calls "
            f"(after {len(images)} warm-up calls; measured before the server started)"
        )

        print("  starting the server ...", file=sys.stderr, flush=True)
        try:
            startup, health = server.start()
            print(f"  started:     in {startup:.1f} s; /healthz: {health}")
            print()
            references: dict[int, dict] = {}
            warmup = run_level(server, images, Level("warm-up", 1, len(images)), references)
            levels = []
            for concurrency in args.concurrency:
                print(f"  concurrency {concurrency} ...", file=sys.stderr, flush=True)
                levels.append(run_level(server, images, Level("level", concurrency, args.requests), references))
            alive = server.process.poll() is None
            try:
                after = httpx.get(f"{server.url}/healthz", timeout=10).json()
            except (httpx.HTTPError, ValueError) as exc:
                after = {"error": f"{type(exc).__name__}: {exc}"}
            hwm = proc_status(server.process.pid, "VmHWM")
        finally:
            status = server.stop()
        log_problems, clean = server.log_problems(), server.finished()

    print_table([warmup, *levels], bare)
    print()
    memory, flat = memory_verdict(levels)
    agree, same = compare_answers(references, answers)
    print(f"  memory:      {memory}; kernel's peak VmHWM {hwm or 'n/a'}")
    print(f"  vs bare:     the server's first answer per image against the in-process warm-up's: {agree}")
    print(f"  after:       /healthz {after}")
    print(
        f"  server log:  {len(log_problems)} error line(s)"
        + "".join(f"\n                 {line}" for line in log_problems[:5])
    )
    for level in [warmup, *levels]:
        problems += [f"{level.name} {level.concurrency}: {p}" for p in level.problems()]
    if not flat:
        problems.append(f"memory {memory}")
    if not same:
        problems.append(f"server vs bare: {agree}")
    if after.get("waiting") != 0:
        problems.append(f"/healthz after the load: {after}")
    if log_problems:
        problems.append(f"{len(log_problems)} error line(s) in the server log")
    if not clean:
        problems.append("the server logged no clean shutdown ('Finished server process')")
    if not alive:
        problems.append(f"the server died during the run (exit status {status})")

    top = max(levels, key=lambda level: level.concurrency)
    if top.problems() or not alive:
        print(f"  VERDICT:     under concurrency {top.concurrency}: {'; '.join(top.problems()) or 'the server died'}")
    else:
        print(
            f"  verdict:     under concurrency {top.concurrency} every request was answered correctly or with 503, "
            "none crashed or hung"
        )
    print(
        f"  server:      {'alive at the end' if alive else 'NOT alive at the end'}; stopped with exit status {status}"
        + ("; clean shutdown (its log ends with 'Finished server process')" if clean else "; NO clean shutdown logged")
    )
    if problems:
        print("  problems:    " + "\n               ".join(problems))
    print(f"total {time.perf_counter() - started_all:.0f} s; load average at the end: ", end="")
    print(describe_load(load_average(), os.cpu_count() or 1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
