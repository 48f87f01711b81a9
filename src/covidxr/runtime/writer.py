"""``predict --out FILE``: predictions written as CSV or JSON in chunks, each chunk synced before the next,
so an interrupted run (a crash, Ctrl-C, SIGTERM) is completed by ``--resume`` without redoing its rows, and
a file made by another model or engine is refused rather than mixed.

A Parquet file cannot be appended to: its rows go to a CSV journal beside it (``FILE.parquet.partial.csv``,
``journal_of``) with the same chunks, syncs and checks, and become the Parquet file, written whole, once every
file has its row."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from covidxr import DISCLAIMER
from covidxr.runtime.batches import progress_bar
from covidxr.runtime.engines import (
    OnnxEngine,
)
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.foreign import NOT_FINITE, ForeignModel
from covidxr.runtime.inference import (
    FILE_BATCH,
    expand_inputs,
    iterate_predictions,
    output_name,
    spreadsheet_text,
    text_from_spreadsheet,
)
from covidxr.runtime.runners import Engine, head_digest, make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.site import describe_set
from covidxr.runtime.storage import atomic_write, locked, output_folder, stable_digest, write_failure

__all__ = [
    "CHUNK",
    "append_synced",
    "csv_line",
    "flat_row",
    "journal_of",
    "model_identity",
    "output_and_files",
    "output_format",
    "predict_locked",
    "predict_to_file",
]

logger = logging.getLogger(__name__)

CHUNK = 256  # files predicted between two writes of the output file
FORMATS = (".csv", ".json", ".parquet")
PARQUET_EXTRA = "pip install 'covidxr[parquet]'"
# The columns of flat_row that are not text, by type (a probability column p_LABEL is a float too).
_FLOATS = {"covid_threshold", "ood_score"}
_INTEGERS = {"image_width", "image_height", "bit_depth"}
_FLAGS = {"covid_positive", "out_of_distribution", "seen_in_training"}


def flat_row(result: dict, labels: Sequence[str]) -> dict:
    """One prediction as a row of ``predict --out``'s table (without its ``model`` column).

    After ``error`` (the columns before it are those of earlier covidxr versions, unchanged):
    ``prediction_set``, the image's conformal prediction set where the site file has sets (``{COVID-19,
    PNEUMONIA}``, ``{NORMAL}``, ``{}`` for the empty set; empty where none was made: no sets, no answer, an
    error), and the file's own ``image_width``, ``image_height``, ``bit_depth`` and ``image_mode``
    (``covidxr.runtime.images.image_facts``; empty for an unreadable file), which ``covidxr monitor`` compares
    with the calibration images'; then ``threshold_source`` (``model``, ``site``, ``user``, or a foreign model's
    ``spec``: who chose ``covid_threshold``) and ``seen_in_training`` (True for an image of the model's training
    split, empty where it cannot be told; ``covidxr.runtime.answers``). A no-answer row keeps its probabilities."""
    probabilities = result.get("probabilities", {})
    members = result.get("prediction_set")
    image = result.get("image") or {}
    return {
        "file": result["file"],
        "label": result.get("label") or "",
        "no_answer_reason": result.get("no_answer_reason") or "",
        **{f"p_{label}": probabilities.get(label) for label in labels},
        "covid_positive": result.get("covid_positive"),
        "covid_threshold": result.get("covid_threshold"),
        "site": result.get("site") or "",
        "out_of_distribution": result.get("out_of_distribution"),
        "ood_score": result.get("ood_score"),
        "error": result.get("error", ""),
        "prediction_set": "" if members is None else describe_set(members),
        "image_width": image.get("width"),
        "image_height": image.get("height"),
        "bit_depth": image.get("bit_depth"),
        "image_mode": image.get("mode") or "",
        "threshold_source": result.get("threshold_source") or "",
        "seen_in_training": result.get("seen_in_training"),
    }


def model_identity(run: Run, runner: Engine) -> str:
    """Which model and engine made a prediction: backbone, run folder name, head hash, engine and the
    hash of the preprocessing key (weights, normalisation, input size, image pipeline), and of the site file whose
    threshold decides, where one is applied. An output file
    records it on every row, and ``--resume`` refuses to mix two models' rows in one file."""
    engine = runner.name
    if isinstance(runner, OnnxEngine) and runner.path.stem.endswith("-int8"):
        engine = "int8"
    head = head_digest(run)[:12]
    preprocessing = stable_digest(run.info.model_key)[:12]
    identity = f"{run.info.model['name']} run={run.path.name} head={head} engine={engine} preprocessing={preprocessing}"
    if run.site is not None:  # another operating point: its rows are not mixed with the run's own
        identity += f" site={stable_digest(run.site.to_dict())[:12]}"
    if run.threshold is not None:  # the user's own operating point (--threshold)
        identity += f" threshold={run.threshold!r}"
    return identity


def _read_done(out: Path, columns: list[str], identity: str) -> list[dict]:
    """Rows already in an output file (for ``--resume``), all made by the model ``identity`` names.

    An incomplete or malformed last CSV row (a crash or full disk in the middle of a write) is cut
    from the file, with a warning, and its image redone; any other damage, another model's rows, or
    a file this version did not write is refused, and the file is never overwritten."""
    recorded: set[str] = set()  # the model a Parquet file's metadata names
    if out.suffix == ".json":
        rows = _read_json_rows(out, columns)
    elif out.suffix == ".parquet":
        rows, recorded = _read_parquet_rows(out, columns)
    else:
        rows, keep = _read_csv_rows(out, columns)
    others = sorted(({str(row["model"]) for row in rows} | recorded) - {identity})
    if others:
        raise CovidxrError(
            f"{out}: made by another model or engine ({others[0]}), not this one ({identity}); "
            "resume with the same --model, --engine and --site, or choose another --out"
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


def _read_parquet_rows(out: Path, columns: list[str]) -> tuple[list[dict], set[str]]:
    """The rows of a finished Parquet output and the model its metadata records; a file that is not Parquet, or
    not with this covidxr's columns and types, is refused."""
    pa, pq = _pyarrow(out)
    try:
        table = pq.read_table(out)
    except (OSError, pa.ArrowException):
        raise _refuse(out, "not a readable Parquet file") from None
    model = (table.schema.metadata or {}).get(b"model")
    if model is None or not table.schema.equals(_parquet_schema(pa, columns), check_metadata=False):
        raise _refuse(out, "its columns are not those of this covidxr's predictions with the model recorded")
    return table.to_pylist(), {model.decode("utf-8", "replace")}


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


def csv_line(values: Iterable[object]) -> str:
    """One CSV record ending in ``\\n``: text cells escaped for spreadsheets (``spreadsheet_text``) and quoted
    wherever they hold a comma, a quote, ``\\n`` or ``\\r`` (the csv module's minimal quoting leaves a bare
    ``\\r`` unquoted when lines end in ``\\n``, and a reader then splits the record), numbers as Python writes
    them, None as an empty cell."""
    cells = []
    for value in values:
        cell = "" if value is None else spreadsheet_text(value) if isinstance(value, str) else str(value)
        cells.append('"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\r\n') else cell)
    return ",".join(cells) + "\n"


def _typed(row: dict[str, str]) -> dict:
    """A CSV row with the types ``flat_row`` wrote: probabilities and scores as floats, flags as booleans,
    an empty cell as None (the file and text columns stay strings)."""
    typed: dict = {}
    for key, value in row.items():
        if key.startswith("p_") or key in _FLOATS:
            typed[key] = float(value) if value else None
        elif key in _INTEGERS:
            typed[key] = int(value) if value.isdigit() else None
        elif key in _FLAGS:
            typed[key] = {"True": True, "False": False}.get(value)
        else:
            typed[key] = text_from_spreadsheet(value)
    return typed


def _complete(row: dict) -> bool:
    """Whether a CSV row was written whole: a file, the model, and an error or finite probabilities (or, for a
    foreign model's non-finite output, none at all with the reason)."""
    if not row["file"] or not row["model"]:
        return False
    if row["error"]:
        return True
    probabilities = [value for key, value in row.items() if key.startswith("p_")]
    if row["no_answer_reason"].startswith(NOT_FINITE) and not any(probabilities):
        return True
    try:
        return all(np.isfinite(float(value)) for key, value in row.items() if key.startswith("p_"))
    except ValueError:
        return False


def append_synced(out: Path, data: bytes, finished: int) -> None:
    """Append whole rows to ``out`` and sync them to disk; a write that fails (a full disk) is cut
    back off, so no half row is left, and stops with one line."""
    try:
        handle = open(out, "ab", buffering=0)  # noqa: SIM115  (closed below; a refused open is one line too)
    except OSError as exc:
        raise _write_error(out, exc, finished) from None
    with handle:
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
    """One line: why, what is kept, what to do (a read-only disk is not told to free space)."""
    kept = f"the {finished} finished row(s) are kept"
    return CovidxrError(f"{write_failure(out, exc, kept)} and rerun with --resume")


def _write_json(out: Path, run: Run | ForeignModel, identity: str, rows: list[dict], finished: int) -> None:
    """The whole JSON file, written beside (a new file of a random name, never one planted there) and synced
    before it replaces the old one (never half a file)."""
    payload = {"model": identity, "labels": list(run.labels), "disclaimer": DISCLAIMER, "predictions": rows}
    try:
        atomic_write(out, json.dumps(payload, indent=1), sync=True)
    except OSError as exc:
        raise _write_error(out, exc, finished) from None


def _pyarrow(out: Path):
    """pyarrow and pyarrow.parquet, or one line saying how to install them (the ``parquet`` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CovidxrError(f"--out {out} needs pyarrow: {PARQUET_EXTRA}") from None
    return pa, pq


def _parquet_schema(pa, columns: list[str], metadata: dict[str, str] | None = None):
    """The Arrow schema of a Parquet output: text as (non-null) strings holding "" where the CSV has an empty
    cell, probabilities, thresholds and scores as float64, flags as nullable booleans, image sizes as int64."""
    fields = []
    for column in columns:
        if column.startswith("p_") or column in _FLOATS:
            fields.append(pa.field(column, pa.float64()))
        elif column in _INTEGERS:
            fields.append(pa.field(column, pa.int64()))
        elif column in _FLAGS:
            fields.append(pa.field(column, pa.bool_()))
        else:
            fields.append(pa.field(column, pa.string(), nullable=False))
    return pa.schema(fields, metadata=metadata)


def _write_parquet(out: Path, run: Run | ForeignModel, identity: str, rows: list[dict], journal: Path) -> None:
    """The whole Parquet file from every row, written beside and synced before it replaces any old one (as
    ``_write_json``); its metadata records the model, the labels and the disclaimer. A failed write keeps the
    journal for ``--resume``."""
    pa, pq = _pyarrow(out)
    columns = [*flat_row({"file": ""}, run.labels), "model"]
    metadata = {"model": identity, "labels": json.dumps(list(run.labels)), "disclaimer": DISCLAIMER}
    schema = _parquet_schema(pa, columns, metadata)
    text = {field.name for field in schema if field.type == pa.string()}
    # None in a text column is "" (as the CSV writes it), so the three formats hold the same values.
    table = pa.Table.from_pylist(
        [{key: "" if value is None and key in text else value for key, value in row.items()} for row in rows],
        schema=schema,
    )
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    try:
        atomic_write(out, buffer.getvalue().to_pybytes(), sync=True)
        _sync_folder(out.parent)  # the new name is on disk before the journal goes
    except OSError as exc:
        kept = f"the {len(rows)} finished row(s) are kept in {journal}"
        raise CovidxrError(f"{write_failure(out, exc, kept)} and rerun with --resume") from None


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk: the renamed Parquet file outlives a power cut once its journal is gone."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def journal_of(out: Path) -> Path:
    """The file a run's rows are appended to: ``out`` itself, or for a Parquet output its CSV journal
    ``FILE.parquet.partial.csv`` (what an interrupted run leaves, and ``--resume`` completes)."""
    return out.with_name(f"{out.name}.partial.csv") if out.suffix == ".parquet" else out


@contextmanager
def _stop_after_chunk():
    """Ctrl-C asks the loop to stop after the batch in hand: the rows finished so far are written, however
    large the chunk, and the loop ends with KeyboardInterrupt (a second Ctrl-C stops at once).

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


def output_format(out: str | Path) -> Path:
    """The ``--out`` file, checked to be a .csv, .json or .parquet (with pyarrow there to write it), so that a
    wrong one is refused before anything is predicted or written."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise CovidxrError(f"{out}: --out must end in .csv, .json or .parquet")
    if out.suffix == ".parquet":
        _pyarrow(out)
    return out


def output_and_files(out: str | Path, inputs: Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """The ``--out`` file (``output_format``) and the files to predict (``expand_inputs``: an empty input is
    refused there); shared by local and Ray prediction, so both refuse alike."""
    return output_format(out), expand_inputs(inputs)


def predict_to_file(
    run: Run | ForeignModel,
    inputs: Sequence[str | Path],
    out: str | Path,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = FILE_BATCH,
    num_workers: int = 1,
    progress: bool = True,
    chunk_size: int = CHUNK,
    engine: str | Engine = "auto",
) -> tuple[list[dict], int]:
    """Predict files and folders into ``out`` (``.csv``, ``.json`` or ``.parquet``), one row per image, written
    chunk by chunk (a Parquet output's to its journal, ``journal_of``): a crash or Ctrl-C leaves a valid file of
    the finished rows, and ``resume`` completes it without redoing them. Every row names its file
    (``output_name``) and the model that made it (``model_identity``); rows are appended whole and synced to disk
    chunk by chunk, and a full disk stops with one line, keeping the finished rows. Returns every row (old, then
    new) and how many are new.

    ``run`` may be a ``ForeignModel`` (``MODEL.onnx`` with its spec): the same columns, its ``identity`` as
    the model, its own file reading and batches (``engine`` and ``cache_dir`` do not apply)."""
    out, files = output_and_files(out, inputs)
    if isinstance(run, ForeignModel):
        identity = run.identity

        def predictions(todo: list[Path]) -> Iterator[list[dict]]:
            return run.iterate_files(todo, min(batch_size, chunk_size))
    else:
        runner = make_engine(run, engine, cache_dir) if isinstance(engine, str) else engine
        identity = model_identity(run, runner)

        def predictions(todo: list[Path]) -> Iterator[list[dict]]:
            return iterate_predictions(run, todo, runner, min(batch_size, chunk_size), num_workers)

    output_folder(out.parent)
    with locked(out, "prediction file"):  # one writer at a time: a second is refused, naming the first
        return predict_locked(run, files, out, resume, identity, predictions, progress, chunk_size)


def predict_locked(
    run: Run | ForeignModel,
    files: list[Path],
    out: Path,
    resume: bool,
    identity: str,
    predictions: Callable[[list[Path]], Iterator[list[dict]]],
    progress: bool,
    chunk_size: int,
) -> tuple[list[dict], int]:
    """``predict_to_file`` once ``out`` is locked for this process.

    A Parquet output's rows go to its journal (``journal_of``), seeded on ``resume`` from a finished Parquet file
    where there is no journal; when every file has its row the Parquet file is written whole and the journal
    removed (a finished file with nothing new to predict is left as it is)."""
    columns = [*flat_row({"file": ""}, run.labels), "model"]
    sink = journal_of(out)
    rows: list[dict] = []
    for path in dict.fromkeys((sink, out)):
        if path.exists() and not resume:
            raise CovidxrError(f"{path}: exists; pass --resume to complete it, or choose another --out")
    if sink.exists():
        rows = _read_done(sink, columns, identity)
    elif out.exists():  # a finished Parquet file: its rows start a new journal
        rows = _read_done(out, columns, identity)
    done = {str(row["file"]) for row in rows}
    todo = [f for f in files if output_name(f) not in done]
    if sink.suffix == ".csv" and not sink.exists() and (todo or not out.exists()):
        lines = [",".join(columns) + "\n", *(csv_line(row[column] for column in columns) for row in rows)]
        try:
            append_synced(sink, "".join(lines).encode("utf-8"), 0)
        except CovidxrError:
            sink.unlink(missing_ok=True)
            raise

    def write(new: list[dict]) -> None:
        if sink.suffix == ".csv":
            text = "".join(csv_line(row[column] for column in columns) for row in new)
            append_synced(sink, text.encode("utf-8"), len(rows))
            rows.extend(new)
        else:
            _write_json(out, run, identity, rows + new, len(rows))
            rows.extend(new)

    pending: list[dict] = []
    written = 0
    bar = progress_bar(len(todo), "predict" if progress else None)
    with _stop_after_chunk() as stop, bar:
        # Batches no larger than a chunk, so every chunk is written as soon as it is done.
        for batch in predictions(todo):
            pending += [{**flat_row(result, run.labels), "model": identity} for result in batch]
            bar.update(len(batch))
            if stop.is_set() or len(pending) >= chunk_size or written + len(pending) == len(todo):
                write(pending)
                written, pending = written + len(pending), []
                if stop.is_set():  # within a batch of Ctrl-C, not a chunk; the caller exits 130
                    raise KeyboardInterrupt
    if out.suffix == ".json" and not todo:
        _write_json(out, run, identity, rows, len(rows))
    if sink != out and sink.exists():
        _write_parquet(out, run, identity, rows, sink)
        sink.unlink()
    return rows, len(todo)
