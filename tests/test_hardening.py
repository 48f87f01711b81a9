"""Issue 29, files and writes: two writers of one ``--out`` (F9), links planted where a temporary file goes (F10),
carriage returns and other separators in file names (F11), a NaN pixel, formula-like names and Ctrl-C during a
long chunk (F16). On the bundled model and real X-rays; every hostile input is made here."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import spreadsheet_text, text_from_spreadsheet
from covidxr.runtime.monitor import _csv_rows, read_predictions
from covidxr.runtime.storage import atomic_path, atomic_write, locked
from covidxr.runtime.writer import predict_to_file

from .conftest import run_cli


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
    first = covidxr("predict", many, "--out", out, "--chunk-size", "1")
    try:
        wait_until(out.exists, first, "output")  # its header or first chunk: written once it holds the output
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


def test_the_lock_is_one_writer_at_a_time_survives_a_crash_and_follows_no_link(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    with locked(out, "prediction file"):
        assert (tmp_path / ".p.csv.lock").stat().st_size == 0  # it takes no space: a full disk still gets its error
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
        assert (tmp_path / ".p.csv.lock").is_file()
    assert not (tmp_path / ".p.csv.lock").exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".p.csv.lock").symlink_to(victim)
    with pytest.raises(CovidxrError, match=r"cannot lock it \(\.p\.csv\.lock: a link\)"), locked(out):
        pass
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# F11 and F16: separators and formulas in file names
# ---------------------------------------------------------------------------------------------


def raw_records(path: Path) -> list[list[str]]:
    """The CSV's records exactly as written (no newline translation)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def cut_after(out: Path, records: int) -> None:
    """Keep the header and the first ``records`` rows of a CSV written by predict (as an interrupted run does)."""
    text, quoted, ends = out.read_bytes().decode("utf-8"), False, []
    for i, char in enumerate(text):
        quoted ^= char == '"'
        if char == "\n" and not quoted:
            ends.append(i + 1)
    out.write_bytes(text[: ends[records]].encode("utf-8"))


def test_separators_in_names_round_trip_through_the_csv_and_resume(run, runner, xrays, tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    names = ["cr\rin.jpg", "lf\nin.jpg", "crlf\r\nin.jpg", 'quote"d.jpg', "com,ma.jpg", "end.jpg\r", "plain.jpg"]
    for name in names:
        shutil.copy(xrays[1], folder / name)
    (folder / "bad\r,name.png").write_text("not an image")  # its error message holds the name too
    expected = sorted(str(path) for path in folder.iterdir())
    out = tmp_path / "p.csv"
    inputs = [folder]  # every file of it, known by content: "end.jpg\r" too, whose suffix is no image's
    rows, new = predict_to_file(run, inputs, out, progress=False, engine=runner)
    records = raw_records(out)
    assert new == len(records) - 1 == len(expected) and all(len(record) == len(records[0]) for record in records)
    assert sorted(record[0] for record in records[1:]) == expected  # every name exactly as on disk
    error = records[0].index("error")
    assert [record[error] for record in records if record[0].endswith(".png")] == [
        f"{folder}/bad\r,name.png: not a readable image (UnidentifiedImageError)"
    ]
    assert table(out)["file"].tolist() == [record[0] for record in records[1:]]  # pandas reads it too

    for kept in (len(expected), 3):  # complete, then interrupted after 3 rows
        cut_after(out, kept)
        rows, new = predict_to_file(run, inputs, out, resume=True, progress=False, engine=runner)
        assert new == len(expected) - kept and sorted(row["file"] for row in rows) == expected
        assert sorted(record[0] for record in raw_records(out)[1:]) == expected
    readable, _ = read_predictions([out])  # covidxr monitor's reader
    assert len(readable) == len(expected)


def test_names_that_look_like_formulas_are_escaped_for_spreadsheets_and_mapped_back(
    run, runner, xrays, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "formulas"
    folder.mkdir()
    escaped = {
        "=1+2.jpg": "'=1+2.jpg",
        "+cmd.jpg": "'+cmd.jpg",
        "-2+3.jpg": "'-2+3.jpg",
        "@SUM(A1).jpg": "'@SUM(A1).jpg",
        "'=quoted.jpg": "''=quoted.jpg",  # a real leading quote before a formula: escaped too, so it comes back
        "'plain.jpg": "'plain.jpg",  # a leading quote alone is no formula: left as it is
        "plain.jpg": "plain.jpg",
    }
    for name in escaped:
        shutil.copy(xrays[2], folder / name)
    (folder / "=bad.png").write_text("not an image")
    escaped["=bad.png"] = "'=bad.png"
    monkeypatch.chdir(folder)  # relative names, as `covidxr predict . --out p.csv` writes them
    out = tmp_path / "p.csv"
    rows, new = predict_to_file(run, [Path(".")], out, progress=False, engine=runner)
    records = raw_records(out)
    header = records[0]
    assert new == len(escaped) and sorted(record[0] for record in records[1:]) == sorted(escaped.values())
    text_columns = [header.index(column) for column in ("file", "label", "no_answer_reason", "error", "model")]
    assert not [record[i] for record in records[1:] for i in text_columns if record[i].startswith(("=", "+", "-", "@"))]
    bad = next(record for record in records if record[0] == "'=bad.png")
    assert bad[header.index("error")] == "'=bad.png: not a readable image (UnidentifiedImageError)"
    assert sorted(row["file"] for row in rows) == sorted(escaped)  # the API's rows hold the real names

    cut_after(out, 4)
    rows, new = predict_to_file(run, [Path(".")], out, resume=True, progress=False, engine=runner)
    assert new == len(escaped) - 4 and sorted(row["file"] for row in rows) == sorted(escaped)  # mapped back
    assert all(Path(row["file"]).is_file() for row in rows)
    assert sorted(record[0] for record in raw_records(out)[1:]) == sorted(escaped.values())
    monitored = _csv_rows(out, out.read_text(encoding="utf-8"))  # covidxr monitor's reader maps them back too
    assert sorted(row["file"] for row in monitored) == sorted(escaped)
    readable, _ = read_predictions([out])
    assert len(readable) == len(escaped)


@pytest.mark.parametrize("text", ["", "'", "''", "'=", "=", "''=x", "a=b", "-", "-1.5", "\t", "\rx", "'+'", "@"])
def test_the_spreadsheet_escape_is_reversible(text: str) -> None:
    cell = spreadsheet_text(text)
    assert text_from_spreadsheet(cell) == text and not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


# ---------------------------------------------------------------------------------------------
# F16: a NaN pixel, and Ctrl-C during a long chunk
# ---------------------------------------------------------------------------------------------


def test_a_float_tiff_with_one_nan_pixel_is_not_a_finite_image_not_blank(run, runner, xrays, tmp_path: Path) -> None:
    grey = np.asarray(Image.open(xrays[3]).convert("L"), dtype=np.float32) / 255.0  # a real film as float TIFF
    Image.fromarray(grey, mode="F").save(tmp_path / "clean.tif")
    for name, value in (("nan.tif", np.nan), ("inf.tif", np.inf)):
        spoiled = grey.copy()
        spoiled[spoiled.shape[0] // 2, spoiled.shape[1] // 2] = value
        Image.fromarray(spoiled, mode="F").save(tmp_path / name)
        with pytest.raises(CovidxrError, match=rf"{name}: not a finite image \(1 of its [\d,]+ pixels"):
            read_image(tmp_path / name)
    rows, _ = predict_to_file(run, sorted(tmp_path.glob("*.tif")), tmp_path / "p.csv", progress=False, engine=runner)
    by_name = {Path(row["file"]).name: row for row in rows}
    assert by_name["clean.tif"]["error"] == "" and by_name["clean.tif"]["p_COVID-19"] is not None
    for name in ("nan.tif", "inf.tif"):
        assert "not a finite image" in by_name[name]["error"] and by_name[name]["no_answer_reason"] == ""
    result = run_cli("predict", tmp_path / "nan.tif", timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {tmp_path / 'nan.tif'}: not a finite image")


@pytest.fixture(scope="module")
def two_hundred(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 real X-rays, linked from the shared data."""
    root = tmp_path_factory.mktemp("two-hundred")
    for name in cxr3_meta["filename"].iloc[::5].head(200):
        (root / Path(name).name).symlink_to(cxr3 / name)
    assert len(list(root.iterdir())) == 200
    return root


def test_ctrl_c_during_a_huge_chunk_stops_keeps_the_finished_rows_and_exits_130(two_hundred: Path, tmp_path: Path):
    out = tmp_path / "p.csv"
    args = ["predict", two_hundred, "--out", out, "--chunk-size", "100000"]  # one chunk for the whole run
    process = covidxr(*args)
    try:
        wait_until(out.exists, process, "header")  # written just before the loop starts
        process.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = process.communicate(timeout=30)  # generous: it stops after the batch in hand
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == (
        f"Error: interrupted; the finished rows are in {out}: rerun with --resume"
    )
    files = sorted(str(path) for path in two_hundred.iterdir())
    partial = table(out)
    assert len(partial) < len(files) and partial["file"].tolist() == files[: len(partial)]  # a valid prefix
    assert (partial["error"] == "").all() and partial["model"].str.startswith("efficientnet_lite0").all()

    resumed = run_cli(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(partial)} were already done)" in resumed.stdout
    complete = table(out)
    assert complete["file"].tolist() == files
    pd.testing.assert_frame_equal(complete.head(len(partial)), partial)  # finished rows untouched
