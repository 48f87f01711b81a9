"""``predict --out FILE.parquet`` on real X-rays and bad files: the rows of the CSV and JSON outputs with real types,
the journal an interrupted run leaves and ``--resume`` completes, a finished file resumed after new images came,
refusals in one line, ``monitor`` reading it, and Ray Data writing it."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from covidxr import DISCLAIMER
from covidxr.runtime.answers import with_threshold
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import expand_inputs, iterate_predictions, output_name
from covidxr.runtime.monitor import read_predictions
from covidxr.runtime.writer import csv_line, journal_of, model_identity, predict_locked, predict_to_file

from .conftest import assert_one_line_error, run_cli

N_GOOD = 8  # real X-rays in the shared folder; 3 bad files beside them
BAD = ["cut.jpg", "gone.png", "notes.png"]
TOLERANCE = 1e-5  # Ray against local probabilities (tests/test_archive.py)


@pytest.fixture(scope="module")
def films(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    """Real X-rays from ../shared: the shared folder's, then three more for a folder that grows."""
    return [cxr3 / name for name in cxr3_meta["filename"].iloc[::13].head(N_GOOD + 3)]


@pytest.fixture(scope="module")
def folder(films: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real X-rays in two folders (links), a text file named .png, a truncated JPEG and a broken link."""
    root = tmp_path_factory.mktemp("incoming")
    for i, film in enumerate(films[:N_GOOD]):
        (root / f"ward{i % 2}").mkdir(exist_ok=True)
        (root / f"ward{i % 2}" / film.name).symlink_to(film)
    (root / "ward0" / "notes.png").write_text("not an image")
    (root / "ward1" / "cut.jpg").write_bytes(films[0].read_bytes()[: films[0].stat().st_size // 3])
    (root / "ward1" / "gone.png").symlink_to(root / "nowhere.png")
    return root


@pytest.fixture(scope="module")
def outputs(run, runner, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folder predicted locally into each of the three formats."""
    where = tmp_path_factory.mktemp("outputs")
    outs = {suffix: where / f"p.{suffix}" for suffix in ("csv", "json", "parquet")}
    for out in outs.values():
        rows, new = predict_to_file(run, [folder], out, progress=False, engine=runner)
        assert new == len(rows) == N_GOOD + len(BAD)
    return outs


def _types(rows: list[dict]) -> list[list[str]]:
    return [[type(value).__name__ for value in row.values()] for row in rows]


def test_parquet_holds_the_rows_of_the_csv_and_json_with_real_types(run, outputs: dict[str, Path]) -> None:
    table = pq.read_table(outputs["parquet"])
    rows = table.to_pylist()
    json_rows = json.loads(outputs["json"].read_text())["predictions"]
    assert rows == json_rows and _types(rows) == _types(json_rows)  # values and Python types, row by row
    csv_text = outputs["csv"].read_text(encoding="utf-8")
    header, body = csv_text.split("\n", 1)
    assert table.column_names == header.split(",") == list(rows[0])
    assert "".join(csv_line(row.values()) for row in rows) == body  # the CSV's every cell, in order

    types = {field.name: field.type for field in table.schema}
    probabilities = [f"p_{label}" for label in run.labels]
    assert {types[c] for c in [*probabilities, "covid_threshold", "ood_score"]} == {pa.float64()}
    assert {types[c] for c in ["covid_positive", "out_of_distribution", "seen_in_training"]} == {pa.bool_()}
    assert {types[c] for c in ["image_width", "image_height", "bit_depth"]} == {pa.int64()}
    assert {types[c] for c in ["file", "label", "error", "image_mode", "model"]} == {pa.string()}
    metadata = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    assert metadata == {"model": rows[0]["model"], "labels": json.dumps(list(run.labels)), "disclaimer": DISCLAIMER}

    errors = {Path(row["file"]).name: row for row in rows if row["error"]}
    assert sorted(errors) == BAD and "broken symlink" in errors["gone.png"]["error"]
    assert all(
        row["label"] == "" and row["p_COVID-19"] is None and row["image_width"] is None for row in errors.values()
    )
    answered = [row for row in rows if not row["error"]]
    assert len(answered) == N_GOOD and all(isinstance(row["covid_positive"], bool) for row in answered)
    assert sorted(os.listdir(outputs["parquet"].parent)) == ["p.csv", "p.json", "p.parquet"]  # no journal, no lock


def _interrupted(run, runner, after: int):
    """Real predictions in batches of 2, with Ctrl-C (SIGINT to this process) while batch ``after`` is in hand."""

    def predictions(todo: list[Path]) -> Iterator[list[dict]]:
        for number, batch in enumerate(iterate_predictions(run, todo, runner, 2, 1)):
            if number == after:
                signal.raise_signal(signal.SIGINT)
            yield batch

    return predictions


def test_an_interrupted_run_leaves_its_journal_and_resume_completes_it(run, runner, folder: Path, tmp_path: Path):
    out = tmp_path / "p.parquet"
    journal = journal_of(out)
    files = expand_inputs([folder])
    identity = model_identity(run, runner)
    with pytest.raises(KeyboardInterrupt):
        predict_locked(run, files, out, False, identity, _interrupted(run, runner, after=1), False, 2)
    assert not out.exists() and journal.name == "p.parquet.partial.csv"
    kept = pd.read_csv(journal, dtype=str, keep_default_na=False)
    assert kept["file"].tolist() == [output_name(f) for f in files[:4]]  # the chunk written, then the batch in hand
    data = journal.read_bytes()
    journal.write_bytes(data + data.splitlines(keepends=True)[-1][:25])  # a row torn by a crash mid-write

    rows, new = predict_to_file(run, [folder], out, resume=True, progress=False, engine=runner, chunk_size=2)
    assert new == len(files) - 4 and not journal.exists()
    table = pq.read_table(out).to_pylist()
    assert [row["file"] for row in table] == [output_name(f) for f in files]  # each file once, in order
    assert table == rows and [row["file"] for row in table[:4]] == kept["file"].tolist()
    assert sorted(os.listdir(tmp_path)) == ["p.parquet"]


def test_ctrl_c_on_the_command_names_the_journal_and_resume_finishes(cxr3, cxr3_meta, tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for name in cxr3_meta["filename"].iloc[::9].head(96):  # enough to be caught in the middle
        (many / Path(name).name).symlink_to(cxr3 / name)
    out = tmp_path / "p.parquet"
    args = ["predict", many, "--out", out, "--chunk-size", "100000"]  # one chunk: the journal's header, then rows
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxr", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not journal_of(out).exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"Error: interrupted; the finished rows are in {journal_of(out)}: rerun with --resume"
    )
    assert not out.exists()
    kept = len(pd.read_csv(journal_of(out), dtype=str))
    assert kept < 96

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0 and f"96 image(s) → {out}" in resumed.stdout, resumed.stderr
    assert f"({kept} were already done)" in resumed.stdout and not journal_of(out).exists()
    assert sorted(row["file"] for row in pq.read_table(out).to_pylist()) == sorted(map(str, many.iterdir()))


def test_resume_of_a_finished_file_predicts_only_the_new_images(run, runner, films: list[Path], tmp_path: Path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for film in films[:4]:
        (incoming / film.name).symlink_to(film)
    out = tmp_path / "p.parquet"
    predict_to_file(run, [incoming], out, progress=False, engine=runner)
    before = pq.read_table(out).to_pylist()
    stamp = out.stat()
    rows, new = predict_to_file(run, [incoming], out, resume=True, progress=False, engine=runner)
    assert new == 0 and rows == before
    assert out.stat().st_ino == stamp.st_ino and out.stat().st_mtime_ns == stamp.st_mtime_ns  # left as it was

    for film in films[N_GOOD:]:  # three more films came in
        (incoming / film.name).symlink_to(film)
    result = run_cli("predict", incoming, "--out", out, "--resume")
    assert result.returncode == 0 and "7 image(s)" in result.stdout and "(4 were already done)" in result.stdout
    after = pq.read_table(out).to_pylist()
    assert after[:4] == before  # the finished rows as they were
    assert [Path(row["file"]).name for row in after[4:]] == sorted(film.name for film in films[N_GOOD:])
    assert sorted(os.listdir(tmp_path)) == ["incoming", "p.parquet"]


def test_a_final_write_that_fails_keeps_the_journal_for_resume(folder: Path, outputs, tmp_path: Path) -> None:
    """Here the Parquet file is larger than its journal (the CSV): a file size limit between the two (``ulimit -f``,
    as a disk that fills at the end) lets every row reach the journal and stops the final write."""
    limit = 5000
    assert outputs["csv"].stat().st_size < limit < outputs["parquet"].stat().st_size
    out = tmp_path / "p.parquet"
    journal = journal_of(out)
    cut = run_cli(
        "predict", folder, "--out", out, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit,) * 2)
    )
    assert assert_one_line_error(cut) == (
        f"Error: {out}: cannot write (File too large); the {N_GOOD + len(BAD)} finished row(s) are kept in {journal}: "
        "raise the file size limit (ulimit -f) and rerun with --resume"
    )
    assert sorted(os.listdir(tmp_path)) == [journal.name]  # no half file, no temporary file, no lock
    body = journal.read_text(encoding="utf-8").split("\n", 1)[1]

    resumed = run_cli("predict", folder, "--out", out, "--resume")
    assert f"({N_GOOD + len(BAD)} were already done)" in resumed.stdout, resumed.stderr
    assert "".join(csv_line(row.values()) for row in pq.read_table(out).to_pylist()) == body
    assert sorted(os.listdir(tmp_path)) == [out.name]


def test_refusals_are_one_line_and_touch_nothing(run, runner, folder: Path, outputs, tmp_path: Path) -> None:
    other = with_threshold(run, 0.5)  # another operating point: another model identity
    theirs = tmp_path / "theirs.parquet"
    predict_to_file(other, [folder / "ward0"], theirs, progress=False, engine=runner)
    journal_out = tmp_path / "journal.parquet"  # only its journal is there
    their_journal = journal_of(journal_out)
    predict_to_file(other, [folder / "ward0"], tmp_path / "theirs.csv", progress=False, engine=runner)
    shutil.copy(tmp_path / "theirs.csv", their_journal)  # the journal is the CSV, chunk by chunk
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("file,label\n")
    pandas_made = tmp_path / "pandas.parquet"
    pd.DataFrame({"file": ["a.png"], "label": ["NORMAL"]}).to_parquet(pandas_made)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    cases = [
        (theirs, "--resume", f"{theirs}: made by another model or engine", "threshold=0.5"),
        (journal_out, "--resume", f"{their_journal}: made by another model or engine"),
        (theirs, None, f"{theirs}: exists; pass --resume"),
        (journal_out, None, f"{their_journal}: exists; pass --resume"),
        (not_parquet, "--resume", f"{not_parquet}: cannot resume from it (not a readable Parquet file)"),
        (pandas_made, "--resume", f"{pandas_made}: cannot resume from it (its columns are not those"),
    ]
    for out, resume, *fragments in cases:
        result = run_cli("predict", folder / "ward0", "--out", out, *filter(None, [resume]))
        assert_one_line_error(result, *fragments)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # nothing written or removed


def test_without_pyarrow_one_line_before_anything_is_predicted(folder: Path, tmp_path: Path) -> None:
    """A pyarrow that cannot be imported (a package of that name raising ImportError, first on the path)."""
    shadow = tmp_path / "shadow" / "pyarrow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "out" / "p.parquet"
    dicom = tmp_path / "dicom"
    result = run_cli("predict", folder, "--out", out, "--dicom-out", dicom, env={**os.environ, "PYTHONPATH": path})
    assert assert_one_line_error(result) == f"Error: --out {out} needs pyarrow: pip install 'covidxr[parquet]'"
    assert sorted(os.listdir(tmp_path)) == ["shadow"]  # nothing written: no output folder, no DICOM


def test_monitor_reads_parquet_as_it_reads_csv(outputs: dict[str, Path], tmp_path: Path) -> None:
    assert read_predictions([outputs["parquet"]]) == read_predictions([outputs["csv"]])
    assert read_predictions([outputs["parquet"], outputs["json"]])[0] == read_predictions([outputs["csv"]] * 2)[0]
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(outputs["parquet"].read_bytes()[:-100])  # a file cut short: no footer
    with pytest.raises(CovidxrError, match=rf"^{re.escape(str(damaged))}: damaged or not a Parquet file \(\w+\)$"):
        read_predictions([damaged])
    Image.new("L", (8, 8)).save(tmp_path / "image.parquet", format="PNG")
    with pytest.raises(CovidxrError, match=f"^{re.escape(str(tmp_path / 'image.parquet'))}: damaged or not a Parquet"):
        read_predictions([tmp_path / "image.parquet"])


def test_ray_local_writes_the_rows_of_local_prediction(folder: Path, outputs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "ray" / "p.parquet"
    result = run_cli("predict", folder, "--out", out, "--ray", "local")
    assert result.returncode == 1 and f"{N_GOOD + len(BAD)} image(s) → {out}" in result.stdout, result.stderr
    got, expected = pq.read_table(out), pq.read_table(outputs["parquet"])
    assert got.schema.equals(expected.schema, check_metadata=True)
    numbers = [name for name in got.column_names if name.startswith("p_") or name == "ood_score"]
    a, b = got.to_pylist(), expected.to_pylist()
    assert [row["file"] for row in a] == [row["file"] for row in b]
    for row, reference in zip(a, b, strict=True):
        assert {k: v for k, v in row.items() if k not in numbers} == {
            k: v for k, v in reference.items() if k not in numbers
        }
        for name in numbers:
            assert (row[name] is None) == (reference[name] is None), (row, reference)
            assert row[name] is None or abs(row[name] - reference[name]) < TOLERANCE, (name, row, reference)
    assert sorted(os.listdir(out.parent)) == ["p.parquet"]
