"""The shortcut audit: how much of a run's accuracy comes from the lungs, and how much from elsewhere.

Public COVID-19 X-ray collections mix sources: adults from papers and web sites against children from
one hospital. A model can score highly by recognising where an image came from. Three checks put
numbers on that risk, each with a verdict ("pass", "warning", "fail" or "not applicable"):

* **lungs_hidden**: accuracy with the central lung field blacked out, and with only the border strip
  kept. Maguolo & Nanni (*A critic evaluation of methods for COVID-19 automatic detection from X-ray
  images*, Information Fusion 2021) found models classify nearly as well with the lungs blacked out:
  accuracy far above chance without the lungs is accuracy the lungs did not earn.
* **source_probe**: how well a linear probe on the frozen backbone features tells the image sources
  apart, across patients. Zech et al. (PLOS Medicine 2018) and DeGrave, Janizek & Lee (Nature Machine
  Intelligence 2021) showed CNNs recognise the hospital and collection of a radiograph, and use it;
  when every class comes from its own source, a recognisable source is a ready-made shortcut.
* **resolution_format**: accuracy after every image gets the same grey 8-bit, 512 x 512, JPEG
  quality 90 format. Collections differ in resolution, bit depth and compression; a model whose
  predictions change when that difference is removed was reading the file format, not the chest.

The lung field and border are ``covidxr.lab.explain``'s documented geometry, so this audit and the map
checks of ``evaluate`` talk about the same regions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from covidxr import DISCLAIMER
from covidxr.lab.data import Dataset, load_dataset, run_dataset
from covidxr.lab.explain import BORDER_WIDTH, GEOMETRY_DESCRIPTION, LUNG_FIELD, region_masks
from covidxr.lab.features import backbone_features, extract_features
from covidxr.lab.models import CovidxrNet, StagedHead, head_probabilities, run_model, to_input_tensor
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.records import AUDIT_DECISION, Audit
from covidxr.runtime.runs import Run, load_run

__all__ = [
    "COMMON_SIZE",
    "common_format",
    "lungs_hidden_check",
    "masked_input",
    "overall_verdict",
    "resolution_format_check",
    "run_audit",
    "source_probe_check",
]

# lungs_hidden: accuracy above chance that survives hiding the lungs (or keeping only the border).
# A margin of 0.25 cannot come from sampling noise on a test set of ~30+ images; 0.10 is worth a look.
LUNGS_HIDDEN_FAIL_MARGIN = 0.25
LUNGS_HIDDEN_WARNING_MARGIN = 0.10
# A margin on a handful of images can be luck: a fail also needs a one-sided exact binomial test of the
# better masked accuracy against chance below this p-value; a margin that is not significant is a
# warning that says so.
LUNGS_HIDDEN_SIGNIFICANCE = 0.05
# Blacked-out inputs are far from the training images: when one class takes this share of the masked
# predictions, the model's answer to "black" dominates and a pass says little (noted in the summary).
MASKED_COLLAPSE_SHARE = 0.80

# source_probe: a probe this good recognises the source almost perfectly; with the source confounded
# with the label, that recognition is a shortcut to the label.
SOURCE_PROBE_LIMIT = 0.95
# Within one class the source carries no label information, so 0.9 there means the backbone sees
# strong source signatures that a model could pick up as soon as sources and labels are mixed.
WITHIN_CLASS_PROBE_LIMIT = 0.90
# A class is "from one source" when at least this share of its images comes from its main source.
CONFOUNDED_SHARE = 0.95
# With the source confounded, a probe this far above chance (short of SOURCE_PROBE_LIMIT, as small
# datasets give) still means the labels can be told apart by source alone: a warning, never a pass.
CONFOUNDED_WARNING_LIMIT = 0.80
MIN_IMAGES_PER_GROUP = 5  # a source (or age group) with fewer images is left out of the probes
MAX_FOLDS = 5
PROBE_MAX_ITER = 5000

# resolution_format: the common format, and how much the accuracy and the predictions may move.
COMMON_SIZE = 512
JPEG_QUALITY = 90
FORMAT_FAIL_DROP = 0.10
FORMAT_FAIL_CHANGED = 0.20
FORMAT_WARNING_DROP = 0.05
FORMAT_WARNING_CHANGED = 0.10

VERDICT_RANK = {"pass": 0, "warning": 1, "fail": 2}
NOT_APPLICABLE = "not applicable"


# ---------------------------------------------------------------------------------------------
# Image variants
# ---------------------------------------------------------------------------------------------


def masked_input(image: Image.Image, keep: np.ndarray, model: CovidxrNet) -> torch.Tensor:
    """The model input with every pixel outside ``keep`` set to 0 in the resized RGB image, then normalised.

    Masking after the model's pipeline and resizing (not on the original) puts the mask exactly on
    ``region_masks``' pixels of what the network sees.
    """
    size = model.image_size
    resized = np.array(model.pipeline(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    resized[~keep] = 0
    return to_input_tensor(Image.fromarray(resized), size, model.preprocessing)


def common_format(image: Image.Image) -> Image.Image:
    """The image as 8-bit grey, ``COMMON_SIZE`` square, JPEG-encoded at ``JPEG_QUALITY`` and decoded again."""
    grey = image.convert("L").resize((COMMON_SIZE, COMMON_SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    grey.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def variant_predictions(
    model: CovidxrNet,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    engine: str = "auto",
) -> dict[str, np.ndarray]:
    """Predicted class indices for the lungs-hidden, border-only and common-format variant of every image.

    Each file is decoded once and its three variants are built from that decode.
    """
    masks = region_masks(model.image_size)
    variants = {
        "lungs_hidden": lambda image: masked_input(image, ~masks["lung_field"], model),
        "border_only": lambda image: masked_input(image, masks["border"], model),
        "common_format": lambda image: model.input_tensor(common_format(image)),
    }
    features: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    with tqdm(total=len(paths), desc="audit", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            images = [read_image(path) for path in paths[start : start + batch_size]]
            for name, make_input in variants.items():
                inputs = torch.stack([make_input(img) for img in images])
                features[name].append(backbone_features(model, inputs, cache_dir, engine))
            bar.update(len(images))
    return {name: head_probabilities(model, np.concatenate(parts)).argmax(1) for name, parts in features.items()}


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _counts(indices: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    return {label: int((indices == k).sum()) for k, label in enumerate(labels)}


def _masked_collapse(predicted_counts: dict[str, dict[str, int]], n: int) -> tuple[dict[str, str], str]:
    """The masked variants whose predictions mostly fall in one class, and a sentence saying so (or "")."""
    collapsed, notes = {}, []
    for name, wording in (("lungs_hidden", "with the lungs hidden"), ("border_only", "with only the border")):
        label, count = max(predicted_counts[name].items(), key=lambda item: item[1])
        if count >= MASKED_COLLAPSE_SHARE * n:
            collapsed[name] = label
            notes.append(f"{count} of {n} {wording} predicted {label}")
    if not notes:
        return collapsed, ""
    return collapsed, (
        f" Masked inputs collapse to one class ({'; '.join(notes)}): blacked-out images are far from the "
        "training images, so the masked accuracies are a weak test."
    )


def lungs_hidden_check(truth: np.ndarray, predictions: dict[str, np.ndarray], labels: Sequence[str]) -> dict:
    """Accuracy unchanged, with the lung field hidden and with only the border kept, against chance."""
    variants = ("unchanged", "lungs_hidden", "border_only")
    correct = {name: int((predictions[name] == truth).sum()) for name in variants}
    accuracy = {name: count / len(truth) for name, count in correct.items()}
    chance = float(np.bincount(truth).max() / len(truth))
    best = max(correct["lungs_hidden"], correct["border_only"])
    excess = best / len(truth) - chance
    p_value = float(binomtest(best, len(truth), chance, alternative="greater").pvalue)
    if excess >= LUNGS_HIDDEN_WARNING_MARGIN and p_value >= LUNGS_HIDDEN_SIGNIFICANCE:
        verdict, meaning = "warning", f"it may classify without the lungs, but too few images to tell (p={p_value:.2f})"
    elif excess >= LUNGS_HIDDEN_FAIL_MARGIN:
        verdict, meaning = "fail", "the model classifies well without seeing the lungs"
    elif excess >= LUNGS_HIDDEN_WARNING_MARGIN:
        verdict, meaning = "warning", "some of the accuracy does not need the lungs"
    else:
        verdict, meaning = "pass", "without the lungs the model is no better than chance"
    predicted_counts = {name: _counts(predictions[name], labels) for name in variants}
    collapsed, collapse_note = _masked_collapse(predicted_counts, len(truth))
    return {
        "n": len(truth),
        "accuracy": accuracy["unchanged"],
        "accuracy_lungs_hidden": accuracy["lungs_hidden"],
        "accuracy_border_only": accuracy["border_only"],
        "chance": chance,
        "excess_over_chance": float(excess),
        "p_value": p_value,
        "true_counts": _counts(truth, labels),
        "predicted_counts": predicted_counts,
        "masked_predictions_collapse_to": collapsed,
        "thresholds": {
            "fail": LUNGS_HIDDEN_FAIL_MARGIN,
            "warning": LUNGS_HIDDEN_WARNING_MARGIN,
            "significance": LUNGS_HIDDEN_SIGNIFICANCE,
        },
        "verdict": verdict,
        "summary": (
            f"With the lung field blacked out the model is right on {accuracy['lungs_hidden']:.0%} of {len(truth)} "
            f"images and with only the outer {BORDER_WIDTH:.0%} border on {accuracy['border_only']:.0%}, against "
            f"{chance:.0%} for always predicting the most frequent class (unchanged: {accuracy['unchanged']:.0%}): "
            f"{meaning}.{collapse_note}"
        ),
    }


def resolution_format_check(truth: np.ndarray, unchanged: np.ndarray, common: np.ndarray) -> dict:
    """Accuracy and changed predictions once every image has the same size, bit depth and compression."""
    accuracy = float((unchanged == truth).mean())
    accuracy_common = float((common == truth).mean())
    drop = accuracy - accuracy_common
    changed = float((unchanged != common).mean())
    if drop >= FORMAT_FAIL_DROP or changed >= FORMAT_FAIL_CHANGED:
        verdict = "fail"
    elif drop >= FORMAT_WARNING_DROP or changed >= FORMAT_WARNING_CHANGED:
        verdict = "warning"
    else:
        verdict = "pass"
    meaning = {
        "fail": "the model depends on the images' format",
        "warning": "the format sways some predictions",
        "pass": "the format barely matters to the model",
    }[verdict]
    return {
        "n": len(truth),
        "common_format": f"8-bit grey, {COMMON_SIZE}x{COMMON_SIZE}, JPEG quality {JPEG_QUALITY}",
        "accuracy": accuracy,
        "accuracy_common_format": accuracy_common,
        "accuracy_drop": float(drop),
        "changed_predictions": int((unchanged != common).sum()),
        "changed_share": changed,
        "thresholds": {
            "fail": {"drop": FORMAT_FAIL_DROP, "changed_share": FORMAT_FAIL_CHANGED},
            "warning": {"drop": FORMAT_WARNING_DROP, "changed_share": FORMAT_WARNING_CHANGED},
        },
        "verdict": verdict,
        "summary": (
            f"With every image converted to 8-bit grey {COMMON_SIZE}x{COMMON_SIZE} JPEG (quality {JPEG_QUALITY}) "
            f"accuracy goes from {accuracy:.0%} to {accuracy_common:.0%} and {changed:.0%} of {len(truth)} "
            f"predictions change: {meaning}."
        ),
    }


def attribute_probe(features: np.ndarray, frame: pd.DataFrame, column: str, seed: int = 0) -> dict:
    """Balanced accuracy of predicting ``column`` from features, cross-validated so no patient is in train and test.

    Values with fewer than ``MIN_IMAGES_PER_GROUP`` images (and empty values) are left out; the probe
    does not run (``applicable`` False, with the reason) when fewer than two values remain or a value
    has fewer than two patients.
    """
    values = frame[column].astype(str).str.strip()
    counts = values[values != ""].value_counts()
    kept = sorted(counts.index[counts >= MIN_IMAGES_PER_GROUP])
    image_counts = {value: int(counts[value]) for value in sorted(counts.index)}
    if len(kept) < 2:
        return {
            "applicable": False,
            "counts": image_counts,
            "reason": f"fewer than two {column} values with at least {MIN_IMAGES_PER_GROUP} images",
        }
    rows = values.isin(kept).to_numpy()
    target = values[rows].to_numpy()
    groups = frame["patient_id"].to_numpy()[rows]
    folds = int(min(MAX_FOLDS, frame[rows].groupby(values[rows])["patient_id"].nunique().min()))
    if folds < 2:
        return {"applicable": False, "counts": image_counts, "reason": f"a {column} value has only one patient"}
    # Balanced class weights, because the score is balanced accuracy and sources are rarely the same size.
    classifier = LogisticRegression(max_iter=PROBE_MAX_ITER, class_weight="balanced", random_state=seed)
    probe = make_pipeline(StandardScaler(), classifier)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, features[rows], target, groups=groups, cv=cv)
    return {
        "applicable": True,
        "balanced_accuracy": float(balanced_accuracy_score(target, predicted)),
        "chance": 1 / len(kept),
        "n": int(rows.sum()),
        "folds": folds,
        "counts": image_counts,
    }


@torch.no_grad()
def head_hidden_layer(model: CovidxrNet, features: np.ndarray) -> np.ndarray | None:
    """The trained head's hidden activations (where a source adversary acts; for a staged head, its decisions'
    shared hidden layer), or None for a linear head."""
    head = model.head.decisions if isinstance(model.head, StagedHead) else model.head
    if not isinstance(head[0], torch.nn.Linear) or len(head) < 4:
        return None
    head.eval()
    return head[1](head[0](torch.from_numpy(features))).numpy()


def source_probe_check(
    model: CovidxrNet,
    dataset: Dataset,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = False,
    engine: str = "auto",
) -> dict:
    """Can the frozen features tell the sources apart, overall and within a class, and is the source the label?"""
    frame = dataset.frame
    table = pd.crosstab(frame["label"], frame["source"])
    main_source = {label: str(row.idxmax()) for label, row in table.iterrows()}
    main_source_share = {label: float(row.max() / row.sum()) for label, row in table.iterrows()}
    common = {
        "label_source_counts": {label: {s: int(n) for s, n in row.items() if n} for label, row in table.iterrows()},
        "main_source": main_source,
        "main_source_share": main_source_share,
        "every_class_from_one_source": bool((table > 0).sum(axis=1).eq(1).all()),
        # Confounded: each class (nearly) from one source, and not all from the same one.
        "confounded": min(main_source_share.values()) >= CONFOUNDED_SHARE and len(set(main_source.values())) > 1,
    }
    sources = frame["source"].value_counts()
    if (sources >= MIN_IMAGES_PER_GROUP).sum() < 2:
        counts = ", ".join(f"{source} {n}" for source, n in sources.items())
        reason = f"fewer than two sources with at least {MIN_IMAGES_PER_GROUP} images ({counts})"
        return {**common, "verdict": NOT_APPLICABLE, "summary": f"Source probe not applicable: {reason}."}
    features = extract_features(model, dataset.paths(), cache_dir, batch_size, num_workers, progress, engine=engine)
    overall = attribute_probe(features, frame, "source", seed)
    if not overall["applicable"]:
        return {**common, "verdict": NOT_APPLICABLE, "summary": f"Source probe not applicable: {overall['reason']}."}
    class_rows = {
        label: rows
        for label in table.index
        for rows in [(frame["label"] == label).to_numpy()]
        if frame.loc[rows, "source"].value_counts().ge(MIN_IMAGES_PER_GROUP).sum() >= 2
    }
    within_class = {
        label: attribute_probe(features[rows], frame[rows], "source", seed) for label, rows in class_rows.items()
    }
    within_scores = {k: v["balanced_accuracy"] for k, v in within_class.items() if v["applicable"]}
    hidden = head_hidden_layer(model, features)
    head_within_class = (
        {label: attribute_probe(hidden[rows], frame[rows], "source", seed) for label, rows in class_rows.items()}
        if hidden is not None
        else {}
    )
    head_scores = {k: v["balanced_accuracy"] for k, v in head_within_class.items() if v["applicable"]}
    other_attributes = {
        column: attribute_probe(features, frame, column, seed) for column in ("age_group",) if column in frame.columns
    }

    accuracy = overall["balanced_accuracy"]
    strongest_within = max(within_scores.values(), default=0.0)
    if accuracy >= SOURCE_PROBE_LIMIT and common["confounded"]:
        verdict = "fail"
        meaning = "near-perfect source prediction with each class from its own source is a confounding risk"
    elif accuracy >= SOURCE_PROBE_LIMIT or strongest_within >= WITHIN_CLASS_PROBE_LIMIT:
        verdict = "warning"
        meaning = "the backbone recognises the sources, a shortcut wherever they differ in label mix"
    elif common["confounded"] and accuracy >= CONFOUNDED_WARNING_LIMIT:
        verdict = "warning"
        meaning = "the sources are largely recognisable, and with each class from its own source that is a shortcut"
    else:
        verdict = "pass"
        meaning = "the sources are not readily recognised"
    within_text = "".join(f"; within {label}: {score:.2f}" for label, score in within_scores.items())
    within_text += "".join(
        f"; on the trained head's hidden layer within {label}: {score:.2f}" for label, score in head_scores.items()
    )
    attribute_text = "".join(
        f"; {column} predicted with {probe['balanced_accuracy']:.2f}"
        for column, probe in other_attributes.items()
        if probe["applicable"]
    )
    confounding_text = (
        "every class comes from a single source"
        if common["every_class_from_one_source"]
        else f"the smallest main-source share of a class is {min(main_source_share.values()):.0%}"
    )
    return {
        **common,
        "balanced_accuracy": accuracy,
        "chance": overall["chance"],
        "n": overall["n"],
        "folds": overall["folds"],
        "source_counts": overall["counts"],
        "within_class": within_class,
        "head_hidden_within_class": head_within_class,
        "other_attributes": other_attributes,
        "thresholds": {
            "source": SOURCE_PROBE_LIMIT,
            "within_class": WITHIN_CLASS_PROBE_LIMIT,
            "confounded_share": CONFOUNDED_SHARE,
            "confounded_warning": CONFOUNDED_WARNING_LIMIT,
        },
        "verdict": verdict,
        "summary": (
            f"A linear probe on the backbone features predicts the source of {overall['n']} images with balanced "
            f"accuracy {accuracy:.2f} (chance {overall['chance']:.2f}, {overall['folds']} patient-grouped folds)"
            f"{within_text}{attribute_text}; {confounding_text}: {meaning}."
        ),
    }


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


def overall_verdict(checks: dict[str, dict]) -> str:
    """The worst verdict among the checks that apply."""
    applicable = [check["verdict"] for check in checks.values() if check["verdict"] != NOT_APPLICABLE]
    return max(applicable, key=VERDICT_RANK.__getitem__, default=NOT_APPLICABLE)


def run_audit(
    run: str | Path | Run,
    data: str | Path | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict:
    """Audit a run on its test split (or every image of ``data``) and write ``audit.json`` into ``out``.

    ``out`` defaults to the run folder. Returns what it writes.
    """
    run = run if isinstance(run, Run) else load_run(run)
    model, labels = run_model(run), run.labels
    if data is None:
        dataset = run_dataset(run)
        frame = dataset.frame
        frame = frame[frame["split"] == "test"].reset_index(drop=True)
        images = f"test split of {dataset.root}"
        if frame.empty:
            raise CovidxrError(f"{run.path}: has no test split to audit")
    else:
        dataset = load_dataset(data)
        frame = dataset.frame
        images = f"all images of {dataset.root}"
    paths = [dataset.root / name for name in frame["filename"]]
    batch_size, num_workers = run.config.extract_batch_size, run.config.num_workers

    truth = np.array([labels.index(label) for label in frame["label"]])
    # The unchanged features come from the cache, as evaluate's do; each variant is called its most probable class
    # (AUDIT_DECISION), so the audit compares the model's ranking wherever the operating threshold sits.
    engine = run.config.feature_engine
    unchanged = extract_features(model, paths, cache_dir, batch_size, num_workers, progress, engine=engine)
    predictions = {"unchanged": head_probabilities(model, unchanged).argmax(1)}
    predictions |= variant_predictions(model, paths, batch_size, progress, cache_dir, engine)
    checks = {
        "lungs_hidden": lungs_hidden_check(truth, predictions, labels),
        "source_probe": source_probe_check(model, dataset, cache_dir, seed, batch_size, num_workers, progress, engine),
        "resolution_format": resolution_format_check(truth, predictions["unchanged"], predictions["common_format"]),
    }
    verdict = overall_verdict(checks)
    check_verdicts = ", ".join(f"{name} {check['verdict']}" for name, check in checks.items())
    masks = region_masks(model.image_size)
    audit = Audit.new(
        {
            "run": str(run.path.resolve()),
            "model": run.config.model,
            "data": str(dataset.root.resolve()),
            "images": images,
            "n_images": len(frame),
            "geometry": {
                "description": GEOMETRY_DESCRIPTION,
                "lung_field": list(LUNG_FIELD),
                "border_width": BORDER_WIDTH,
                "input_size": model.image_size,
                "area": {name: float(masks[name].mean()) for name in ("lung_field", "border")},
            },
            "decision": AUDIT_DECISION,
            "checks": checks,
            "verdict": verdict,
            "summary": (
                f"Shortcut audit of {run.config.model} on {len(frame)} images ({images}): {verdict} ({check_verdicts})."
            ),
            "disclaimer": DISCLAIMER,
        }
    ).to_dict()
    out = Path(out) if out else run.path
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(audit, indent=2))
    return audit
