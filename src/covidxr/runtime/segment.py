"""``covidxr segment``: lung masks of many files by the bundled segmenter, each with an overlay, and a table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.lungs import find_lungs, overlay

__all__ = ["COLUMNS", "segment_files"]

COLUMNS = ["file", "mask", "overlay", "area_fraction", "box", "reason", "error"]


def segment_files(files: list[Path], out: Path) -> list[dict[str, str]]:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png`` per readable file and ``segment.csv`` (one row
    per file: its mask, area, box, the reason where no two plausible lungs were found, or its error) into
    ``out``; refuses an ``out`` that already holds a table rather than overwrite it."""
    table = out / "segment.csv"
    if table.exists():
        raise CovidxrError(f"{table} already exists; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    rows, stems = [], set()
    for path in files:
        row = dict.fromkeys(COLUMNS, "") | {"file": str(path)}
        try:
            grey = np.asarray(read_image(path).convert("L"))
            fields = find_lungs(grey)
        except CovidxrError as exc:
            row["error"] = str(exc)
        else:
            stem = path.stem
            while stem in stems:  # two files with one name in different folders
                stem += "_"
            stems.add(stem)
            row["mask"], row["overlay"] = f"{stem}_mask.png", f"{stem}_overlay.png"
            Image.fromarray(fields.mask.astype(np.uint8) * 255).save(out / row["mask"])
            overlay(grey, fields).save(out / row["overlay"])
            row["area_fraction"] = f"{fields.area_fraction:.4f}"
            row["box"] = " ".join(map(str, fields.box)) if fields.box else ""
            row["reason"] = fields.reason or ""
        rows.append(row)
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows
