"""Issue 17's designs on real images: the within-site test the source cannot pass, the staged decision
and source-balanced sampling, run through ``reproduce --design deconfounded`` once and shared here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data as skimage_data
from sklearn.metrics import roc_auc_score

from covidxr.lab.generalisation import WITHIN_SITE_PREDICTIONS
from covidxr.lab.labels import LABELS
from covidxr.lab.loop import decision_teachers, group_balanced_weights, staged_loss
from covidxr.lab.models import StagedHead, make_head, run_model
from covidxr.lab.report import shortfall, targets_met
from covidxr.lab.reproduce import reproduce_designs
from covidxr.lab.train import train
from covidxr.runtime.api import load_model
from covidxr.runtime.batches import prepare
from covidxr.runtime.config import TrainConfig
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.lungs import lung_segmenter
from covidxr.runtime.preprocess import (
    LUNG_CROP_MARGIN,
    LUNG_MASK_FILL,
    LUNG_MASK_GROW,
    LUNG_MASK_SOFTEN,
    LUNGS_REASON,
    ImagePipeline,
)

from .conftest import ADULT_CONTROLS, SHARED, assert_same_answer, linked_dataset, small_subset
from .test_serve import Server, post

OTHER = SHARED / "data" / "ieee8023-other"
SITES = ("radiopaedia.org", "eurorad.org")
VARIANTS = ("zscore-without-other", "staged-balanced", "finetune-staged-lungs")


def _site_rows(meta: pd.DataFrame, per_site: int) -> pd.DataFrame:
    """Whole patients from the two sites that published COVID-19 and other pneumonia, ``per_site`` images each."""
    rows = []
    for site in SITES:
        at_site = meta[meta["site"] == site]
        taken = []
        for patient in at_site["patient_id"].drop_duplicates():
            taken.append(at_site[at_site["patient_id"] == patient])
            if sum(map(len, taken)) >= per_site:
                break
        rows.append(pd.concat(taken))
    return pd.concat(rows)


@pytest.fixture(scope="module")
def datasets(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """cxr3 (Kermany children + ieee8023 COVID-19 from two sites and a few others), NIH adults, and
    ieee8023's own other pneumonia from the same two sites: real images linked to ../shared."""
    for folder in (ADULT_CONTROLS, OTHER):
        if not (folder / "metadata.csv").is_file():
            pytest.fail(f"real data not found at {folder}; the tests need ../shared/data")
    root = tmp_path_factory.mktemp("validity-data")
    read = lambda folder: pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)  # noqa: E731
    children = small_subset(cxr3_meta[cxr3_meta["source"] == "kermany"], per_class=14)
    covid = cxr3_meta[cxr3_meta["label"] == "COVID-19"]
    covid_rows = pd.concat([_site_rows(covid, 12), small_subset(covid[~covid["site"].isin(SITES)], per_class=10)])
    return [
        linked_dataset(root / "cxr3", cxr3, pd.concat([children, covid_rows])),
        linked_dataset(root / "adult-controls", ADULT_CONTROLS, small_subset(read(ADULT_CONTROLS), per_class=12)),
        linked_dataset(root / "ieee8023-other", OTHER, _site_rows(read(OTHER), 12)),
    ]


@pytest.fixture(scope="module")
def designs(datasets: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("validity") / "designs"
    reproduce_designs(datasets, out, config=TrainConfig(epochs=3, image_size=224), variants=VARIANTS, progress=False)
    return out


def _loso(designs: Path, run: str) -> dict:
    return json.loads((designs / run / "loso.json").read_text())


@pytest.mark.parametrize("run", ["paper", *(f"deconfounded-{v}" for v in VARIANTS)])
def test_within_site_auc_holds_each_site_out_and_matches_its_predictions(designs: Path, run: str) -> None:
    loso = _loso(designs, run)
    sites = {s["site"]: s for s in loso["within_site"]["sites"]}
    assert set(sites) == set(SITES)
    predictions = pd.read_csv(designs / run / WITHIN_SITE_PREDICTIONS)
    for site, record in sites.items():
        assert record["status"] == "evaluated"
        assert record["n_covid"] >= 10 and record["n_other"] >= 10
        rows = predictions[predictions["unit"] == site]
        assert len(rows) == record["n_covid"] + record["n_other"]
        assert set(rows["label"]) == {"COVID-19", "PNEUMONIA"}
        assert record["auc"] == pytest.approx(roc_auc_score(rows["label"] == "COVID-19", rows["p_COVID-19"]))
    pooled = roc_auc_score(predictions["label"] == "COVID-19", predictions["p_COVID-19"])
    assert loso["within_site_auc"] == pytest.approx(pooled)
    low, high = loso["within_site_auc_ci95"]
    assert 0 <= low <= loso["within_site_auc"] <= high <= 1


def test_a_design_without_same_site_controls_still_takes_them_from_the_held_back_folder(designs: Path) -> None:
    info = json.loads((designs / "deconfounded-zscore-without-other" / "run.json").read_text())
    assert [Path(d).name for d in info["datasets"]] == ["cxr3", "adult-controls"]
    loso = _loso(designs, "deconfounded-zscore-without-other")
    assert "ieee8023-other (external)" in {u["unit"] for u in loso["units"]}
    predictions = pd.read_csv(designs / "deconfounded-zscore-without-other" / WITHIN_SITE_PREDICTIONS)
    others = predictions[predictions["label"] == "PNEUMONIA"]
    assert len(others) and not others["in_run_data"].any()  # other pneumonia came from the held-back folder


def test_designs_table_and_report_lead_with_the_within_site_auc(designs: Path) -> None:
    report = (designs / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[0].startswith("## Within-site AUC first"), headings
    first_table = report[report.index(headings[0]) : report.index(headings[1])]
    for row in json.loads((designs / "designs.json").read_text()):
        assert f"| {row['run']} |" in first_table
    rows = json.loads((designs / "designs.json").read_text())
    for row in rows:
        assert list(row).index("within_site_auc") < list(row).index("internal_accuracy")
        assert row["within_site_auc"] == _loso(designs, row["run"])["within_site_auc"]


def test_staged_run_outputs_the_product_of_its_two_decisions(designs: Path, datasets: list[Path]) -> None:
    model = load_model(designs / "deconfounded-staged-balanced", engine="torch")
    head = run_model(model.run).head
    assert isinstance(head, StagedHead)
    features = torch.randn(5, run_model(model.run).spec.num_features)
    with torch.no_grad():
        abnormal, covid = torch.sigmoid(head.decisions.eval()(features)).unbind(1)
        probabilities = torch.softmax(head(features), 1)
    assert torch.allclose(probabilities[:, LABELS.index("COVID-19")], abnormal * covid, atol=1e-6)
    assert torch.allclose(probabilities[:, LABELS.index("NORMAL")], 1 - abnormal, atol=1e-6)
    [result] = model.predict([next((datasets[0] / "images").iterdir())])
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)


def test_each_staged_decision_learns_only_where_a_source_holds_both_of_its_sides() -> None:
    covid, normal, pneumonia = (LABELS.index(x) for x in ("COVID-19", "NORMAL", "PNEUMONIA"))
    # domain 0: ieee8023 (COVID-19 and other pneumonia); 1: Kermany (normal and pneumonia); 2: only COVID-19.
    targets = torch.tensor([covid, pneumonia, normal, pneumonia, covid])
    domains = torch.tensor([0, 0, 1, 1, 2])
    teaches = decision_teachers(targets, domains, 3)
    assert teaches.tolist() == [[False, True], [True, False], [False, False]]
    head = make_head(8, 3, hidden=0, dropout=0.0, decision="staged")
    features = torch.randn(5, 8)
    staged_loss(head(features), targets, teaches[domains]).backward()
    weight = head.decisions[1].weight.grad  # rows: abnormal, COVID-19-given-abnormal

    def only(item: int) -> torch.Tensor:
        span = slice(item, item + 1)
        return staged_loss(head(features[span]), targets[span], teaches[domains[span]])

    for item, (teaches_abnormal, teaches_covid) in enumerate([(0, 1), (0, 1), (1, 0), (1, 0), (0, 0)]):
        head.zero_grad()
        only(item).backward()
        grad = head.decisions[1].weight.grad
        # A decision a source does not teach gets no gradient from it (up to float rounding).
        assert bool(grad[0].abs().sum() > 1e-4) == bool(teaches_abnormal), item
        assert bool(grad[1].abs().sum() > 1e-4) == bool(teaches_covid), item
    assert weight[0].abs().sum() > 0 and weight[1].abs().sum() > 0


def test_group_balanced_sampling_draws_every_source_and_class_equally() -> None:
    targets = torch.tensor([0] * 30 + [1] * 5 + [1] * 60 + [2] * 5)
    domains = torch.tensor([0] * 35 + [1] * 65)
    weights = group_balanced_weights(targets, domains)
    groups = domains * 3 + targets
    totals = {int(g): float(weights[groups == g].sum()) for g in groups.unique()}
    assert len(totals) == 4 and max(totals.values()) == pytest.approx(min(totals.values()))


def test_staged_decision_refuses_an_adversary_and_an_unknown_decision() -> None:
    with pytest.raises(CovidxrError, match="staged"):
        TrainConfig(decision="staged", adversarial_weight=0.5)
    with pytest.raises(CovidxrError, match="decision"):
        TrainConfig(decision="cascade")


def test_fine_tuning_on_the_cached_front_learns_exactly_what_fine_tuning_on_images_does(
    small_dataset: Path, tmp_path: Path
) -> None:
    """Same seed, same batches, dropout off: the losses of every epoch agree, so caching the frozen front
    changes the cost of fine-tuning, not its result."""
    common = {"epochs": 2, "image_size": 160, "dropout": 0.0, "unfreeze_blocks": 2, "batch_size": 8}
    histories = {}
    for name, extra in (("front", {"cache_front": True}), ("images", {})):
        run = train(small_dataset, tmp_path / name, TrainConfig(**common, **extra), progress=False)
        histories[name] = pd.read_csv(run / "history.csv")[["train_loss", "val_loss"]].to_numpy()
    assert histories["front"] == pytest.approx(histories["images"], abs=1e-4)
    info = json.loads((tmp_path / "front" / "run.json").read_text())
    assert info["fine_tuned_backbone"] and "front" in info["feature_cache"]


def test_the_fine_tuned_design_is_held_out_like_the_frozen_ones(designs: Path) -> None:
    run = designs / "deconfounded-finetune-staged-lungs"
    info = json.loads((run / "run.json").read_text())
    assert info["fine_tuned_backbone"] and (run / info["fine_tuned_backbone"]["file"]).is_file()
    loso = _loso(designs, run.name)
    assert any(u["status"] == "evaluated" and u["source"] == "nih" for u in loso["units"])


# ---------------------------------------------------------------------------------------------
# Lung-only input and the lung check
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xray(cxr3: Path, cxr3_meta: pd.DataFrame) -> Image.Image:
    return read_image(cxr3 / cxr3_meta[cxr3_meta["label"] == "COVID-19"]["filename"].iloc[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grey photograph: no colour gives it away (a colour photo is refused before the lungs are looked for)."""
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).convert("L").save(path)
    return path


def test_lung_crop_keeps_the_lungs_box_and_a_margin_only(xray: Image.Image) -> None:
    grey = np.asarray(xray.convert("L"))
    found = lung_segmenter().segment(grey)
    assert found.reason is None
    left, top, right, bottom = found.box
    cropped = np.asarray(ImagePipeline(lungs="crop").process(xray))
    height, width = cropped.shape
    assert (right - left) <= width <= (right - left) * (1 + 2 * LUNG_CROP_MARGIN) + 2
    assert (bottom - top) <= height <= (bottom - top) * (1 + 2 * LUNG_CROP_MARGIN) + 2
    assert width < grey.shape[1] or height < grey.shape[0]


def test_lung_mask_blanks_what_lies_well_outside_the_lungs(xray: Image.Image) -> None:
    grey = np.asarray(xray.convert("L"))
    found = lung_segmenter().segment(grey)
    masked = np.asarray(ImagePipeline(lungs="mask").process(xray))
    assert masked.shape == grey.shape
    # Beyond the grown edge and three blur radii nothing of the image is left.
    reach = round((LUNG_MASK_GROW + 3 * LUNG_MASK_SOFTEN) * max(grey.shape))
    grown = Image.fromarray(found.mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * reach + 1))
    far = np.asarray(grown) == 0
    assert far.mean() > 0.05 and (masked[far] == LUNG_MASK_FILL).mean() > 0.99
    inside = found.mask
    assert np.abs(masked[inside].astype(int) - grey[inside]).mean() < 10  # the lungs themselves stay


def test_an_image_without_lungs_is_never_cropped_and_says_why(photo: Path) -> None:
    image = read_image(photo)
    processed = ImagePipeline(lungs="crop").process(image)
    assert processed.size == image.size and processed.info[LUNGS_REASON]
    _, reason = prepare(run_model(load_model().run).input_transform, image)
    assert reason.startswith("lung check: ")


def test_the_bundled_model_gives_no_answer_where_no_lungs_are_found(photo: Path, xray: Image.Image) -> None:
    model = load_model()
    answer = model.predict(read_image(photo))
    assert answer["label"] is None and answer["out_of_distribution"] is True
    assert "lung check: " in answer["no_answer_reason"]
    assert model.predict(xray)["label"] is not None


def test_a_lungs_run_trains_predicts_and_serves_end_to_end(designs: Path, datasets: list[Path], photo: Path) -> None:
    run = designs / "deconfounded-finetune-staged-lungs"
    assert TrainConfig.load(run / "config.yaml").lungs == "crop"
    model = load_model(run)
    images = sorted((datasets[1] / "images").iterdir())[:3]
    answers = model.predict(images)
    assert all(a["label"] in LABELS for a in answers), answers
    served = Server(designs.parent / "serve-lungs", "--model", str(run))
    try:
        direct = model.predict(images[0])
        answer = post(served, "/api/predict", images[0].read_bytes(), images[0].name).json()
        assert_same_answer(answer, direct)  # the service's engine call against the Python API's
        refused = post(served, "/api/predict", photo.read_bytes(), photo.name).json()
        assert refused["label"] is None and "lung check: " in refused["no_answer_reason"]
    finally:
        served.stop()


def test_shortfall_adds_how_far_each_validity_target_is_missed() -> None:
    met = {
        "within_site_auc": 0.9,
        "loso_auc": 0.8,
        "nih_called_covid": 0.1,
        "kermany_called_covid": 0.0,
        "covid_sensitivity": 0.9,
        "lung_share": 0.7,
    }
    assert shortfall(met) == 0 and targets_met(met) == 6
    assert shortfall(met | {"within_site_auc": 0.7, "nih_called_covid": 0.5}) == pytest.approx(0.1 + 0.3)
    assert targets_met(met | {"within_site_auc": 0.7, "nih_called_covid": 0.5}) == 4
    unmeasured = {name: None for name in met}
    assert shortfall(unmeasured) == pytest.approx(0.8 + 0.75 + 0.8 + 0.8 + 0.8 + 0.6) and targets_met(unmeasured) == 0
