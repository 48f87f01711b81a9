"""What an image comes from: a file, or bytes held in memory (an upload), and how to tell a DICOM file.

Its own module so that decoding (``images``) and DICOM (``dicom``, which imports pydicom) both build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

__all__ = ["DICOM_SUFFIXES", "IMAGE_SIGNATURES", "Source", "has_dicom_magic", "looks_like_image", "source_label"]

Source = str | Path | BinaryIO  # a file, or bytes held in memory (an upload; its ``name`` labels messages)
DICOM_SUFFIXES = {".dcm", ".dicom"}
_PREAMBLE = 128
_MAGIC = b"DICM"
# The formats covidxr decodes, by where their signature starts and what it is: how every route (a file in a
# folder, an upload) knows an image by its content, never by its name.
IMAGE_SIGNATURES = {
    "PNG": (0, b"\x89PNG\r\n\x1a\n"),
    "JPEG": (0, b"\xff\xd8\xff"),
    "TIFF (little-endian)": (0, b"II*\x00"),
    "TIFF (big-endian)": (0, b"MM\x00*"),
    "BMP": (0, b"BM"),
    "GIF": (0, b"GIF8"),
    "WebP": (8, b"WEBP"),
    "DICOM": (_PREAMBLE, _MAGIC),
}


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file (at least 132) carry the signature of a format covidxr decodes."""
    return any(head[offset : offset + len(magic)] == magic for offset, magic in IMAGE_SIGNATURES.values())


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
