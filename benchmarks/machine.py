"""What every benchmark prints about the machine it ran on, and the small real datasets they build.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so this module is imported as ``machine``.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

REPO = Path(__file__).resolve().parents[1]
LOAD_WARNING = 0.5  # a 1-minute load above this (plus the benchmark's own threads) means shared cores

__all__ = [
    "cpu_bf16_flags",
    "cpu_model",
    "describe_load",
    "isolated_cache",
    "linked_dataset",
    "load_average",
    "machine_lines",
    "small_subset",
    "timed_pass",
    "warm_up",
]
WARMUP_CALLS = 2  # untimed calls per batch shape and variant


# The small real datasets the benchmarks train on, built as the test suite builds its own (the benchmarks
# do not import the tests).
def small_subset(meta: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """A few real images per class, whole patients only, so patient-disjoint splits stay possible."""
    import pandas as pd

    rows = []
    for _, group in meta.groupby("label"):
        patients = group["patient_id"].drop_duplicates().sample(frac=1.0, random_state=seed)
        taken, count = [], 0
        for patient in patients:
            images = group[group["patient_id"] == patient]
            taken.append(images)
            count += len(images)
            if count >= per_class:
                break
        rows.append(pd.concat(taken))
    return pd.concat(rows).reset_index(drop=True)


def linked_dataset(root: Path, source: Path, rows: pd.DataFrame) -> Path:
    """A dataset folder whose ``metadata.csv`` lists ``rows`` and whose images link to ``source``'s files."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in rows["filename"]:
        (root / name).symlink_to((source / name).resolve())
    rows.to_csv(root / "metadata.csv", index=False)
    return root


def load_average() -> float | None:
    """The 1-minute system load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe_load(load: float | None, own_threads: int = 0) -> str:
    """The load, flagged when other processes probably competed for the cores.

    At the end of a run the 1-minute average also counts this benchmark's own ``own_threads`` busy
    threads, so only a load above ``LOAD_WARNING + own_threads`` is flagged then.
    """
    if load is None:
        return "n/a"
    limit = LOAD_WARNING + own_threads
    text = f"{load:.2f}"
    if own_threads:
        text += f" (includes this run's own {own_threads} busy threads)"
    if load > limit:
        text += f"  (above {limit}: other processes shared these cores; timings are noisy)"
    return text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bf16_flags() -> str:
    """The CPU's native bfloat16 instruction sets (AMX tiles, AVX-512 BF16), as /proc/cpuinfo lists them."""
    from covidxr.runtime.engines import cpu_flags

    return ", ".join(cpu_flags("amx_bf16", "avx512_bf16")) or "none (bf16 would be emulated)"


def timed_pass(call: Callable, inputs: Sequence, batch: int) -> tuple[float, list[float], list]:
    """Seconds for every input in batches of ``batch``, seconds of each full batch, and each call's output."""
    calls, outputs = [], []
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        before = time.perf_counter()
        outputs.append(call(inputs[start : start + batch]))
        if start + batch <= len(inputs):
            calls.append(time.perf_counter() - before)
    return time.perf_counter() - started, calls, outputs


def warm_up(call: Callable, inputs: Sequence, batch: int) -> None:
    """Every batch shape the timed passes use, ``WARMUP_CALLS`` times (kernel selection, memory set-up)."""
    sizes = {1, min(batch, len(inputs))}
    if len(inputs) % batch:
        sizes.add(len(inputs) % batch)
    for size in sorted(sizes):
        for _ in range(WARMUP_CALLS):
            call(inputs[:size])


def machine_lines() -> str:
    """The header lines every engine benchmark prints: the CPU and the versions that decide its speed."""
    import numpy
    import onnxruntime
    import torch

    return (
        f"  CPU:         {cpu_model()}, {os.cpu_count()} cores; bf16 instructions: {cpu_bf16_flags()}\n"
        f"  platform:    torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}"
    )


@contextmanager
def isolated_cache(name: str) -> Iterator[Path]:
    """A temporary folder whose ``cache`` is covidxr's cache for this process and its children (so every
    run starts cold and leaves nothing behind), with downloads switched off."""
    with tempfile.TemporaryDirectory(prefix=f"covidxr-bench-{name}-") as tmp:
        os.environ["COVIDXR_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["COVIDXR_OFFLINE"] = "1"
        yield Path(tmp)
