"""The shortcut audit on real X-rays with the real EfficientNet-Lite0 weights: planted shortcuts must be found.

The planted-shortcut datasets are real NORMAL X-rays of distinct patients labelled COVID-19 or NORMAL
at random, so the only thing that can separate the labels is what a test plants.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from covidxr.lab.audit import (
    COMMON_SIZE,
    common_format,
    lungs_hidden_check,
    masked_input,
    run_audit,
    source_probe_check,
)
from covidxr.lab.data import load_dataset
from covidxr.lab.explain import region_masks
from covidxr.lab.models import run_model, to_input_tensor
from covidxr.lab.train import train
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.images import read_image
from covidxr.runtime.runs import load_run

from .conftest import linked_dataset, small_subset

# Half the patients train, 40% are audited: ~29 test images, where +0.25 over chance is not noise.
FAST = TrainConfig(model="efficientnet_lite0", epochs=60, image_size=224, split_fractions=(0.5, 0.1, 0.4))
VERDICTS = {"pass", "warning", "fail", "not applicable"}


def burn_in_label(image: Image.Image) -> Image.Image:
    """A white box with black "PORTABLE" text across y 1-9%, x 1-40%: inside the border strip, off the lungs.

    A burnt-in text label is the kind of token DeGrave et al. found COVID-19 models relying on. (A flat
    white square of 8% x 8% moves the pooled features too little for a head trained on 36 images to learn.)
    """
    grey = np.array(image.convert("L"))
    height, width = grey.shape
    grey[int(0.01 * height) : int(0.09 * height), int(0.01 * width) : int(0.40 * width)] = 255
    marked = Image.fromarray(grey)
    font = ImageFont.load_default(size=int(0.06 * height))
    ImageDraw.Draw(marked).text((int(0.02 * width), int(0.015 * height)), "PORTABLE", fill=0, font=font)
    return marked


def write_dataset(root: Path, rows: pd.DataFrame, cxr3: Path, mark: bool) -> Path:
    """Save every image as grey PNG (COVID-19-labelled ones with the burnt-in label when ``mark``)."""
    (root / "images").mkdir(parents=True)
    table = []
    for i, row in enumerate(rows.itertuples()):
        image = read_image(cxr3 / row.filename).convert("L")
        if mark and row.label == "COVID-19":
            image = burn_in_label(image)
        name = f"images/{i:03d}.png"
        image.save(root / name)
        table.append({"filename": name, "label": row.label, "patient_id": row.patient_id, "source": row.source})
    pd.DataFrame(table).to_csv(root / "metadata.csv", index=False)
    return root


def train_and_audit(data: Path, out: Path) -> dict:
    """Train the fast model on ``data`` into ``out``, audit it, and check the audit is well formed."""
    run = train(data, out, FAST, progress=False)
    audit = run_audit(run)
    assert_well_formed(audit, run)
    return audit


def assert_well_formed(audit: dict, folder: Path) -> None:
    """audit.json parses to what run_audit returned, and every check has a verdict and a summary."""
    assert json.loads((folder / "audit.json").read_text()) == audit
    assert set(audit["checks"]) == {"lungs_hidden", "source_probe", "resolution_format"}
    for check in audit["checks"].values():
        assert check["verdict"] in VERDICTS
        assert isinstance(check["summary"], str) and check["summary"]
    assert audit["verdict"] in VERDICTS and audit["summary"].startswith("Shortcut audit of efficientnet_lite0")
    assert "lung field = central box" in audit["geometry"]["description"]


@pytest.fixture(scope="module")
def random_labels(cxr3_meta: pd.DataFrame) -> pd.DataFrame:
    """72 NORMAL X-rays of 72 patients, half labelled COVID-19 at random."""
    normal = cxr3_meta[cxr3_meta["label"] == "NORMAL"].drop_duplicates("patient_id")
    rows = normal.sample(n=72, random_state=0).reset_index(drop=True)
    labels = np.array(["COVID-19", "NORMAL"] * 36)
    np.random.default_rng(0).shuffle(labels)
    return rows.assign(label=labels)


@pytest.fixture(scope="module")
def marker_audit(cxr3: Path, random_labels: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = write_dataset(tmp_path_factory.mktemp("marker") / "data", random_labels, cxr3, mark=True)
    return train_and_audit(root, root.parent / "run")


@pytest.fixture(scope="module")
def plain_audit(cxr3: Path, random_labels: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = write_dataset(tmp_path_factory.mktemp("plain") / "data", random_labels, cxr3, mark=False)
    return train_and_audit(root, root.parent / "run")


@pytest.fixture(scope="module")
def confounded_dataset(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 real images per class of cxr3, linked: COVID-19 all from ieee8023, the others all from kermany.

    (With ~20 per class the source probe's balanced accuracy swings from 0.87 to 0.98 with the fold seed.)
    """
    return linked_dataset(tmp_path_factory.mktemp("confounded"), cxr3, small_subset(cxr3_meta, per_class=40))


@pytest.fixture(scope="module")
def confounded_run(confounded_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = replace(FAST, epochs=10, split_fractions=(0.8, 0.1, 0.1))
    return train(confounded_dataset, tmp_path_factory.mktemp("confounded-run") / "run", config, progress=False)


def test_a_burnt_in_label_outside_the_lungs_fails(marker_audit: dict) -> None:
    lungs = marker_audit["checks"]["lungs_hidden"]
    assert lungs["accuracy"] >= 0.85, "the head should have learnt the planted label"
    assert lungs["accuracy_lungs_hidden"] >= lungs["chance"] + 0.25, lungs["summary"]
    # Only the border kept, the label is still seen, but the black 80% of the input pulls many
    # predictions to one class: the accuracy stays above chance, less far than with the lungs hidden.
    assert lungs["accuracy_border_only"] > lungs["chance"], lungs["summary"]
    assert lungs["verdict"] == "fail"
    assert marker_audit["verdict"] == "fail"
    assert marker_audit["images"].startswith("test split of ")
    assert sum(lungs["predicted_counts"]["border_only"].values()) == lungs["n"] == marker_audit["n_images"]


def test_the_same_images_without_the_label_do_not_fail(plain_audit: dict) -> None:
    lungs = plain_audit["checks"]["lungs_hidden"]
    assert lungs["verdict"] != "fail", lungs["summary"]
    assert abs(lungs["accuracy"] - lungs["chance"]) < 0.25  # random labels: nothing real to learn
    assert max(lungs["accuracy_lungs_hidden"], lungs["accuracy_border_only"]) < lungs["chance"] + 0.25
    assert plain_audit["checks"]["source_probe"]["verdict"] == "not applicable"  # one source only


def test_source_equal_to_label_is_a_confounding_fail(confounded_run: Path) -> None:
    audit = run_audit(confounded_run)
    assert_well_formed(audit, confounded_run)
    probe = audit["checks"]["source_probe"]
    assert probe["verdict"] == "fail", probe["summary"]
    assert probe["every_class_from_one_source"] and probe["confounded"]
    assert probe["balanced_accuracy"] >= 0.95
    assert probe["within_class"] == {}  # no class has two sources
    assert probe["n"] == len(load_dataset(audit["data"]).frame) and probe["folds"] == 5
    assert audit["verdict"] == "fail"
    # The resolution/format check runs on the real JPEGs and reports sane figures.
    fmt = audit["checks"]["resolution_format"]
    assert 0 <= fmt["changed_share"] <= 1 and fmt["n"] == audit["n_images"] > 0
    assert fmt["accuracy"] == audit["checks"]["lungs_hidden"]["accuracy"]


def link_dataset(root: Path, frame: pd.DataFrame, images: Path) -> Path:
    """A dataset folder with ``frame`` as metadata.csv and its files linked from ``images``."""
    (root / "images").mkdir(parents=True)
    for name in frame["filename"]:
        (root / name).symlink_to(images / name)
    frame.to_csv(root / "metadata.csv", index=False)
    return root


def test_sources_mixed_within_every_class_are_no_fail(
    confounded_run: Path, confounded_dataset: Path, tmp_path: Path
) -> None:
    """The same real images, each class split alternately over two made-up hospitals."""
    frame = pd.read_csv(confounded_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    frame["source"] = ["hospital-a" if i % 2 else "hospital-b" for i in frame.groupby("label").cumcount()]
    dataset = load_dataset(link_dataset(tmp_path, frame, confounded_dataset))
    probe = source_probe_check(run_model(load_run(confounded_run)), dataset, seed=0)
    assert probe["verdict"] != "fail", probe["summary"]
    assert not probe["confounded"] and not probe["every_class_from_one_source"]
    assert probe["balanced_accuracy"] <= 0.70, "made-up sources must be near chance (0.5)"
    assert set(probe["within_class"]) == {"COVID-19", "NORMAL", "PNEUMONIA"}


def test_audit_of_another_dataset_writes_where_asked(
    confounded_run: Path, confounded_dataset: Path, tmp_path: Path
) -> None:
    frame = pd.read_csv(confounded_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    data = link_dataset(tmp_path / "data", frame.groupby("label").head(2), confounded_dataset)
    run_audit_file = confounded_run / "audit.json"
    before = run_audit_file.read_text() if run_audit_file.exists() else None
    audit = run_audit(confounded_run, data=data, out=tmp_path / "audit")
    assert_well_formed(audit, tmp_path / "audit")
    assert (run_audit_file.read_text() if run_audit_file.exists() else None) == before
    assert audit["n_images"] == 6 and audit["images"] == f"all images of {data}"
    probe = audit["checks"]["source_probe"]
    assert probe["verdict"] == "not applicable" and "ieee8023 2" in probe["summary"]  # fewer than 5 per source


def test_tiny_png_against_full_size_jpeg(confounded_run: Path, confounded_dataset: Path, tmp_path: Path) -> None:
    """Real NORMAL X-rays, half labelled COVID-19 at random and saved at 64 px as PNG, the rest the original JPEGs."""
    frame = pd.read_csv(confounded_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    rows = frame[frame["label"] == "NORMAL"].reset_index(drop=True)
    labels = np.array(["COVID-19", "NORMAL"] * (len(rows) // 2 + 1))[: len(rows)]
    np.random.default_rng(1).shuffle(labels)
    rows["label"] = labels
    data = link_dataset(tmp_path / "data", rows[rows["label"] == "NORMAL"], confounded_dataset)
    tiny = rows[rows["label"] == "COVID-19"].assign(filename=lambda t: t["filename"].str.replace(".jpg", ".png"))
    for original, name in zip(rows.loc[rows["label"] == "COVID-19", "filename"], tiny["filename"], strict=True):
        read_image(confounded_dataset / original).convert("L").resize((64, 64)).save(data / name)
    pd.concat([rows[rows["label"] == "NORMAL"], tiny]).to_csv(data / "metadata.csv", index=False)
    audit = train_and_audit(data, tmp_path / "run")
    fmt = audit["checks"]["resolution_format"]
    assert fmt["n"] == audit["n_images"] and 0 <= fmt["changed_share"] <= 1
    # Observed: the model separates the classes by resolution (unchanged accuracy 100%), yet the common
    # format changes no prediction, because upscaling a 64 px image to 512 cannot bring back the detail
    # it lost: this check catches reliance on encoding and size differences, not on lost detail. The
    # blur is everywhere, the border included, so lungs_hidden is what flags this shortcut.
    assert fmt["accuracy"] >= 0.9 and fmt["changed_share"] <= 0.1 and fmt["verdict"] == "pass", fmt["summary"]
    assert audit["checks"]["lungs_hidden"]["verdict"] == "fail", audit["checks"]["lungs_hidden"]["summary"]


def test_masks_follow_the_explain_geometry(confounded_run: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    """Masked pixels are black before normalisation, the others are the ordinary input, on explain's regions."""
    model = run_model(load_run(confounded_run))
    image = read_image(cxr3 / cxr3_meta["filename"].iloc[0])
    masks = region_masks(model.image_size)
    plain = to_input_tensor(image, model.image_size, model.preprocessing)
    black = to_input_tensor(Image.new("RGB", image.size), model.image_size, model.preprocessing)
    for keep in (~masks["lung_field"], masks["border"]):
        masked = masked_input(image, keep, model)
        keep_t = torch.from_numpy(keep)
        assert torch.equal(masked[:, keep_t], plain[:, keep_t])
        assert torch.equal(masked[:, ~keep_t], black[:, ~keep_t])
    reencoded = np.asarray(common_format(image))
    assert reencoded.shape == (COMMON_SIZE, COMMON_SIZE, 3)
    assert (reencoded[..., 0] == reencoded[..., 2]).all()


def test_a_margin_on_a_handful_of_images_is_only_a_warning() -> None:
    """4 of 6 right against a chance of 1/3 could be luck (p = 0.10); 40 of 60 could not."""
    labels = ["COVID-19", "NORMAL", "PNEUMONIA"]
    for repeats, verdict in ((1, "warning"), (10, "fail")):
        truth = np.tile([0, 0, 1, 1, 2, 2], repeats)
        hidden = np.tile([0, 0, 1, 1, 0, 0], repeats)  # two thirds right, everything else one class
        predictions = {"unchanged": truth, "lungs_hidden": hidden, "border_only": np.zeros_like(truth)}
        check = lungs_hidden_check(truth, predictions, labels)
        assert check["excess_over_chance"] == pytest.approx(1 / 3)
        assert check["verdict"] == verdict, check["summary"]


def test_a_colour_tint_on_one_class_fails_the_format_check(confounded_dataset: Path, tmp_path: Path) -> None:
    """Real NORMAL X-rays, half labelled COVID-19 at random and saved with a sepia tint (as journal figures
    often are): the only signal is the file's colour, which the common 8-bit grey format removes."""
    frame = pd.read_csv(confounded_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    rows = frame[frame["label"] == "NORMAL"].reset_index(drop=True)
    labels = np.array(["COVID-19", "NORMAL"] * (len(rows) // 2 + 1))[: len(rows)]
    np.random.default_rng(2).shuffle(labels)
    rows["label"] = labels
    data = link_dataset(tmp_path / "data", rows[rows["label"] == "NORMAL"], confounded_dataset)
    tinted = rows[rows["label"] == "COVID-19"].assign(filename=lambda t: t["filename"].str.replace(".jpg", ".png"))
    for original, name in zip(rows.loc[rows["label"] == "COVID-19", "filename"], tinted["filename"], strict=True):
        grey = np.asarray(read_image(confounded_dataset / original).convert("L"), dtype=np.float32)
        sepia = np.stack([grey, grey * 0.8, grey * 0.55], axis=2).astype(np.uint8)
        Image.fromarray(sepia).save(data / name)
    pd.concat([rows[rows["label"] == "NORMAL"], tinted]).to_csv(data / "metadata.csv", index=False)
    audit = train_and_audit(data, tmp_path / "run")
    fmt = audit["checks"]["resolution_format"]
    assert fmt["accuracy"] >= 0.9, fmt["summary"]  # the tint is easy to learn
    assert fmt["verdict"] == "fail" and fmt["changed_share"] >= 0.2, fmt["summary"]
    assert audit["verdict"] == "fail"
