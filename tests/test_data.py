"""Reading, checking, building and splitting datasets, on real X-rays and on broken files made here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.lab.data import check_dataset, load_dataset, split_by_patient
from covidxr.lab.sources import kermany_patient, read_ieee8023, read_kermany
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image

from .conftest import raw_sources


def test_reads_the_shared_metadata_dataset(cxr3: Path) -> None:
    dataset = load_dataset(cxr3)
    assert len(dataset.frame) == 1190
    assert dataset.labels_present() == ["COVID-19", "NORMAL", "PNEUMONIA"]
    assert set(dataset.frame["source"]) == {"ieee8023", "kermany"}
    image = read_image(dataset.paths()[0])
    assert image.mode == "RGB" and min(image.size) > 32


def test_reads_a_class_per_folder_tree(tmp_path: Path, cxr3_meta: pd.DataFrame, cxr3: Path) -> None:
    for label, group in cxr3_meta.groupby("label"):
        (tmp_path / label).mkdir()
        for name in group["filename"][:3]:
            shutil.copy(cxr3 / name, tmp_path / label / Path(name).name)
    (tmp_path / "notes").mkdir()  # a folder that is not a class is ignored
    dataset = load_dataset(tmp_path)
    assert sorted(dataset.frame["label"].value_counts().to_dict().items()) == [
        ("COVID-19", 3),
        ("NORMAL", 3),
        ("PNEUMONIA", 3),
    ]
    first = dataset.frame.iloc[0]
    assert first["patient_id"] == f"{tmp_path.name}-{Path(first['filename']).stem}"


def test_sixteen_bit_and_rgba_pngs_become_8bit_rgb(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    grey = np.asarray(Image.open(cxr3 / cxr3_meta["filename"][0]).convert("L"), dtype=np.uint16)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(grey * 16).save(sixteen)  # 12-bit range in a 16-bit container
    rgba = tmp_path / "rgba.png"
    Image.fromarray(grey.astype(np.uint8)).convert("RGBA").save(rgba)
    from_sixteen = np.asarray(read_image(sixteen))
    from_rgba = np.asarray(read_image(rgba))
    assert from_sixteen.dtype == np.uint8 and from_sixteen.shape[2] == 3
    assert from_sixteen.max() == 255  # scaled by its own range, not divided by 65535
    expected = (grey - grey.min()) / (grey.max() - grey.min()) * 255
    assert np.abs(from_sixteen[..., 0] - expected).max() <= 1
    assert np.array_equal(from_rgba[..., 0], grey.astype(np.uint8))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a readable image"),
    ],
)
def test_bad_files_give_one_clear_message(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(CovidxrError, match=message) as info:
        read_image(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_truncated_image_is_refused(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    data = (cxr3 / cxr3_meta["filename"][0]).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CovidxrError, match="truncated"):
        read_image(truncated)


def _broken_dataset(root: Path, cxr3: Path, meta: pd.DataFrame) -> pd.DataFrame:
    """A copy of a few real rows plus one of every kind of problem ``data check`` must find."""
    (root / "images").mkdir(parents=True)
    rows = meta.groupby("label").head(2).copy()
    for name in rows["filename"]:
        shutil.copy(cxr3 / name, root / name)
    good = rows.iloc[0].to_dict()
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = (cxr3 / good["filename"]).read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[:2000])
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "copy.jpg").write_bytes(data)  # identical image, same label
    (root / "images" / "relabelled.jpg").write_bytes(data)  # identical image, other label
    extra = [
        {**good, "filename": "images/corrupt.png"},
        {**good, "filename": "images/truncated.jpg"},
        {**good, "filename": "images/empty.jpg"},
        {**good, "filename": "images/missing.jpg"},
        {**good, "filename": "images/copy.jpg"},
        {**good, "filename": "images/relabelled.jpg", "label": "NORMAL"},
        {**good, "filename": rows.iloc[1]["filename"], "label": "TUBERCULOSIS"},
    ]
    frame = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
    frame.to_csv(root / "metadata.csv", index=False)
    return frame


def test_check_finds_every_problem_in_one_pass(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    _broken_dataset(tmp_path, cxr3, cxr3_meta)
    problems = [str(p) for p in check_dataset(tmp_path)]
    text = "\n".join(problems)
    assert "unreadable: row 8 (images/corrupt.png)" in text
    assert "unreadable: row 9 (images/truncated.jpg)" in text
    assert "unreadable: row 10 (images/empty.jpg): empty file" in text
    assert "missing: row 11 (images/missing.jpg)" in text
    assert "duplicate: row 12 (images/copy.jpg): identical image to row 2" in text
    assert "label: row 13 (images/relabelled.jpg): identical image to row 2 but labelled NORMAL vs COVID-19" in text
    assert "unknown label 'TUBERCULOSIS'" in text
    assert "duplicate: row 14" in text  # same filename listed twice
    assert len(problems) == 8


def test_check_flags_a_label_that_contradicts_its_class_folder(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame):
    rows = cxr3_meta.groupby("label").head(1).copy()
    for name, label in zip(rows["filename"], rows["label"], strict=True):
        (tmp_path / label).mkdir()
        shutil.copy(cxr3 / name, tmp_path / label / Path(name).name)
    rows["filename"] = [f"{label}/{Path(n).name}" for n, label in zip(rows["filename"], rows["label"], strict=True)]
    rows.iloc[0, rows.columns.get_loc("label")] = "NORMAL"
    rows.to_csv(tmp_path / "metadata.csv", index=False)
    problems = [str(p) for p in check_dataset(tmp_path)]
    assert problems == [
        f"label: row 2 ({rows.iloc[0]['filename']}): labelled NORMAL but stored under a COVID-19 folder"
    ]


def test_check_reports_a_single_class_dataset(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    rows = cxr3_meta[cxr3_meta["label"] == "NORMAL"].head(3)
    (tmp_path / "images").mkdir()
    for name in rows["filename"]:
        shutil.copy(cxr3 / name, tmp_path / name)
    rows.to_csv(tmp_path / "metadata.csv", index=False)
    assert [p.kind for p in check_dataset(tmp_path)] == ["classes"]
    with pytest.raises(CovidxrError, match="only the class"):
        load_dataset(tmp_path, require_classes=2)


def test_load_refuses_unknown_labels_naming_the_row(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    _broken_dataset(tmp_path, cxr3, cxr3_meta)
    with pytest.raises(CovidxrError, match=r"row 14 .*unknown label 'TUBERCULOSIS'"):
        load_dataset(tmp_path)


def test_load_refuses_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("filename,label\na.png,NORMAL\n")
    with pytest.raises(CovidxrError, match="missing column.*patient_id"):
        load_dataset(tmp_path)


def test_split_is_patient_disjoint_stratified_and_seeded(cxr3: Path) -> None:
    frame = load_dataset(cxr3).frame
    split = split_by_patient(frame, seed=0)
    assert split.equals(split_by_patient(frame, seed=0))
    assert not split.equals(split_by_patient(frame, seed=1))
    assert (frame.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
    for label, group in frame.assign(split=split).groupby("label"):
        shares = group.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
        assert abs(shares["train"] - 0.8) < 0.02, label
        assert abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02, label


def test_kermany_patient_ids() -> None:
    assert kermany_patient("person1_bacteria_1") == "person1"
    assert kermany_patient("person1049_virus_1751") == "person1049"
    assert kermany_patient("IM-0115-0001") == "IM-0115"
    assert kermany_patient("NORMAL2-IM-1427-0001") == "NORMAL2-IM-1427"


def test_raw_layouts_are_read_as_the_paper_used_them(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    ieee, kermany = raw_sources(tmp_path, cxr3, cxr3_meta)
    covid = read_ieee8023(ieee)
    assert len(covid) == 4 and set(covid["view"]) == {"PA", "AP", "AP Supine"}
    assert list(covid["patient_id"]) == ["ieee8023-100", "ieee8023-100", "ieee8023-101", "ieee8023-101"]
    kids = read_kermany(kermany.parent)
    assert sorted(kids["patient_id"]) == sorted(
        [
            "kermany-normal-IM-0115",
            "kermany-normal-IM-0116",
            "kermany-normal-NORMAL2-IM-1427",
            "kermany-pneumonia-person1",
            "kermany-pneumonia-person1",
        ]
    )
    assert set(kids.loc[kids["label"] == "PNEUMONIA", "finding"]) == {"bacterial pneumonia", "viral pneumonia"}


def test_build_writes_a_deduplicated_dataset(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    from covidxr.lab.sources import build_dataset

    ieee, kermany = raw_sources(tmp_path, cxr3, cxr3_meta)
    (kermany / "train" / "NORMAL" / "IM-0200-0001.jpeg").write_bytes(b"broken")
    sources = pd.concat([read_ieee8023(ieee), read_kermany(kermany)], ignore_index=True)
    frame, skipped = build_dataset(sources, tmp_path / "built")
    assert len(frame) == 8  # 4 COVID-19 + 4 Kermany; the duplicate and the broken file dropped
    assert any("identical to" in s for s in skipped) and any("IM-0200-0001" in s for s in skipped)
    assert check_dataset(tmp_path / "built") == []
    assert load_dataset(tmp_path / "built").labels_present() == ["COVID-19", "NORMAL", "PNEUMONIA"]
    with pytest.raises(CovidxrError, match="already holds a dataset"):
        build_dataset(sources, tmp_path / "built")
