"""Prediction: the one API behind ``covidxr predict``, ``evaluate`` and (later) the web service."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidxr import DISCLAIMER
from covidxr.calibration import POSITIVE, softmax
from covidxr.data import IMAGE_SUFFIXES
from covidxr.engines import OnnxEngine, TorchEngine, export_or_fallback, resolve_engine, sidecar
from covidxr.errors import CovidxrError
from covidxr.features import iterate_batches
from covidxr.models import CovidxrNet
from covidxr.train import Run


@torch.no_grad()
def head_probabilities(model: CovidxrNet, features: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax probabilities of the trained head on pooled backbone features, logits divided by ``temperature``."""
    model.head.eval()
    return torch.softmax(model.head(torch.from_numpy(features)) / temperature, dim=1).numpy()


def make_engine(
    run: Run, engine: str = "auto", cache_dir: str | Path | None = None, threads: int | None = None
) -> TorchEngine | OnnxEngine:
    """The engine that predicts with ``run``: ``torch`` (the model itself), ``onnx`` (the run's graph,
    exported once into the cache, run by onnxruntime on ``threads`` threads) or ``auto`` (onnx where
    ``covidxr.engines.resolve_engine`` says so; a model that cannot be exported gets one line on stderr
    and torch) or ``int8`` (the graph ``covidxr quantize`` accepted)."""
    if engine == "int8":
        from covidxr.quantize import int8_engine

        return int8_engine(run, cache_dir, threads)
    if resolve_engine(engine, run.model) == "torch":
        if threads is not None:
            raise CovidxrError("--threads applies to the onnx engine; torch uses torch.set_num_threads")
        return TorchEngine(run.model)
    info = sidecar(run.model, run.labels, run.temperature, run.covid_threshold)
    path = export_or_fallback(run.model, info, engine, cache_dir)
    return TorchEngine(run.model) if path is None else OnnxEngine(path, threads, spin=False)


def answer(run: Run, features: np.ndarray, logits: np.ndarray, blank: Sequence[bool]) -> list[dict]:
    """What covidxr says of each image, from the engine's features and logits: label, calibrated
    probabilities, the COVID-19 threshold decision and the out-of-distribution flag (``None`` for runs
    made before the guard existed; ``blank`` marks nearly uniform images)."""
    labels, covid = run.labels, run.labels.index(POSITIVE)
    probabilities = softmax(logits.astype(np.float64), run.temperature)
    guard = run.ood_guard
    scores = guard.score(features) if guard is not None else [None] * len(features)
    return [
        {
            "label": labels[int(p.argmax())],
            "probabilities": {label: float(v) for label, v in zip(labels, p, strict=True)},
            "covid_threshold": run.covid_threshold,
            "covid_positive": bool(p[covid] >= run.covid_threshold),
            "out_of_distribution": None if guard is None else bool(score > guard.threshold or flat),
            "ood_score": None if score is None else float(score),
            "disclaimer": DISCLAIMER,
        }
        for p, score, flat in zip(probabilities, scores, blank, strict=True)
    ]


def iterate_predictions(
    run: Run,
    paths: Sequence[Path],
    runner: TorchEngine | OnnxEngine,
    batch_size: int = 32,
    num_workers: int = 1,
    desc: str | None = None,
) -> Iterator[list[dict]]:
    """The results of ``paths`` batch by batch, in order, from one DataLoader (so decoding never stops
    between batches); an unreadable file's result is its ``error``."""
    batches = iterate_batches(paths, run.model.input_transform, batch_size, num_workers, desc)
    for indices, inputs, errors, blanks in batches:
        features, logits = runner(inputs)
        answers = answer(run, features, logits, blanks)
        yield [
            {"file": str(paths[i]), "error": error} if error else {"file": str(paths[i]), **result}
            for i, error, result in zip(indices, errors, answers, strict=True)
        ]


def predict_files(
    run: Run,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    engine: str | TorchEngine | OnnxEngine = "auto",
) -> list[dict]:
    """One result per file — label and calibrated probabilities, or the error — continuing past bad files.

    Files are decoded in a worker process while the engine (``auto``, ``torch``, ``onnx``, or one made
    by ``make_engine``) runs; nothing is written to the feature cache (prediction is not training, and
    a hospital's images should leave no trace). ``covid_positive`` applies the run's COVID-19
    threshold, chosen on validation data; ``out_of_distribution`` says whether the image is unlike
    the training X-rays (``covidxr.ood``; ``None`` for runs made before the guard existed).
    """
    runner = make_engine(run, engine, cache_dir) if isinstance(engine, str) else engine
    paths = [Path(p) for p in paths]
    desc = "predict" if progress else None
    batches = iterate_predictions(run, paths, runner, batch_size, num_workers, desc)
    return [result for batch in batches for result in batch]


# ---------------------------------------------------------------------------------------------
# Folders and batches, written as they finish
# ---------------------------------------------------------------------------------------------

CHUNK = 256  # files predicted between two writes of the output file


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image file under each folder (recursively, in sorted order).

    Named files are always tried, whatever their extension, so a mislabelled file gets its own line.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def _flat_row(result: dict, labels: Sequence[str]) -> dict:
    probabilities = result.get("probabilities", {})
    return {
        "file": result["file"],
        "label": result.get("label", ""),
        **{f"p_{label}": probabilities.get(label) for label in labels},
        "covid_positive": result.get("covid_positive"),
        "out_of_distribution": result.get("out_of_distribution"),
        "ood_score": result.get("ood_score"),
        "error": result.get("error", ""),
    }


def _read_done(out: Path) -> list[dict]:
    """Rows already in an output file (for ``--resume``); a damaged file is refused, never overwritten."""
    try:
        if out.suffix == ".json":
            rows = json.loads(out.read_text())["predictions"]
        else:
            rows = pd.read_csv(out, dtype={"file": str}, keep_default_na=False).to_dict("records")
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:
        raise CovidxrError(
            f"{out}: cannot resume from it ({type(exc).__name__}); move it away or choose another --out"
        ) from None
    return rows


def _write_json(out: Path, run: Run, rows: list[dict]) -> None:
    payload = {"model": str(run.path), "labels": list(run.labels), "disclaimer": DISCLAIMER, "predictions": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)


@contextmanager
def _stop_after_chunk():
    """Ctrl-C asks the loop to stop once the chunk in hand is written (a second Ctrl-C stops at once).

    Only the main thread can handle signals; elsewhere Ctrl-C keeps its default behaviour.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def predict_to_file(
    run: Run,
    inputs: Sequence[str | Path],
    out: str | Path,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    chunk_size: int = CHUNK,
    engine: str | TorchEngine | OnnxEngine = "auto",
) -> tuple[list[dict], int]:
    """Predict files and folders into ``out`` (``.csv`` or ``.json``), one row per image, written chunk
    by chunk: a crash or Ctrl-C leaves a valid file of the finished rows, and ``resume`` completes it
    without redoing them. Returns every row (old, then new) and how many are new."""
    out = Path(out)
    if out.suffix not in {".csv", ".json"}:
        raise CovidxrError(f"{out}: --out must end in .csv or .json")
    files = expand_inputs(inputs)
    if not files:
        raise CovidxrError(f"no image files found in {', '.join(map(str, inputs))}")
    rows: list[dict] = []
    if out.exists():
        if not resume:
            raise CovidxrError(f"{out}: exists; pass --resume to complete it, or choose another --out")
        rows = _read_done(out)
    done = {str(row["file"]) for row in rows}
    todo = [f for f in files if str(f) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(_flat_row({"file": ""}, run.labels))
    if out.suffix == ".csv" and not out.exists():
        pd.DataFrame(columns=columns).to_csv(out, index=False)
    runner = make_engine(run, engine, cache_dir) if isinstance(engine, str) else engine

    def write(new: list[dict]) -> None:
        rows.extend(new)
        if out.suffix == ".csv":
            with open(out, "a", newline="") as handle:
                pd.DataFrame(new, columns=columns).to_csv(handle, header=False, index=False)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            _write_json(out, run, rows)

    pending: list[dict] = []
    written = 0
    with _stop_after_chunk() as stop, tqdm(total=len(todo), desc="predict", unit="img", disable=not progress) as bar:
        # Batches no larger than a chunk, so every chunk is written as soon as it is done.
        for batch in iterate_predictions(run, todo, runner, min(batch_size, chunk_size), num_workers):
            pending += [_flat_row(result, run.labels) for result in batch]
            bar.update(len(batch))
            if len(pending) >= chunk_size or written + len(pending) == len(todo):
                write(pending)
                written, pending = written + len(pending), []
                if stop.is_set() and written < len(todo):
                    raise KeyboardInterrupt
    if out.suffix == ".json" and not todo:
        _write_json(out, run, rows)
    return rows, len(todo)
