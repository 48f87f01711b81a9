"""Small file and hashing helpers shared across covidxr (runtime layer: stdlib and numpy only)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "hash_arrays", "stable_digest"]


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


def atomic_write(path: str | Path, data: bytes | str, sync: bool = False) -> Path:
    """Write ``data`` beside ``path`` and rename it into place, so a reader never sees half a file and an
    interrupted write leaves the old one; ``sync`` also flushes it to disk first."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
