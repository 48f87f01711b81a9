"""Evaluating a run: predict its test split (or another dataset), compute the metrics, write
``metrics.json``, ``predictions.csv``, the figures and the run report.

Orchestration only, so each part has one job: the numbers are ``covidxr.lab.metrics``, the drawings
``covidxr.lab.figures``, the explanation checks ``covidxr.lab.explain`` and the reports ``covidxr.lab.report``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from covidxr import DISCLAIMER
from covidxr.lab.data import load_dataset
from covidxr.lab.explain import Explainer, check_maps, input_lungs, probabilities_of
from covidxr.lab.features import extract_features
from covidxr.lab.figures import (
    gradcam_examples,
    plot_calibration,
    plot_confusion,
    plot_gradcam,
    plot_history,
    plot_predictions,
)
from covidxr.lab.metrics import class_mix_shift, compute_metrics, covid_versus_rest, rates_by_group
from covidxr.lab.models import CovidxrNet, head_probabilities, run_model
from covidxr.lab.report import write_run_report
from covidxr.runtime.answers import training_hashes
from covidxr.runtime.calibration import POSITIVE, decide, expected_calibration_error
from covidxr.runtime.cam import overlay
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256, read_image
from covidxr.runtime.records import Metrics
from covidxr.runtime.runs import Run, load_run

__all__ = ["LUNG_MASKS", "choose_examples", "evaluate_run", "explain_examples", "external_folder", "hand_masks"]

log = logging.getLogger(__name__)

LUNG_MASKS = "lung-masks"  # a folder of hand-drawn lung masks beside the datasets, as in ../shared/data


def hand_masks(paths: Sequence[Path]) -> list[np.ndarray | None]:
    """The hand-drawn lung mask of each image where a ``lung-masks`` folder beside its dataset has one
    (``metadata.csv``: ``mask``, ``image`` relative to the folder holding both); None elsewhere."""
    index: dict[Path, Path] = {}
    for folder in {Path(p).resolve().parents[2] / LUNG_MASKS for p in paths if len(Path(p).resolve().parents) > 2}:
        if (folder / "metadata.csv").is_file():
            table = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
            hand = ~table["origin"].str.contains("generated|lungVAE", case=False) if "origin" in table else True
            for mask, image in zip(table.loc[hand, "mask"], table.loc[hand, "image"], strict=True):
                index[(folder.parent / image).resolve()] = folder / mask
    masks = []
    for path in paths:
        found = index.get(Path(path).resolve())
        masks.append(None if found is None else np.asarray(Image.open(found).convert("L")))
    return masks


def choose_examples(frame: pd.DataFrame, per_class: int, seed: int) -> list[int]:
    """Row positions of up to ``per_class`` images of each true class, drawn with ``seed``."""
    chosen: list[int] = []
    for _, group in frame.groupby("label", sort=True):
        chosen += list(group.sample(n=min(per_class, len(group)), random_state=seed).index)
    return chosen


def explain_examples(
    model: CovidxrNet, images: Sequence[Image.Image], shown: Sequence[int], method: str = "gradcam"
) -> tuple[dict[int, np.ndarray], dict[int, Image.Image]]:
    """The probabilities and the activation map of the predicted class, drawn over the image, of each
    example ``shown`` (positions in ``images``), for ``figures.plot_gradcam``."""
    inputs = torch.stack([model.input_tensor(images[i]) for i in shown])
    probs = dict(zip(shown, probabilities_of(model, inputs), strict=True))
    maps = Explainer(model, method)(inputs, [p.argmax() for p in probs.values()])
    overlays = {i: overlay(images[i], cam, model.image_size) for i, cam in zip(shown, maps, strict=True)}
    return probs, overlays


def external_folder(run_dir: str | Path, data: str | Path) -> Path:
    """Where ``evaluate RUN --data OTHER`` writes by default: ``RUN/external/<OTHER's folder name>/``, so
    an evaluation on another dataset never overwrites the run's own test results."""
    return Path(run_dir) / "external" / Path(data).resolve().name


def unseen_images(run: Run, frame: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, int | None]:
    """The rows of another dataset whose image file is not in the run's training split (by SHA-256,
    ``covidxr.runtime.answers``), and how many were left out: scoring a model on its own training images
    would flatter it. A run without hashes cannot tell (None, with a warning); a dataset of nothing but
    training images is refused in one line."""
    hashes = training_hashes(run)
    if hashes is None:
        log.warning("%s: its splits.csv has no sha256 column; training images cannot be left out", run.path)
        return frame, None
    seen = np.array([file_sha256(root / name) in hashes for name in frame["filename"]], dtype=bool)
    if seen.all():
        raise CovidxrError(f"{root}: every image is in {run.path}'s training split; nothing unseen to evaluate")
    if seen.any():
        log.warning("%s: left out %d image(s) of %s's training split (seen_in_training)", root, seen.sum(), run.path)
    return frame[~seen], int(seen.sum())


def evaluate_run(
    run: str | Path | Run,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    explain: bool = True,
) -> dict:
    """Evaluate a run on its own split (default: test) or on every image of another dataset.

    Writes ``metrics.json``, ``predictions.csv``, the figures ``curves.png``, ``confusion_matrix.png``,
    ``predictions.png`` and (with ``explain``) ``gradcam.png`` plus the explanation checks, and the
    reports, into ``out`` (default: the run folder; for another dataset ``external_folder``, and the
    run's own report is rewritten to link it); returns the metrics.
    """
    run = run if isinstance(run, Run) else load_run(run, weights, weights_dir)
    if data is None:
        frame = run.splits()
        if split != "all":
            if split not in set(frame["split"]):
                raise CovidxrError(f"{run.path}: split {split!r} is empty or unknown (train, val, test, all)")
            frame = frame[frame["split"] == split]
        root = Path(run.info.data)
        scope = f"{Path(run.info.data).name}, {split} split"
    else:
        dataset = load_dataset(data)
        frame, root, split = dataset.frame, dataset.root, "all"
        frame, left_out = unseen_images(run, frame, root)
        scope = f"{dataset.name} (external: all images)"
        if left_out:
            scope = f"{dataset.name} (external: {len(frame)} images, {left_out} seen in training left out)"
    frame = frame.reset_index(drop=True)
    extraction = (cache_dir, run.config.extract_batch_size, run.config.num_workers, progress)
    engine = run.config.feature_engine
    features = extract_features(run_model(run), [root / f for f in frame["filename"]], *extraction, engine=engine)
    uncalibrated = head_probabilities(run_model(run), features)
    probabilities = head_probabilities(run_model(run), features, run.temperature)
    threshold = run.covid_threshold
    predicted = [run.labels[k] for k in decide(probabilities, run.labels, threshold)]  # what `predict` says
    truth = list(frame["label"])
    truth_idx = np.array([run.labels.index(t) for t in truth])
    metrics = {
        "run": str(run.path.resolve()),
        "model": run.config.model,
        "data": str(Path(root).resolve()),
        "split": split,
        "disclaimer": DISCLAIMER,
        **compute_metrics(
            truth, probabilities, run.labels, list(frame["patient_id"]), seed=run.config.seed, threshold=threshold
        ),
        "calibration": {
            "temperature": run.temperature,
            "ece_uncalibrated": expected_calibration_error(uncalibrated, truth_idx),
            "ece_calibrated": expected_calibration_error(probabilities, truth_idx),
        },
        "covid_vs_rest": covid_versus_rest(truth, probabilities, run.labels, threshold),
        "by_source": rates_by_group(frame, predicted),
    }
    if data is not None:
        metrics["seen_in_training_left_out"] = left_out
        internal = run.splits().query("split == 'test'")
        internal_paths = [Path(run.info.data) / f for f in internal["filename"]]
        internal_features = extract_features(run_model(run), internal_paths, *extraction, engine=engine)
        internal_probabilities = head_probabilities(run_model(run), internal_features, run.temperature)
        internal_predicted = decide(internal_probabilities, run.labels, threshold)
        internal_counts = {label: int((internal_predicted == k).sum()) for k, label in enumerate(run.labels)}
        metrics["predicted_class_shift"] = class_mix_shift(metrics["predicted_class_counts"], internal_counts)
    out = Path(out) if out else (run.path if data is None else external_folder(run.path, data))
    out.mkdir(parents=True, exist_ok=True)
    predictions = frame[["filename", "label", "patient_id", "source"]].copy()
    predictions["predicted"] = predicted
    for k, label in enumerate(run.labels):
        predictions[f"p_{label}"] = probabilities[:, k]
    predictions.to_csv(out / "predictions.csv", index=False)
    seed = run.config.seed
    if explain:
        chosen = choose_examples(frame, per_class=8, seed=seed)
        images = [read_image(root / frame["filename"].iloc[i]) for i in chosen]
        inputs = torch.stack([run_model(run).input_tensor(img) for img in images])
        hands = hand_masks([root / frame["filename"].iloc[i] for i in chosen])
        lungs = [input_lungs(run_model(run), img, hand) for img, hand in zip(images, hands, strict=True)]
        covid = run.labels.index(POSITIVE)
        metrics["explanations"] = check_maps(run_model(run), inputs, seed=seed, lungs=lungs, covid_class=covid)
        metrics["explanations"]["lung_masks"] = {"hand_drawn": sum(h is not None for h in hands), "n": len(hands)}
        true_labels = list(frame["label"].iloc[chosen])
        shown = [i for examples in gradcam_examples(run.labels, true_labels).values() for i in examples]
        probs, overlays = explain_examples(run_model(run), images, shown)
        size = run_model(run).image_size
        plot_gradcam(run.labels, images, true_labels, probs, overlays, size, out / "gradcam.png")
    metrics = Metrics.new(metrics).to_dict()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_predictions(frame, probabilities, run.labels, predicted, Path(root), out / "predictions.png", seed)
    acc = metrics["accuracy"]
    low, high = metrics["accuracy_ci95"]
    plot_confusion(
        metrics["confusion_matrix"]["matrix"],
        run.labels,
        out / "confusion_matrix.png",
        f"{run.config.model}: {scope}\naccuracy {acc:.1%} (95% CI {low:.1%}-{high:.1%}), n={metrics['n']}",
    )
    plot_history(run.history(), out / "curves.png", f"{run.config.model}: training curves")
    plot_calibration(probabilities, uncalibrated, truth_idx, out / "calibration.png", f"{run.config.model}\n{scope}")
    write_run_report(out)
    if out.resolve() != run.path.resolve() and (run.path / "metrics.json").is_file():
        write_run_report(run.path)  # its report links every evaluation under external/
    log.info("evaluated %s on %s (%d images) into %s", run.path, scope, metrics["n"], out)
    return metrics
