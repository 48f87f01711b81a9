"""The out-of-distribution guard on real X-rays, real photographs and synthetic non-images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from covidxr.lab.train import train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import predict_files
from covidxr.runtime.ood import OODGuard, fit_guard
from covidxr.runtime.runs import load_run

from .conftest import linked_dataset, run_cli, small_subset

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera", "page", "brick")


@pytest.fixture(scope="module")
def guarded_run(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run on ~240 real images: enough validation images to set the threshold on."""
    data = linked_dataset(tmp_path_factory.mktemp("medium") / "cxr3", cxr3, small_subset(cxr3_meta, per_class=80))
    config = replace(TrainConfig(image_size=224), epochs=2)
    return train(data, tmp_path_factory.mktemp("runs") / "guarded", config, progress=False)


@pytest.fixture(scope="module")
def non_xrays(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("non-xrays")
    paths = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.dtype != np.uint8:
            image = (image * 255).astype(np.uint8)
        paths.append(folder / f"{name}.png")
        Image.fromarray(image).convert("RGB").save(paths[-1])
    rng = np.random.default_rng(0)
    for name, pixels in {
        "blank": np.zeros((400, 400), np.uint8),
        "white": np.full((400, 400), 255, np.uint8),
        "noise": rng.integers(0, 256, (400, 400), dtype=np.uint8),
    }.items():
        paths.append(folder / f"{name}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_real_test_xrays_pass_and_non_xrays_are_flagged(guarded_run: Path, non_xrays: list[Path]) -> None:
    run = load_run(guarded_run)
    info = json.loads((guarded_run / "run.json").read_text())
    assert info["out_of_distribution"]["threshold"] == pytest.approx(run.ood_guard.threshold)
    test = run.splits().query("split == 'test'")
    xrays = predict_files(run, [Path(run.info.data) / f for f in test["filename"]], progress=False)
    passed = np.mean([not r["out_of_distribution"] for r in xrays])
    assert passed >= 0.95, f"only {passed:.0%} of {len(xrays)} real test X-rays pass the guard"
    others = predict_files(run, non_xrays, progress=False)
    missed = [Path(r["file"]).name for r in others if not r["out_of_distribution"]]
    assert not missed, f"not flagged: {missed}"
    photos = [r for r in others if Path(r["file"]).stem in PHOTOS]
    assert min(r["ood_score"] for r in photos) > max(r["ood_score"] for r in xrays)


def test_cli_gives_no_answer_for_a_photograph(guarded_run: Path, non_xrays: list[Path], cxr3: Path) -> None:
    """A compact table: file name, label, p(COVID-19), flag; a photograph gets no class, only the reason."""
    xray = cxr3 / load_run(guarded_run).splits().query("split == 'test'")["filename"].iloc[0]
    result = run_cli("predict", non_xrays[1], xray, "--model", guarded_run)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "label", "p(COVID-19)", "flag"]
    photo = next(line for line in lines if line.startswith(non_xrays[1].name))
    # A colour photograph gets its one reason (issue 28), the same words as `explain`'s.
    assert "a colour photograph, not a grey chest X-ray" in photo and photo.endswith(": no answer")
    assert not any(label in photo for label in ("COVID-19", "NORMAL", "PNEUMONIA"))
    row = next(line for line in lines if line.startswith(xray.name)).split()
    assert row[1] in {"COVID-19", "NORMAL", "PNEUMONIA"} and 0 <= float(row[2]) <= 1
    assert len(row) == 3 or "the operating point;" in " ".join(row[3:])  # a flag only to say why, if at all
    assert str(non_xrays[1].parent) not in result.stdout  # names only; full paths with --json or --out
    assert "Research use only" in result.stdout


def test_guard_statistics_round_trip_and_damage(guarded_run: Path, tmp_path: Path) -> None:
    guard = load_run(guarded_run).ood_guard
    rng = np.random.default_rng(1)
    features = rng.normal(size=(5, len(guard.mean)))
    guard.save(tmp_path / "ood.safetensors")
    again = OODGuard.load(tmp_path / "ood.safetensors")
    assert np.allclose(again.score(features), guard.score(features))
    (tmp_path / "ood.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CovidxrError, match="ood.safetensors: damaged"):
        OODGuard.load(tmp_path / "ood.safetensors")
    with pytest.raises(CovidxrError, match="at least 3 training"):
        fit_guard(features[:2], features[:1])
