"""Issue 29, files and writes: two writers of one ``--out`` (F9), links planted where a temporary file goes (F10),
carriage returns and other separators in file names (F11), a NaN pixel, formula-like names and Ctrl-C during a
long chunk (F16). On the bundled model and real X-rays; every hostile input is made here."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.storage import atomic_path, atomic_write
from covidxr.runtime.writer import predict_to_file


@pytest.fixture(scope="module")
def run():
    return load_run(default_model_path())


@pytest.fixture(scope="module")
def runner(run):
    return make_engine(run, "auto")


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    return [cxr3 / name for name in cxr3_meta["filename"].iloc[::41].head(8)]


def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# F10: a link planted where a temporary file goes is never followed
# ---------------------------------------------------------------------------------------------


def test_a_planted_tmp_link_beside_a_json_out_is_not_followed(run, runner, xrays, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "symout"
    folder.mkdir()
    (folder / "preds.json.tmp").symlink_to(victim)  # the name predict used for its temporary file
    out = folder / "preds.json"
    rows, new = predict_to_file(run, xrays[:2], out, progress=False, engine=runner)
    assert new == 2 and victim.read_text() == "precious"
    assert not out.is_symlink() and out.is_file()
    assert [row["file"] for row in json.loads(out.read_text())["predictions"]] == [str(x) for x in xrays[:2]]
    assert (folder / "preds.json.tmp").is_symlink()  # left as it was, not used
    assert sorted(p.name for p in folder.iterdir()) == ["preds.json", "preds.json.tmp"]  # no temporary left


def test_atomic_writes_never_follow_a_link_at_the_old_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "a.json"
    # The name atomic_path used to choose: the process id and thread, both easy to guess.
    (tmp_path / f".a.json.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(victim)
    atomic_write(target, "new", sync=True)
    assert victim.read_text() == "precious" and target.read_text() == "new" and not target.is_symlink()
    with atomic_path(tmp_path / "b.bin") as tmp:
        assert not tmp.is_symlink() and tmp.stat().st_size == 0  # a new file, made for this write
        assert oct(tmp.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() makes it
        tmp.write_bytes(b"b")
    assert (tmp_path / "b.bin").read_bytes() == b"b"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
