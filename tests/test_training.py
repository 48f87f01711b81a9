"""Feature cache, head training and evaluation on real X-rays with the real EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.lab.data import load_dataset
from covidxr.lab.evaluate import evaluate_run
from covidxr.lab.features import FeatureCache, extract_features
from covidxr.lab.labels import LABELS
from covidxr.lab.loop import TensorSet, Trainee, fit
from covidxr.lab.metrics import compute_metrics, wilson_interval
from covidxr.lab.models import create_model, run_model, to_input_tensor
from covidxr.lab.train import make_splits, train
from covidxr.runtime.bundle import BUNDLED
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.runs import load_run

from .conftest import linked_dataset

FAST = TrainConfig(model="efficientnet_lite0", epochs=3, image_size=224)


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", image_size=224)


@pytest.fixture(scope="module")
def trained_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(small_dataset, tmp_path_factory.mktemp("runs") / "lite0", replace(FAST, epochs=10), progress=False)


def test_cached_features_train_exactly_like_the_frozen_backbone(small_dataset: Path, lite0) -> None:
    """Same seed, same shuffles, same dropout: losses agree within 1e-4 epoch by epoch."""
    dataset = load_dataset(small_dataset)
    frame, _ = make_splits(dataset, FAST)
    parts = {p: torch.tensor(frame.index[frame["split"] == p]) for p in ("train", "val")}
    targets = {p: torch.tensor([LABELS.index(v) for v in frame.loc[i.numpy(), "label"]]) for p, i in parts.items()}
    features = torch.from_numpy(extract_features(lite0, dataset.paths(), progress=False))
    images = torch.stack([to_input_tensor(read_image(p), 224, lite0.preprocessing) for p in dataset.paths()])

    def fitted(inputs: torch.Tensor, encoder: torch.nn.Module | None):
        head = create_model("efficientnet_lite0", image_size=224, seed=FAST.seed).head
        parts_sets = [TensorSet(inputs[parts[p]], targets[p]) for p in ("train", "val")]
        return fit(Trainee(head, encoder), *parts_sets, FAST, progress=False)

    cached = fitted(features, None)
    recomputed = fitted(images, torch.nn.Sequential(lite0.backbone, lite0.pool))
    columns = ["train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    difference = (cached.history[columns] - recomputed.history[columns]).abs().to_numpy()
    assert difference.max() < 1e-4, cached.history.compare(recomputed.history)
    assert cached.best_epoch == recomputed.best_epoch
    assert cached.history["train_loss"].iloc[-1] < cached.history["train_loss"].iloc[0]


def test_cache_key_changes_with_weights_preprocessing_and_size(lite0) -> None:
    other_size = create_model("efficientnet_lite0", image_size=237)
    random = create_model("efficientnet_lite0", pretrained=False, image_size=224)
    keys = {lite0.model_key_hash(), other_size.model_key_hash(), random.model_key_hash()}
    assert len(keys) == 3
    assert lite0.model_key_hash() == create_model("efficientnet_lite0", image_size=224).model_key_hash()


def test_cache_is_keyed_by_image_content_and_survives_damage(tmp_path: Path, cxr3: Path, cxr3_meta, lite0) -> None:
    names = list(cxr3_meta["filename"][:2])
    work = tmp_path / "image.jpg"
    work.write_bytes((cxr3 / names[0]).read_bytes())
    first = extract_features(lite0, [work], cache_dir=tmp_path / "cache", progress=False)
    work.write_bytes((cxr3 / names[1]).read_bytes())  # same path, new content
    second = extract_features(lite0, [work], cache_dir=tmp_path / "cache", progress=False)
    assert not np.allclose(first, second)
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 2
    entries[0].write_bytes(b"damaged")
    again = extract_features(lite0, [cxr3 / names[0], cxr3 / names[1]], cache_dir=tmp_path / "cache", progress=False)
    # Recomputed in another batch than before: equal to float32 precision (features reach ~4).
    assert np.allclose(again[0], first[0], atol=1e-4) and np.allclose(again[1], second[0], atol=1e-4)


def test_an_unreadable_image_is_named_after_the_others_are_cached(tmp_path: Path, cxr3: Path, cxr3_meta, lite0) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    good = [cxr3 / n for n in cxr3_meta["filename"][:3]]
    with pytest.raises(CovidxrError, match="broken.png: not a readable image"):
        extract_features(lite0, [good[0], bad, *good[1:]], cache_dir=tmp_path / "cache", progress=False)
    cache = FeatureCache(lite0, tmp_path / "cache")
    from covidxr.runtime.images import file_sha256

    assert all(cache.get(file_sha256(p)) is not None for p in good)


def test_a_run_folder_says_how_it_was_made(trained_run: Path) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "run.json", "splits.csv", "history.csv", "head.safetensors"} <= names
    info = json.loads((trained_run / "run.json").read_text())
    assert info["weights"]["kind"] == "package" and len(info["weights"]["sha256"]) == 64
    assert TrainConfig.load(trained_run / "config.yaml") == replace(FAST, epochs=10)
    history = pd.read_csv(trained_run / "history.csv")
    assert len(history) == 10 and info["best_epoch"] == int(history["val_loss"].idxmin()) + 1
    splits = pd.read_csv(trained_run / "splits.csv")
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    with pytest.raises(CovidxrError, match="already holds a run"):
        train(Path(info["data"]), trained_run, FAST, progress=False)


def test_evaluate_writes_metrics_and_figures(trained_run: Path) -> None:
    metrics = evaluate_run(trained_run, progress=False)
    for name in (
        "metrics.json",
        "predictions.csv",
        "confusion_matrix.png",
        "curves.png",
        "predictions.png",
        "gradcam.png",
    ):
        assert (trained_run / name).stat().st_size > 0
    stored = json.loads((trained_run / "metrics.json").read_text())
    assert stored["n"] == metrics["n"] == len(pd.read_csv(trained_run / "predictions.csv"))
    assert set(stored["per_class"]) == set(LABELS)
    for label in LABELS:
        assert set(stored["per_class"][label]) == {
            "n",
            "sensitivity",
            "specificity",
            "ppv",
            "f1",
            "auc",
            "sensitivity_ci95",
            "specificity_ci95",
            "auc_ci95",
        }
    low, high = stored["accuracy_ci95"]
    assert low <= stored["accuracy"] <= high
    assert stored["confusion_matrix"]["labels"] == list(LABELS)
    explanations = stored["explanations"]
    assert set(explanations["methods"]) == {"gradcam", "gradcam++", "eigencam"}
    for checks in explanations["methods"].values():
        assert checks["verdict"] in {"pass", "warning", "fail"}
        assert 0 <= checks["mass"]["lung_field"] <= 1 and checks["better_than_random_p"] <= 1


def test_evaluate_on_an_external_set_with_two_classes(trained_run: Path, cxr3: Path, cxr3_meta, tmp_path: Path):
    splits = pd.read_csv(trained_run / "splits.csv")
    trained = {Path(name).name for name in splits.loc[splits["split"] == "train", "filename"]}
    unseen = cxr3_meta[~cxr3_meta["filename"].map(lambda name: Path(name).name in trained)]
    rows = unseen[unseen["label"].isin(["COVID-19", "NORMAL"])].groupby("label").tail(4)
    seen = cxr3_meta[cxr3_meta["filename"].map(lambda name: Path(name).name in trained)]
    seen = seen[seen["label"] == "NORMAL"].head(1)
    external = linked_dataset(tmp_path / "external", cxr3, pd.concat([rows, seen]))
    metrics = evaluate_run(trained_run, data=external, out=tmp_path / "eval", progress=False, explain=False)
    assert metrics["n"] == 8 and metrics["split"] == "all"  # the training image is left out, and said so
    assert metrics["seen_in_training_left_out"] == 1
    assert set(metrics["per_class"]) == {"COVID-19", "NORMAL"}
    assert len(metrics["confusion_matrix"]["matrix"]) == 3  # predictions still over all three classes
    assert (tmp_path / "eval" / "confusion_matrix.png").exists() and (tmp_path / "eval" / "predictions.png").exists()
    assert "explanations" not in metrics and not (tmp_path / "eval" / "gradcam.png").exists()


def test_load_run_refuses_different_backbone_weights(trained_run: Path, tmp_path: Path) -> None:
    run = load_run(trained_run)
    assert run_model(run).weights.sha256 == json.loads((trained_run / "run.json").read_text())["weights"]["sha256"]
    other = create_model("efficientnet_lite0", pretrained=False).backbone.body.state_dict()
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(CovidxrError, match="was trained on efficientnet_lite0 weights"):
        _ = run_model(load_run(trained_run, weights=tmp_path / "other.pth"))  # built (and checked) on first use


def test_metrics_by_hand() -> None:
    labels = list(LABELS)
    truth = ["COVID-19", "COVID-19", "NORMAL", "NORMAL"]
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.1, 0.6]])
    metrics = compute_metrics(truth, probabilities, labels)
    assert metrics["accuracy"] == 0.5 and metrics["n"] == 4
    assert metrics["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    covid = metrics["per_class"]["COVID-19"]
    assert covid == {
        "n": 2,
        "sensitivity": 0.5,
        "specificity": 1.0,
        "ppv": 1.0,
        "f1": pytest.approx(2 / 3),
        "auc": 0.75,
    }  # COVID-19 scores 0.9, 0.2 vs 0.1, 0.3: three of four pairs ordered
    assert metrics["per_class"]["NORMAL"]["auc"] == 0.75
    assert "PNEUMONIA" not in metrics["per_class"]
    assert metrics["macro_auc"] == 0.75


def test_wilson_interval_matches_the_textbook() -> None:
    low, high = wilson_interval(73, 75)  # the paper's VGG-16: 73 of 75
    assert low == pytest.approx(0.9078, abs=1e-3) and high == pytest.approx(0.9927, abs=1e-3)


def test_config_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    config = TrainConfig(model="vgg16", epochs=5, split_fractions=(0.7, 0.15, 0.15))
    config.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == config
    assert TrainConfig() == TrainConfig(epochs=80, batch_size=15, learning_rate=0.001, image_size=237)
    (tmp_path / "bad.yaml").write_text("epochs: 5\nlearning_rat: 0.1\n")
    with pytest.raises(CovidxrError, match="unknown key.*learning_rat"):
        TrainConfig.load(tmp_path / "bad.yaml")


def test_a_config_saved_before_feature_engine_was_named_still_opens(tmp_path: Path) -> None:
    """Configs written before the rename call the option ``engine`` (the bundled model's among them)."""
    (tmp_path / "old.yaml").write_text("epochs: 5\nengine: torch\n")
    assert TrainConfig.load(tmp_path / "old.yaml") == TrainConfig(epochs=5, feature_engine="torch")
    assert "engine:" in (BUNDLED / "config.yaml").read_text()
    assert TrainConfig.load(BUNDLED / "config.yaml").feature_engine == "auto"
    TrainConfig(feature_engine="onnx").save(tmp_path / "new.yaml")
    assert "feature_engine: onnx" in (tmp_path / "new.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"learning_rate": 0}, "config: learning_rate must be greater than 0, not 0"),
        ({"learning_rate": -0.01}, "config: learning_rate must be greater than 0, not -0.01"),
        ({"hidden_units": -1}, "config: hidden_units must be 0 or more, not -1"),
        ({"epochs": 2.5}, "config: epochs must be a whole number, not 2.5"),
        ({"optimizer": "rmsprop"}, "config: optimizer must be one of adam, sgd, not 'rmsprop'"),
    ],
)
def test_a_bad_option_is_refused_in_one_line_naming_it_and_its_value(override: dict, message: str) -> None:
    with pytest.raises(CovidxrError) as caught:
        TrainConfig.from_dict(override)
    assert str(caught.value) == message
    assert TrainConfig(hidden_units=0, learning_rate=1).learning_rate == 1.0


def test_the_command_line_accepts_exactly_what_the_config_accepts() -> None:
    """Every option declared in CONSTRAINTS: its click type (covidxr.cli) and TrainConfig agree on each side
    of every bound, and the train command builds those options from CONSTRAINTS."""
    import click

    from covidxr.cli import _config_type, train_command
    from covidxr.runtime.config import CONSTRAINTS, Range, check_option

    for name, allowed in CONSTRAINTS.items():
        kind = _config_type(name)
        if isinstance(allowed, Range):
            bounds = [b for b in (allowed.low, allowed.high) if b is not None]
            probes = [b + d for b in bounds for d in ((-1, 0, 1) if allowed.integer else (-1e-9, 0.0, 1e-9))]
        else:
            probes = [*allowed, "not-a-choice"]
        for value in probes:
            try:
                kind.convert(value, None, None)
                by_click = True
            except click.BadParameter:
                by_click = False
            try:
                check_option(name, value)
                by_config = True
            except CovidxrError:
                by_config = False
            assert by_click == by_config, (name, value, by_click, by_config)
    train_types = {p.name: p.type for p in train_command.params}
    for name in set(CONSTRAINTS) & set(train_types):
        assert repr(train_types[name]) == repr(_config_type(name)), name
    assert {"learning_rate", "epochs", "image_size", "unfreeze_blocks", "intensity", "feature_engine"} <= set(
        train_types
    )


def test_a_split_never_separates_near_duplicates_unless_told(cxr3: Path, cxr3_meta, tmp_path: Path) -> None:
    """The same radiograph re-encoded under a second patient id: grouped by default, refused when ungrouped."""
    from PIL import Image

    rows = cxr3_meta.drop_duplicates("patient_id").groupby("label").head(8).copy()
    (tmp_path / "images").mkdir()
    for name in rows["filename"]:
        (tmp_path / name).symlink_to(cxr3 / name)
    original = rows.iloc[0]
    Image.open(cxr3 / original["filename"]).convert("L").save(tmp_path / "images" / "copy.jpg", quality=60)
    copy = {**original.to_dict(), "filename": "images/copy.jpg", "patient_id": "someone-else"}
    rows = pd.concat([rows, pd.DataFrame([copy])], ignore_index=True)
    rows.to_csv(tmp_path / "metadata.csv", index=False)
    dataset = load_dataset(tmp_path)
    refused = []
    for seed in range(30):
        frame, report = make_splits(dataset, replace(FAST, seed=seed))
        assert report["pairs_across_patients"] == 1 and report["pairs_crossing_splits"] == 0
        assert frame["split"].iloc[0] == frame["split"].iloc[-1]
        try:
            make_splits(dataset, replace(FAST, seed=seed, group_near_duplicates=False))
        except CovidxrError as exc:
            assert "1 near-duplicate pair(s) cross splits" in str(exc) and "copy.jpg" in str(exc)
            refused.append(seed)
    assert refused, "some seed must separate the two patients when they are not grouped"
    allowed = replace(FAST, seed=refused[0], group_near_duplicates=False, allow_near_duplicate_leakage=True)
    assert make_splits(dataset, allowed)[1]["pairs_crossing_splits"] == 1
