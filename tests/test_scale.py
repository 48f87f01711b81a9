"""Several sources, several processes, interruptions and fine-tuning, on real X-rays and real weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from covidxr.lab.data import load_datasets, run_dataset
from covidxr.lab.evaluate import evaluate_run
from covidxr.lab.features import extract_features
from covidxr.lab.loop import TensorSet, bf16_supported
from covidxr.lab.models import create_model, run_model
from covidxr.lab.train import make_splits, train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.runs import load_run

from .conftest import ADULT_CONTROLS, free_port, linked_dataset, small_subset
from .conftest import run_cli as _covidxr

FAST = TrainConfig(epochs=3, image_size=224)


@pytest.fixture(scope="module")
def two_sources(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The small cxr3 subset and a small NIH adult-controls subset: three sources in all."""
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    nih = linked_dataset(tmp_path_factory.mktemp("nih") / "adult-controls", ADULT_CONTROLS, small_subset(meta, 12))
    return [small_dataset, nih]


def test_merged_datasets_keep_sources_and_patients_apart(two_sources: list[Path], tmp_path: Path) -> None:
    clash = linked_dataset(tmp_path / "clash", two_sources[0], pd.read_csv(two_sources[0] / "metadata.csv").head(6))
    merged = load_datasets([two_sources[0], clash])
    # The same patient ids in two folders stay two patients.
    assert (
        merged.frame["patient_id"].nunique()
        == pd.read_csv(two_sources[0] / "metadata.csv")["patient_id"].nunique()
        + pd.read_csv(clash / "metadata.csv")["patient_id"].nunique()
    )
    assert all(path.is_file() for path in merged.paths())

    dataset = load_datasets(two_sources)
    assert set(dataset.frame["source"]) == {"ieee8023", "kermany", "nih"}
    frame, _ = make_splits(dataset, FAST)
    # Split by patient within every source: each source in every split, no patient in two.
    assert (frame.groupby("source")["split"].nunique() == 3).all()
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()

    with pytest.raises(CovidxrError, match="distinct names"):
        load_datasets([two_sources[0], two_sources[0]])


def test_multi_source_run_reports_every_source(two_sources: list[Path], tmp_path: Path) -> None:
    result = _covidxr(
        "train", "--data", str(two_sources[0]), "--data", str(two_sources[1]), "--out", str(tmp_path / "run"),
        "--epochs", "3", "--image-size", "224", "--adversarial-weight", "0.5", "--intensity", "clahe",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["datasets"] == [str(p.resolve()) for p in two_sources]
    assert info["domains"]["values"] == ["ieee8023", "kermany", "nih"]
    assert set(info["split_sizes"]["test"]["by_source"]) == {"ieee8023", "kermany", "nih"}
    assert info["model_key"]["pipeline"]["intensity"] == "clahe"
    assert "domain_loss" in pd.read_csv(tmp_path / "run" / "history.csv").columns
    metrics = evaluate_run(tmp_path / "run", progress=False, explain=False)
    test = pd.read_csv(tmp_path / "run" / "splits.csv").query("split == 'test'")
    assert {k: v["n"] for k, v in metrics["by_source"].items()} == test["source"].value_counts().to_dict()
    assert metrics["by_source"]["nih"]["covid_sensitivity"] is None  # no COVID-19 images there
    assert metrics["by_source"]["ieee8023"]["other_called_covid"] is None


def test_adversarial_training_needs_two_sources(small_dataset: Path, tmp_path: Path) -> None:
    # cxr3 alone has two sources, but restricted to one source the adversary has nothing to tell apart.
    meta = pd.read_csv(small_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    single = linked_dataset(tmp_path / "kermany-only", small_dataset, meta[meta["source"] == "kermany"])
    with pytest.raises(CovidxrError, match="at least two values of 'source'"):
        train(single, tmp_path / "run", replace(FAST, adversarial_weight=0.5), progress=False)


def test_two_processes_give_the_losses_of_one(two_sources: list[Path], tmp_path: Path) -> None:
    """DistributedDataParallel on gloo over 127.0.0.1, 2 processes x half the batch == 1 process x the batch."""
    frame, _ = make_splits(load_datasets(two_sources), FAST)
    n_train = int((frame["split"] == "train").sum())
    batch = max(b for b in range(2, 17, 2) if n_train % b == 0) if n_train % 2 == 0 else None
    if batch is None:  # an odd training set: drop nothing, but then the sampler would pad; keep the test exact
        pytest.fail(f"the fixture's training split has an odd size ({n_train}); adjust the subset")
    config = tmp_path / "config.yaml"
    replace(FAST, epochs=4, dropout=0.0, batch_size=batch, adversarial_weight=0.3).save(config)
    data = ["--data", str(two_sources[0]), "--data", str(two_sources[1]), "--config", str(config)]
    single = _covidxr("train", *data, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    double = subprocess.run(
        [*launcher, "-m", "covidxr", "train", *data, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    one = pd.read_csv(tmp_path / "one" / "history.csv")
    two = pd.read_csv(tmp_path / "two" / "history.csv")
    columns = ["train_loss", "train_accuracy", "val_loss", "domain_loss"]
    assert np.abs(one[columns].to_numpy() - two[columns].to_numpy()).max() < 1e-4, one.compare(two)
    heads = [load_file(str(tmp_path / run / "head.safetensors")) for run in ("one", "two")]
    assert all(torch.allclose(heads[0][k], heads[1][k], atol=1e-4) for k in heads[0])


def test_killed_training_resumes_to_the_same_result(small_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    replace(FAST, epochs=40, schedule="cosine", balanced_sampling=True, label_smoothing=0.1).save(config)
    args = ["train", "--data", str(small_dataset), "--config", str(config)]
    assert _covidxr(*args, "--out", str(tmp_path / "uninterrupted")).returncode == 0

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxr", *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "run.json").exists(), "training finished before it could be killed; raise the epochs"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 1 <= saved["epoch"] < 40

    with_other_config = _covidxr(*args[:-2], "--out", str(out), "--epochs", "41")
    assert with_other_config.returncode == 1
    assert "different configuration" in with_other_config.stderr
    assert "Traceback" not in with_other_config.stderr

    resumed = _covidxr(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stderr
    assert not (out / "checkpoint.pt").exists()
    first = pd.read_csv(tmp_path / "uninterrupted" / "history.csv")
    second = pd.read_csv(out / "history.csv")
    pd.testing.assert_frame_equal(first, second, atol=1e-6)
    heads = [load_file(str(folder / "head.safetensors")) for folder in (tmp_path / "uninterrupted", out)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert json.loads((out / "run.json").read_text())["resumed_after_epoch"] == saved["epoch"]


def test_fine_tuning_trains_on_images_and_ships_its_backbone(small_dataset: Path, tmp_path: Path) -> None:
    precision = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"
    config = replace(FAST, epochs=1, unfreeze_blocks=1, augment=True, precision=precision, early_stopping_patience=2)
    out = train(small_dataset, tmp_path / "fine", config, progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["feature_cache"].startswith("bypassed")
    assert info["fine_tuned_backbone"]["file"] == "backbone.safetensors"
    run = load_run(out)
    assert run_model(run).weights.kind == "fine-tuned"
    assert (
        run_model(run).model_key()["weights_sha256"]
        == info["fine_tuned_backbone"]["sha256"]
        != info["weights"]["sha256"]
    )
    pretrained = create_model("efficientnet_lite0", image_size=224).backbone.body.state_dict()
    tuned = load_file(str(out / "backbone.safetensors"))
    changed = {k.split(".")[1] for k in tuned if k.startswith("_blocks.") and not torch.equal(tuned[k], pretrained[k])}
    assert changed == {"15"}  # only the last block was trained
    assert torch.equal(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])
    features = extract_features(run_model(run), run_dataset(run).paths()[:4], progress=False)
    assert np.isfinite(features).all()
    assert np.isfinite(pd.read_csv(out / "history.csv")["train_loss"]).all()

    (out / "backbone.safetensors").write_bytes(b"not weights")
    with pytest.raises(CovidxrError, match="backbone.safetensors"):
        _ = run_model(load_run(out))  # the torch model is built, and its backbone checked, on first use


def test_augmented_views_are_cached_and_drawn_per_epoch(small_dataset: Path, tmp_path: Path) -> None:
    inputs, views = torch.zeros(6, 2), torch.stack([torch.ones(6, 2), 2 * torch.ones(6, 2)])
    items = TensorSet(inputs, torch.zeros(6, dtype=torch.long), views=views, seed=3)
    drawn = []
    for epoch in (1, 2, 1):
        items.set_epoch(epoch)
        drawn.append([float(items[i][0][0]) for i in range(6)])
    assert drawn[0] == drawn[2] != drawn[1]
    assert set(drawn[0] + drawn[1]) <= {0.0, 1.0, 2.0} and len(set(drawn[0] + drawn[1])) > 1

    out = train(small_dataset, tmp_path / "views", replace(FAST, augment=True, augment_views=2), progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["feature_cache"] == "used, with 2 cached augmented views"
    assert info["design"]["augment"]["hflip"] is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"intensity": "sharpen"}, "sharpen"),
        ({"unfreeze_blocks": -1}, "unfreeze_blocks must be 0 or more"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
    ],
)
def test_bad_options_are_refused_in_one_line(override: dict, message: str) -> None:
    with pytest.raises(CovidxrError, match=message):
        TrainConfig.from_dict(override)


def test_unfreezing_more_blocks_than_exist_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    result = _covidxr(
        "train", "--data", str(small_dataset), "--out", str(tmp_path / "run"), "--unfreeze-blocks", "99",
        "--epochs", "1", "--image-size", "224",
    )  # fmt: skip
    assert result.returncode == 1
    assert "unfreeze_blocks must be between 1 and 17" in result.stderr
    assert "Traceback" not in result.stderr
