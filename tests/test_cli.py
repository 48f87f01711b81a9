"""The installed ``covidxr`` command, run as a user would, on real images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from .conftest import ADULT_CONTROLS, linked_dataset, raw_sources, run_cli, small_subset

run = partial(run_cli, installed=True)  # the installed ``covidxr`` command, as a user types it


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["data"],
        ["data", "build"],
        ["data", "check"],
        ["models"],
        ["train"],
        ["evaluate"],
        ["predict"],
        ["reproduce"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.fixture(scope="module")
def cli_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "fast.yaml"
    config.write_text("epochs: 6\nimage_size: 224\nseed: 3\n")
    result = run(
        "train",
        "--data",
        str(small_dataset),
        "--model",
        "efficientnet_lite0",
        "--out",
        str(out),
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr
    assert "best epoch" in result.stdout
    return out


def test_train_then_evaluate(cli_run: Path) -> None:
    result = run("evaluate", str(cli_run))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "95% CI" in result.stdout
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] > 0
    assert (cli_run / "confusion_matrix.png").exists() and (cli_run / "curves.png").exists()
    assert "seed: 3" in (cli_run / "config.yaml").read_text()


def test_audit_writes_its_verdicts_into_the_report(cli_run: Path) -> None:
    assert run("evaluate", str(cli_run), "--no-explain").returncode == 0
    result = run("audit", str(cli_run))
    assert result.returncode == 0, result.stderr
    for check in ("lungs_hidden", "source_probe", "resolution_format"):
        assert f"{check}: " in result.stdout
    audit = json.loads((cli_run / "audit.json").read_text())
    assert audit["verdict"] in {"pass", "warning", "fail"} and "overall: " + audit["verdict"] in result.stdout
    assert "Shortcut audit" in (cli_run / "report.md").read_text()
    assert "No shortcut audit yet" not in (cli_run / "report.md").read_text()


def test_predict_reports_bad_files_and_keeps_going(cli_run: Path, cxr3: Path, cxr3_meta, tmp_path: Path) -> None:
    good = [str(cxr3 / n) for n in cxr3_meta.groupby("label").head(1)["filename"]]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = run("predict", *good, str(bad), "--model", str(cli_run), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [*good, str(bad)]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows[:3])
    assert all(r["label"] in {"COVID-19", "NORMAL", "PNEUMONIA"} for r in rows[:3])
    assert "not a readable image" in rows[3]["error"]
    text = run("predict", good[0], "--model", str(cli_run))
    assert text.returncode == 0 and "Research use only" in text.stdout


def test_explain_writes_maps_and_reports_bad_files(cli_run: Path, cxr3: Path, cxr3_meta, tmp_path: Path) -> None:
    image = cxr3 / cxr3_meta["filename"].iloc[0]
    missing = tmp_path / "missing.png"
    result = run(
        "explain",
        str(image),
        str(missing),
        "--model",
        str(cli_run),
        "--method",
        "eigencam",
        "--out",
        str(tmp_path / "maps"),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{image}: " in result.stdout and "(p=" in result.stdout and "Research use only" in result.stdout
    assert f"{missing}: ERROR" in result.stdout and "file not found" in result.stdout
    assert (tmp_path / "maps" / f"{image.stem}.eigencam.png").exists()
    assert (tmp_path / "maps" / f"{image.stem}.eigencam.npy").exists()


def test_reproduce_skips_models_without_weights_and_writes_the_table(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "reproduce"
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    unseen = linked_dataset(tmp_path / "unseen", ADULT_CONTROLS, small_subset(meta, per_class=3))
    args = (
        "reproduce",
        "--data",
        str(small_dataset),
        "--out",
        str(out),
        "--models",
        "vgg16,efficientnet_lite0",
        "--epochs",
        "4",
        "--external",
        str(unseen),
    )
    result = run(*args)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["skipped", "trained"]
    assert "no pretrained weights for 'vgg16'" in table.loc[0, "reason"]
    assert "efficientnet_lite0: test accuracy" in result.stdout and "vgg16: skipped" in result.stdout
    markdown = (out / "report.md").read_text()
    assert "97.3%" in markdown and "(not in the paper)" in markdown and "by patient" in markdown
    assert (out / "report.html").stat().st_size > 0
    for name in ("metrics.json", "confusion_matrix.png", "curves.png", "run.json"):
        assert (out / "efficientnet_lite0" / name).exists()
    assert (out / "efficientnet_lite0" / "external" / "unseen" / "metrics.json").exists()
    bottom_line = markdown.split("## Contents", 1)[0]  # the first screen: one row per model
    row = next(line for line in bottom_line.splitlines() if line.startswith("> | efficientnet_lite0 |"))
    assert "On unseen (" in row, bottom_line
    first = json.loads((out / "efficientnet_lite0" / "run.json").read_text())["created"]
    again = run(*args)  # finished models are reused, not retrained
    assert again.returncode == 0
    assert json.loads((out / "efficientnet_lite0" / "run.json").read_text())["created"] == first


def test_data_build_and_check(tmp_path: Path, cxr3: Path, cxr3_meta) -> None:
    ieee, kermany = raw_sources(tmp_path, cxr3, cxr3_meta)
    result = run("data", "build", "--ieee8023", str(ieee), "--kermany", str(kermany), "--out", str(tmp_path / "ds"))
    assert result.returncode == 0, result.stderr
    assert "8 images" in result.stdout and "identical to" in result.stderr
    assert run("data", "check", str(tmp_path / "ds")).returncode == 0
    (tmp_path / "ds" / "images" / next(iter(os.listdir(tmp_path / "ds" / "images")))).write_bytes(b"")
    meta = pd.read_csv(tmp_path / "ds" / "metadata.csv")
    meta.loc[len(meta)] = {**meta.iloc[0].to_dict(), "filename": "images/gone.png"}
    meta.to_csv(tmp_path / "ds" / "metadata.csv", index=False)
    checked = run("data", "check", str(tmp_path / "ds"))
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "empty file" in checked.stdout and "images/gone.png does not exist" in checked.stdout
    assert_one_line_error(checked, "2 problem(s)")


def test_bad_input_gives_one_line_errors(tmp_path: Path, cxr3: Path, cxr3_meta, cli_run: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = cxr3_meta.groupby("label").head(3).copy()
    for name in rows["filename"]:
        shutil.copy(cxr3 / name, data / name)
    rows.iloc[4, rows.columns.get_loc("label")] = "Covid-19 maybe"
    rows.to_csv(data / "metadata.csv", index=False)
    out = tmp_path / "run"
    assert_one_line_error(run("train", "--data", str(data), "--out", str(out)), "row 6", "unknown label")
    assert not out.exists()
    assert_one_line_error(run("train", "--data", str(tmp_path / "nowhere"), "--out", str(out)), "not found")
    assert_one_line_error(
        run("train", "--data", str(cxr3), "--model", "alexnet", "--out", str(out)), "unknown model 'alexnet'"
    )
    assert_one_line_error(
        run("train", "--data", str(cxr3), "--model", "resnet50", "--out", str(out)), "no pretrained weights"
    )
    assert_one_line_error(run("evaluate", str(tmp_path)), "not a covidxr run folder")
    assert_one_line_error(run("train", "--data", str(cxr3), "--out", str(cli_run)), "already holds a run")
    (tmp_path / "bad.yaml").write_text("epochs: [unclosed\n")
    assert_one_line_error(
        run("train", "--data", str(cxr3), "--out", str(out), "--config", str(tmp_path / "bad.yaml")), "bad.yaml"
    )


def test_models_lists_weights_without_loading_or_downloading(tmp_path: Path) -> None:
    """Even where downloads are allowed, ``models`` only looks: no "Downloading", no weights read."""
    (tmp_path / "vgg16.pth").write_bytes(b"not read by `covidxr models`")
    env = {k: v for k, v in os.environ.items() if k != "COVIDXR_OFFLINE"} | {"COVIDXR_WEIGHTS_DIR": str(tmp_path)}
    result = run("models", env=env)
    assert result.returncode == 0, result.stderr
    assert "Downloading" not in result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert f"weights-dir {tmp_path / 'vgg16.pth'}" in lines["vgg16"]
    assert "package" in lines["efficientnet_lite0"] and "not here" in lines["resnet50"]


def test_explain_defaults_to_the_bundled_model(cxr3: Path, cxr3_meta, tmp_path: Path) -> None:
    image = cxr3 / cxr3_meta["filename"].iloc[0]
    result = run("explain", str(image), "--out", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr
    assert "map of the " in result.stdout and "inside the lungs" in result.stdout
    assert "Research use only" in result.stdout
    assert (tmp_path / "maps" / f"{image.stem}.gradcam.png").stat().st_size > 0


def test_predict_of_one_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run("predict", str(tmp_path / "nowhere.png"))
    assert_one_line_error(result, "nowhere.png", "file not found")
    assert result.stdout == ""
