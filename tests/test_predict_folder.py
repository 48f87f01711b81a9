"""Predicting folders into a CSV or JSON file: bad files, interruption and resumption, on real X-rays."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runs import load_run
from covidxr.runtime.writer import predict_to_file

from .conftest import run_cli

# Enough X-rays that an interrupt sent within 50 ms of the second chunk lands long before the last one, also on
# a machine several times faster than a 2-core VM (where 24 took 0.2 s after it: a race on a fast CI runner).
N_GOOD = 96


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run  # shared by the session (conftest); read only


@pytest.fixture(scope="module")
def folder(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real X-rays in nested folders, plus a text file named .png, a truncated JPEG and a non-image file."""
    root = tmp_path_factory.mktemp("incoming")
    for i, name in enumerate(cxr3_meta["filename"].iloc[::12].head(N_GOOD)):
        target = root / f"ward{i % 3}" / f"day{i % 2}" / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(cxr3 / name)
    (root / "ward0" / "notes.png").write_text("not an image")
    data = (cxr3 / cxr3_meta["filename"].iloc[1]).read_bytes()
    (root / "ward1" / "cut.jpg").write_bytes(data[: len(data) // 3])
    (root / "ward1" / "readme.txt").write_text("not an image: a row saying so (read by content, not by name)")
    Image.new("L", (1, 1)).save(root / "ward2" / "dot.png")
    Image.new("L", (20_000, 20_000)).save(root / "ward2" / "huge.png")  # 400 Mpx: a decompression bomb
    return root


def test_folder_to_csv_one_row_per_image_past_bad_files(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    rows, new = predict_to_file(load_run(run_dir), [folder], tmp_path / "p.csv", progress=False)
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(table) == len(rows) == new == N_GOOD + 5
    bad = table[table["error"] != ""]
    assert sorted(Path(f).name for f in bad["file"]) == ["cut.jpg", "dot.png", "huge.png", "notes.png", "readme.txt"]
    assert "too small to be a chest radiograph" in bad[bad["file"].str.endswith("dot.png")]["error"].iloc[0]
    assert "over the limit" in bad[bad["file"].str.endswith("huge.png")]["error"].iloc[0]
    assert all(str(Path(f).name) in e for f, e in zip(bad["file"], bad["error"], strict=True))
    good = table[table["error"] == ""]
    probabilities = good[[c for c in table.columns if c.startswith("p_")]].astype(float)
    assert (probabilities.sum(axis=1) - 1).abs().max() < 1e-5
    assert set(good["label"]) <= {"COVID-19", "NORMAL", "PNEUMONIA", ""}  # "": no answer, with the reason
    assert ((good["label"] == "") == (good["no_answer_reason"] != "")).all()
    assert good["out_of_distribution"].isin(["True", "False"]).all()

    with pytest.raises(CovidxrError, match="exists; pass --resume"):
        predict_to_file(load_run(run_dir), [folder], tmp_path / "p.csv", progress=False)
    with pytest.raises(CovidxrError, match=r"\.csv, \.json or \.parquet"):
        predict_to_file(load_run(run_dir), [folder], tmp_path / "p.txt", progress=False)


def test_interrupted_prediction_leaves_valid_rows_and_resumes(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    args = ["predict", str(folder), "--model", str(run_dir), "--out", str(out), "--chunk-size", "3"]
    command = [sys.executable, "-m", "covidxr", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) > 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr  # 128 + SIGINT, as a shell reports an interrupted command
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    partial = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert 3 <= len(partial) < N_GOOD + 5 and partial["file"].is_unique

    resumed = run_cli(*args, "--resume")
    assert f"({len(partial)} were already done)" in resumed.stdout
    assert resumed.returncode == 1  # the bad files
    complete = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(complete) == N_GOOD + 5 and complete["file"].is_unique
    pd.testing.assert_frame_equal(complete.head(len(partial)), partial)  # finished rows untouched


def test_json_output_resumes_too(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    files = sorted((folder / "ward2").rglob("*.jpg")) + sorted((folder / "ward2").rglob("*.jpeg"))
    rows, _ = predict_to_file(run, files[:3], tmp_path / "p.json", progress=False)
    rows, new = predict_to_file(run, [folder / "ward2"], tmp_path / "p.json", resume=True, progress=False)
    payload = json.loads((tmp_path / "p.json").read_text())
    assert new == len(rows) - 3
    assert [row["file"] for row in payload["predictions"]] == [row["file"] for row in rows]
    assert "Research use only" in payload["disclaimer"]
    (tmp_path / "damaged.json").write_text("{not json")
    with pytest.raises(CovidxrError, match="cannot resume"):
        predict_to_file(run, files, tmp_path / "damaged.json", resume=True, progress=False)
