"""covidxr.runtime.storage: the one atomic writer and the one stable digest the package uses."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from covidxr.runtime.storage import atomic_path, atomic_write, stable_digest


def test_stable_digest_is_the_sha256_of_sorted_key_json() -> None:
    value = {"b": [1, 2], "a": {"y": 1, "x": None}}
    expected = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    assert stable_digest(value) == expected == stable_digest({"a": {"x": None, "y": 1}, "b": [1, 2]})


def test_an_interrupted_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "a.json", "old", sync=True)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_threads_writing_one_path_never_leave_a_mixed_file(tmp_path: Path) -> None:
    target = tmp_path / "entry.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda data: atomic_write(target, data), payloads * 4))
    assert target.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["entry.bin"]
