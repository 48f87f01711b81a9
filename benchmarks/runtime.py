"""Benchmark: the torch-free runtime's targets (issue 16), measured side by side in one run.

covidxr predicts with the bundled model on numpy, Pillow and onnxruntime alone (``--engine torch`` loads the
torch model instead); prediction decodes on a thread pool (``covidxr.runtime.batches.iterate_batches``), large JPEGs
are decoded at reduced scale (Pillow draft, ``read_image(path, draft=InputTransform.decode_side)``), and
``covidxr serve`` micro-batches concurrent ``/api/predict`` requests. This script measures, on real cxr3
X-rays (``--images``, evenly spaced over ``metadata.csv``, linked into a temporary folder), and prints one
table of the targets (target, measured, ratio, met?):

1. **Start-up**: wall time of ``covidxr predict IMAGE`` (a subprocess, the venv's ``covidxr`` script,
   default engine, one real image) against ``python -c "import numpy, PIL, onnxruntime"``, ``--runs-single``
   runs each, interleaved (A, B, A, B, ...) after one untimed run of each; medians. Targets: at most 1.5 s,
   and at most 3x the import. With ``--runtime-venv`` its ``covidxr`` is timed in the same rounds (for
   information). Once, untimed: ``python -X importtime`` of the same command, its slowest imports and
   whether torch was imported at all.
2. **Folder, start-up included**: ``covidxr predict FOLDER --out x.csv`` over the ``--images`` images (a
   fresh out file every time), default engine against ``--engine torch``, ``--runs-folder`` runs each,
   interleaved; medians. Target: torch at least 4x slower. The labels of the two engines are compared.
3. **In-process folder throughput**: images/s of ``covidxr.runtime.inference.predict_files(run, paths,
   engine=engine, progress=False)`` (default engine, the bundled run) after one untimed call, against the
   bare onnxruntime session (the same engine object) on the same inputs already decoded and preprocessed
   (``engine(inputs)`` in batches of 32), and, for information, decoding + preprocessing alone through
   ``iterate_batches`` as ``predict_files`` calls it (lung check, draft, 1 worker); ``--repeats`` rounds,
   interleaved; medians. Target: end to end at least 85 % of the bare session.
4. **Service**: ``python -m covidxr serve`` (bundled model, default engine, ``--max-queue 32``) as a
   subprocess (``benchmarks/serve.py``'s ``Server``), waited for on ``/healthz``; each of ``--requests``
   real images is uploaded once (warm-up), then ``--requests`` ``POST /api/predict`` uploads (multipart
   ``file``) are sent by 1 and by 16 client threads (each with its own ``httpx.Client``), interleaved
   c1, c16, c1, c16. Per setting: images/s (median of the rounds), p50 and p95 latency (client side, all
   rounds pooled) and the batch sizes ``/healthz`` reports (``recent_batch_sizes``) for the last round.
   Target: c16 at least 1.8x c1's images/s. The client threads run on the same cores as the server.
5. **Draft decoding**: cxr3 holds no large JPEGs, so ``--large-images`` real 512-px images are upscaled to
   ``--large-side`` px on the long side (Lanczos, JPEG quality 95) into a temporary folder: they are
   **upscaled copies**, smoother than real large films. Decode ms/image of ``read_image(p)`` against
   ``read_image(p, side)`` with ``side`` the model's ``InputTransform.decode_side`` (what prediction uses)
   and 474; decode + preprocess ms/image through ``iterate_batches`` (in this thread) with ``draft`` off and
   on; interleaved, medians. Through the bundled model (``covidxr.load_model().predict(images)`` on the
   images decoded each way): the max and median over images of max |delta p| (over the classes) against the
   full decode, and how many labels change.
6. **Install size**: ``du -sh`` of ``--runtime-venv`` (a venv with only the covidxr wheel installed, as the
   test suite's wheel test makes) and of ``.venv`` (the training install), and whether the runtime venv
   can import torch.

Every subprocess and this process use a fresh temporary ``COVIDXR_CACHE_DIR`` with ``COVIDXR_OFFLINE=1``.
Timings are wall-clock: the header and footer print ``uptime`` and the CPU; on shared cores compare ratios,
which are measured in the same rounds. Run from the repository root (not part of the test suite; it writes
nothing into the repository)::

    .venv/bin/python benchmarks/runtime.py
    .venv/bin/python benchmarks/runtime.py --quick
    python -m pip wheel --no-deps --no-build-isolation -w /tmp/wheel . && python -m venv /tmp/rt \\
        && /tmp/rt/bin/pip install -q /tmp/wheel/covidxr-*.whl
    .venv/bin/python benchmarks/runtime.py --runtime-venv /tmp/rt
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

from covidxr import load_model
from covidxr.runtime.batches import iterate_batches
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import predict_files
from covidxr.runtime.ood import is_blank
from covidxr.runtime.preprocess import InputTransform
from covidxr.runtime.runners import input_transform, make_engine
from covidxr.runtime.runs import default_model_path, load_run
from machine import cpu_model, describe_load, isolated_cache, linked_dataset, load_average
from serve import Server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
VENV_BIN = Path(sys.executable).parent
BATCH = 32
BRIEF_DRAFT = 474  # the draft side issue 16 names (the bundled model's decode_side may differ)
CONCURRENCY = (1, 16)
TIMEOUT = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=256, help="real X-rays for parts 2 and 3 (default: %(default)s)")
    parser.add_argument("--runs-single", type=int, default=7, help="runs of part 1, each (default: %(default)s)")
    parser.add_argument("--runs-folder", type=int, default=3, help="runs of part 2, each (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of parts 3 and 5 (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=64, help="uploads per service round (default: %(default)s)")
    parser.add_argument("--service-rounds", type=int, default=2, help="rounds of c1, c16 (default: %(default)s)")
    parser.add_argument("--large-images", type=int, default=24, help="upscaled JPEGs (default: %(default)s)")
    parser.add_argument("--large-side", type=int, default=2048, help="their long side (default: %(default)s)")
    parser.add_argument("--runtime-venv", type=Path, default=None, help="a venv with only the covidxr wheel")
    parser.add_argument("--quick", action="store_true", help="fewer runs and images (a smoke test, noisier)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs_single, args.runs_folder, args.repeats = 3, 1, 1
        args.requests, args.service_rounds, args.large_images = 32, 1, 8
    if min(args.images, args.runs_single, args.runs_folder, args.repeats, args.requests, args.service_rounds) < 1:
        parser.error("counts must be at least 1")
    if args.large_images < 1 or args.large_side < 600:
        parser.error("--large-images must be at least 1 and --large-side at least 600")
    if args.runtime_venv is not None and not (args.runtime_venv / "bin" / "covidxr").is_file():
        parser.error(f"--runtime-venv {args.runtime_venv}: has no bin/covidxr")
    return args


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {describe_load(load_average())}"


def header() -> str:
    packages = ", ".join(f"{name} {version(name)}" for name in ("covidxr", "numpy", "pillow", "onnxruntime", "torch"))
    return (
        f"  CPU:         {cpu_model()}, {os.cpu_count()} cores\n"
        f"  platform:    {packages}, Python {platform.python_version()}, {platform.machine()}\n"
        f"  uptime:      {uptime()}\n"
        f"  load avg:    {describe_load(load_average())}"
    )


def choose_rows(data: Path, count: int) -> pd.DataFrame:
    """``count`` rows evenly spaced over ``metadata.csv`` (every class, every source)."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    if count > len(meta):
        raise SystemExit(f"--images {count}: {data} has only {len(meta)} images")
    return meta.iloc[np.linspace(0, len(meta) - 1, count).round().astype(int)].reset_index(drop=True)


def run_timed(command: list[str]) -> float:
    """Wall seconds of a subprocess, which must succeed (its stdout discarded)."""
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr}")
    return seconds


def interleaved(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's measurement per round, in the order A, B, ..., A, B, ... (each gets the round number)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, measure in variants.items():
            times[name].append(measure(round_))
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    shown = ", ".join(f"{v * scale:.3g}" for v in values)
    return f"median {med(values) * scale:.3g} {unit} (runs: {shown})"


class Table:
    """The targets: what, the goal, the measured figures, the ratio and whether it is met."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, target: str, goal: str, measured: str, ratio: str, met: bool | None) -> None:
        self.rows.append((target, goal, measured, ratio, "n/a" if met is None else "yes" if met else "NO"))

    def __str__(self) -> str:
        titles = ("target", "goal", "measured", "ratio", "met?")
        widths = [max(len(row[i]) for row in (titles, *self.rows)) for i in range(5)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (titles,)]
        lines.append("  ".join("-" * width for width in widths))
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in self.rows]
        return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# 1. Start-up of one prediction
# ---------------------------------------------------------------------------------------------


def part_startup(args: argparse.Namespace, image: Path, table: Table) -> None:
    covidxr = str(VENV_BIN / "covidxr")
    variants = {
        "covidxr predict IMAGE": [covidxr, "predict", str(image)],
        "import numpy, PIL, onnxruntime": [sys.executable, "-c", "import numpy, PIL, onnxruntime"],
    }
    if args.runtime_venv is not None:
        variants["runtime venv: covidxr predict IMAGE"] = [str(args.runtime_venv / "bin" / "covidxr"), "predict"]
        variants["runtime venv: covidxr predict IMAGE"].append(str(image))
    for command in variants.values():
        run_timed(command)  # untimed: the page cache
    times = interleaved(
        {name: lambda _, c=command: run_timed(c) for name, command in variants.items()}, args.runs_single
    )
    print(f"\n1. Start-up: one real image ({image.name}), {args.runs_single} runs each, interleaved")
    for name, values in times.items():
        print(f"   {name:<36} {spread(values)}")
    predict, imports = med(times["covidxr predict IMAGE"]), med(times["import numpy, PIL, onnxruntime"])
    table.add("1. predict 1 image, wall", "<= 1.5 s", f"{predict:.2f} s", "", predict <= 1.5)
    table.add(
        "1. predict 1 image / import",
        "<= 3x",
        f"{predict:.2f} s vs import {imports:.2f} s",
        f"{predict / imports:.3f}x",
        predict / imports <= 3,
    )
    if args.runtime_venv is not None:
        runtime = med(times["runtime venv: covidxr predict IMAGE"])
        table.add("1. (info) runtime venv predict", "", f"{runtime:.2f} s", f"{runtime / imports:.2f}x import", None)
    importtime(covidxr, image)


def importtime(covidxr: str, image: Path, top: int = 12) -> None:
    """The slowest imports (cumulative) of one ``covidxr predict IMAGE``, and whether torch is among them."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", covidxr, "predict", str(image)], capture_output=True, text=True
    )
    rows = []  # (cumulative microseconds, nesting level, module)
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            name = name.rstrip()[1:]  # "| " then two spaces per nesting level
            rows.append((int(cumulative), (len(name) - len(name.lstrip())) // 2, name.strip()))
    total = sum(us for us, level, _ in rows if level == 0)
    torch = any(name.split(".")[0] == "torch" for *_, name in rows)
    print(
        f"   -X importtime (one untimed run): {total / 1e6:.2f} s in all imports; "
        f"torch imported: {'YES' if torch else 'no'}; slowest (cumulative; level 0 = imported by the command):"
    )
    for us, level, name in sorted(rows, reverse=True)[:top]:
        print(f"     {us / 1e3:7.1f} ms  level {level}  {name}")


# ---------------------------------------------------------------------------------------------
# 2. A folder, start-up included: default engine vs torch
# ---------------------------------------------------------------------------------------------


def part_folder(args: argparse.Namespace, folder: Path, tmp: Path, table: Table) -> None:
    covidxr = str(VENV_BIN / "covidxr")
    outputs: dict[str, list[Path]] = {"default": [], "torch": []}

    def measure(engine: str) -> Callable[[int], float]:
        def run(round_: int) -> float:
            out = tmp / f"folder-{engine}-{round_}.csv"
            outputs[engine].append(out)
            extra = ["--engine", "torch"] if engine == "torch" else []
            return run_timed([covidxr, "predict", str(folder), "--out", str(out), *extra])

        return run

    count = len(list(folder.iterdir()))
    times = interleaved({"default": measure("default"), "torch": measure("torch")}, args.runs_folder)
    print(f"\n2. covidxr predict FOLDER --out x.csv, {count} images, start-up included, {args.runs_folder} run(s) each")
    for name, values in times.items():
        print(f"   {name:<8} {spread(values)}  ({count / med(values):.1f} images/s)")
    labels = {engine: read_labels(paths[-1]) for engine, paths in outputs.items()}
    differ = sum(labels["default"][f] != labels["torch"].get(f) for f in labels["default"])
    print(f"   labels that differ between the engines: {differ} of {len(labels['default'])}")
    ratio = med(times["torch"]) / med(times["default"])
    table.add(
        f"2. {count} images: torch / default",
        ">= 4x",
        f"{med(times['default']):.1f} s vs torch {med(times['torch']):.1f} s",
        f"{ratio:.3f}x",
        ratio >= 4,
    )


def read_labels(path: Path) -> dict[str, str]:
    with path.open(newline="") as handle:
        return {row["file"]: row["label"] for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------------------------
# 3. In-process throughput: predict_files vs the bare session
# ---------------------------------------------------------------------------------------------


def part_inprocess(args: argparse.Namespace, paths: list[Path], table: Table) -> None:
    run = load_run(default_model_path())
    engine = make_engine(run)
    transform = input_transform(run, engine)

    def decode() -> np.ndarray:
        batches = iterate_batches(paths, transform, BATCH, 1, None, check_lungs=True, draft=True)
        return np.concatenate([inputs for _, inputs, *_ in batches])

    inputs = decode()
    predict_files(run, paths, engine=engine, progress=False)  # warm-up (and the page cache)
    for start in range(0, len(inputs), BATCH):
        engine(inputs[start : start + BATCH])

    def timed(call: Callable[[], object]) -> Callable[[int], float]:
        def measure(_: int) -> float:
            started = time.perf_counter()
            call()
            return len(paths) / (time.perf_counter() - started)

        return measure

    def bare() -> None:
        for start in range(0, len(inputs), BATCH):
            engine(inputs[start : start + BATCH])

    rates = interleaved(
        {
            "predict_files (end to end)": timed(lambda: predict_files(run, paths, engine=engine, progress=False)),
            "bare session, batches of 32": timed(bare),
            "decode + preprocess alone": timed(decode),
        },
        args.repeats,
    )
    print(
        f"\n3. In-process, {len(paths)} images, {engine.description}, input {transform.image_size} px, "
        f"lungs={transform.pipeline.lungs}, draft side {transform.decode_side}; {args.repeats} round(s)"
    )
    for name, values in rates.items():
        print(f"   {name:<28} {spread(values, 'images/s')}")
    e2e, bare_rate = med(rates["predict_files (end to end)"]), med(rates["bare session, batches of 32"])
    decode_rate = med(rates["decode + preprocess alone"])
    bound = 1 / (1 / bare_rate + 1 / decode_rate)
    print(
        f"   if decoding and the session each used every core, one after the other: {bound:.1f} images/s "
        f"({bound / bare_rate:.0%} of bare); above that only by overlapping on idle cores"
    )
    stages(transform, paths[:64])
    table.add(
        "3. predict_files / bare session",
        ">= 85%",
        f"{e2e:.1f} vs {bare_rate:.1f} images/s",
        f"{e2e / bare_rate:.1%}",
        e2e / bare_rate >= 0.85,
    )
    table.add(
        "3. (info) decode + preprocess", "", f"{decode_rate:.1f} images/s", f"{decode_rate / bare_rate:.2f}x bare", None
    )


def stages(transform: InputTransform, paths: list[Path]) -> None:
    """Where decoding + preprocessing spends its time: each stage in this thread, ms/image (one pass)."""
    from covidxr.runtime.lungs import lung_segmenter

    segmenter = lung_segmenter()
    started = time.perf_counter()
    images = [read_image(path, transform.decode_side) for path in paths]
    decoded = time.perf_counter()
    for image in images:
        transform.with_reason(image)
    transformed = time.perf_counter()
    for image in images:
        is_blank(image)
    blanked = time.perf_counter()
    greys = [np.asarray(image.convert("L")) for image in images]
    segment_start = time.perf_counter()
    for grey in greys:
        segmenter.segment(grey)
    segmented = time.perf_counter()
    ms = 1000 / len(paths)
    print(
        f"   stages in this thread ({len(paths)} images, one pass, ms/image): decode {(decoded - started) * ms:.1f}, "
        f"input transform {(transformed - decoded) * ms:.1f} (of which the lung segmenter alone: "
        f"{(segmented - segment_start) * ms:.1f}, {segmenter.session.get_session_options().intra_op_num_threads} "
        f"onnxruntime thread(s)), blank check {(blanked - transformed) * ms:.1f}"
    )


# ---------------------------------------------------------------------------------------------
# 4. The service: concurrency 1 vs 16
# ---------------------------------------------------------------------------------------------


def send_all(url: str, uploads: list[tuple[str, bytes]], concurrency: int) -> tuple[float, list[float]]:
    """Wall seconds to send every upload with ``concurrency`` threads, and each answer's latency."""
    todo: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    for upload in uploads:
        todo.put(upload)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        with httpx.Client(timeout=TIMEOUT) as session:
            start.wait()
            while True:
                try:
                    name, data = todo.get_nowait()
                except queue.Empty:
                    return
                sent = time.perf_counter()
                try:
                    response = session.post(f"{url}/api/predict", files={"file": (name, data, "image/jpeg")})
                    ok = response.status_code == 200 and "probabilities" in response.json()
                    problem = "" if ok else f"{name}: HTTP {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{name}: {type(exc).__name__}"
                with lock:
                    if problem:
                        failures.append(problem)
                    else:
                        latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} upload(s) failed at concurrency {concurrency}: {failures[:3]}")
    return seconds, latencies


def part_service(args: argparse.Namespace, files: list[Path], tmp: Path, table: Table) -> None:
    uploads = [(path.name, path.read_bytes()) for path in files]
    server = Server(argparse.Namespace(max_queue=32, engine="auto", model=None), tmp / "server.log")
    rates: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
    latencies: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
    batches: dict[int, list[int]] = {}
    try:
        startup, _ = server.start()
        send_all(server.url, uploads, 1)  # warm-up: each image once
        for _ in range(args.service_rounds):
            for concurrency in CONCURRENCY:
                seconds, answered = send_all(server.url, uploads, concurrency)
                rates[concurrency].append(len(uploads) / seconds)
                latencies[concurrency] += answered
                recent = httpx.get(f"{server.url}/healthz", timeout=10).json()["recent_batch_sizes"]
                batches[concurrency] = last_requests(recent, len(uploads))
    finally:
        status = server.stop()
    print(
        f"\n4. covidxr serve (bundled model, --max-queue 32; /healthz after {startup:.1f} s), {len(uploads)} uploads "
        f"of real images per round, {args.service_rounds} round(s) of c1, c16; exit status at stop: {status}"
    )
    for concurrency in CONCURRENCY:
        p50, p95 = np.percentile(latencies[concurrency], [50, 95]) * 1000
        sizes = Counter(batches[concurrency])
        shown = ", ".join(f"{size}x{n}" for size, n in sorted(sizes.items()))
        print(
            f"   c{concurrency:<3} {spread(rates[concurrency], 'images/s')}; latency p50 {p50:.0f} ms, "
            f"p95 {p95:.0f} ms; batch sizes of the last round (size x batches): {shown}"
        )
    problems = server.log_problems()
    if problems:
        print(f"   server log problems: {problems[:5]}")
    c1, c16 = med(rates[1]), med(rates[16])
    table.add(
        "4. serve images/s: c16 / c1", ">= 1.8x", f"{c16:.1f} vs {c1:.1f} images/s", f"{c16 / c1:.3f}x", c16 / c1 >= 1.8
    )


def last_requests(sizes: list[int], requests: int) -> list[int]:
    """The batch sizes at the end of ``sizes`` that hold the last ``requests`` requests."""
    taken, total = [], 0
    for size in reversed(sizes):
        if total >= requests:
            break
        taken.append(size)
        total += size
    return taken[::-1]


# ---------------------------------------------------------------------------------------------
# 5. Draft decoding of large JPEGs (upscaled copies)
# ---------------------------------------------------------------------------------------------


def upscale(files: list[Path], folder: Path, side: int) -> list[Path]:
    folder.mkdir()
    made = []
    for path in files:
        with Image.open(path) as image:
            scale = side / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            large = image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB").resize(
                size, Image.Resampling.LANCZOS
            )
        target = folder / f"{path.stem}-{side}.jpg"
        large.save(target, format="JPEG", quality=95)
        made.append(target)
    return made


def part_draft(args: argparse.Namespace, files: list[Path], tmp: Path, table: Table) -> None:
    large = upscale(files, tmp / "large", args.large_side)
    model = load_model()
    side = model.transform.decode_side
    ways = {"full": None, f"draft {side}": side}
    if side != BRIEF_DRAFT:
        ways[f"draft {BRIEF_DRAFT}"] = BRIEF_DRAFT

    def decode_ms(draft: int | None) -> Callable[[int], float]:
        def measure(_: int) -> float:
            started = time.perf_counter()
            for path in large:
                read_image(path, draft)
            return (time.perf_counter() - started) / len(large)

        return measure

    def pipeline_ms(draft: bool) -> Callable[[int], float]:
        def measure(_: int) -> float:
            started = time.perf_counter()
            for _ in iterate_batches(large, model.transform, BATCH, 0, None, check_lungs=True, draft=draft):
                pass
            return (time.perf_counter() - started) / len(large)

        return measure

    variants = {f"read_image, {name}": decode_ms(draft) for name, draft in ways.items()}
    variants |= {
        "decode + preprocess, full": pipeline_ms(False),
        f"decode + preprocess, draft {side}": pipeline_ms(True),
    }
    for measure in variants.values():
        measure(0)  # warm-up
    times = interleaved(variants, args.repeats)
    full_sizes = [read_image(path).size for path in large]
    reduced = {
        name: sum(read_image(path, draft).size != size for path, size in zip(large, full_sizes, strict=True))
        for name, draft in ways.items()
        if draft is not None
    }
    print(
        f"\n5. Draft decoding: {len(large)} large JPEGs that are UPSCALED COPIES of real 512-px cxr3 images "
        f"({args.large_side} px long side, Lanczos, quality 95; mean {mean_mib(large):.2f} MiB), not real large films; "
        f"decode_side of the bundled model: {side}; decoded at reduced scale (both sides must stay >= the side): "
        f"{', '.join(f'{name}: {n} of {len(large)}' for name, n in reduced.items())}; "
        f"{args.repeats} round(s), in this thread"
    )
    for name, values in times.items():
        print(f"   {name:<32} {spread(values, 'ms/image', 1000)}")
    full = med(times["read_image, full"])
    drafted = med(times[f"read_image, draft {side}"])
    predictions = {name: model.predict([read_image(path, draft) for path in large]) for name, draft in ways.items()}
    reference = predictions["full"]
    for name in list(ways)[1:]:
        deltas = [
            max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"])
            for a, b in zip(reference, predictions[name], strict=True)
        ]
        changed = sum(a["label"] != b["label"] for a, b in zip(reference, predictions[name], strict=True))
        print(
            f"   {name} vs full, through the bundled model: max |delta p| {max(deltas):.4f}, "
            f"median {med(deltas):.4f}; labels changed {changed} of {len(large)}"
        )
        table.add(
            f"5. (info) {name}: |delta p| max/median",
            "",
            f"{max(deltas):.4f} / {med(deltas):.4f}",
            f"{changed} labels changed",
            None,
        )
    table.add(
        f"5. (info) decode, full / draft {side}",
        "",
        f"{full * 1000:.1f} vs {drafted * 1000:.1f} ms/image (upscaled)",
        f"{full / drafted:.2f}x",
        None,
    )


def mean_mib(paths: list[Path]) -> float:
    return statistics.mean(path.stat().st_size for path in paths) / 2**20


# ---------------------------------------------------------------------------------------------
# 6. Install size
# ---------------------------------------------------------------------------------------------


def du(path: Path) -> str:
    done = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True)
    return done.stdout.split()[0] if done.returncode == 0 else f"du failed: {done.stderr.strip()}"


def part_size(args: argparse.Namespace, table: Table) -> None:
    training = du(REPO / ".venv")
    if args.runtime_venv is None:
        print(f"\n6. Install size: no --runtime-venv given; .venv (training install): {training}")
        return
    python = args.runtime_venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    runtime = du(args.runtime_venv)
    print(
        f"\n6. Install size (du -sh): runtime venv {args.runtime_venv}: {runtime} "
        f"(torch importable: {'YES' if probe.returncode == 0 else 'no'}); .venv (training install): {training}"
    )
    table.add("6. (info) install size", "", f"runtime {runtime} vs training {training}", "", None)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    print("covidxr's torch-free runtime: the targets of issue 16")
    print(header())
    rows = choose_rows(args.data, max(args.images, args.requests, args.large_images))
    table = Table()
    with isolated_cache("runtime") as tmp:
        linked = linked_dataset(tmp / "data", args.data.resolve(), rows.iloc[: args.images])
        folder = linked / "images"
        paths = sorted(folder.iterdir())
        print(f"  images:      {len(paths)} real cxr3 images evenly spaced over {args.data / 'metadata.csv'}")
        part_startup(args, paths[0], table)
        part_folder(args, folder, tmp, table)
        part_inprocess(args, paths, table)
        real = [args.data / name for name in rows["filename"]]
        part_service(args, real[: args.requests], tmp, table)
        spaced = np.linspace(0, len(real) - 1, args.large_images).round().astype(int)
        part_draft(args, [real[i] for i in spaced], tmp, table)
        part_size(args, table)
    print(f"\nTargets ({time.perf_counter() - began:.0f} s in all)")
    print(str(table))
    print(f"\n  CPU:         {cpu_model()}, {os.cpu_count()} cores")
    print(f"  uptime:      {uptime()}")
    print(f"  load avg:    {describe_load(load_average(), own_threads=0)} at end")


if __name__ == "__main__":
    main()
