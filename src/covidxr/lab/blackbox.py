"""The black-box shortcut audit: what any chest X-ray classifier answers when its lungs, its periphery or its
acquisition look are taken away, with no retraining and nothing but the model's class probabilities.

``audit_classifier(classifier, samples)`` takes any ``covidxr.runtime.classifier.Classifier`` (a foreign
``MODEL.onnx`` with its spec, or a covidxr run folder) and in-memory ``Sample`` images, so a caller can plant
a shortcut in memory (the planted-shortcut benchmark does). ``load_samples`` builds samples from dataset
folders. Each image is decoded once (to 8-bit grey: chest X-rays are grey; a colour annotation would be lost)
and its lung fields are found once (``covidxr.runtime.lungs``); every variant below is built from that decode.

The checks, each with a pass / warning / fail rule stated beside its figures (``RULES``; the constants
below say why each value):

* **per_source**: per source and overall, AUC of p(COVID-19), sensitivity and specificity at the model's
  own decision with exact (Clopper–Pearson) 95% intervals, accuracy and balanced accuracy; and a **source
  probe within class**: a cross-validated logistic regression (folds grouped by patient) predicting the
  source from the model's log-probabilities among images of one true class (Zech et al. 2018; DeGrave,
  Janizek & Lee 2021: models recognise the hospital and use it).
* **transplant**: counterfactual swaps (``covidxr.lab.transplant``): each image's lungs, corners, border,
  text-like regions or look taken from a COVID-19 donor and from a donor of another class; the change of
  p(COVID-19) between the two is the region's effect. Only this check and **per_source** decide the verdict
  on their own: on the planted-shortcut benchmark the fills and perturbations below flipped as many decisions
  of clean controls as of shortcut models (a frozen-feature model is disturbed by any image it never saw), so
  they are reported with their rules but judged only where they are far outside what clean models showed.
* **lungs_hidden**: the lung fields filled with a neutral grey (Maguolo & Nanni 2021: models classify
  nearly as well without the lungs).
* **lungs_only**: everything outside the lungs filled.
* **periphery**: the four corners, the border band, and text-like bright blobs outside the lungs, each
  filled, and all together (markers and burnt-in text: DeGrave et al. 2021).
* **acquisition**: resolution down-up, JPEG re-encoding, gamma and contrast; a model whose decisions flip
  under them reads the acquisition, not the chest.
* **explanation**: occlusion on a seeded subset (an 8 x 8 grid, each cell filled in turn; the drop of the
  decided class's probability is the cell's attribution), and the share of that attribution inside the
  lungs. No maintained library runs occlusion or RISE on a black-box numpy callable without torch here
  (Captum needs a torch model, and is not installed), so this is the small loop below.
* **calibration**: per source, the expected calibration error (10 equal-width bins) and the Brier score
  of p(COVID-19) against COVID-19-or-not.

"Neutral fill": hidden pixels take the median grey of the pixels the variant still shows, so no variant
paints black or white blocks the model never saw, and a hidden marker takes the image's typical grey.

``estimated_clean_accuracy``: the audit's estimate of the model's balanced accuracy on images free of the
shortcut it may use: the lower of (a) for each region the transplant check flags, the balanced accuracy
with every image given that region from donors of one class (the shortcut then follows the donors' class,
not the image's; the better of the classes is the one whose images lack it), with the transplant's own
damage given back: the unchanged balanced accuracy minus that with the region from a donor of each image's
own class (the shortcut as often as in the data), so only the shortcut's share of the loss counts; and (b)
the mean of the within-source balanced accuracies over sources holding at least two classes (the source
shortcut removed: within a source it cannot separate the classes), never above the unchanged balanced
accuracy. None ("not estimable", with the reason) where every source holds a single class (nothing in the
data separates the source from the label), or where the flagged look moves the answer of one class only (a
transplant can blur an image but not restore its detail, so a low-resolution shortcut would stay). Its
anchor is Ong Ly et al. 2024 (*Shortcut learning in medical AI hinders generalization*, npj Digit. Med.),
who estimated external accuracy from perturbed internal data.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from covidxr import DISCLAIMER, __version__
from covidxr.lab.transplant import (
    DONOR_CLASSES,
    REGIONS,
    choose_donors,
    down_up,
    effective_resolution,
    resized_like,
    transplanted,
)
from covidxr.runtime.errors import CovidxrError

__all__ = [
    "CHECKS",
    "DEFAULT_LIMIT",
    "RULES",
    "Sample",
    "audit_classifier",
    "limit_samples",
    "load_samples",
    "rescore_audit",
    "variants",
]

log = logging.getLogger(__name__)

COVID = "COVID-19"
FORMAT = "covidxr-blackbox-audit-1"
CHECKS = (
    "per_source",
    "transplant",
    "lungs_hidden",
    "lungs_only",
    "periphery",
    "acquisition",
    "explanation",
    "calibration",
)
VERDICT_RANK = {"pass": 0, "warning": 1, "fail": 2}
NOT_APPLICABLE = "not applicable"

# Images per source, stratified by label and seeded: 300 give a flip rate within about ±5 points (95%) and
# keep three sources' twelve variants near ten thousand predictions, minutes on 2 CPU cores.
DEFAULT_LIMIT = 300
BATCH = 32  # images per predict_proba call and per chunk of variants built at once (memory stays flat)

# --- geometry (shares of the shorter image side) ---------------------------------------------------
CORNER_SIZE = 0.15  # corner squares: markers and side letters sit in the outer ~10%; 15% keeps a margin
BORDER_BAND = 0.06  # the border band: collimation edges, film borders and rulers
# Text-like regions: outside the lungs' box (grown by LUNG_BOX_MARGIN), pixels at least this bright and in
# the image's brightest TEXT_PERCENTILE, grown by TEXT_GROW so a glyph's halo goes too. Burnt-in text and
# lead markers are the brightest, most saturated pixels of a radiograph; bone is rarely this bright outside
# the lung box.
TEXT_MIN_GREY = 200
TEXT_PERCENTILE = 99.0
TEXT_GROW = 0.02
LUNG_BOX_MARGIN = 0.05
# When the segmenter finds no plausible pair of lungs, the lung field is covidxr's documented central box
# (x0, y0, x1, y1 as shares of the image; covidxr.lab.explain.LUNG_FIELD).
FALLBACK_LUNG_FIELD = (0.15, 0.15, 0.85, 0.85)

# --- acquisition perturbations ---------------------------------------------------------------------
DOWN_UP_FACTOR = 4  # 512 px → 128 px → 512 px: the detail of a low-resolution collection
JPEG_QUALITY = 30  # heavy web compression, as in images collected from papers and web sites
GAMMAS = (0.6, 1.6)  # a brighter and a darker film response
CONTRAST = 0.6  # grey levels pulled 40% towards the image's mean

# --- rules ---------------------------------------------------------------------------------------
# A model must beat chance by this much balanced accuracy before "how much of its skill survives" means
# anything; below it, lungs_hidden is not applicable.
MIN_SKILL = 0.10
# The fills and perturbations below cannot tell a sound frozen-feature model from a shortcut one: on the
# planted-shortcut benchmark's development designs, clean controls kept 39-55% of their skill with the lungs
# hidden, lost 0.27-0.33 with only the lungs shown, flipped 22-29% of decisions with the periphery filled and
# 30-39% under down-up x4, as shortcut models did. Their limits therefore sit above every development control,
# so they speak only far outside what a sound model shows; the transplants decide the rest.
# lungs_hidden: the share of the model's skill above chance kept with the lungs hidden: keeping nearly all of
# it (Maguolo & Nanni 2021) means the model does not need the lungs. A flip rate this low means the
# decisions barely change whatever the balanced accuracy says.
LUNGS_HIDDEN_FAIL_RETAINED = 0.90
LUNGS_HIDDEN_WARNING_RETAINED = 0.75
LUNGS_HIDDEN_FAIL_FLIPS = 0.05
LUNGS_HIDDEN_WARNING_FLIPS = 0.10
# lungs_only: balanced accuracy lost when only the lungs are shown. Flat fill outside the lungs is itself an
# unfamiliar image: sound development controls lost up to 0.33.
LUNGS_ONLY_FAIL_LOSS = 0.50
LUNGS_ONLY_WARNING_LOSS = 0.40
# periphery: flips under a flat mask are common (controls up to 29%); lost balanced accuracy is not: controls
# lost at most 0.124, the marker and band models that cost 8-27 points off their shortcut 0.20-0.32.
PERIPHERY_FAIL_FLIPS = 0.50
PERIPHERY_WARNING_FLIPS = 0.35
PERIPHERY_FAIL_LOSS = 0.20
PERIPHERY_WARNING_LOSS = 0.15
# lungs_only, periphery and acquisition: one or two flipped decisions are noise on any sample, so fewer than
# this many flips never warn (on a handful of images one flip is already 17% of decisions and of accuracy).
MIN_FLIPS = 3
# acquisition: down-up x4 flipped 30-39% of development controls' decisions and cost them up to 0.22.
ACQUISITION_FAIL_FLIPS = 0.55
ACQUISITION_WARNING_FLIPS = 0.45
ACQUISITION_FAIL_LOSS = 0.35
ACQUISITION_WARNING_LOSS = 0.28
# source probe within class: the source carries no label information within a class, so outputs that tell
# sources apart there (balanced accuracy 0.75 for two sources, chance 0.5) encode the source; 0.90 is near
# perfect, and where a source holds only one class that recognition is a ready-made label (fail).
PROBE_WARNING = 0.75
PROBE_FAIL = 0.90
PROBE_MIN_IMAGES = 5  # a source with fewer images of a class is left out of that class's probe
PROBE_FOLDS = 5
PROBE_MAX_ITER = 5000
# explanation: lung enrichment = mean share of occlusion attribution inside the lungs / mean lung area
# share (a uniform map scores 1). Development controls scored 0.93-1.05 (occlusion of 8x8 cells spreads over
# the whole film for frozen features), so only attribution clearly kept out of the lungs is judged.
OCCLUSION_IMAGES = 24
OCCLUSION_GRID = 8
EXPLANATION_FAIL_ENRICHMENT = 0.5
EXPLANATION_WARNING_ENRICHMENT = 0.7
EXPLANATION_MIN_IMAGES = 5
# calibration of p(COVID-19) per source (sources with at least CALIBRATION_MIN_IMAGES): an ECE of 0.10 is a
# probability off by 10 points on average, a warning; 0.25 makes the probability meaningless (fail).
CALIBRATION_BINS = 10
CALIBRATION_WARNING_ECE = 0.10
CALIBRATION_FAIL_ECE = 0.25
CALIBRATION_MIN_IMAGES = 20

# transplant: the effect of a region is the mean change of p(COVID-19) when it comes from a COVID-19 donor
# rather than another donor (``covidxr.lab.transplant``). (fail, warning) per region, set on the development
# designs of the planted-shortcut benchmark (benchmarks/audit_validity.py: marker, band and contrast models,
# clean seeds 0 and 1), above every clean control there: corners at most 0.036, border 0.159 (the band holds
# shoulders and ribs, which a sound model reads), look 0.110. Text has no development figure; it takes the
# corners' limits (both are small areas off the lungs).
TRANSPLANT_LIMITS = {"corners": (0.10, 0.06), "border": (0.25, 0.20), "text": (0.10, 0.06), "look": (0.20, 0.14)}
# The chest must move the answer. With lung pixels alone transplanted, clean controls moved p(COVID-19) by
# 0.047-0.063 and shortcut models by 0.020-0.036 (a frozen-feature model reads the whole film): only an answer
# that all but ignores the lungs is judged.
CHEST_FAIL_EFFECT = 0.01
CHEST_WARNING_EFFECT = 0.02
SHORTCUT_REGIONS = ("corners", "border", "text", "look")
# The estimate: where the look is flagged, the mean change of p(COVID-19) between a COVID-19 and another donor's
# look, over one class's images, must be at least this share of the other class's; otherwise the look moved
# one way only and the estimate is "not estimable". On the development designs the contrast models, whose look
# is flagged and transplants both ways, gave 0.60-0.85; the limit is half the lowest.
LOOK_ONE_WAY = 0.30

RULES = {
    "per_source": (
        f"Source probe within class (logistic regression on the model's log-probabilities, patient-grouped "
        f"{PROBE_FOLDS}-fold CV, sources with at least {PROBE_MIN_IMAGES} images of the class): fail when its "
        f"balanced accuracy reaches {PROBE_FAIL:.2f} in some class and some source holds only one class (the "
        f"source-label confound); warning when it reaches {PROBE_WARNING:.2f} (or {PROBE_FAIL:.2f} without a "
        "one-class source); pass below. Warning outright when every source (two or more) holds a single class: "
        "the source then gives the label and nothing in the data can tell the two apart. Not applicable when no "
        "class holds two sources otherwise. The per-source figures are reported, not judged."
    ),
    "lungs_hidden": (
        f"Skill kept = (balanced accuracy with the lungs hidden - chance) / (unchanged - chance). Fail when "
        f"it is at least {LUNGS_HIDDEN_FAIL_RETAINED:.0%} or fewer than {LUNGS_HIDDEN_FAIL_FLIPS:.0%} of "
        f"decisions flip; warning at {LUNGS_HIDDEN_WARNING_RETAINED:.0%} or under "
        f"{LUNGS_HIDDEN_WARNING_FLIPS:.0%} flips; pass otherwise; not applicable when the unchanged balanced "
        f"accuracy is less than {MIN_SKILL:.2f} above chance."
    ),
    "lungs_only": (
        f"Balanced accuracy lost with only the lungs shown: fail at {LUNGS_ONLY_FAIL_LOSS:.2f} or more, warning "
        f"at {LUNGS_ONLY_WARNING_LOSS:.2f}, pass below (or with fewer than {MIN_FLIPS} flipped decisions: noise)."
    ),
    "periphery": (
        f"For each mask (corners, border, text, all): fail when {PERIPHERY_FAIL_FLIPS:.0%} or more of "
        f"decisions flip or balanced accuracy drops by {PERIPHERY_FAIL_LOSS:.2f}; warning at "
        f"{PERIPHERY_WARNING_FLIPS:.0%} flips or a {PERIPHERY_WARNING_LOSS:.2f} drop; the check takes the "
        f"worst mask. Fewer than {MIN_FLIPS} flipped decisions never warn (noise)."
    ),
    "acquisition": (
        f"For each perturbation: fail when {ACQUISITION_FAIL_FLIPS:.0%} or more of decisions flip or balanced "
        f"accuracy drops by {ACQUISITION_FAIL_LOSS:.2f}; warning at {ACQUISITION_WARNING_FLIPS:.0%} flips or "
        f"a {ACQUISITION_WARNING_LOSS:.2f} drop; the check takes the worst perturbation. Fewer than {MIN_FLIPS} "
        "flipped decisions never warn (noise)."
    ),
    "transplant": (
        "Each image gets a region from a COVID-19 donor and, separately, from a donor of another class (same "
        "source where possible); the region's effect is the mean change of p(COVID-19) between the two, with its "
        "95% interval. Corners, border, text and look (grey levels and resolution): fail when an effect reaches "
        + ", ".join(f"{r} {f:.2f}" for r, (f, _) in TRANSPLANT_LIMITS.items())
        + " with its interval above 0; warning at "
        + ", ".join(f"{r} {w:.2f}" for r, (_, w) in TRANSPLANT_LIMITS.items())
        + ". "
        + f"Lungs: fail when their effect is under {CHEST_FAIL_EFFECT:.2f}, warning under "
        f"{CHEST_WARNING_EFFECT:.2f} (the answer does not follow the chest); not applicable when the model is "
        f"less than {MIN_SKILL:.2f} above chance."
    ),
    "explanation": (
        f"Lung enrichment = mean share of occlusion attribution inside the lungs / mean lung area share (a "
        f"uniform map gives 1): fail below {EXPLANATION_FAIL_ENRICHMENT:.1f}, warning below "
        f"{EXPLANATION_WARNING_ENRICHMENT:.1f}, pass otherwise; not applicable with fewer than "
        f"{EXPLANATION_MIN_IMAGES} images whose decided class any cell lowers."
    ),
    "calibration": (
        f"Expected calibration error of p(COVID-19) ({CALIBRATION_BINS} equal-width bins) per source with at "
        f"least {CALIBRATION_MIN_IMAGES} images: fail when the worst reaches {CALIBRATION_FAIL_ECE:.2f}, warning "
        f"at {CALIBRATION_WARNING_ECE:.2f}, pass below."
    ),
}

SHORTCUT_CHECKS = tuple(name for name in CHECKS if name != "calibration")
MASKS = ("corners", "border", "text", "all")

PERTURBATIONS = ("down_up", "jpeg", *(f"gamma_{g}" for g in GAMMAS), f"contrast_{CONTRAST}")
VARIANTS = ("lungs_hidden", "lungs_only", *(f"mask_{m}" for m in MASKS), *PERTURBATIONS)
TRANSPLANTS = tuple(f"{c}_{r}" for c in DONOR_CLASSES for r in (*REGIONS, "shortcut_free"))


@dataclass(frozen=True)
class Sample:
    """One image to audit: decoded, with its true label, its source, and (where known) its patient."""

    image: Image.Image
    label: str
    source: str
    patient_id: str | None = None
    name: str = ""


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def _stratified(keys: Sequence[tuple[str, str]], limit: int | None, seed: int) -> list[int]:
    """Indices keeping at most ``limit`` per source, each source's label mix kept (largest remainder, every
    label at least one image), chosen by a seeded permutation; the order of ``keys`` is kept."""
    if limit is None:
        return list(range(len(keys)))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for source in sorted({s for s, _ in keys}):
        rows = [i for i, (s, _) in enumerate(keys) if s == source]
        if len(rows) <= limit:
            chosen += rows
            continue
        by_label: dict[str, list[int]] = {}
        for i in rows:
            by_label.setdefault(keys[i][1], []).append(i)
        labels = sorted(by_label)
        exact = {label: limit * len(by_label[label]) / len(rows) for label in labels}
        quota = {label: max(1, math.floor(exact[label])) for label in labels}
        for label in sorted(labels, key=lambda lab: exact[lab] - math.floor(exact[lab]), reverse=True):
            if sum(quota.values()) >= limit:
                break
            if quota[label] < len(by_label[label]):
                quota[label] += 1
        for label in labels:
            members = by_label[label]
            chosen += [members[j] for j in rng.permutation(len(members))[: min(quota[label], len(members))]]
    return sorted(chosen)


def limit_samples(samples: Sequence[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most ``limit`` samples per source, stratified by label and seeded (``None``: all)."""
    return [samples[i] for i in _stratified([(s.source, s.label) for s in samples], limit, seed)]


def load_samples(
    folders: Sequence[str | Path], limit: int | None = DEFAULT_LIMIT, seed: int = 0, progress: bool = False
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Samples from dataset folders (``covidxr.lab.data``'s layout; the folder's name is the source where
    metadata has none), at most ``limit`` per source, and what each folder held. Only the chosen images are
    decoded, once each, to 8-bit grey."""
    from tqdm import tqdm

    from covidxr.lab.data import load_dataset
    from covidxr.runtime.images import read_image

    if not folders:
        raise CovidxrError("no dataset given; pass at least one --data folder")
    rows: list[tuple[Path, dict]] = []
    described = []
    for folder in folders:
        dataset = load_dataset(folder)
        frame = dataset.frame
        counts: dict[str, dict[str, int]] = {}
        for record in frame.to_dict("records"):
            source = str(record.get("source") or dataset.root.name)
            counts.setdefault(source, {}).setdefault(record["label"], 0)
            counts[source][record["label"]] += 1
            rows.append((dataset.root, {**record, "source": source}))
        described.append({"folder": str(dataset.root.resolve()), "images": len(frame), "per_source": counts})
    keep = _stratified([(r["source"], r["label"]) for _, r in rows], limit, seed)
    samples = []
    for i in tqdm(keep, desc="decode", unit="img", disable=not progress, leave=False):
        root, record = rows[i]
        image = read_image(root / record["filename"]).convert("L")
        patient = str(record.get("patient_id") or "") or None
        samples.append(Sample(image, record["label"], record["source"], patient, str(record["filename"])))
    return samples, described


# ---------------------------------------------------------------------------------------------
# Regions and variants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regions:
    """One image's regions, at its own size: the lungs (and whether the segmenter found them)."""

    lungs: np.ndarray  # bool HxW
    found: bool


def _box_mask(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = True
    return mask


def find_regions(greys: Sequence[np.ndarray]) -> list[Regions]:
    """Lung fields of each grey image, one segmenter call per batch; the central box where no lungs are found."""
    from covidxr.runtime.lungs import lung_segmenter

    found = lung_segmenter().segment_batch(list(greys))
    regions = []
    for grey, fields in zip(greys, found, strict=True):
        if fields.reason is None and fields.mask.any():
            regions.append(Regions(fields.mask, True))
        else:
            regions.append(Regions(_box_mask(grey.shape, FALLBACK_LUNG_FIELD), False))
    return regions


def _filled(grey: np.ndarray, hide: np.ndarray) -> np.ndarray:
    """``grey`` with ``hide`` set to the median grey of what stays shown (mid grey if nothing does)."""
    shown = grey[~hide]
    out = grey.copy()
    out[hide] = np.uint8(np.median(shown)) if shown.size else np.uint8(128)
    return out


def text_level(grey: np.ndarray) -> float:
    """The grey level from which a pixel of ``grey`` may be burnt-in text (see ``TEXT_MIN_GREY``)."""
    return max(TEXT_MIN_GREY, float(np.percentile(grey, TEXT_PERCENTILE)))


def _lung_box(shape: tuple[int, int], lungs: np.ndarray) -> np.ndarray:
    """The lungs' bounding box grown by ``LUNG_BOX_MARGIN`` (bool HxW; empty where no lungs are given)."""
    rows, cols = np.nonzero(lungs)
    margin = round(LUNG_BOX_MARGIN * min(shape))
    inside = np.zeros(shape, dtype=bool)
    if rows.size:
        inside[
            max(0, rows.min() - margin) : rows.max() + 1 + margin, max(0, cols.min() - margin) : cols.max() + 1 + margin
        ] = True
    return inside


def text_mask(grey: np.ndarray, inside: np.ndarray, level: float | None = None) -> np.ndarray:
    """Text-like regions of ``grey`` outside ``inside`` (the grown lung box): pixels from ``level`` up (its
    ``text_level`` unless given, so a caller can reuse one image's level), grown by ``TEXT_GROW``."""
    bright = (grey >= (text_level(grey) if level is None else level)) & ~inside
    if not bright.any():
        return bright
    size = 2 * max(1, round(TEXT_GROW * min(grey.shape) / 2)) + 1
    # A square maximum filter with edge pixels repeated: separable, so far cheaper than PIL's MaxFilter,
    # and the same mask.
    return ndimage.maximum_filter(bright, size=size, mode="nearest") & ~inside


def periphery_masks(grey: np.ndarray, lungs: np.ndarray) -> dict[str, np.ndarray]:
    """The corners, border band and text-like regions of one image (bool HxW each), and their union."""
    height, width = grey.shape
    side = min(height, width)
    corner, band = max(1, round(CORNER_SIZE * side)), max(1, round(BORDER_BAND * side))
    corners = np.zeros(grey.shape, dtype=bool)
    corners[:corner, :corner] = corners[:corner, -corner:] = True
    corners[-corner:, :corner] = corners[-corner:, -corner:] = True
    border = np.ones(grey.shape, dtype=bool)
    border[band : height - band, band : width - band] = False
    text = text_mask(grey, _lung_box(grey.shape, lungs))
    return {"corners": corners, "border": border, "text": text, "all": corners | border | text}


def _jpeg(grey: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


def _gamma(grey: np.ndarray, gamma: float) -> np.ndarray:
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return lut[grey]


def _contrast(grey: np.ndarray, factor: float) -> np.ndarray:
    mean = float(grey.mean())
    return np.clip(np.round(mean + factor * (grey.astype(np.float32) - mean)), 0, 255).astype(np.uint8)


def variants(grey: np.ndarray, regions: Regions, masks: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every variant of one grey image the audit asks the model about (``VARIANTS``); ``masks``: its
    ``periphery_masks`` where already made."""
    out = {
        "lungs_hidden": _filled(grey, regions.lungs),
        "lungs_only": _filled(grey, ~regions.lungs),
    }
    masks = masks if masks is not None else periphery_masks(grey, regions.lungs)
    for name, mask in masks.items():
        out[f"mask_{name}"] = _filled(grey, mask)
    out["down_up"] = down_up(grey, DOWN_UP_FACTOR)
    out["jpeg"] = _jpeg(grey, JPEG_QUALITY)
    for gamma in GAMMAS:
        out[f"gamma_{gamma}"] = _gamma(grey, gamma)
    out[f"contrast_{CONTRAST}"] = _contrast(grey, CONTRAST)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """How true labels meet the model's labels: the same names (``labels``), or COVID-19 against the rest
    (``covid-vs-rest``) where a true label has no counterpart among the model's labels."""

    how: str
    truth: np.ndarray  # str array in the scored space
    map_decision: Callable[[str | None], str | None]


def make_scoring(model_labels: Sequence[str], true_labels: Sequence[str]) -> Scoring:
    """Score in the model's own labels where it names every true label; a binary [COVID-19, other] model
    scores every non-COVID image as its other label; otherwise COVID-19 against the rest."""
    present = set(true_labels)
    if present <= set(model_labels):
        return Scoring("labels", np.array(true_labels, dtype=object), lambda d: d)
    if len(model_labels) == 2:
        [other] = [label for label in model_labels if label != COVID]
        truth = np.array([COVID if t == COVID else other for t in true_labels], dtype=object)
        return Scoring(f"labels (every non-COVID image as {other})", truth, lambda d: d)
    truth = np.array([COVID if t == COVID else "other" for t in true_labels], dtype=object)
    return Scoring("covid-vs-rest", truth, lambda d: None if d is None else (COVID if d == COVID else "other"))


def balanced_accuracy(truth: np.ndarray, decided: np.ndarray) -> float | None:
    """Mean recall over the true classes present (decisions of any label count; None rows are left out)."""
    answered = np.array([d is not None for d in decided], dtype=bool)
    truth, decided = truth[answered], decided[answered]
    if not len(truth):
        return None
    recalls = [float(np.mean(decided[truth == label] == label)) for label in sorted(set(truth))]
    return float(np.mean(recalls))


def accuracy(truth: np.ndarray, decided: np.ndarray) -> float | None:
    answered = np.array([d is not None for d in decided], dtype=bool)
    return float(np.mean(decided[answered] == truth[answered])) if answered.any() else None


def flip_rate(before: np.ndarray, after: np.ndarray) -> tuple[float | None, int, int]:
    """Share of images answered both times whose decision changed, with the counts."""
    both = np.array([a is not None and b is not None for a, b in zip(before, after, strict=True)], dtype=bool)
    flips = int(np.sum(before[both] != after[both]))
    return (flips / int(both.sum()) if both.any() else None), flips, int(both.sum())


def clopper_pearson(successes: int, n: int) -> list[float]:
    """The exact two-sided 95% interval of ``successes / n``."""
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(interval.low), float(interval.high)]


def _rate(successes: int, n: int) -> dict | None:
    if n == 0:
        return None
    return {"value": successes / n, "ci95": clopper_pearson(successes, n), "successes": successes, "n": n}


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    finite = np.isfinite(score)
    positive, score = positive[finite], score[finite]
    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else None


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE of a probability against a 0/1 outcome: bin-size-weighted |mean p - observed share|, equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(float(probability[members].mean()) - float(outcome[members].mean()))
    return total / len(probability)


def _worst(verdicts: Iterable[str]) -> str:
    judged = [v for v in verdicts if v in VERDICT_RANK]
    return max(judged, key=VERDICT_RANK.__getitem__, default=NOT_APPLICABLE)


def _graded(value: float | None, fail: float, warning: float, higher_is_worse: bool = True) -> str:
    if value is None:
        return "pass"
    sign = 1 if higher_is_worse else -1
    if sign * value >= sign * fail:
        return "fail"
    if sign * value >= sign * warning:
        return "warning"
    return "pass"


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """What the model said of every image and variant: p(COVID-19) and the decisions in the scored space."""

    probabilities: dict[str, np.ndarray]  # variant ("unchanged" included) → (n, classes)
    decisions: dict[str, np.ndarray]  # variant → object array of scored labels or None
    reasons: list[str | None]  # the unchanged images' reasons for no answer
    decisions_raw: np.ndarray  # the unchanged images' decisions in the model's own labels


def _figures_of_variant(scoring: Scoring, base: np.ndarray, decided: np.ndarray, reference: float | None) -> dict:
    rate, flips, both = flip_rate(base, decided)
    ba = balanced_accuracy(scoring.truth, decided)
    return {
        "flip_rate": rate,
        "flips": flips,
        "answered_both": both,
        "accuracy": accuracy(scoring.truth, decided),
        "balanced_accuracy": ba,
        "balanced_accuracy_loss": None if ba is None or reference is None else reference - ba,
    }


def per_source_check(
    scoring: Scoring, samples: Sequence[Sample], preds: Predictions, covid_index: int, seed: int
) -> dict:
    """Per-source figures with exact intervals, and the within-class source probe on the model's outputs."""
    probabilities, decided = preds.probabilities["unchanged"], preds.decisions["unchanged"]
    sources = np.array([s.source for s in samples], dtype=object)
    true = np.array([s.label for s in samples], dtype=object)
    p_covid = probabilities[:, covid_index]
    answered = np.array([d is not None for d in decided], dtype=bool)
    is_covid = true == COVID
    called = np.array([d == COVID for d in decided], dtype=bool)
    table = {}
    for name in [*sorted(set(sources)), "all"]:
        rows = np.ones(len(samples), dtype=bool) if name == "all" else sources == name
        ok = rows & answered
        table[name] = {
            "n": int(rows.sum()),
            "answered": int(ok.sum()),
            "per_label": {label: int(np.sum(true[rows] == label)) for label in sorted(set(true[rows]))},
            "auc": _auc(is_covid[ok], p_covid[ok]),
            "sensitivity": _rate(int(np.sum(called[ok & is_covid])), int(np.sum(ok & is_covid))),
            "specificity": _rate(int(np.sum(~called[ok & ~is_covid])), int(np.sum(ok & ~is_covid))),
            "accuracy": accuracy(scoring.truth[rows], decided[rows]),
            "balanced_accuracy": balanced_accuracy(scoring.truth[rows], decided[rows]),
        }
    one_class = sorted(
        name for name in set(sources) if len(set(scoring.truth[sources == name])) == 1 and np.sum(sources == name) > 0
    )
    probes = {}
    for label in sorted(set(true)):
        rows = (true == label) & answered
        counts = {s: int(np.sum(rows & (sources == s))) for s in sorted(set(sources[rows]))}
        kept = [s for s, n in counts.items() if n >= PROBE_MIN_IMAGES]
        if len(kept) < 2:
            continue
        probes[label] = _source_probe(samples, probabilities, rows & np.isin(sources, kept), seed) | {"counts": counts}
    scores = {label: p["balanced_accuracy"] for label, p in probes.items() if p.get("balanced_accuracy") is not None}
    best = max(scores.values(), default=None)
    best_label = max(scores, key=scores.__getitem__) if scores else None
    every_source_one_class = (
        len(one_class) >= 2 and len(one_class) == len(set(sources)) and len(set(scoring.truth)) >= 2
    )
    if best is not None and best >= PROBE_FAIL and one_class:
        verdict = "fail"
        meaning = (
            f"within {best_label} the model's outputs tell the sources apart near perfectly, and "
            f"{', '.join(one_class)} hold{'s' if len(one_class) == 1 else ''} a single class: the source is a "
            "ready-made label"
        )
    elif every_source_one_class:
        # Whatever the probe says: in such data the source alone gives the label, so no figure here can tell a
        # model reading the chest from one reading the source.
        verdict = "warning"
        meaning = (
            f"every source holds a single class ({', '.join(one_class)}): the source alone gives the label, so "
            "this data cannot tell a model reading the chest from one reading the source"
        )
    elif best is None:
        verdict = NOT_APPLICABLE
        meaning = "no class holds two sources with enough images, so the outputs cannot be probed for the source"
    elif best >= PROBE_WARNING:
        verdict = "warning"
        meaning = f"within {best_label} the model's outputs tell the sources apart: they encode the source"
    else:
        verdict = "pass"
        meaning = "within each class the model's outputs do not tell the sources apart"
    gaps = _gaps(table)
    overall = table["all"]
    summary = (
        f"Overall on {overall['n']} images: balanced accuracy {_f(overall['balanced_accuracy'])}, AUC of "
        f"p(COVID-19) {_f(overall['auc'])}. Source probe within class: "
        + (", ".join(f"{label} {score:.2f}" for label, score in scores.items()) or "not run")
        + f"; {meaning}."
        + (f" One-class sources: {', '.join(one_class)}." if one_class else "")
        + (f" Note: {gaps}." if gaps else "")
    )
    return {
        "verdict": verdict,
        "rule": RULES["per_source"],
        "summary": summary,
        "figures": {
            "sources": table,
            "one_class_sources": one_class,
            "source_probe_within_class": probes,
            "thresholds": {"warning": PROBE_WARNING, "fail": PROBE_FAIL},
        },
    }


def _gaps(table: dict) -> str:
    """Sentences for sources whose specificity (or sensitivity) intervals do not overlap: reported, not judged."""
    notes = []
    names = [n for n in table if n != "all"]
    for metric in ("specificity", "sensitivity"):
        rated = [(n, table[n][metric]) for n in names if table[n][metric] is not None]
        for i, (a, ra) in enumerate(rated):
            for b, rb in rated[i + 1 :]:
                if ra["ci95"][1] < rb["ci95"][0] or rb["ci95"][1] < ra["ci95"][0]:
                    notes.append(f"{metric} {a} {ra['value']:.0%} vs {b} {rb['value']:.0%} (intervals apart)")
    return "; ".join(notes)


def _source_probe(samples: Sequence[Sample], probabilities: np.ndarray, rows: np.ndarray, seed: int) -> dict:
    """Balanced accuracy of a logistic regression predicting the source from log-probabilities, cross-validated
    with no patient in two folds (a patient-less image is its own group)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    index = np.flatnonzero(rows)
    target = np.array([samples[i].source for i in index])
    groups = np.array([f"{samples[i].source}/{samples[i].patient_id or '#' + str(i)}" for i in index])
    patients = {s: len(set(groups[target == s])) for s in set(target)}
    folds = min(PROBE_FOLDS, min(patients.values()))
    if folds < 2:
        return {"balanced_accuracy": None, "reason": "a source has a single patient in this class"}
    features = np.log(np.clip(probabilities[index], 1e-6, 1.0))
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, class_weight="balanced", random_state=seed)
    )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, features, target, groups=groups, cv=cv)
    recalls = [float(np.mean(predicted[target == s] == s)) for s in sorted(set(target))]
    return {"balanced_accuracy": float(np.mean(recalls)), "chance": 1 / len(recalls), "folds": folds, "n": len(index)}


def lungs_hidden_check(scoring: Scoring, preds: Predictions, lungs_found: int) -> dict:
    base = preds.decisions["unchanged"]
    ba = balanced_accuracy(scoring.truth, base)
    figures = _figures_of_variant(scoring, base, preds.decisions["lungs_hidden"], ba)
    chance = 1 / len(set(scoring.truth))
    skill = None if ba is None else ba - chance
    hidden = figures["balanced_accuracy"]
    retained = None if skill is None or skill < MIN_SKILL or hidden is None else (hidden - chance) / skill
    figures |= {"balanced_accuracy_unchanged": ba, "chance": chance, "skill_retained": retained}
    figures["lungs_found"] = lungs_found
    flips = figures["flip_rate"]
    if retained is None:
        verdict = NOT_APPLICABLE
        meaning = f"the model is less than {MIN_SKILL:.2f} above chance here, so there is no skill to lose"
    else:
        by_retained = _graded(retained, LUNGS_HIDDEN_FAIL_RETAINED, LUNGS_HIDDEN_WARNING_RETAINED)
        by_flips = _graded(flips, LUNGS_HIDDEN_FAIL_FLIPS, LUNGS_HIDDEN_WARNING_FLIPS, higher_is_worse=False)
        verdict = _worst([by_retained, by_flips])
        meaning = {
            "fail": "the model does not need the lungs",
            "warning": "much of the model's skill does not need the lungs",
            "pass": "without the lungs the model loses its skill",
        }[verdict]
    summary = (
        f"With the lung fields filled, {_p(flips)} of decisions flip and balanced accuracy goes from {_f(ba)} to "
        f"{_f(hidden)} (chance {chance:.2f}; skill kept {_p(retained)}): {meaning}."
    )
    return {"verdict": verdict, "rule": RULES["lungs_hidden"], "summary": summary, "figures": figures}


def lungs_only_check(scoring: Scoring, preds: Predictions) -> dict:
    base = preds.decisions["unchanged"]
    ba = balanced_accuracy(scoring.truth, base)
    figures = _figures_of_variant(scoring, base, preds.decisions["lungs_only"], ba)
    figures["balanced_accuracy_unchanged"] = ba
    loss = figures["balanced_accuracy_loss"]
    verdict = _graded(loss, LUNGS_ONLY_FAIL_LOSS, LUNGS_ONLY_WARNING_LOSS) if figures["flips"] >= MIN_FLIPS else "pass"
    meaning = {
        "fail": "the model leans on what lies outside the lungs",
        "warning": "some of the model's skill comes from outside the lungs",
        "pass": "the lungs alone keep the model's skill",
    }[verdict]
    summary = (
        f"With everything outside the lungs filled, balanced accuracy goes from {_f(ba)} to "
        f"{_f(figures['balanced_accuracy'])} ({_p(figures['flip_rate'])} of decisions flip): {meaning}."
    )
    return {"verdict": verdict, "rule": RULES["lungs_only"], "summary": summary, "figures": figures}


def _variant_table(
    scoring: Scoring, preds: Predictions, names: dict[str, str], fail: tuple[float, float], warning: tuple[float, float]
) -> tuple[dict, str]:
    base = preds.decisions["unchanged"]
    ba = balanced_accuracy(scoring.truth, base)
    table = {}
    for key, variant in names.items():
        figures = _figures_of_variant(scoring, base, preds.decisions[variant], ba)
        figures["verdict"] = (
            _worst(
                [
                    _graded(figures["flip_rate"], fail[0], warning[0]),
                    _graded(figures["balanced_accuracy_loss"], fail[1], warning[1]),
                ]
            )
            if figures["flips"] >= MIN_FLIPS
            else "pass"  # the balanced accuracy can only move through flipped decisions
        )
        table[key] = figures
    return table, _worst(f["verdict"] for f in table.values())


def periphery_check(scoring: Scoring, preds: Predictions, text_share: float) -> dict:
    table, verdict = _variant_table(
        scoring,
        preds,
        {m: f"mask_{m}" for m in MASKS},
        (PERIPHERY_FAIL_FLIPS, PERIPHERY_FAIL_LOSS),
        (PERIPHERY_WARNING_FLIPS, PERIPHERY_WARNING_LOSS),
    )
    meaning = {
        "fail": "masking the periphery changes the model's answers: a marker or text shortcut",
        "warning": "masking the periphery sways some answers",
        "pass": "the periphery barely matters to the model",
    }[verdict]
    listed = ", ".join(
        f"{name} {_p(f['flip_rate'])} flips (balanced accuracy {_f(f['balanced_accuracy'])})"
        for name, f in table.items()
    )
    return {
        "verdict": verdict,
        "rule": RULES["periphery"],
        "summary": f"{listed}: {meaning}.",
        "figures": {
            "masks": table,
            "geometry": {
                "corner_size": CORNER_SIZE,
                "border_band": BORDER_BAND,
                "text": (
                    f"pixels outside the lungs' box (grown by {LUNG_BOX_MARGIN:.0%} of the side) at or above grey "
                    f"{TEXT_MIN_GREY} and the image's {TEXT_PERCENTILE:g}th percentile, grown by "
                    f"{TEXT_GROW:.0%} of the side"
                ),
                "text_mean_area_share": text_share,
                "fill": "median grey of the pixels still shown",
            },
        },
    }


def acquisition_check(scoring: Scoring, preds: Predictions) -> dict:
    table, verdict = _variant_table(
        scoring,
        preds,
        {p: p for p in PERTURBATIONS},
        (ACQUISITION_FAIL_FLIPS, ACQUISITION_FAIL_LOSS),
        (ACQUISITION_WARNING_FLIPS, ACQUISITION_WARNING_LOSS),
    )
    meaning = {
        "fail": "the model's answers follow the acquisition look",
        "warning": "the acquisition look sways some answers",
        "pass": "the acquisition look barely matters to the model",
    }[verdict]
    listed = ", ".join(f"{name} {_p(f['flip_rate'])}" for name, f in table.items())
    return {
        "verdict": verdict,
        "rule": RULES["acquisition"],
        "summary": f"Decisions flipped: {listed}: {meaning}.",
        "figures": {
            "perturbations": table,
            "settings": {
                "down_up": f"x{DOWN_UP_FACTOR} down then up (bilinear)",
                "jpeg": f"quality {JPEG_QUALITY}",
                "gamma": list(GAMMAS),
                "contrast": f"x{CONTRAST} around the image's mean",
            },
        },
    }


def _effect(preds: Predictions, region: str, covid_index: int) -> dict:
    """Mean paired change of p(COVID-19), COVID-19 donor minus other donor, with a normal 95% interval."""
    covid = preds.probabilities[f"covid_{region}"][:, covid_index]
    other = preds.probabilities[f"other_{region}"][:, covid_index]
    change = covid - other
    change = change[np.isfinite(change)]
    if len(change) < 2:
        return {"effect": None, "ci95": None, "n": len(change)}
    mean, half = float(change.mean()), 1.96 * float(change.std(ddof=1)) / math.sqrt(len(change))
    return {"effect": mean, "ci95": [mean - half, mean + half], "n": len(change)}


def transplant_check(scoring: Scoring, preds: Predictions, covid_index: int) -> dict:
    ba = balanced_accuracy(scoring.truth, preds.decisions["unchanged"])
    chance = 1 / len(set(scoring.truth))
    effects = {region: _effect(preds, region, covid_index) for region in REGIONS}
    verdicts = {}
    for region in SHORTCUT_REGIONS:
        found = effects[region]
        if found["effect"] is None:
            verdicts[region] = NOT_APPLICABLE
            continue
        verdict = _graded(found["effect"], *TRANSPLANT_LIMITS[region])
        if verdict == "fail" and found["ci95"][0] <= 0:
            verdict = "warning"
        verdicts[region] = verdict
    chest = effects["lungs"]["effect"]
    if ba is None or ba - chance < MIN_SKILL or chest is None:
        verdicts["lungs"] = NOT_APPLICABLE
    else:
        verdicts["lungs"] = _graded(chest, CHEST_FAIL_EFFECT, CHEST_WARNING_EFFECT, higher_is_worse=False)
    for region, verdict in verdicts.items():
        effects[region]["verdict"] = verdict
    verdict = _worst(verdicts.values())
    flagged = [r for r, v in verdicts.items() if v in ("fail", "warning")]
    meaning = (
        "the answer follows the chest, not the periphery or the look"
        if not flagged
        else "the answer follows " + ", ".join("not the lungs" if r == "lungs" else f"the {r}" for r in flagged)
    )
    listed = ", ".join(f"{r} {_f(e['effect'])}" for r, e in effects.items())
    return {
        "verdict": verdict,
        "rule": RULES["transplant"],
        "summary": f"Change of p(COVID-19) with the region from a COVID-19 donor: {listed}: {meaning}.",
        "figures": {"effects": effects, "balanced_accuracy_unchanged": ba},
    }


def occlusion_shares(
    classifier, grey: np.ndarray, lungs: np.ndarray, class_index: int, grid: int = OCCLUSION_GRID
) -> tuple[float | None, float]:
    """Occlusion on a ``grid`` x ``grid`` partition: each cell filled with the median grey in turn; a cell's
    attribution is the drop of p(class) it causes (rises count 0). Returns the attribution's share inside the
    lungs (None when no cell lowers it) and the lungs' area share."""
    height, width = grey.shape
    ys = np.linspace(0, height, grid + 1).round().astype(int)
    xs = np.linspace(0, width, grid + 1).round().astype(int)
    fill = np.uint8(np.median(grey))
    images, lung_share = [Image.fromarray(grey)], []
    for i in range(grid):
        for j in range(grid):
            occluded = grey.copy()
            occluded[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = fill
            images.append(Image.fromarray(occluded))
            lung_share.append(float(lungs[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean()))
    p = classifier.predict_proba(images, batch_size=BATCH).probabilities[:, class_index]
    drops = np.clip(p[0] - p[1:], 0, None)
    drops[~np.isfinite(drops)] = 0
    total = float(drops.sum())
    area = float(lungs.mean())
    if total <= 0:
        return None, area
    return float((drops * np.array(lung_share)).sum() / total), area


def explanation_check(
    classifier, samples: Sequence[Sample], preds: Predictions, regions: dict[int, Regions], chosen: list[int]
) -> dict:
    labels = list(classifier.labels)
    shares, areas, per_image = [], [], []
    for i in chosen:
        decided = preds.decisions_raw[i]
        if decided is None:
            continue
        grey = np.asarray(samples[i].image.convert("L"))
        share, area = occlusion_shares(classifier, grey, regions[i].lungs, labels.index(decided))
        per_image.append({"name": samples[i].name, "decided": decided, "lung_share": share, "lung_area": area})
        if share is not None:
            shares.append(share)
            areas.append(area)
    mean_share = float(np.mean(shares)) if shares else None
    mean_area = float(np.mean(areas)) if areas else None
    enrichment = mean_share / mean_area if shares and mean_area else None
    if len(shares) < EXPLANATION_MIN_IMAGES or enrichment is None:
        verdict = NOT_APPLICABLE
        meaning = f"fewer than {EXPLANATION_MIN_IMAGES} images have a cell that lowers their decided class"
    else:
        verdict = _graded(enrichment, EXPLANATION_FAIL_ENRICHMENT, EXPLANATION_WARNING_ENRICHMENT, False)
        meaning = {
            "fail": "the attribution is no denser in the lungs than elsewhere",
            "warning": "the attribution is only slightly denser in the lungs",
            "pass": "the attribution concentrates in the lungs",
        }[verdict]
    summary = (
        f"Occlusion ({OCCLUSION_GRID}x{OCCLUSION_GRID} cells, {len(shares)} of {len(chosen)} images with an "
        f"attribution): mean share inside the lungs {_p(mean_share)} against a lung area of {_p(mean_area)} "
        f"(enrichment {_f(enrichment)}): {meaning}."
    )
    return {
        "verdict": verdict,
        "rule": RULES["explanation"],
        "summary": summary,
        "figures": {
            "method": f"occlusion, {OCCLUSION_GRID}x{OCCLUSION_GRID} grid, cell filled with the image's median grey, "
            "attribution = drop of the decided class's probability",
            "images": len(chosen),
            "images_with_attribution": len(shares),
            "mean_lung_share": mean_share,
            "mean_lung_area": mean_area,
            "enrichment": enrichment,
            "per_image": per_image,
        },
    }


def calibration_check(samples: Sequence[Sample], preds: Predictions, covid_index: int) -> dict:
    p_covid = preds.probabilities["unchanged"][:, covid_index]
    sources = np.array([s.source for s in samples], dtype=object)
    outcome = np.array([s.label == COVID for s in samples], dtype=float)
    finite = np.isfinite(p_covid)
    table = {}
    for name in [*sorted(set(sources)), "all"]:
        rows = finite & (True if name == "all" else sources == name)
        if not rows.any():
            continue
        table[name] = {
            "n": int(rows.sum()),
            "ece": expected_calibration_error(p_covid[rows], outcome[rows]),
            "brier": float(np.mean((p_covid[rows] - outcome[rows]) ** 2)),
            "mean_p_covid": float(p_covid[rows].mean()),
            "covid_share": float(outcome[rows].mean()),
            "judged": bool(name != "all" and rows.sum() >= CALIBRATION_MIN_IMAGES),
        }
    judged = {n: t["ece"] for n, t in table.items() if t["judged"]}
    worst = max(judged.values(), default=None)
    verdict = NOT_APPLICABLE if worst is None else _graded(worst, CALIBRATION_FAIL_ECE, CALIBRATION_WARNING_ECE)
    listed = ", ".join(f"{n} {t['ece']:.3f} (Brier {t['brier']:.3f}, n={t['n']})" for n, t in table.items())
    meaning = {
        "fail": "p(COVID-19) does not mean what it says on some source",
        "warning": "p(COVID-19) is off on some source",
        "pass": "p(COVID-19) means roughly what it says on every source",
        NOT_APPLICABLE: f"no source has {CALIBRATION_MIN_IMAGES} images",
    }[verdict]
    return {
        "verdict": verdict,
        "rule": RULES["calibration"],
        "summary": f"Expected calibration error of p(COVID-19): {listed}: {meaning}.",
        "figures": {"sources": table, "bins": CALIBRATION_BINS},
    }


def estimate_clean_accuracy(
    scoring: Scoring,
    samples: Sequence[Sample],
    preds: Predictions,
    transplant: dict | None = None,
    covid_index: int | None = None,
) -> dict:
    """The audit's estimate of balanced accuracy without the shortcut (see the module docstring): the lower of
    the transplant estimate for each region the transplant check flags and the mean within-source balanced
    accuracy, never above the unchanged one; None where every source holds a single class (source and label
    cannot be told apart in such data)."""
    unchanged = balanced_accuracy(scoring.truth, preds.decisions["unchanged"])
    sources = np.array([s.source for s in samples], dtype=object)
    within, single = {}, []
    for name in sorted(set(sources)):
        rows = sources == name
        if len(set(scoring.truth[rows])) >= 2:
            within[name] = balanced_accuracy(scoring.truth[rows], preds.decisions["unchanged"][rows])
        else:
            single.append(name)
    effects = (transplant or {}).get("figures", {}).get("effects", {})
    flagged = [r for r in SHORTCUT_REGIONS if effects.get(r, {}).get("verdict") in ("fail", "warning")]
    by_region = {
        region: {c: balanced_accuracy(scoring.truth, preds.decisions[f"{c}_{region}"]) for c in DONOR_CLASSES}
        for region in flagged
    }
    # Every image given the flagged region from donors of one class: the shortcut then follows that class, not
    # the image's; the better class is the one whose images lack the shortcut. The transplant itself costs a
    # model some accuracy whatever the region carries (a pasted region is an image it never saw: clean controls
    # lost 16-24 points with the periphery and look transplanted), which is not the shortcut's cost. That
    # damage is measured on the same region from donors of each image's own class, whose shortcut is there as
    # often as in the data, and given back.
    own_class = np.array([t == COVID for t in scoring.truth], dtype=bool)
    by_own = {
        region: balanced_accuracy(
            scoring.truth,
            np.where(own_class, preds.decisions[f"covid_{region}"], preds.decisions[f"other_{region}"]),
        )
        for region in flagged
    }
    removed = []
    for region, by_class in by_region.items():
        best = max((v for v in by_class.values() if v is not None), default=None)
        if best is not None and by_own[region] is not None and unchanged is not None:
            removed.append(min(1.0, max(0.0, unchanged + best - by_own[region])))
    by_donor = {c: balanced_accuracy(scoring.truth, preds.decisions[f"{c}_shortcut_free"]) for c in DONOR_CLASSES}
    terms = {
        "flagged_regions_transplanted": min(removed) if removed else None,
        "within_source": float(np.mean([v for v in within.values() if v is not None])) if within else None,
    }
    reported = {
        "periphery_masked": balanced_accuracy(scoring.truth, preds.decisions["mask_all"]),
        "acquisition_harmonised": balanced_accuracy(scoring.truth, preds.decisions["down_up"]),
        "periphery_and_look_by_donor_class": by_donor,
        "flagged_regions_by_donor_class": by_region,
        "flagged_regions_by_own_class_donor": by_own,
    }
    # A look transplant can blur an image or flatten its grey levels, but not restore detail that was never
    # captured. Where the look moves p(COVID-19) for one class's images and hardly for the other's, it could
    # not give that class the other's look, and an estimate from it would keep the shortcut.
    look_by_class = None
    if "look" in flagged and covid_index is not None:
        change = preds.probabilities["covid_look"][:, covid_index] - preds.probabilities["other_look"][:, covid_index]
        look_by_class = {
            name: float(np.nanmean(change[rows])) if rows.any() else None
            for name, rows in (("covid", own_class), ("other", ~own_class))
        }
    one_way = (
        look_by_class is not None
        and None not in look_by_class.values()
        and min(look_by_class.values()) < LOOK_ONE_WAY * max(look_by_class.values())
    )
    reported["look_change_by_recipient_class"] = look_by_class
    confounded = len(set(sources)) >= 2 and not within
    candidates = [v for v in (*terms.values(), unchanged) if v is not None]
    value = None if confounded or one_way or not candidates else min(candidates)
    limiting = min((k for k, v in terms.items() if v is not None), key=lambda k: terms[k], default=None)
    if limiting is not None and unchanged is not None and terms[limiting] >= unchanged:
        limiting = "unchanged"
    return {
        "value": value,
        "metric": "balanced accuracy",
        "limited_by": (
            "not estimable: every source holds one class"
            if confounded
            else "not estimable: the look moves the answer of one class only (a transplant can blur an image, not "
            "restore its detail)"
            if one_way
            else limiting
        ),
        "unchanged": unchanged,
        "terms": terms,
        "reported": reported,
        "within_source": within,
        "single_class_sources": single,
        "estimator": (
            "min(for each region the transplant check flags: unchanged balanced accuracy - (balanced accuracy "
            "with every image given that region from a donor of its own class - the same from donors of one "
            "class, the better class); mean within-source balanced accuracy over sources holding two or more "
            "classes), capped at the unchanged balanced accuracy (after Ong Ly et al. 2024); none where every "
            f"source holds a single class, or where the flagged look moves p(COVID-19) for one class's images less "
            f"than {LOOK_ONE_WAY:.2f} times as much as for the other's (a transplant cannot sharpen)"
        ),
    }


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


def _predict(classifier, images: list[Image.Image]) -> tuple[np.ndarray, list[str | None]]:
    outputs = classifier.predict_proba(images, batch_size=BATCH)
    return np.asarray(outputs.probabilities, dtype=np.float64), list(outputs.reasons)


def _occlusion_subset(samples: Sequence[Sample], seed: int) -> list[int]:
    """Up to ``OCCLUSION_IMAGES`` images, taken in turn from each (source, label) pair, seeded."""
    rng = np.random.default_rng(seed + 1)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((sample.source, sample.label), []).append(i)
    queues = [[members[j] for j in rng.permutation(len(members))] for _, members in sorted(groups.items())]
    chosen: list[int] = []
    while len(chosen) < OCCLUSION_IMAGES and any(queues):
        for queue in queues:
            if queue and len(chosen) < OCCLUSION_IMAGES:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN and Inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def audit_classifier(
    classifier,
    samples: Sequence[Sample],
    out: str | Path | None = None,
    seed: int = 0,
    sample_limit: int | None = DEFAULT_LIMIT,
    progress: bool | None = None,
    data: list[dict[str, Any]] | None = None,
) -> dict:
    """Audit ``classifier`` (a ``covidxr.runtime.classifier.Classifier``) on ``samples``; with ``out``, write
    ``audit.json``, ``audit.md`` and ``audit.html`` there. Returns what ``audit.json`` holds.

    ``sample_limit`` keeps at most that many samples per source (stratified by label, seeded); ``data``
    describes the folders the samples came from (``load_samples``' second value)."""
    from tqdm import tqdm

    samples = limit_samples(samples, sample_limit, seed)
    if not samples:
        raise CovidxrError("no images to audit")
    if COVID not in classifier.labels:
        raise CovidxrError(f"{classifier.name}: output.labels: must include {COVID}, not {list(classifier.labels)}")
    covid_index = classifier.covid_index
    scoring = make_scoring(classifier.labels, [s.label for s in samples])
    n = len(samples)
    probabilities = {
        name: np.full((n, len(classifier.labels)), np.nan) for name in ("unchanged", *VARIANTS, *TRANSPLANTS)
    }
    donors = choose_donors([s.label for s in samples], [s.source for s in samples], COVID, seed)
    resolutions: dict[int, int] = {}  # per donor, and its text level at a recipient's size
    donor_levels: dict[tuple[int, tuple[int, int]], float] = {}
    reasons: list[str | None] = [None] * n
    chosen = _occlusion_subset(samples, seed)
    kept_regions: dict[int, Regions] = {}  # only the occlusion subset's, so memory stays flat
    found = 0
    text_share = 0.0
    log.debug("auditing %s on %d images (%d variants each)", classifier.name, n, len(VARIANTS) + 1)
    with tqdm(total=n, desc="audit", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, BATCH):
            stop = min(n, start + BATCH)
            greys = [np.asarray(samples[i].image.convert("L")) for i in range(start, stop)]
            regions = find_regions(greys)
            found += sum(r.found for r in regions)
            built: dict[str, list[Image.Image]] = {name: [] for name in VARIANTS}
            moved: dict[str, list[tuple[int, Image.Image]]] = {name: [] for name in TRANSPLANTS}
            for k, (grey, region) in enumerate(zip(greys, regions, strict=True)):
                if start + k in chosen:
                    kept_regions[start + k] = region
                masks = periphery_masks(grey, region.lungs)
                inside = _lung_box(grey.shape, region.lungs)
                text_share += float(masks["text"].mean())
                for name, array in variants(grey, region, masks).items():
                    built[name].append(Image.fromarray(array))
                for donor_class in DONOR_CLASSES:
                    j = int(donors[donor_class][start + k])
                    if j < 0:
                        continue
                    donor = np.asarray(samples[j].image.convert("L"))
                    if j not in resolutions:
                        resolutions[j] = effective_resolution(donor)
                    donor = resized_like(donor, grey.shape)
                    if (j, grey.shape) not in donor_levels:  # a donor serves about two recipients
                        donor_levels[(j, grey.shape)] = text_level(donor)
                    text = masks["text"] | text_mask(donor, inside, donor_levels[(j, grey.shape)])
                    made = transplanted(grey, donor, resolutions[j], {**masks, "lungs": region.lungs, "text": text})
                    for region_name, array in made.items():
                        moved[f"{donor_class}_{region_name}"].append((start + k, Image.fromarray(array)))
            p, why = _predict(classifier, [Image.fromarray(g) for g in greys])
            probabilities["unchanged"][start:stop] = p
            reasons[start:stop] = why
            for name, images in built.items():
                probabilities[name][start:stop] = _predict(classifier, images)[0]
            for name, pairs in moved.items():
                if pairs:
                    rows = [i for i, _ in pairs]
                    probabilities[name][rows] = _predict(classifier, [image for _, image in pairs])[0]
            bar.update(stop - start)
    decisions_raw = np.array(classifier.decide(probabilities["unchanged"]), dtype=object)
    decisions = {
        name: np.array([scoring.map_decision(d) for d in classifier.decide(p)], dtype=object)
        for name, p in probabilities.items()
    }
    preds = Predictions(probabilities, decisions, reasons, decisions_raw)
    answered = np.array([d is not None for d in decisions_raw], dtype=bool)

    checks = {
        "per_source": per_source_check(scoring, samples, preds, covid_index, seed),
        "transplant": transplant_check(scoring, preds, covid_index),
        "lungs_hidden": lungs_hidden_check(scoring, preds, found),
        "lungs_only": lungs_only_check(scoring, preds),
        "periphery": periphery_check(scoring, preds, text_share / n),
        "acquisition": acquisition_check(scoring, preds),
        "explanation": explanation_check(classifier, samples, preds, kept_regions, chosen),
        "calibration": calibration_check(samples, preds, covid_index),
    }
    # Calibration is not a shortcut: it keeps its own verdict and stays out of the shortcut verdict.
    verdict = _worst(check["verdict"] for name, check in checks.items() if name in SHORTCUT_CHECKS)
    if verdict == NOT_APPLICABLE:
        verdict = "pass"
    estimate = estimate_clean_accuracy(scoring, samples, preds, checks["transplant"], covid_index)
    per_source: dict[str, dict[str, int]] = {}
    for s in samples:
        per_source.setdefault(s.source, {}).setdefault(s.label, 0)
        per_source[s.source][s.label] += 1
    unanswered = [{"name": samples[i].name, "reason": reasons[i]} for i in range(n) if not answered[i]]
    failing = [
        name
        for name, check in checks.items()
        if name in SHORTCUT_CHECKS and check["verdict"] == verdict and verdict != "pass"
    ]
    audit = _clean(
        {
            "format": FORMAT,
            "verdict": verdict,
            "verdict_line": _verdict_line(verdict, failing, estimate),
            "estimated_clean_accuracy": estimate["value"],
            "estimate": estimate,
            "model": {
                **classifier.identity,
                "labels": list(classifier.labels),
                "threshold": classifier.threshold,
                "decision": (
                    f"COVID-19 when p(COVID-19) >= {classifier.threshold:.4g}, else the most probable other class"
                    if classifier.threshold is not None
                    else "the most probable class"
                ),
            },
            "scored_as": scoring.how,
            "data": {
                "folders": data or [],
                "images": n,
                "per_source": per_source,
                "limit_per_source": sample_limit,
                "lungs_found": found,
                "unanswered": unanswered,
            },
            "checks": checks,
            "seed": seed,
            "covidxr_version": __version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "disclaimer": DISCLAIMER,
        }
    )
    if out is not None:
        write_audit(out, audit)
        _write_variants(Path(out), samples, scoring, preds, covid_index)
    return audit


def _write_variants(out: Path, samples: Sequence[Sample], scoring: Scoring, preds: Predictions, covid: int) -> None:
    """``variants.npz``: every image's p(COVID-19) under every variant and transplant, with its name, source and
    scored label, so a figure of the audit can be traced to the images behind it."""
    from covidxr.runtime.storage import atomic_path

    arrays = {f"p_covid/{name}": p[:, covid] for name, p in preds.probabilities.items()}
    with atomic_path(out / "variants.npz", ".npz") as tmp, tmp.open("wb") as handle:
        np.savez_compressed(
            handle,
            names=np.array([s.name for s in samples]),
            sources=np.array([s.source for s in samples]),
            truth=scoring.truth.astype(str),
            **arrays,
        )


def rescore_audit(out: str | Path, classifier, samples: Sequence[Sample]) -> dict:
    """Redo the verdict, the per-source and transplant checks and the estimate of the audit in ``out`` from its
    stored predictions (``variants.npz``), without running the model again: so a change of those rules reaches
    audits already made. The other checks keep their figures. ``samples``: the audit's own images (their
    labels, sources and patients; images are not read), in any order; a binary [COVID-19, other] model only,
    since ``variants.npz`` keeps p(COVID-19) alone."""
    import json

    out = Path(out)
    audit = json.loads((out / "audit.json").read_text())
    if len(classifier.labels) != 2:
        raise CovidxrError(f"{out}: only a two-label model's audit can be rescored from p(COVID-19) alone")
    by_name = {s.name: s for s in samples}
    with np.load(out / "variants.npz") as stored:
        names = [str(n) for n in stored["names"]]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CovidxrError(f"{out}/variants.npz: image {missing[0]} is not among the samples given")
        ordered = [by_name[n] for n in names]
        covid_index = classifier.covid_index
        probabilities = {}
        for key in stored.files:
            if key.startswith("p_covid/"):
                p = np.asarray(stored[key], dtype=np.float64)
                both = np.empty((len(p), 2))
                both[:, covid_index], both[:, 1 - covid_index] = p, 1 - p
                probabilities[key.removeprefix("p_covid/")] = both
    scoring = make_scoring(classifier.labels, [s.label for s in ordered])
    decisions = {
        name: np.array([scoring.map_decision(d) for d in classifier.decide(p)], dtype=object)
        for name, p in probabilities.items()
    }
    raw = np.array(classifier.decide(probabilities["unchanged"]), dtype=object)
    preds = Predictions(probabilities, decisions, [None] * len(ordered), raw)
    checks = dict(audit["checks"])
    checks["per_source"] = per_source_check(scoring, ordered, preds, covid_index, audit["seed"])
    checks["transplant"] = transplant_check(scoring, preds, covid_index)
    verdict = _worst(check["verdict"] for name, check in checks.items() if name in SHORTCUT_CHECKS)
    verdict = "pass" if verdict == NOT_APPLICABLE else verdict
    estimate = estimate_clean_accuracy(scoring, ordered, preds, checks["transplant"], covid_index)
    failing = [
        name
        for name, check in checks.items()
        if name in SHORTCUT_CHECKS and check["verdict"] == verdict and verdict != "pass"
    ]
    audit = _clean(
        audit
        | {
            "verdict": verdict,
            "verdict_line": _verdict_line(verdict, failing, estimate),
            "estimated_clean_accuracy": estimate["value"],
            "estimate": estimate,
            "checks": checks,
            "rescored": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    write_audit(out, audit)
    return audit


def _verdict_line(verdict: str, failing: list[str], estimate: dict) -> str:
    estimate_text = (
        f"; estimated balanced accuracy without the shortcut {estimate['value']:.2f} (unchanged "
        f"{estimate['unchanged']:.2f})"
        if estimate["value"] is not None and estimate["unchanged"] is not None
        else ""
    )
    if verdict == "pass":
        return f"Verdict: PASS: no check found a shortcut{estimate_text}."
    return f"Verdict: {verdict.upper()}: {', '.join(failing)}{estimate_text}."


def write_audit(out: str | Path, audit: dict) -> Path:
    """``audit.json`` (atomically) and the reports ``audit.md`` and ``audit.html`` in ``out``."""
    import json

    from covidxr.lab.report.blackbox import write_blackbox_report
    from covidxr.runtime.storage import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "audit.json", json.dumps(audit, indent=2, allow_nan=False))
    write_blackbox_report(out, audit)
    return out / "audit.json"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
