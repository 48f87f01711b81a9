"""onnxruntime as the default engine for frozen features: the same numbers as torch, chosen by ``auto``,
recorded in the run, and a clear line (with a safe fallback) wherever it cannot be used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.lab.data import run_dataset
from covidxr.lab.export import TorchEngine, backbone_sidecar, cached_export, feature_engine
from covidxr.lab.features import FeatureCache, extract_features
from covidxr.lab.models import create_model, run_model
from covidxr.lab.train import train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.engines import OnnxEngine, physical_cores
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256, read_image
from covidxr.runtime.runs import load_run

from .conftest import run_cli

TOLERANCE = 1e-4  # float32, relative to the features' scale where it exceeds 1
PRETRAINED_HERE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
RANDOM_INIT = ["vgg16", "resnet50", "xception", "mobilenet_v2"]  # no weights here: random, seeded


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list:
    rows = cxr3_meta.groupby("label").head(2)  # two of each class
    return [read_image(cxr3 / name) for name in rows["filename"]]


@pytest.mark.parametrize("name", PRETRAINED_HERE + RANDOM_INIT)
def test_onnx_features_match_torch_for_every_backbone(name: str, xrays: list, tmp_path: Path) -> None:
    pretrained = name in PRETRAINED_HERE
    # Small inputs keep the random large models quick; Xception needs at least 71 px.
    model = create_model(name, pretrained=pretrained, image_size=None if pretrained else 96, seed=0)
    inputs = torch.stack([model.input_tensor(image) for image in xrays])
    engine = feature_engine(model, "auto", tmp_path)
    assert isinstance(engine, OnnxEngine)
    expected = TorchEngine(model).features(inputs)
    got = engine.features(inputs)
    assert got.shape == expected.shape == (len(xrays), model.spec.num_features)
    # float32 agreement scales with the features: ResNet-50's reach ~50 at random, where two CPUs' kernels
    # differ by ~4e-5 (an absolute 1e-4 would be met by a margin of 2); randomly initialised networks give
    # tiny activations (MobileNetV2's are ~1e-9 after 17 blocks), where an absolute tolerance proves nothing.
    scale = np.abs(expected).max()
    assert scale > 0 and np.abs(got - expected).max() / scale < 1e-4
    assert np.abs(got - expected).max() < TOLERANCE * max(1.0, scale)
    # Batch 1 gives the same features as the batch (the dynamic batch axis).
    assert np.abs(engine.features(inputs[:1]) - got[:1]).max() < TOLERANCE * max(1.0, scale)


def test_auto_training_uses_onnxruntime_and_matches_torch(small_dataset: Path, tmp_path: Path) -> None:
    config = replace(TrainConfig(image_size=224), epochs=3)
    by_onnx = train(small_dataset, tmp_path / "onnx", config, cache_dir=tmp_path / "c1", progress=False)
    by_torch = train(
        small_dataset,
        tmp_path / "torch",
        replace(config, feature_engine="torch"),
        cache_dir=tmp_path / "c2",
        progress=False,
    )
    onnx_info, torch_info = (json.loads((run / "run.json").read_text()) for run in (by_onnx, by_torch))
    assert onnx_info["feature_engine"].startswith("onnxruntime ") and "threads" in onnx_info["feature_engine"]
    assert torch_info["feature_engine"].startswith("torch ")
    # The feature cache keeps the engines apart, so a run's features all come from the engine it names.
    onnx_keys = [json.loads(p.read_text()) for p in (tmp_path / "c1" / "features").glob("*/key.json")]
    torch_keys = [json.loads(p.read_text()) for p in (tmp_path / "c2" / "features").glob("*/key.json")]
    assert [k.get("engine") for k in onnx_keys] == ["onnx"] and [k.get("engine") for k in torch_keys] == [None]
    # Same seed, same data: the same validation losses, epoch by epoch.
    onnx_loss = pd.read_csv(by_onnx / "history.csv")["val_loss"].to_numpy()
    torch_loss = pd.read_csv(by_torch / "history.csv")["val_loss"].to_numpy()
    assert len(onnx_loss) == 3 and np.abs(onnx_loss - torch_loss).max() < 1e-3
    # Evaluation of the run reuses its engine and its cache (no feature is recomputed by torch).
    run = load_run(by_onnx)
    assert run.config.feature_engine == "auto"
    paths = [run_dataset(run).root / f for f in run.splits().query("split == 'train'")["filename"][:4]]
    cached = FeatureCache(run_model(run), tmp_path / "c1", engine="onnx")
    assert all(cached.get(file_sha256(p)) is not None for p in paths)
    assert (
        np.abs(
            extract_features(run_model(run), paths, tmp_path / "c1", progress=False)
            - np.stack([cached.get(file_sha256(p)) for p in paths])
        ).max()
        == 0
    )


def test_corrupt_backbone_export_is_rebuilt(xrays: list, tmp_path: Path) -> None:
    model = create_model("efficientnet_lite0", image_size=224)
    path = cached_export(model, backbone_sidecar(model), tmp_path)
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    rebuilt = cached_export(model, backbone_sidecar(model), tmp_path)
    inputs = torch.stack([model.input_tensor(image) for image in xrays[:2]])
    expected = TorchEngine(model).features(inputs)
    assert np.abs(OnnxEngine(rebuilt).features(inputs) - expected).max() < TOLERANCE * max(1.0, np.abs(expected).max())
    with pytest.raises(CovidxrError, match="holds the backbone only"):
        OnnxEngine(rebuilt)(inputs)


def _unexportable(model):
    """A custom backbone with an operator the ONNX exporter does not support (and no effect on values)."""
    features = model.backbone._features

    def custom(body, x):
        eigen = torch.linalg.eigvalsh(x[:, 0, :2, :2])  # depends on the input, so it cannot be folded away
        return features(body, x) + 0 * eigen.sum(dim=1)[:, None, None, None]

    model.backbone._features = custom
    return model


def test_unexportable_model_falls_back_to_torch_with_one_line(
    xrays: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _unexportable(create_model("efficientnet_lite0", image_size=224))
    paths = [tmp_path / f"x{i}.png" for i in range(2)]
    for image, path in zip(xrays, paths, strict=False):
        image.save(path)
    features = extract_features(model, paths, tmp_path / "cache", progress=False)
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "could not be exported to ONNX" in warned[0] and "running it with torch instead" in warned[0]
    inputs = torch.stack([model.input_tensor(read_image(p)) for p in paths])
    assert np.abs(features - TorchEngine(model).features(inputs)).max() == 0
    # Asked for explicitly, the failure is an error, not a silent change of engine.
    with pytest.raises(CovidxrError, match="could not be exported to ONNX"):
        extract_features(model, paths, tmp_path / "other-cache", progress=False, engine="onnx")


def test_threads_default_to_physical_cores_and_bad_settings_are_one_line(small_dataset: Path, tmp_path: Path) -> None:
    model = create_model("efficientnet_lite0", image_size=224)
    engine = feature_engine(model, "onnx", tmp_path)
    assert engine.description.endswith(f"(CPU, {physical_cores()} threads)")
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    image = next(iter(sorted((small_dataset / "images").iterdir())))
    for threads in ("0", str((os.cpu_count() or 1) + 1)):
        result = run_cli("predict", image, "--threads", threads)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"Error: threads must be between 1 and {os.cpu_count()} (the cores of this machine), not {threads}"
        ]


BLOCK_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None; from covidxr.cli import cli; cli()"


def test_without_onnxruntime_auto_is_torch_and_onnx_is_one_line(small_dataset: Path) -> None:
    image = str(next(iter(sorted((small_dataset / "images").iterdir()))))
    auto = subprocess.run(
        [sys.executable, "-c", BLOCK_ONNXRUNTIME, "predict", image, "--json"], capture_output=True, text=True
    )
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)[0]["label"] in {"COVID-19", "NORMAL", "PNEUMONIA"}
    explicit = subprocess.run(
        [sys.executable, "-c", BLOCK_ONNXRUNTIME, "predict", image, "--engine", "onnx"], capture_output=True, text=True
    )
    assert explicit.returncode == 1
    assert explicit.stderr.strip().splitlines() == [
        "Error: the onnx engine needs onnxruntime: pip install onnxruntime (or use --engine torch)"
    ]
