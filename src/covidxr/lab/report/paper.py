"""The paper being reproduced (Soares & Soares, 2020): its accuracies, its figures, and ours beside them."""

from __future__ import annotations

from pathlib import Path

from covidxr.runtime.document import Block, Figure, Table, Text
from covidxr.runtime.formatting import ci_range, counted, pct, with_ci
from covidxr.runtime.records import Metrics

# Soares & Soares (2020), test set of 75 images split at random from 375.
PAPER_RESULTS = {
    "vgg16": {"paper_model": "VGG-16", "paper_accuracy": 0.973, "paper_n": 75},
    "xception": {"paper_model": "Xception", "paper_accuracy": 0.959, "paper_n": 75},
    "resnet50": {"paper_model": "ResNet", "paper_accuracy": 0.946, "paper_n": 75},
}
# (id suffix, file, caption), in the order of the paper's Figures 1-4, as evaluate writes them.
FIGURES = (
    ("curves", "curves.png", "Training curves: accuracy and loss per epoch, training and validation"),
    ("confusion", "confusion_matrix.png", "Confusion matrix of the evaluated images, rows = truth"),
    ("predictions", "predictions.png", 'Evaluated images captioned "Predict = X / Correct = Y"'),
    ("gradcam", "gradcam.png", "Grad-CAM maps per class"),
)


def paper_blocks(metrics: Metrics, external: bool = False) -> list[Block]:
    """The paper's accuracies beside this evaluation's, with its intervals and how each test set was drawn (for
    an evaluation on another dataset, why there is no such table)."""
    if external:
        return [Text(EXTERNAL_AGAINST_PAPER)]
    model = metrics.model
    rows = [
        [
            f"{row['paper_model']} (paper)",
            pct(row["paper_accuracy"]),
            "not reported",
            "not reported",
            str(row["paper_n"]),
            "by image",
        ]
        for row in PAPER_RESULTS.values()
    ]
    same = PAPER_RESULTS[model]["paper_model"] if model in PAPER_RESULTS else None
    name = f"{model} (covidxr; the paper's {same} backbone)" if same else f"{model} (covidxr; not in the paper)"
    data = Path(str(metrics.data)).name
    drawn = f"every image of {data}" if metrics.split == "all" else f"by patient ({metrics.split} split)"
    wilson = ci_range(metrics.accuracy_ci95) or "n/a"
    boot = ci_range(metrics.accuracy_bootstrap_ci95) or "not computed"
    rows.append([name, pct(metrics.accuracy), wilson, boot, str(metrics.n), drawn])
    return [
        Table(["model", "test accuracy", "95% CI (Wilson)", "95% CI (patient bootstrap)", "n test", "test set"], rows),
        Text(
            "The paper's test images were drawn at random from 375 images, so one patient could be in training and "
            "test; covidxr splits by patient, on different data. The numbers are not directly comparable."
        ),
    ]


def figure_blocks(folder: Path, base: Path, model: str, prefix: str = "") -> list[Block]:
    """Each of the paper's figures that exists, and a sentence for each that does not."""
    blocks: list[Block] = []
    for number, (key, name, caption) in enumerate(FIGURES, start=1):
        path = folder / name
        if path.is_file():
            link = path.relative_to(base).as_posix()
            text = f"{caption} (the paper's Fig. {number})."
            blocks.append(Figure(f"{prefix}fig-{key}", path, link, f"{model}: {caption}", text))
        else:
            blocks.append(Text(f"Missing figure: {name}, the paper's Fig. {number}, is not in {folder}."))
    return blocks


EXTERNAL_AGAINST_PAPER = (
    "Against the paper: nothing to compare. The paper reports accuracy only on a random split of its own data "
    "(its best, VGG-16, 97.3% on 75 images); these images come from a dataset the model never saw, a different "
    "question with a different class mix."
)


def paper_line(metrics: Metrics, external: bool = False) -> str:
    """The paper's figure for this backbone against ours (or the paper's best, for a backbone it did not use);
    for an evaluation on another dataset, why there is nothing in the paper to set against it."""
    if external:
        return EXTERNAL_AGAINST_PAPER
    model = str(metrics.model)
    ours = (
        f"{with_ci(metrics.accuracy, metrics.accuracy_ci95, label='95% CI ')} on "
        f"{counted(int(metrics.n or 0), 'image')} ({metrics.split} split, by patient)"
    )
    paper = PAPER_RESULTS.get(model)
    if paper:
        return (
            f"Accuracy against the paper: the paper's {paper['paper_model']} {pct(paper['paper_accuracy'])} on "
            f"{paper['paper_n']} images split at random; covidxr's {model} {ours}. Different data and split: "
            "not directly comparable."
        )
    return (
        f"Accuracy: covidxr's {model} {ours}. The paper did not use this backbone (its best, VGG-16, reported "
        "97.3% on 75 images split at random)."
    )
