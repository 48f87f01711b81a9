"""Issue 29, files and writes (second part): an input swapped for a pipe while it is read (F14), ``segment`` on
names that are not UTF-8 and its resume (F12), writes the system refuses: a full disk, a read-only one, a file
where a folder should be (F13), and an int8 report edited after it was accepted (F7; F8 is in test_quantize). On
the bundled model and real X-rays; every hostile input is made here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.lab.export import cached_export, sidecar
from covidxr.lab.models import run_model
from covidxr.lab.quantize import report_digest
from covidxr.runtime.engines import graph_sha256
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import path_from_output_name
from covidxr.runtime.runners import make_engine

from .conftest import assert_one_line_error, free_port, run_cli


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    return [cxr3 / name for name in cxr3_meta["filename"].iloc[::53].head(6)]


def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# F14: a file swapped for a pipe while it is read
# ---------------------------------------------------------------------------------------------


def test_a_file_swapped_for_a_pipe_while_read_is_refused_never_waited_on(xrays, tmp_path: Path) -> None:
    """A swapper replaces one name, as fast as it can, by a real image and by a pipe that no one writes; a reader
    reads it over and over. Opening by name after checking the name (as before) sooner or later opens the pipe and
    waits for ever; opened once without blocking and checked after opening, every read is an image or one line."""
    target = tmp_path / "swapped.png"
    with Image.open(xrays[0]) as image:
        image.convert("L").resize((64, 64)).save(tmp_path / "real.png")
    data = (tmp_path / "real.png").read_bytes()
    target.write_bytes(data)  # there from the start: the swapper replaces it atomically, never removes it
    pipes: list[Path] = []
    stop = threading.Event()

    def swap() -> None:
        for i in range(1_000_000):
            if stop.is_set():
                return
            pipe = tmp_path / f"pipe{i}"
            os.mkfifo(pipe)
            pipes.append(pipe)  # kept under its own name too, so a reader stuck on it can be let go
            os.link(pipe, tmp_path / "next")
            os.replace(tmp_path / "next", target)
            (tmp_path / "next").write_bytes(data)
            os.replace(tmp_path / "next", target)

    outcomes: dict[str, int] = {"image": 0, "refused": 0}
    errors: list[str] = []

    def read() -> None:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                read_image(target)
                outcomes["image"] += 1
            except CovidxrError as exc:
                outcomes["refused"] += 1
                if "not a regular file (a device, pipe or socket)" not in str(exc):
                    errors.append(str(exc))

    swapper = threading.Thread(target=swap, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    swapper.start()
    reader.start()
    reader.join(timeout=30)
    hung = reader.is_alive()
    stop.set()
    swapper.join(timeout=10)
    for pipe in pipes:  # let a reader stuck on a pipe go: a writer opens it, and it reads an empty file
        with contextlib.suppress(OSError):  # no reader waits on this one
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    assert not hung, f"a read waited on a pipe for ever (after {outcomes})"
    assert errors == [] and outcomes["image"] > 0 and outcomes["refused"] > 0, (outcomes, errors[:3])


# ---------------------------------------------------------------------------------------------
# F12: segment on names that are not UTF-8, and its resume
# ---------------------------------------------------------------------------------------------


def test_segment_escapes_names_that_are_not_utf8_and_resumes_a_cut_table(xrays, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    latin1 = os.fsdecode(b"caf\xe9 \\x41.jpg")  # an old archive's Latin-1 name, holding "\x" as well
    names = [latin1, "plain.jpg", "=cmd.jpg", "second.jpg"]
    for name, source in zip(names, xrays, strict=False):
        shutil.copy(source, folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    first = run_cli("segment", folder, "--out", out)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    rows = table(out / "segment.csv")
    assert len(rows) == 5 and rows["file"].str.isascii().all()
    files = {path_from_output_name(name) for name in rows["file"]}
    assert files == {folder / name for name in [*names, "broken.png"]}  # every name maps back to its file
    row = rows[rows["file"].map(path_from_output_name) == folder / latin1].iloc[0]
    assert row["mask"] == "caf\\xe9 \\x5cx41_mask.png" and not row["error"]
    mask = np.asarray(Image.open(out / path_from_output_name(row["mask"])))
    assert set(np.unique(mask)) == {0, 255}
    assert rows.set_index("file").loc[str(folder / "broken.png"), "error"].startswith(f"{folder / 'broken.png'}: ")

    again = run_cli("segment", folder, "--out", out)  # never overwritten
    assert_one_line_error(again, "segment.csv already exists; pass --resume to complete it")
    # Cut inside the last row (a crash mid-write) and drop a finished row's files: --resume redoes both images
    # and keeps the others' rows as they were.
    data = (out / "segment.csv").read_bytes()
    lines = data.splitlines(keepends=True)
    (out / "segment.csv").write_bytes(b"".join(lines[:3]) + lines[3][:20])
    resumed = run_cli("segment", folder, "--out", out, "--resume")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr
    after = table(out / "segment.csv")
    pd.testing.assert_frame_equal(after.head(2), rows.head(2))
    assert sorted(after["file"]) == sorted(rows["file"]) and len(after) == 5
    done = run_cli("segment", folder, "--out", out, "--resume")
    assert "5 image(s)" in done.stdout and table(out / "segment.csv").equals(after)


# ---------------------------------------------------------------------------------------------
# F13: writes the system refuses, one line each
# ---------------------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    """A ``preexec_fn``: no file this process writes may grow past ``limit`` bytes (``RLIMIT_FSIZE``, as ``ulimit
    -f`` sets; Python ignores SIGXFSZ, so the write fails with EFBIG): a disk that fills mid-file, without root."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 160 KiB tmpfs (needs root: the test is skipped without it; ``ulimit -f`` covers the same writes)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _whole_outputs(out: Path) -> None:
    """Every map and picture left in ``out`` is whole, and no temporary file is left."""
    for path in out.iterdir():
        assert not path.name.startswith("."), path
        if path.suffix == ".npy":
            assert np.load(path).shape == (224, 224), path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()


@pytest.mark.parametrize("command", ["explain", "segment"])
def test_a_file_size_limit_mid_write_is_one_line_and_leaves_no_truncated_file(
    command: str, xrays, tmp_path: Path
) -> None:
    """A map (224x224 float32, ~200 KB) or a mask larger than the limit fails mid-file: one line naming the file
    and what to do, and the file is not left half written."""
    out = tmp_path / "out"
    limit = 150_000 if command == "explain" else 20_000
    result = run_cli(command, *xrays[:2], "--out", out, preexec_fn=_file_size_limit(limit))
    line = assert_one_line_error(result, f"{out}/", "cannot write (File too large)", "raise the file size limit")
    assert "Traceback" not in result.stderr and "FileExistsError" not in line
    _whole_outputs(out)


def test_a_full_disk_is_one_line_and_leaves_no_truncated_file(xrays, small_disk: Path) -> None:
    seg = run_cli("segment", *xrays, "--out", small_disk / "masks")
    assert_one_line_error(seg, "cannot write (No space left on device)", "rerun with --resume")
    _whole_outputs(small_disk / "masks")


def test_a_disk_remounted_read_only_mid_run_is_one_line_keeping_the_rows(xrays, small_disk: Path, tmp_path: Path):
    """``predict --out`` onto a disk that becomes read-only after some rows (remounted while the run goes on): one
    line that does not tell the user to free space, the finished rows kept for --resume."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.jpg").symlink_to(xrays[i % len(xrays)])
    out = small_disk / "p.csv"
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxr", "predict", str(folder), "--out", str(out), "--chunk-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    while subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode:
        time.sleep(0.01)  # busy while a row is being appended: between two rows, then
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    kept = len(table(out))
    assert 2 <= kept < 40
    assert assert_one_line_error(result) == (
        f"Error: {out}: cannot write (Read-only file system); the {kept} finished row(s) are kept: make the file "
        "system writable again and rerun with --resume"
    )


def test_out_onto_a_file_or_under_one_is_one_line_and_writes_nothing(xrays, tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.write_text("mine")
    for command, out, named, why in [
        ("predict", existing / "p.csv", existing, "exists and is not a folder"),
        ("segment", existing, existing, "exists and is not a folder"),
        ("explain", existing / "sub", existing / "sub", "a part of this path is a file, not a folder"),
    ]:
        line = assert_one_line_error(run_cli(command, xrays[0], "--out", out), f"{named}: {why}; choose another --out")
        assert "Errno" not in line
    assert existing.read_text() == "mine" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.parametrize(("record", "damage"), [("run.json", ""), ("metrics.json", "{garbage")])
def test_model_card_and_serve_on_a_damaged_record_are_one_line(run, record: str, damage: str, tmp_path: Path):
    copy = shutil.copytree(run.path, tmp_path / "run")
    (copy / record).write_text(damage)
    assert_one_line_error(run_cli("model-card", copy), f"{copy / record}: ")
    assert_one_line_error(run_cli("serve", "--model", copy, "--port", free_port(), timeout=60), f"{copy / record}: ")


# ---------------------------------------------------------------------------------------------
# F7: an int8 report edited after it was accepted
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accepted_int8(run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding an accepted int8 graph where `covidxr quantize` keeps it, with its report as quantize
    writes it (the graph is a copy of the fp32 one: a real graph; quantising for real needs the calibration data,
    as test_quantize does)."""
    cache = tmp_path_factory.mktemp("int8-cache")
    fp32 = cached_export(
        run_model(run), sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold), cache
    )
    int8 = fp32.with_name(f"{fp32.stem}-int8.onnx")
    shutil.copy(fp32, int8)
    fields = json.loads(fp32.with_suffix(".json").read_text())
    report = fields | {"format": "covidxr-int8-1", "accepted": True, "ood_threshold": run.ood_guard.threshold}
    report["sha256"] = graph_sha256(int8)
    int8.with_suffix(".json").write_text(json.dumps(report | {"report_sha256": report_digest(report)}, indent=2))
    return cache


@pytest.mark.parametrize(
    "edit",
    [
        {"ood_threshold": 1e12},  # "no answer" would become an answer
        {"normalisation": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}},  # p(COVID-19) would change
        {"pipeline": {"lungs": "none", "crop": "none", "equalise": "clahe"}},
        {"image_size": 64},  # a traceback before
    ],
    ids=["ood_threshold", "normalisation", "pipeline", "image_size"],
)
def test_an_edited_int8_report_is_refused_in_one_line(run, accepted_int8: Path, edit: dict, tmp_path: Path) -> None:
    cache = shutil.copytree(accepted_int8, tmp_path / "cache", symlinks=True)
    engine = make_engine(run, "int8", cache)  # the report as accepted is used: what it says feeds the graph
    [report_path] = cache.rglob("*-int8.json")
    report = json.loads(report_path.read_text())
    assert engine.sidecar.image_size == report["image_size"] and engine.ood_threshold == report["ood_threshold"]
    report_path.write_text(json.dumps(report | edit, indent=2))
    refused = f"{report_path}: the int8 report does not match the SHA-256 recorded when it was accepted"
    with pytest.raises(CovidxrError, match=re.escape(refused)):  # the command line's one line (FriendlyGroup)
        make_engine(run, "int8", cache)
