"""What an image comes from: a file, or bytes held in memory (an upload), and how to tell a DICOM file.

Its own module so that decoding (``images``) and DICOM (``dicom``, which imports pydicom) both build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

__all__ = ["DICOM_SUFFIXES", "Source", "has_dicom_magic", "source_label"]

Source = str | Path | BinaryIO  # a file, or bytes held in memory (an upload; its ``name`` labels messages)
DICOM_SUFFIXES = {".dcm", ".dicom"}
_PREAMBLE = 128
_MAGIC = b"DICM"


def source_label(source: Source) -> str:
    """How messages name a source: its path, or an in-memory buffer's ``name``."""
    return str(source) if isinstance(source, str | Path) else str(getattr(source, "name", "upload"))


def has_dicom_magic(source: Source) -> bool:
    """Whether a file starts with the DICOM Part 10 preamble and ``DICM`` prefix, whatever its name."""
    if not isinstance(source, str | Path):
        position = source.tell()
        head = source.read(_PREAMBLE + len(_MAGIC))
        source.seek(position)
        return head[_PREAMBLE:] == _MAGIC
    try:
        with open(source, "rb") as handle:
            head = handle.read(_PREAMBLE + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE:] == _MAGIC
