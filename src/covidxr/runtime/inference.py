"""Prediction: the one API behind ``covidxr predict``, the Python API and the web service (runtime layer).

With a run that holds its exported graph (the bundled model does), everything here runs on numpy,
Pillow and onnxruntime: torch is imported only for the torch engine or a run without a graph."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from covidxr import DISCLAIMER
from covidxr.runtime.batches import iterate_batches, progress_bar
from covidxr.runtime.calibration import POSITIVE, decide, softmax
from covidxr.runtime.engines import (
    OnnxEngine,
)
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import IMAGE_SUFFIXES
from covidxr.runtime.runners import Engine, head_digest, input_transform, make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import stable_digest

__all__ = [
    "BLANK",
    "OUT_OF_DISTRIBUTION",
    "answer",
    "expand_inputs",
    "iterate_predictions",
    "output_name",
    "path_from_output_name",
    "predict_files",
    "predict_to_file",
]

logger = logging.getLogger(__name__)


OUT_OF_DISTRIBUTION = "not a chest X-ray like the training images"
BLANK = "a nearly uniform (blank) image"


def answer(
    run: Run,
    features: np.ndarray,
    logits: np.ndarray,
    blank: Sequence[bool],
    reasons: Sequence[str | None] | None = None,
    ood_threshold: float | None = None,
) -> list[dict]:
    """What covidxr says of each image, from the engine's features and logits.

    ``label`` is the decision (``covidxr.runtime.calibration.decide``): COVID-19 when the calibrated COVID-19
    probability reaches the run's operating threshold, else the more probable other class, so it always
    agrees with ``covid_positive``. An image the out-of-distribution guard flags, a nearly uniform one
    (``blank``), or one with a caller's reason (``reasons``, one per image, e.g. lungs not found) gets
    no answer: ``label`` and ``covid_positive`` are ``None`` and ``no_answer_reason`` says why; its
    probabilities stay, for research. ``out_of_distribution`` is ``None`` for runs made before the guard.
    ``ood_threshold`` replaces the guard's own where an engine's features need another (int8).
    """
    labels, covid, threshold = run.labels, run.labels.index(POSITIVE), run.covid_threshold
    probabilities = softmax(logits.astype(np.float64), run.temperature)
    decisions = decide(probabilities, labels, threshold)
    guard = run.ood_guard
    scores = guard.score(features) if guard is not None else [None] * len(features)
    reasons = reasons if reasons is not None else [None] * len(features)
    results = []
    for p, decision, score, flat, given in zip(probabilities, decisions, scores, blank, reasons, strict=True):
        unlike = guard is not None and bool(score > (ood_threshold or guard.threshold))
        why = [text for text, applies in ((BLANK, flat), (OUT_OF_DISTRIBUTION, unlike), (given, given)) if applies]
        answered = not why
        results.append(
            {
                "label": labels[int(decision)] if answered else None,
                "no_answer_reason": None if answered else "; ".join(why),
                "probabilities": {label: float(v) for label, v in zip(labels, p, strict=True)},
                "covid_threshold": threshold,
                "covid_positive": bool(decision == covid) if answered else None,
                "out_of_distribution": True if given else None if guard is None else bool(unlike or flat),
                "ood_score": None if score is None else float(score),
                "disclaimer": DISCLAIMER,
            }
        )
    return results


def iterate_predictions(
    run: Run,
    paths: Sequence[Path],
    runner: Engine,
    batch_size: int = 32,
    num_workers: int = 1,
    desc: str | None = None,
) -> Iterator[list[dict]]:
    """The results of ``paths`` batch by batch, in order, decoded on a thread pool while the engine runs
    (so decoding never stops between batches); an unreadable file's result is its ``error``."""
    transform = input_transform(run, runner)
    batches = iterate_batches(paths, transform, batch_size, num_workers, desc, check_lungs=True, draft=True)
    for indices, inputs, errors, blanks, lungs in batches:
        features, logits = runner(inputs)
        reasons = [reason or None for reason in lungs]
        answers = answer(run, features, logits, blanks, reasons, getattr(runner, "ood_threshold", None))
        yield [
            {"file": output_name(paths[i]), "error": printable(error)}
            if error
            else {"file": output_name(paths[i]), **result}
            for i, error, result in zip(indices, errors, answers, strict=True)
        ]


def predict_files(
    run: Run,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    engine: str | Engine = "auto",
) -> list[dict]:
    """One result per file — label and calibrated probabilities, or the error — continuing past bad files.

    Files are decoded on a thread pool while the engine (``auto``, ``torch``, ``onnx``, or one made
    by ``make_engine``) runs; nothing is written to the feature cache (prediction is not training, and
    a hospital's images should leave no trace). ``covid_positive`` applies the run's COVID-19
    threshold, chosen on validation data; ``out_of_distribution`` says whether the image is unlike
    the training X-rays (``covidxr.runtime.ood``; ``None`` for runs made before the guard existed).
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
    Inside folders, broken symlinks, symlink loops and sub-folders that cannot be listed are kept, so
    each gets a row saying why it could not be read instead of vanishing.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += _folder_entries(path)
        else:
            files.append(path)
    return files


def _folder_entries(folder: Path) -> list[Path]:
    unlisted: list[Path] = []
    found = [
        Path(root) / name
        for root, _, names in os.walk(folder, onerror=lambda error: unlisted.append(Path(error.filename)))
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(found + unlisted)


def output_name(path: str | Path) -> str:
    """How a file is named in results and output files: its path, or, where the name is not valid
    UTF-8 (an old archive's Latin-1 name) or holds ``\\x``, the path with every backslash written
    ``\\x5c`` and every byte that is not UTF-8 as ``\\xNN``, so the name stays readable and
    ``path_from_output_name`` gives the exact file back."""
    text = str(path)
    raw = os.fsencode(text)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\\x" not in text:
            return text
    return raw.replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


def path_from_output_name(name: str) -> Path:
    """The file an ``output_name`` names (its inverse)."""
    if "\\x" not in name:
        return Path(name)
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda match: bytes([int(match[1], 16)]), name.encode("utf-8"))
    return Path(os.fsdecode(raw))


def printable(message: str) -> str:
    """A message that can be written as UTF-8: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    return message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _flat_row(result: dict, labels: Sequence[str]) -> dict:
    probabilities = result.get("probabilities", {})
    return {
        "file": result["file"],
        "label": result.get("label") or "",
        "no_answer_reason": result.get("no_answer_reason") or "",
        **{f"p_{label}": probabilities.get(label) for label in labels},
        "covid_positive": result.get("covid_positive"),
        "out_of_distribution": result.get("out_of_distribution"),
        "ood_score": result.get("ood_score"),
        "error": result.get("error", ""),
    }


def model_identity(run: Run, runner: Engine) -> str:
    """Which model and engine made a prediction: backbone, run folder name, head hash, engine and the
    hash of the preprocessing key (weights, normalisation, input size, image pipeline). An output file
    records it on every row, and ``--resume`` refuses to mix two models' rows in one file."""
    engine = runner.name
    if isinstance(runner, OnnxEngine) and runner.path.stem.endswith("-int8"):
        engine = "int8"
    head = head_digest(run)[:12]
    preprocessing = stable_digest(run.info.model_key)[:12]
    return f"{run.info.model['name']} run={run.path.name} head={head} engine={engine} preprocessing={preprocessing}"


def _read_done(out: Path, columns: list[str], identity: str) -> list[dict]:
    """Rows already in an output file (for ``--resume``), all made by the model ``identity`` names.

    An incomplete or malformed last CSV row (a crash or full disk in the middle of a write) is cut
    from the file, with a warning, and its image redone; any other damage, another model's rows, or
    a file this version did not write is refused, and the file is never overwritten."""
    if out.suffix == ".json":
        rows = _read_json_rows(out, columns)
    else:
        rows, keep = _read_csv_rows(out, columns)
    others = sorted({str(row["model"]) for row in rows} - {identity})
    if others:
        raise CovidxrError(
            f"{out}: made by another model or engine ({others[0]}), not this one ({identity}); "
            "resume with the same --model and --engine, or choose another --out"
        )
    if out.suffix == ".csv" and keep < out.stat().st_size:
        logger.warning("%s: cut an incomplete last row (an interrupted write); its image is predicted again", out)
        os.truncate(out, keep)
    return rows


def _refuse(out: Path, why: str) -> CovidxrError:
    return CovidxrError(f"{out}: cannot resume from it ({why}); move it away or choose another --out")


def _read_json_rows(out: Path, columns: list[str]) -> list[dict]:
    try:
        rows = json.loads(out.read_text(encoding="utf-8"))["predictions"]
        complete = all(isinstance(row, dict) and list(row) == columns for row in rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _refuse(out, type(exc).__name__) from None
    if not complete:
        raise _refuse(out, "its rows are not those of this covidxr with the model recorded")
    return rows


def _read_csv_rows(out: Path, columns: list[str]) -> tuple[list[dict], int]:
    """The complete rows of a CSV output and the byte length they fill (anything after is a torn row)."""
    try:
        data = out.read_bytes()
        text = data[: data.rfind(b"\n") + 1].decode("utf-8")  # a last line without its newline is torn
    except (OSError, UnicodeDecodeError) as exc:
        raise _refuse(out, type(exc).__name__) from None
    ends: list[int] = []  # byte offset after each record
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for line in text.split("\n")[:-1]:
            line += "\n"
            consumed += len(line.encode("utf-8"))
            yield line

    records = []
    try:
        for record in csv.reader(lines()):
            records.append(record)
            ends.append(consumed)
    except csv.Error as exc:
        raise _refuse(out, f"malformed CSV: {exc}") from None
    if not records or records[0] != columns:
        raise _refuse(out, "its columns are not those of this covidxr's predictions with the model recorded")
    rows = [dict(zip(columns, record, strict=False)) for record in records[1:]]
    good = [len(record) == len(columns) and _complete(row) for record, row in zip(records[1:], rows, strict=True)]
    if good and not good[-1]:
        rows, good, ends = rows[:-1], good[:-1], ends[:-1]  # the last row was cut short: redo its image
    if not all(good):
        raise _refuse(out, f"row {good.index(False) + 2} is damaged")
    return [_typed(row) for row in rows], ends[-1]


def _typed(row: dict[str, str]) -> dict:
    """A CSV row with the types ``_flat_row`` wrote: probabilities and scores as floats, flags as booleans,
    an empty cell as None (the file and text columns stay strings)."""
    typed: dict = {}
    for key, value in row.items():
        if key.startswith("p_") or key == "ood_score":
            typed[key] = float(value) if value else None
        elif key in {"covid_positive", "out_of_distribution"}:
            typed[key] = {"True": True, "False": False}.get(value)
        else:
            typed[key] = value
    return typed


def _complete(row: dict) -> bool:
    """Whether a CSV row was written whole: a file, the model, and an error or finite probabilities."""
    if not row["file"] or not row["model"]:
        return False
    if row["error"]:
        return True
    try:
        return all(np.isfinite(float(value)) for key, value in row.items() if key.startswith("p_"))
    except ValueError:
        return False


def _append_synced(out: Path, data: bytes, finished: int) -> None:
    """Append whole rows to ``out`` and sync them to disk; a write that fails (a full disk) is cut
    back off, so no half row is left, and stops with one line."""
    with open(out, "ab", buffering=0) as handle:
        size = handle.tell()
        try:
            view = memoryview(data)
            while view:
                view = view[handle.write(view) :]
            os.fsync(handle.fileno())
        except OSError as exc:
            with suppress(OSError):  # if even this fails, --resume cuts the torn row
                os.ftruncate(handle.fileno(), size)
            raise _write_error(out, exc, finished) from None


def _write_error(out: Path, exc: OSError, finished: int) -> CovidxrError:
    return CovidxrError(
        f"{out}: cannot write ({exc.strerror or type(exc).__name__}); the {finished} finished row(s) are kept: "
        "free some space and rerun with --resume"
    )


def _write_json(out: Path, run: Run, identity: str, rows: list[dict], finished: int) -> None:
    """The whole JSON file, written beside and synced before it replaces the old one (never half a file)."""
    payload = {"model": identity, "labels": list(run.labels), "disclaimer": DISCLAIMER, "predictions": rows}
    tmp = out.with_suffix(".json.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(out, exc, finished) from None


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
    engine: str | Engine = "auto",
) -> tuple[list[dict], int]:
    """Predict files and folders into ``out`` (``.csv`` or ``.json``), one row per image, written chunk
    by chunk: a crash or Ctrl-C leaves a valid file of the finished rows, and ``resume`` completes it
    without redoing them. Every row names its file (``output_name``) and the model that made it
    (``model_identity``); rows are appended whole and synced to disk chunk by chunk, and a full disk
    stops with one line, keeping the finished rows. Returns every row (old, then new) and how many are new."""
    out = Path(out)
    if out.suffix not in {".csv", ".json"}:
        raise CovidxrError(f"{out}: --out must end in .csv or .json")
    files = expand_inputs(inputs)
    if not files:
        raise CovidxrError(f"no image files found in {', '.join(map(printable, map(str, inputs)))}")
    runner = make_engine(run, engine, cache_dir) if isinstance(engine, str) else engine
    identity = model_identity(run, runner)
    columns = [*_flat_row({"file": ""}, run.labels), "model"]
    rows: list[dict] = []
    if out.exists():
        if not resume:
            raise CovidxrError(f"{out}: exists; pass --resume to complete it, or choose another --out")
        rows = _read_done(out, columns, identity)
    done = {str(row["file"]) for row in rows}
    todo = [f for f in files if output_name(f) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv" and not out.exists():
        try:
            _append_synced(out, (",".join(columns) + "\n").encode("utf-8"), 0)
        except CovidxrError:
            out.unlink(missing_ok=True)
            raise

    def write(new: list[dict]) -> None:
        if out.suffix == ".csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, columns, lineterminator="\n")
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in new)
            _append_synced(out, buffer.getvalue().encode("utf-8"), len(rows))
            rows.extend(new)
        else:
            _write_json(out, run, identity, rows + new, len(rows))
            rows.extend(new)

    pending: list[dict] = []
    written = 0
    bar = progress_bar(len(todo), "predict" if progress else None)
    with _stop_after_chunk() as stop, bar:
        # Batches no larger than a chunk, so every chunk is written as soon as it is done.
        for batch in iterate_predictions(run, todo, runner, min(batch_size, chunk_size), num_workers):
            pending += [{**_flat_row(result, run.labels), "model": identity} for result in batch]
            bar.update(len(batch))
            if len(pending) >= chunk_size or written + len(pending) == len(todo):
                write(pending)
                written, pending = written + len(pending), []
                if stop.is_set() and written < len(todo):
                    raise KeyboardInterrupt
    if out.suffix == ".json" and not todo:
        _write_json(out, run, identity, rows, len(rows))
    return rows, len(todo)
