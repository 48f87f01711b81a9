"""Issue 29, files and writes: two writers of one ``--out`` (F9), links planted where a temporary file goes (F10),
carriage returns and other separators in file names (F11), a NaN pixel, formula-like names and Ctrl-C during a
long chunk (F16). On the bundled model and real X-rays; every hostile input is made here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.storage import atomic_path, atomic_write, locked
from covidxr.runtime.writer import predict_to_file

from .conftest import run_cli


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


# ---------------------------------------------------------------------------------------------
# F9: two processes writing one --out
# ---------------------------------------------------------------------------------------------


def covidxr(*args: str | Path) -> subprocess.Popen:
    """``python -m covidxr ARGS`` started in the background (its pid is the writer's)."""
    command = [sys.executable, "-m", "covidxr", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, process: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"finished before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {limit} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def many(xrays, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real X-rays (links under their own names): enough for a writer to be caught in the middle."""
    root = tmp_path_factory.mktemp("many")
    for i in range(48):
        (root / f"film{i:03d}.jpg").symlink_to(xrays[i % len(xrays)])
    return root


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_second_writer_of_one_out_is_refused_naming_the_first(many: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"p{suffix}"
    lock = tmp_path / f".p{suffix}.lock"
    first = covidxr("predict", many, "--out", out, "--chunk-size", "1")
    try:
        # The first writer holds the output (its lock names it; without a lock, its first rows are there).
        held = lambda: lock.is_file() and _read(lock).strip().isdigit() or out.exists()  # noqa: E731
        wait_until(held, first, "output")
        first.send_signal(signal.SIGSTOP)  # caught in the middle of its run, for as long as the test needs
        for extra in (["--resume"], []):
            second = run_cli("predict", many, "--out", out, "--chunk-size", "1", *extra, timeout=300)
            assert second.returncode == 1, (second.stdout, second.stderr)
            assert "Traceback" not in second.stderr
            errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
            assert (
                len(errors) == 1
                and f"another covidxr is writing this prediction file (process {first.pid}" in errors[0]
            )
    finally:
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    names = (
        list(table(out)["file"])
        if suffix == ".csv"
        else [row["file"] for row in json.loads(out.read_text())["predictions"]]
    )
    assert sorted(names) == sorted(str(path) for path in many.iterdir())  # each image once: the first's rows only
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no lock or temporary file left


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_the_lock_is_one_writer_at_a_time_survives_a_crash_and_follows_no_link(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    with locked(out, "prediction file"):
        assert (tmp_path / ".p.csv.lock").read_text() == f"{os.getpid()}\n"
        with (
            pytest.raises(
                CovidxrError, match=rf"another covidxr is writing this prediction file \(process {os.getpid()}"
            ),
            locked(out, "prediction file"),
        ):
            pass  # a second writer, even in this process
    assert not (tmp_path / ".p.csv.lock").exists()
    (tmp_path / ".p.csv.lock").write_text("4194304\n")  # left by a writer that crashed: no one holds it
    with locked(out, "prediction file"):
        assert (tmp_path / ".p.csv.lock").read_text() == f"{os.getpid()}\n"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".p.csv.lock").symlink_to(victim)
    with pytest.raises(CovidxrError, match=r"cannot lock it \(\.p\.csv\.lock: a link\)"), locked(out):
        pass
    assert victim.read_text() == "precious"
