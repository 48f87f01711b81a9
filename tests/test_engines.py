"""The ONNX export and the onnxruntime engine agree with torch on real X-rays."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from covidxr.lab.data import run_dataset
from covidxr.lab.export import TorchEngine, cached_export, sidecar
from covidxr.lab.models import run_model
from covidxr.lab.train import train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.engines import OnnxEngine
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.inference import predict_files
from covidxr.runtime.runs import load_run

from .conftest import assert_same_answer, run_cli


@pytest.fixture(scope="module")
def run_dir(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = replace(TrainConfig(image_size=224), epochs=2, intensity="clahe")  # the pipeline must travel too
    return train(small_dataset, tmp_path_factory.mktemp("runs") / "r", config, progress=False)


@pytest.fixture(scope="module")
def images(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    run = load_run(run_dir)
    paths = run_dataset(run).paths()[::4][:12]
    bad = tmp_path_factory.mktemp("bad") / "notes.png"
    bad.write_text("not an image")
    return [*paths[:6], bad, *paths[6:]]


def test_onnx_predictions_match_torch(run_dir: Path, images: list[Path], tmp_path: Path) -> None:
    run = load_run(run_dir)
    by_torch = predict_files(run, images, tmp_path / "cache", progress=False, engine="torch")
    by_onnx = predict_files(run, images, tmp_path / "cache", progress=False, engine="onnx")
    assert [("error" in r) for r in by_torch] == [("error" in r) for r in by_onnx] == [i == 6 for i in range(13)]
    for a, b in zip(by_torch, by_onnx, strict=True):
        if "error" in a:
            assert a["error"] == b["error"]
            continue
        assert_same_answer(b, a)  # probabilities within 1e-4; the same label unless on a decision boundary
        assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-3)


def test_export_cli_writes_graph_and_sidecar(run_dir: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "exported" / "lite0.onnx"
    result = run_cli("export", run_dir, "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stderr
    info = json.loads(out.with_suffix(".json").read_text())
    run = load_run(run_dir)
    assert info["labels"] == run.labels
    assert info["temperature"] == run.temperature and info["covid_threshold"] == run.covid_threshold
    assert info["pipeline"]["intensity"] == "clahe" and info["image_size"] == 224
    # A user with only the graph, the sidecar and onnxruntime gets the same logits.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = np.stack([run_model(run).input_tensor(read_image(p)).numpy() for p in images[:3]])
    features, logits = session.run(["features", "logits"], {"image": inputs})
    expected_features, expected_logits = TorchEngine(run_model(run))(inputs)
    assert np.abs(logits - expected_logits).max() < 1e-4
    # Features reach ~4: float32 agreement is relative to their scale (measured 1e-5 here, ~3e-6 of it).
    assert np.abs(features - expected_features).max() < 1e-4 * max(1.0, np.abs(expected_features).max())


def test_cached_export_is_reused_and_rebuilt_when_damaged(run_dir: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    info = sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold)
    first = cached_export(run_model(run), info, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_export(run_model(run), info, tmp_path).stat().st_mtime_ns == stamp  # reused
    first.write_bytes(b"\x00garbage")
    rebuilt = cached_export(run_model(run), info, tmp_path)
    assert rebuilt == first and rebuilt.stat().st_size > 1_000_000
    stale = {**info, "key": {**info["key"], "head_sha256": "0" * 64}}
    first.with_suffix(".json").write_text(json.dumps(stale))
    stamp = first.stat().st_mtime_ns
    cached_export(run_model(run), info, tmp_path)
    assert first.stat().st_mtime_ns != stamp  # a sidecar for other weights means a stale export: rebuilt


def test_bad_engine_settings_are_refused(run_dir: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    path = cached_export(run_model(run), sidecar(run_model(run), run.labels, 1.0, 0.5), tmp_path)
    for threads in (0, (os.cpu_count() or 1) + 1):
        with pytest.raises(CovidxrError, match="threads must be between 1 and"):
            OnnxEngine(path, threads=threads)
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(CovidxrError, match="broken.onnx: not a usable ONNX graph"):
        OnnxEngine(tmp_path / "broken.onnx")
    with pytest.raises(CovidxrError, match="engine must be one of"):
        predict_files(run, [], engine="tensorrt")


def test_predicting_engine_leaves_half_the_cores_to_decoding(run) -> None:
    """Issue 27: a predicting onnxruntime engine runs on ``shared_engine_threads`` (half the physical cores, at least
    one) unless --threads says otherwise; the training feature engine keeps every core (test_engine_auto)."""
    from covidxr.runtime.engines import physical_cores, shared_engine_threads
    from covidxr.runtime.runners import make_engine

    assert shared_engine_threads() == max(1, physical_cores() // 2)
    assert make_engine(run, "auto").description.endswith(f"(CPU, {shared_engine_threads()} threads)")
    assert make_engine(run, "onnx", threads=physical_cores()).description.endswith(f"(CPU, {physical_cores()} threads)")
