"""Small file and hashing helpers shared across covidxr (runtime layer: stdlib and numpy only)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "atomic_write", "hash_arrays", "stable_digest"]


def stable_digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON-able value with sorted keys: the same for equal values in any process, so
    it can name cache entries and exports."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def hash_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays in key order (each name, then its C-ordered bytes): the identity of a head or
    backbone's weights, equal whether they were read by torch or by numpy."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (torch.save, an exporter): renamed
    onto ``path`` when the block ends, removed when it raises, so a reader never sees half a file and an
    interrupted write leaves the old one. The name is hidden and unique per process and thread."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, sync: bool = False) -> Path:
    """Write ``data`` beside ``path`` and rename it into place (``atomic_path``); ``sync`` also flushes it to
    disk first."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    return path
