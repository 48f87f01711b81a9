"""Near-duplicates on real X-rays: a re-encoded, resized, cropped copy filed under another patient id."""

from __future__ import annotations

import shutil
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxr.lab.data import check_dataset, load_dataset, split_by_patient
from covidxr.lab.duplicates import (
    HASH_BITS,
    HASH_SIZE,
    NEAR_DUPLICATE_DISTANCE,
    HashCache,
    crossing_pairs,
    near_duplicate_pairs,
    patient_groups,
)
from covidxr.runtime.images import file_sha256, read_image

from .conftest import small_subset

# The closest pair of different patients in cxr3 (two Kermany children, 48 of 256 bits apart; 4 of 64 with
# imagehash's default 64-bit hash, closer than a re-encoded copy): they must not be taken for copies.
LOOKALIKE_CHILDREN = ("images/kermany_IM-0440-0001.jpg", "images/kermany_NORMAL2-IM-0888-0001.jpg")
COPY = "images/re-encoded-copy.jpg"
COPY_PATIENT = "ieee8023-copy"


def reencode(source: Path, target: Path) -> None:
    """What a journal or a second collection does to a radiograph: crop, resize, JPEG quality 60."""
    image = read_image(source)
    width, height = image.size
    image = image.crop((3, 4, width - 3, height - 2)).resize((int(width * 0.97), int(height * 0.97)))
    image.save(target, "JPEG", quality=60)


def make_dataset(root: Path, cxr3: Path, rows: pd.DataFrame) -> None:
    (root / "images").mkdir(parents=True)
    for name in rows["filename"]:
        if (cxr3 / name).is_file():
            shutil.copy(cxr3 / name, root / name)
    rows.to_csv(root / "metadata.csv", index=False)


@pytest.fixture(scope="module")
def dataset(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """~8 real images per class, the two look-alike children, and last a copy of the first image under another id."""
    root = tmp_path_factory.mktemp("near-duplicates")
    rows = pd.concat(
        [small_subset(cxr3_meta, per_class=8), cxr3_meta[cxr3_meta["filename"].isin(LOOKALIKE_CHILDREN)]],
        ignore_index=True,
    ).drop_duplicates("filename", ignore_index=True)
    original = rows.iloc[0]
    rows.loc[len(rows)] = {**original.to_dict(), "filename": COPY, "patient_id": COPY_PATIENT}
    make_dataset(root, cxr3, rows)
    reencode(cxr3 / original["filename"], root / COPY)
    return root, load_dataset(root).frame


def test_a_reencoded_copy_is_found_and_different_patients_are_not(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, frame = dataset
    copy = len(frame) - 1
    pairs = near_duplicate_pairs(frame, root)
    assert list(pairs[["a", "b"]].itertuples(index=False, name=None)) == [(0, copy)]
    expected = imagehash.phash(Image.open(root / frame["filename"][0]), HASH_SIZE, 1) - imagehash.phash(
        Image.open(root / COPY), HASH_SIZE, 1
    )
    assert pairs["distance"][0] == expected and 0 < expected <= NEAR_DUPLICATE_DISTANCE
    assert file_sha256(root / COPY) != file_sha256(root / frame["filename"][0])  # not an exact copy
    # The look-alike children are in the table and are not paired, even with twice the threshold's leeway.
    assert set(LOOKALIKE_CHILDREN) <= set(frame["filename"])
    assert len(near_duplicate_pairs(frame, root, max_distance=NEAR_DUPLICATE_DISTANCE + 6)) == 1


def test_check_reports_the_near_duplicate_naming_both_rows(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, frame = dataset
    original = frame.iloc[0]
    problems = [p for p in check_dataset(root) if p.kind == "near-duplicate"]
    assert len(problems) == 1
    assert problems[0].where == f"row {len(frame) + 1} ({COPY})"
    assert problems[0].message.startswith(f"looks like row 2 ({original['filename']}), distance ")
    assert problems[0].message.endswith(
        f"/{HASH_BITS}, under another patient id ({COPY_PATIENT} vs {original['patient_id']})"
    )
    assert check_dataset(root) == problems  # nothing else is wrong with this dataset


def test_check_leaves_out_one_patients_lookalikes_and_exact_copies(
    tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame
) -> None:
    rows = cxr3_meta.groupby("label").head(2).reset_index(drop=True)
    first = rows.iloc[0].to_dict()
    rows.loc[len(rows)] = {**first, "filename": "images/same-patient-copy.jpg"}
    rows.loc[len(rows)] = {**first, "filename": "images/exact-copy.jpg", "patient_id": "someone-else"}
    make_dataset(tmp_path, cxr3, rows)
    reencode(cxr3 / first["filename"], tmp_path / "images" / "same-patient-copy.jpg")
    shutil.copy(cxr3 / first["filename"], tmp_path / "images" / "exact-copy.jpg")
    frame = load_dataset(tmp_path).frame
    assert len(near_duplicate_pairs(frame, tmp_path)) == 3  # all three versions of the radiograph
    # The same patient's copy is normal; the exact copy is already a "duplicate", reported once only.
    assert [str(p) for p in check_dataset(tmp_path)] == [
        "duplicate: row 9 (images/exact-copy.jpg): identical image to row 2"
    ]


def test_patient_groups_unite_the_two_patient_ids(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, frame = dataset
    groups = patient_groups(frame, near_duplicate_pairs(frame, root))
    assert groups.index.equals(frame.index)
    assert groups.iloc[-1] == groups.iloc[0] == min(COPY_PATIENT, frame["patient_id"][0])
    others = frame.index[1:-1]
    assert groups[others].equals(frame["patient_id"][others].rename("group"))


def test_a_split_on_groups_keeps_near_duplicates_together(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, frame = dataset
    pairs = near_duplicate_pairs(frame, root)
    groups = patient_groups(frame, pairs)
    for seed in range(8):
        split = split_by_patient(frame, seed, groups=groups)
        assert split.iloc[0] == split.iloc[-1], seed
        assert (frame.assign(split=split).groupby("patient_id")["split"].nunique() == 1).all()
        assert crossing_pairs(pairs, split).empty
    separating = next(
        (seed for seed in range(30) if (s := split_by_patient(frame, seed)).iloc[0] != s.iloc[-1]),
        None,
    )
    assert separating is not None, "a split by patient id alone should separate the copy within 30 seeds"
    split = split_by_patient(frame, separating)
    crossing = crossing_pairs(pairs, split)
    assert crossing[["a", "b"]].values.tolist() == [[0, len(frame) - 1]]
    assert {crossing["split_a"][0], crossing["split_b"][0]} == {split.iloc[0], split.iloc[-1]}


def test_groups_without_links_leave_the_split_as_it_was(cxr3: Path) -> None:
    frame = load_dataset(cxr3).frame
    unlinked = patient_groups(frame, pd.DataFrame({"a": [], "b": [], "distance": []}, dtype=np.int64))
    for seed in (0, 1):
        assert split_by_patient(frame, seed, groups=unlinked).equals(split_by_patient(frame, seed))


def test_the_copies_upstream_filed_under_two_patient_ids_in_cxr3(cxr3: Path) -> None:
    """The data README says such copies were left in cxr3: these eight are all the hash finds across patients."""
    frame = load_dataset(cxr3).frame
    pairs = near_duplicate_pairs(frame, cxr3)
    patient, name = frame["patient_id"].to_numpy(), frame["filename"].str.removeprefix("images/ieee8023_").to_numpy()
    across = pairs[patient[pairs["a"]] != patient[pairs["b"]]]
    ards = "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-"
    assert sorted((name[a], name[b]) for a, b in zip(across["a"], across["b"], strict=True)) == sorted(
        [
            ("353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpg", "case_72_RX-TORACE1.jpg"),
            ("A7E260CE-8A00-4C5F-A7F5-27336527A981.jpg", "case_76_1-3.jpg"),
            ("AR-1.jpg", "extubation-1.jpg"),
            ("AR-2.jpg", "extubation-1.jpg"),
            (f"{ards}admission.jpg", "16660_2_1.jpg"),
            (f"{ards}day-1.jpg", "16660_3_1.jpg"),
            (f"{ards}day-2.jpg", "16660_4_1.jpg"),
            (f"{ards}day-3.jpg", "16660_5_1.jpg"),
        ]
    )
    split = split_by_patient(frame, 0, groups=patient_groups(frame, pairs))
    assert crossing_pairs(pairs, split).empty


def test_hashes_are_cached_by_content_and_a_damaged_entry_is_recomputed(
    dataset: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, frame = dataset
    first = near_duplicate_pairs(frame, root, cache_dir=tmp_path)
    cache = HashCache(tmp_path)
    entries = [cache.path(file_sha256(root / name)) for name in frame["filename"]]
    assert all(entry.is_file() for entry in entries)
    # A planted entry is believed: the second run reads the cache instead of decoding the image again.
    copy_entry = entries[-1]
    copy_entry.write_text("00" * (HASH_BITS // 8))
    assert near_duplicate_pairs(frame, root, cache_dir=tmp_path).empty
    # A damaged entry is recomputed from the image and rewritten.
    copy_entry.write_text("not a hash")
    assert near_duplicate_pairs(frame, root, cache_dir=tmp_path).equals(first)
    assert cache.get(file_sha256(root / COPY)) is not None


def test_unreadable_and_missing_files_are_skipped(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame) -> None:
    rows = cxr3_meta.head(2).reset_index(drop=True)
    rows.loc[2] = {**rows.iloc[0].to_dict(), "filename": "images/empty.jpg", "patient_id": "p-empty"}
    rows.loc[3] = {**rows.iloc[0].to_dict(), "filename": "images/gone.jpg", "patient_id": "p-gone"}
    rows.loc[4] = {**rows.iloc[0].to_dict(), "filename": "images/copy.jpg", "patient_id": "p-copy"}
    make_dataset(tmp_path, cxr3, rows)
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    shutil.copy(cxr3 / rows["filename"][0], tmp_path / "images" / "copy.jpg")
    pairs = near_duplicate_pairs(rows, tmp_path, cache_dir=tmp_path / "cache")
    assert pairs.values.tolist() == [[0, 4, 0]]  # an exact copy is distance 0; rows 2 and 3 are left out


def test_hash_of_a_decoded_image_matches_hash_of_its_file(tmp_path: Path, cxr3: Path, cxr3_meta: pd.DataFrame):
    path = cxr3 / cxr3_meta["filename"][0]
    from_file = HashCache(tmp_path / "a").hash_file(path)
    from_image = HashCache(tmp_path / "b").hash_of(file_sha256(path), read_image(path))
    assert from_file is not None and from_file.shape == (HASH_BITS,)
    assert np.array_equal(from_file, from_image)
    assert HashCache(tmp_path / "a").hash_file(tmp_path / "nowhere.png") is None
