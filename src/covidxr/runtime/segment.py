"""``covidxr segment``: lung masks of many files by the bundled segmenter, each with an overlay, and a table.

The table is written row by row, each row synced, under a lock, so an interrupted run (a crash, Ctrl-C, a
full disk) keeps its finished rows and ``--resume`` completes it; masks and overlays are written whole
(``storage.write_file``), never truncated. File names that are not UTF-8 are written as ``predict`` writes
them (``inference.output_name``: reversible ``\\xNN``)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import output_name, printable, text_from_spreadsheet
from covidxr.runtime.lungs import find_lungs, overlay
from covidxr.runtime.storage import locked, output_folder, write_file
from covidxr.runtime.writer import append_synced, csv_line

__all__ = ["COLUMNS", "segment_files"]

COLUMNS = ["file", "mask", "overlay", "area_fraction", "box", "reason", "error"]


def segment_files(files: list[Path], out: Path, resume: bool = False) -> list[dict[str, str]]:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png`` per readable file and ``segment.csv`` (one row
    per file: its mask, area, box, the reason where no two plausible lungs were found, or its error) into
    ``out``; returns every row (old, then new). An ``out`` that already holds a table is refused rather than
    overwritten, unless ``resume``: then the files it lists are kept and the others done."""
    out = output_folder(out)
    table = out / "segment.csv"
    with locked(table, "segment table"):
        rows = _read_rows(table) if resume and table.exists() else []
        if table.exists() and not resume:
            raise CovidxrError(f"{table} already exists; pass --resume to complete it, or choose another --out")
        done = {row["file"] for row in rows}
        taken = {row["mask"] for row in rows if row["mask"]}
        if not rows:
            table.unlink(missing_ok=True)  # a table cut before its first row: start it again
            try:
                append_synced(table, csv_line(COLUMNS).encode("utf-8"), 0)
            except CovidxrError:
                table.unlink(missing_ok=True)  # not even a header: nothing to resume
                raise
        for path in files:
            if output_name(path) not in done:
                row = _segment(path, out, taken, len(rows), table)
                append_synced(table, csv_line(row[column] for column in COLUMNS).encode("utf-8"), len(rows))
                rows.append(row)
    return rows


def _segment(path: Path, out: Path, taken: set[str], finished: int, table: Path) -> dict[str, str]:
    """One file's row, its mask and overlay written (a name another file took gets ``_`` appended)."""
    row = dict.fromkeys(COLUMNS, "") | {"file": output_name(path)}
    try:
        grey = np.asarray(read_image(path).convert("L"))
        fields = find_lungs(grey)
    except CovidxrError as exc:
        return row | {"error": printable(str(exc))}
    stem = path.stem
    while output_name(f"{stem}_mask.png") in taken:  # two files with one name in different folders
        stem += "_"
    mask, shown = f"{stem}_mask.png", f"{stem}_overlay.png"
    taken.add(output_name(mask))
    for name, image in ((mask, Image.fromarray(fields.mask.astype(np.uint8) * 255)), (shown, overlay(grey, fields))):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        try:
            write_file(out / name, buffer.getvalue())
        except CovidxrError as exc:
            kept = f"the {finished} finished row(s) of {table} are kept"
            raise CovidxrError(f"{exc}; {kept}: rerun with --resume") from None
    return row | {
        "mask": output_name(mask),
        "overlay": output_name(shown),
        "area_fraction": f"{fields.area_fraction:.4f}",
        "box": " ".join(map(str, fields.box)) if fields.box else "",
        "reason": fields.reason or "",
    }


def _read_rows(table: Path) -> list[dict[str, str]]:
    """The complete rows of a table to resume; a torn last row (an interrupted write) is dropped and its file
    redone, any other damage refused in one line, the table untouched."""
    try:
        data = table.read_bytes()
        records = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CovidxrError(f"{table}: cannot resume from it ({type(exc).__name__}); move it away") from None
    if not records:
        return []
    if records[0] != COLUMNS:
        raise CovidxrError(f"{table}: cannot resume from it (not a covidxr segment table); move it away")
    torn = not data.endswith(b"\n")
    rows = records[1:-1] if torn else records[1:]
    if any(len(record) != len(COLUMNS) for record in rows):
        bad = next(i for i, record in enumerate(rows) if len(record) != len(COLUMNS))
        raise CovidxrError(f"{table}: cannot resume from it (row {bad + 2} is damaged); move it away")
    if torn:
        os.truncate(table, data.rfind(b"\n") + 1)
    return [dict(zip(COLUMNS, map(text_from_spreadsheet, record), strict=True)) for record in rows]
