"""Benchmark: is the black-box audit right? Models with planted shortcuts of known kind and strength (issue 24).

An audit is a test, so it is validated like one: by its sensitivity on models known to use a shortcut and
its false alarms on models known not to. This script makes such models, audits each blind through the same
code as ``covidxr audit MODEL.onnx --data ...``, and scores the audit.

**Task.** The shared data has no COVID-19 images from a source that also holds non-COVID images, so no clean
COVID-19 task exists here. The benchmark's positive class is therefore *pneumonia* (Kermany children and NIH
adults), named ``COVID-19`` in each model's spec because the audit looks at that class; the negative class is
``NORMAL`` from the same two sources. Sources are balanced within each class, so the base task has no source
shortcut. The audit is about shortcuts, not about the disease.

**Models.** The paper's protocol: a frozen ImageNet backbone (EfficientNet-Lite0, the only ImageNet weights
here), global average pooling and a logistic-regression head, trained on a patient-disjoint 65% of the
images and exported whole to ONNX with a ``MODEL.yaml`` spec (some as logits, some as probabilities, some
NHWC, so the audit meets several kinds of foreign graph). Shortcuts, each planted in a share ``s`` of the
positive images and ``1 - s`` of the negative ones (``s`` = strength: 0.5 is no correlation):

- ``marker``: a bright square in the top-right corner;
- ``letter``: a burnt-in letter "P" at a random place in the top band;
- ``band``: a bright band along the bottom edge;
- ``contrast``: contrast reduced to 60% around the mean;
- ``lowres``: the image reduced 4x and enlarged back;
- ``source``: the source confound itself, as torchxrayvision's ``CovariateDataset`` mixes it: a share ``s``
  of the positives from Kermany and ``1 - s`` of the negatives (the rest from NIH).

Strengths 0.7, 0.85, 0.95 and 1.0. **Clean controls**: the shortcut absent (three seeds) and each shortcut
decorrelated (``s = 0.5``).

**The audit's data** is each model's own held-out 35%, with the shortcut planted at the model's strength
(or, for ``source``, sampled at its mixing ratio): the internal test set a developer would audit with.
**Truth** is the model's balanced accuracy on the same held-out images with no shortcut at all, and both
sources in their natural mix ("off-shortcut"). A shortcut's **cost** is internal minus off-shortcut accuracy.

**Development and evaluation.** The audit's thresholds (``covidxr.lab.blackbox``) were set on the
development designs: the marker, band and contrast models and the clean controls of seeds 0 and 1. The letter,
low-resolution and source models and the seed-2 control are the evaluation designs, shortcut kinds the
thresholds never saw; the scores are given for each part and for all.

**Scores** (the issue's targets): sensitivity, the share of models whose shortcut costs at least 10 points
that the audit flags fail or warning (target >= 95%); false alarms, the share of clean controls flagged
(target <= 10%); and the error of the audit's ``estimated_clean_accuracy`` against truth (target within 5
points). The table is written to ``OUT/results.csv`` and ``OUT/results.md`` and printed.

Resumable: every stage writes its result as it goes (features per shortcut kind, each model, each audit)
and a rerun skips what exists. On 2 CPU cores the whole run takes about an hour (features ~5 min, models
~5 min, audits ~1 min each at 150 images per source). Run from the repository root::

    .venv/bin/python benchmarks/audit_validity.py                 # OUT = runs/audit-validity
    .venv/bin/python benchmarks/audit_validity.py --stage train     # features and models only
    .venv/bin/python benchmarks/audit_validity.py --only marker-1.0 # one model
    .venv/bin/python benchmarks/audit_validity.py --rescore         # audits made: today's verdict and estimate rules
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from covidxr.lab.blackbox import SHORTCUT_CHECKS
from covidxr.runtime.images import read_image
from covidxr.runtime.spec import GraphSpec, InputSpec, OutputSpec, prepare
from covidxr.runtime.storage import atomic_write
from machine import REPO, cpu_model

SHARED = REPO.parent / "shared" / "data"
POSITIVE, NEGATIVE = "COVID-19", "NORMAL"  # pneumonia stands in for COVID-19 (see above)
KINDS = ("marker", "letter", "band", "contrast", "lowres")
STRENGTHS = (0.7, 0.85, 0.95, 1.0)
CONTROL_SEEDS = (0, 1, 2)
TRAIN_SHARE = 0.65
COST_THRESHOLD = 0.10  # a shortcut that costs at least this much off-shortcut must be flagged
INPUT = InputSpec(
    size=(224, 224), channels=3, resize="stretch", scale=255.0, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)

log = logging.getLogger("audit_validity")


# ---------------------------------------------------------------------------------------------
# Data and the planted shortcuts
# ---------------------------------------------------------------------------------------------


def load_table() -> pd.DataFrame:
    """Kermany and NIH normals and pneumonias, with a patient-disjoint train/test split (seed 0)."""
    frames = []
    for folder, source in (("cxr3", "kermany"), ("adult-controls", "nih")):
        meta = pd.read_csv(SHARED / folder / "metadata.csv", dtype=str, keep_default_na=False)
        meta = meta[(meta["source"] == source) & meta["label"].isin(["NORMAL", "PNEUMONIA"])].copy()
        meta["path"] = [str(SHARED / folder / name) for name in meta["filename"]]
        frames.append(meta)
    table = pd.concat(frames, ignore_index=True)
    table["label"] = np.where(table["label"] == "PNEUMONIA", POSITIVE, NEGATIVE)
    rng = np.random.default_rng(0)
    patients = sorted(table["patient_id"].unique())
    train_patients = set(rng.permutation(patients)[: round(TRAIN_SHARE * len(patients))])
    table["split"] = np.where(table["patient_id"].isin(train_patients), "train", "test")
    return table[["path", "label", "source", "patient_id", "split"]]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def plant(image: Image.Image, kind: str, key: int) -> Image.Image:
    """``image`` (grey) with the shortcut ``kind`` drawn in; ``key`` seeds where a letter goes."""
    grey = image.convert("L")
    width, height = grey.size
    side = min(width, height)
    if kind == "marker":
        out = grey.copy()
        size, inset = round(0.07 * side), round(0.03 * side)
        ImageDraw.Draw(out).rectangle([width - inset - size, inset, width - inset, inset + size], fill=255)
        return out
    if kind == "letter":
        out = grey.copy()
        rng = np.random.default_rng(key)
        size = round(0.09 * side)
        x = int(rng.integers(round(0.1 * width), round(0.8 * width)))
        y = int(rng.integers(round(0.01 * height), round(0.06 * height)))
        ImageDraw.Draw(out).text((x, y), "P", fill=255, font=_font(size))
        return out
    if kind == "band":
        out = grey.copy()
        ImageDraw.Draw(out).rectangle([0, height - round(0.04 * height), width, height], fill=235)
        return out
    if kind == "contrast":
        pixels = np.asarray(grey, dtype=np.float32)
        return Image.fromarray(np.clip(pixels.mean() + 0.6 * (pixels - pixels.mean()), 0, 255).astype(np.uint8))
    if kind == "lowres":
        small = grey.resize((max(1, width // 4), max(1, height // 4)), Image.Resampling.BILINEAR)
        return small.resize((width, height), Image.Resampling.BILINEAR)
    raise ValueError(kind)


def carriers(labels: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """Which images carry the shortcut: a share ``strength`` of the positives and ``1 - strength`` of the others."""
    rng = np.random.default_rng(seed)
    carry = np.zeros(len(labels), dtype=bool)
    for label, share in ((POSITIVE, strength), (NEGATIVE, 1 - strength)):
        index = np.flatnonzero(labels == label)
        chosen = rng.permutation(index)[: round(share * len(index))]
        carry[chosen] = True
    return carry


def confounded(table: pd.DataFrame, strength: float, seed: int) -> np.ndarray:
    """Rows of ``table`` (one split) mixed as ``CovariateDataset`` does: a share ``strength`` of the positives
    from Kermany, ``1 - strength`` of the negatives, the rest from NIH, as many per class as the mix allows."""
    rng = np.random.default_rng(seed)
    pools = {
        (label, source): rng.permutation(np.flatnonzero((table["label"] == label) & (table["source"] == source)))
        for label in (POSITIVE, NEGATIVE)
        for source in ("kermany", "nih")
    }
    shares = {POSITIVE: strength, NEGATIVE: 1 - strength}
    per_class = min(
        int(min(len(pools[(label, "kermany")]) / max(share, 1e-9), len(pools[(label, "nih")]) / max(1 - share, 1e-9)))
        for label, share in shares.items()
    )
    rows = []
    for label, share in shares.items():
        from_kermany = round(share * per_class)
        rows += list(pools[(label, "kermany")][:from_kermany]) + list(pools[(label, "nih")][: per_class - from_kermany])
    return np.array(sorted(rows))


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """One benchmark model: a shortcut kind (or none) at a strength, or a clean control."""

    name: str
    kind: str | None  # None: no shortcut anywhere
    strength: float  # 0.5: decorrelated
    seed: int = 0

    @property
    def control(self) -> bool:
        return self.kind is None or self.strength == 0.5


# The audit's thresholds were set on the development designs (three shortcut kinds and two clean seeds) and
# are scored on the evaluation designs too: shortcut kinds the thresholds never saw.
DEVELOPMENT_KINDS = ("marker", "band", "contrast")
DEVELOPMENT_SEEDS = (0, 1)


def part(design: Design) -> str:
    if design.kind is None:
        return "development" if design.seed in DEVELOPMENT_SEEDS else "evaluation"
    return "development" if design.kind in DEVELOPMENT_KINDS else "evaluation"


def designs() -> list[Design]:
    found = [Design(f"clean-seed{seed}", None, 0.5, seed) for seed in CONTROL_SEEDS]
    for kind in (*KINDS, "source"):
        found.append(Design(f"{kind}-0.5", kind, 0.5))
        found += [Design(f"{kind}-{strength}", kind, strength) for strength in STRENGTHS]
    return found


def rendered(row: pd.Series, kind: str | None, index: int) -> Image.Image:
    image = read_image(row["path"]).convert("L")
    return image if kind is None or kind == "source" else plant(image, kind, index)


class Features:
    """Pooled EfficientNet-Lite0 features of every image, clean and with each shortcut planted (one file per kind)."""

    def __init__(self, folder: Path, table: pd.DataFrame):
        self.folder, self.table = folder, table
        self._backbone = None

    def backbone(self):
        if self._backbone is None:
            from covidxr.lab.models import create_backbone

            self._backbone, _ = create_backbone("efficientnet_lite0")
        return self._backbone

    def get(self, kind: str | None) -> np.ndarray:
        import torch

        path = self.folder / f"features-{kind or 'clean'}.npy"
        if path.exists():
            return np.load(path)
        started = time.perf_counter()
        rows = []
        for start in range(0, len(self.table), 32):
            images = [rendered(self.table.iloc[i], kind, i) for i in range(start, min(start + 32, len(self.table)))]
            with torch.no_grad():
                fmap = self.backbone()(torch.from_numpy(prepare(images, INPUT)))
            rows.append(fmap.mean(dim=(2, 3)).numpy())
        features = np.concatenate(rows)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, features)
        partial.replace(path)
        log.info("features %s: %d images in %.0f s", kind or "clean", len(features), time.perf_counter() - started)
        return features


def train_rows(table: pd.DataFrame, design: Design) -> np.ndarray:
    """Indices of ``table`` a design trains on (all training images, or the source mix)."""
    train = np.flatnonzero(table["split"] == "train")
    if design.kind == "source":
        return train[confounded(table.iloc[train].reset_index(drop=True), design.strength, design.seed)]
    if design.kind is None:  # controls of other seeds train on another 90% of the training images
        keep = (
            np.random.default_rng(design.seed).permutation(train)[: round(0.9 * len(train))] if design.seed else train
        )
        return np.sort(keep)
    return train


def test_rows(table: pd.DataFrame, design: Design) -> np.ndarray:
    """Indices of the audit's data: the held-out images (for ``source``, sampled at the design's mix)."""
    test = np.flatnonzero(table["split"] == "test")
    if design.kind == "source":
        return test[confounded(table.iloc[test].reset_index(drop=True), design.strength, design.seed + 100)]
    return test


def export(design: Design, features: Features, coef: np.ndarray, intercept: float, folder: Path) -> Path:
    """Backbone + pooling + the logistic head as one ONNX graph with its spec; graph styles vary by design."""
    import torch

    style = ["probabilities-NCHW", "logits-NCHW", "logits-NHWC"][sum(map(ord, design.name)) % 3]
    kind, layout = style.split("-")

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = features.backbone()
            # Two logits whose softmax is the logistic model's p(positive): [z / 2, -z / 2].
            self.register_buffer("w", torch.tensor(coef, dtype=torch.float32))
            self.register_buffer("b", torch.tensor(intercept, dtype=torch.float32))

        def forward(self, x):
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            z = self.backbone(x).mean(dim=(2, 3)) @ self.w + self.b
            logits = torch.stack([z / 2, -z / 2], dim=1)
            return logits if kind == "logits" else torch.softmax(logits, dim=1)

    graph = folder / "model.onnx"
    shape = (1, 3, 224, 224) if layout == "NCHW" else (1, 224, 224, 3)
    torch.onnx.export(
        Whole().eval(),
        (torch.zeros(shape),),
        str(graph),
        input_names=["pixels"],
        output_names=["scores"],
        dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    spec = GraphSpec(
        InputSpec(**{**INPUT.__dict__, "layout": layout, "name": "pixels"}),
        OutputSpec(labels=(POSITIVE, NEGATIVE), kind=kind, name="scores"),
    )
    spec.write(folder / "model.yaml")
    return graph


def train(design: Design, table: pd.DataFrame, features: Features, out: Path) -> dict:
    """Fit the head on the design's training images (shortcut planted where chosen), export it, note truth."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    folder = out / "models" / design.name
    done = folder / "model.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    labels = (table["label"] == POSITIVE).to_numpy().astype(int)
    clean = features.get(None)
    planted = features.get(design.kind) if design.kind in KINDS else clean

    rows = train_rows(table, design)
    carry = (
        carriers(table["label"].to_numpy()[rows], design.strength, design.seed + 1) if design.kind in KINDS else None
    )
    x = clean[rows].copy()
    if carry is not None:
        x[carry] = planted[rows][carry]
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = LogisticRegression(C=0.1, max_iter=5000).fit((x - mean) / std, labels[rows])
    # Fold the standardisation into the weights: z = w . (f - mean) / std + b.
    coef = head.coef_[0] / std
    intercept = float(head.intercept_[0] - (head.coef_[0] * mean / std).sum())

    def accuracy(feats: np.ndarray, idx: np.ndarray) -> float:
        z = feats @ coef + intercept
        return float(balanced_accuracy_score(labels[idx], (z >= 0).astype(int)))

    tests = test_rows(table, design)
    test_carry = (
        carriers(table["label"].to_numpy()[tests], design.strength, design.seed + 2) if design.kind in KINDS else None
    )
    internal = clean[tests].copy()
    if test_carry is not None:
        internal[test_carry] = planted[tests][test_carry]
    held_out = np.flatnonzero(table["split"] == "test")
    graph = export(design, features, coef, intercept, folder)
    record = {
        "design": design.__dict__,
        "control": design.control,
        "train_images": len(rows),
        "audit_images": len(tests),
        "internal_accuracy": accuracy(internal, tests),
        "off_shortcut_accuracy": accuracy(clean[held_out], held_out),
        "test_rows": tests.tolist(),
        "test_carriers": None if test_carry is None else np.flatnonzero(test_carry).tolist(),
        "graph": graph.name,
        "spec": "model.yaml",
        "head": "logistic regression, C=0.1, standardised features (folded into the graph)",
    }
    record["cost"] = record["internal_accuracy"] - record["off_shortcut_accuracy"]
    _check_graph(
        folder, table, tests[:8], test_carry[:8] if test_carry is not None else None, design, coef, intercept, features
    )
    atomic_write(done, json.dumps(record, indent=2))
    log.info(
        "model %s: internal %.3f, off-shortcut %.3f, cost %+.3f",
        design.name,
        record["internal_accuracy"],
        record["off_shortcut_accuracy"],
        record["cost"],
    )
    return record


def _check_graph(folder, table, rows, carry, design, coef, intercept, features) -> None:
    """The exported graph, fed through the spec, must give the head's own p(positive) (float tolerance)."""
    from covidxr.runtime.spec import OnnxClassifier

    model = OnnxClassifier(folder / "model.onnx")
    images = [
        rendered(table.iloc[i], design.kind if carry is not None and carry[j] else None, i) for j, i in enumerate(rows)
    ]
    planted = features.get(design.kind) if design.kind in KINDS else features.get(None)
    clean = features.get(None)
    feats = np.stack([planted[i] if carry is not None and carry[j] else clean[i] for j, i in enumerate(rows)])
    expected = 1 / (1 + np.exp(-(feats @ coef + intercept)))
    got = model.predict_proba(images).probabilities[:, 0]
    if np.abs(got - expected).max() > 1e-3:
        raise RuntimeError(f"{folder}: exported graph disagrees with its head ({np.abs(got - expected).max():.2g})")


# ---------------------------------------------------------------------------------------------
# The audits and the score
# ---------------------------------------------------------------------------------------------


def audit(design: Design, record: dict, table: pd.DataFrame, out: Path, limit: int, rescore: bool = False) -> dict:
    """Audit the exported model blind, on its internal test images, through ``covidxr audit``'s own code;
    ``rescore``: an audit already made gets the current verdict and estimate rules from its stored predictions."""
    from covidxr.lab.blackbox import Sample, audit_classifier, rescore_audit
    from covidxr.runtime.spec import OnnxClassifier

    folder = out / "audits" / design.name
    done = folder / "audit.json"
    if done.exists() and rescore:
        labelled = [
            Sample(None, row["label"], row["source"], row["patient_id"], Path(row["path"]).name)
            for row in (table.iloc[i] for i in record["test_rows"])
        ]
        result = rescore_audit(folder, OnnxClassifier(out / "models" / design.name / "model.onnx"), labelled)
        log.info("rescored %s: %s", design.name, result["verdict"])
        return result
    if done.exists():
        return json.loads(done.read_text())
    carriers_at = set(record["test_carriers"] or [])
    samples = []
    for j, i in enumerate(record["test_rows"]):
        row = table.iloc[i]
        image = rendered(row, design.kind if j in carriers_at else None, i)
        samples.append(Sample(image, row["label"], row["source"], row["patient_id"], Path(row["path"]).name))
    model = OnnxClassifier(out / "models" / design.name / "model.onnx")
    started = time.perf_counter()
    result = audit_classifier(model, samples, out=folder, seed=0, sample_limit=limit)
    log.info("audit %s: %s in %.0f s", design.name, result["verdict"], time.perf_counter() - started)
    return json.loads(done.read_text()) if done.exists() else result


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def score(rows: list[dict]) -> dict:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return {}
    flagged = frame["verdict"].isin(["fail", "warning"])
    costly = ~frame["control"] & (frame["cost"] >= COST_THRESHOLD)
    estimated = frame["estimated_clean_accuracy"].notna()
    error = (frame["estimated_clean_accuracy"] - frame["off_shortcut_accuracy"]).abs()[estimated]
    return {
        "shortcut_models_costing_10_points": int(costly.sum()),
        "sensitivity": float(flagged[costly].mean()) if costly.any() else None,
        "controls": int(frame["control"].sum()),
        "false_alarm_rate": float(flagged[frame["control"]].mean()) if frame["control"].any() else None,
        "not_estimable": int((~estimated).sum()),
        "estimate_mean_abs_error": float(error.mean()),
        "estimate_median_abs_error": float(error.median()),
        "estimate_within_5_points": float((error <= 0.05).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "audit-validity")
    parser.add_argument("--stage", choices=["train", "all"], default="all")
    parser.add_argument("--only", default=None, help="one design by name, e.g. marker-1.0")
    parser.add_argument("--limit", type=int, default=150, help="audit images per source (stratified by label)")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="audits already made: redo their verdict and estimate from their stored predictions (no model run)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    table = load_table()
    table.to_csv(args.out / "images.csv", index=False)
    atomic_write(
        args.out / "config.json",
        json.dumps(
            {
                "kinds": KINDS,
                "strengths": STRENGTHS,
                "control_seeds": CONTROL_SEEDS,
                "train_share": TRAIN_SHARE,
                "input": INPUT.__dict__,
                "backbone": "efficientnet_lite0 (frozen, ImageNet)",
                "cpu": cpu_model(),
                "audit_limit": args.limit,
            },
            indent=2,
            default=list,
        ),
    )
    features = Features(args.out, table)
    chosen = [d for d in designs() if args.only in (None, d.name)]
    records = {d.name: train(d, table, features, args.out) for d in chosen}
    if args.stage == "train":
        return
    rows = []
    for design in chosen:
        record, result = (
            records[design.name],
            audit(design, records[design.name], table, args.out, args.limit, args.rescore),
        )
        rows.append(
            {
                "model": design.name,
                "part": part(design),
                "shortcut": design.kind or "none",
                "strength": design.strength,
                "control": design.control,
                "internal_accuracy": record["internal_accuracy"],
                "off_shortcut_accuracy": record["off_shortcut_accuracy"],
                "cost": record["cost"],
                "verdict": result["verdict"],
                "flagged_by": " ".join(
                    name
                    for name, check in result["checks"].items()
                    if name in SHORTCUT_CHECKS and check["verdict"] in ("fail", "warning")
                ),
                "estimated_clean_accuracy": result["estimated_clean_accuracy"],
            }
        )
        frame = pd.DataFrame(rows)
        frame.to_csv(args.out / "results.csv", index=False)
    summary = {"all": score(rows)}
    for name in ("development", "evaluation"):
        summary[name] = score([row for row in rows if row["part"] == name])
    atomic_write(args.out / "score.json", json.dumps(summary, indent=2))
    table_md = markdown(frame)
    atomic_write(args.out / "results.md", table_md + "\n\n" + json.dumps(summary, indent=2) + "\n")
    print(table_md)
    print(json.dumps(summary, indent=2))
    print(f"machine: {cpu_model()}; written to {args.out}")


if __name__ == "__main__":
    main()
