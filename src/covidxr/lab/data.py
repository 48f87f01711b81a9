"""Datasets: reading metadata, checking datasets, splitting by patient (decoding is ``covidxr.runtime.images``,
the raw public layouts ``covidxr.lab.sources``).

A dataset is a folder with ``metadata.csv`` (``filename, label, patient_id`` and optionally
``source``) plus the images, or a class-per-folder tree (``COVID-19/``, ``NORMAL/``,
``PNEUMONIA/``) whose patient id is the file stem.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidxr.lab.duplicates import HASH_BITS, HashCache, pairs_within
from covidxr.lab.labels import LABELS, canonical_label
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256, read_image
from covidxr.runtime.runs import Run

__all__ = ["Dataset", "Problem", "check_dataset", "load_dataset", "load_datasets", "run_dataset", "split_by_patient"]

REQUIRED_COLUMNS = ("filename", "label", "patient_id")


# ---------------------------------------------------------------------------------------------
# Reading datasets
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Rows of ``filename, label, patient_id, source`` (plus whatever else the metadata has)."""

    root: Path
    frame: pd.DataFrame
    label: str | None = None  # a display name for merged datasets; default: the folder's name

    @property
    def name(self) -> str:
        return self.label or self.root.name

    def paths(self) -> list[Path]:
        return [self.root / f for f in self.frame["filename"]]

    def labels_present(self) -> list[str]:
        return [label for label in LABELS if label in set(self.frame["label"])]

    def subset(self, mask: Iterable[bool]) -> Dataset:
        return Dataset(self.root, self.frame[list(mask)].reset_index(drop=True), self.label)


def load_dataset(root: str | Path, require_classes: int = 1) -> Dataset:
    """Read a dataset folder; refuse unknown labels, missing columns and too few classes.

    Missing or unreadable image files are left for ``check_dataset`` and the feature extractor,
    which name them; here only the table is validated.
    """
    root = Path(root)
    if not root.is_dir():
        raise CovidxrError(f"{root}: dataset folder not found")
    metadata = root / "metadata.csv"
    frame = _read_metadata(metadata) if metadata.is_file() else _scan_class_folders(root)
    problems = _table_problems(frame, root)
    if problems:
        where, message = problems[0]
        first = f"{root / 'metadata.csv'} {where}: {message}"
        more = f" (and {len(problems) - 1} more problems; run `covidxr data check {root}`)" if len(problems) > 1 else ""
        raise CovidxrError(f"{first}{more}")
    frame["label"] = [canonical_label(v) for v in frame["label"]]
    if frame["label"].nunique() < require_classes:
        raise CovidxrError(
            f"{root}: has only the class(es) {sorted(frame['label'].unique())}; "
            f"training needs at least {require_classes} classes"
        )
    return Dataset(root, frame.reset_index(drop=True))


def load_datasets(roots: Sequence[str | Path], require_classes: int = 1) -> Dataset:
    """Several dataset folders as one: labels mapped by name, ``source`` kept, patient ids kept distinct.

    One folder is returned as ``load_dataset`` reads it. For several, file names become relative to
    the folders' common parent and every patient id is prefixed with its folder's name, so two
    hospitals' "patient 1" never merge into one patient.
    """
    roots = [Path(root) for root in roots]
    if not roots:
        raise CovidxrError("no dataset given; pass at least one --data folder")
    if len(roots) == 1:
        return load_dataset(roots[0], require_classes)
    names = [root.resolve().name for root in roots]
    if len(set(names)) < len(names):
        raise CovidxrError(f"dataset folders must have distinct names to keep patients apart: {', '.join(names)}")
    common = Path(os.path.commonpath([root.resolve() for root in roots]))
    frames = []
    for root, name in zip(roots, names, strict=True):
        frame = load_dataset(root).frame.copy()
        frame["filename"] = [(root.resolve() / f).relative_to(common).as_posix() for f in frame["filename"]]
        frame["patient_id"] = name + "/" + frame["patient_id"].astype(str)
        frame["dataset"] = name
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True).fillna("")
    if merged["label"].nunique() < require_classes:
        raise CovidxrError(f"{', '.join(map(str, roots))}: together have only {sorted(merged['label'].unique())}")
    return Dataset(common, merged, label="+".join(names))


def _read_metadata(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CovidxrError(f"{path}: not a readable CSV table ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise CovidxrError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise CovidxrError(f"{path}: has no rows")
    if "source" not in frame.columns:
        frame["source"] = path.parent.name
    frame["source"] = frame["source"].replace("", path.parent.name)
    return frame


def _scan_class_folders(root: Path) -> pd.DataFrame:
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = canonical_label(folder.name)
        if label is None:
            continue
        for file in sorted(folder.rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                rows.append(
                    {
                        "filename": file.relative_to(root).as_posix(),
                        "label": label,
                        "patient_id": f"{root.name}-{file.stem}",
                        "source": root.name,
                    }
                )
    if not rows:
        raise CovidxrError(f"{root}: no metadata.csv and no class folders ({', '.join(LABELS)}) with files")
    return pd.DataFrame(rows)


def _table_problems(frame: pd.DataFrame, root: Path) -> list[tuple[str, str]]:
    """``(where, message)`` for row problems visible from the table alone; rows numbered as in an editor."""
    problems = []
    for index, row in frame.iterrows():
        where = f"row {index + 2} ({row['filename'] or 'no filename'})"
        if not str(row["filename"]).strip():
            problems.append((where, "empty filename"))
        elif Path(row["filename"]).is_absolute() or ".." in Path(row["filename"]).parts:
            problems.append((where, "filename must be relative to the dataset folder"))
        if canonical_label(row["label"]) is None:
            problems.append((where, f"unknown label {row['label']!r} (expected one of {', '.join(LABELS)})"))
        if not str(row["patient_id"]).strip():
            problems.append((where, "empty patient_id"))
    return problems


# ---------------------------------------------------------------------------------------------
# Checking datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str  # table | missing | unreadable | duplicate | near-duplicate | label | classes
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.message}"


def check_dataset(root: str | Path) -> list[Problem]:
    """Every problem of a dataset in one pass: bad rows, missing, unreadable, duplicate, mislabelled.

    Also near-duplicates (same radiograph re-encoded, by perceptual hash) under two patient ids, which a
    patient-disjoint split would put on both sides; several look-alike views of one patient are normal.
    """

    root = Path(root)
    if not root.is_dir():
        return [Problem("missing", str(root), "dataset folder not found")]
    metadata = root / "metadata.csv"
    try:
        frame = _read_metadata(metadata) if metadata.is_file() else _scan_class_folders(root)
    except CovidxrError as exc:
        return [Problem("table", str(root), str(exc))]
    problems = [Problem("table", where, message) for where, message in _table_problems(frame, root)]
    seen_names: dict[str, int] = {}
    seen_hashes: dict[str, tuple[int, str]] = {}
    hash_cache = HashCache()
    hashed_rows: list[int] = []
    perceptual_hashes: list[np.ndarray] = []
    for index, row in frame.iterrows():
        row_no = index + 2
        where = f"row {row_no} ({row['filename']})"
        name = str(row["filename"])
        if name in seen_names:
            problems.append(Problem("duplicate", where, f"same filename as row {seen_names[name]}"))
            continue
        seen_names[name] = row_no
        label = canonical_label(row["label"])
        folder_label = next((canonical_label(p) for p in Path(name).parts[:-1] if canonical_label(p)), None)
        if label and folder_label and folder_label != label:
            problems.append(Problem("label", where, f"labelled {label} but stored under a {folder_label} folder"))
        path = root / name
        if not path.is_file():
            problems.append(Problem("missing", where, f"{path} does not exist"))
            continue
        try:
            image = read_image(path)
        except CovidxrError as exc:
            problems.append(Problem("unreadable", where, str(exc).removeprefix(f"{path}: ")))
            continue
        digest = file_sha256(path)
        if digest in seen_hashes:
            other_row, other_label = seen_hashes[digest]
            if label and other_label and other_label != label:
                problems.append(
                    Problem("label", where, f"identical image to row {other_row} but labelled {label} vs {other_label}")
                )
            else:
                problems.append(Problem("duplicate", where, f"identical image to row {other_row}"))
        else:
            seen_hashes[digest] = (row_no, label or "")
            # Identical files are reported above; only the first of them is compared by looks.
            hashed_rows.append(index)
            perceptual_hashes.append(hash_cache.hash_of(digest, image))
    problems += _near_duplicate_problems(frame, hashed_rows, perceptual_hashes)
    classes = {canonical_label(v) for v in frame["label"]} - {None}
    if len(classes) < 2:
        problems.append(Problem("classes", str(root), f"only {len(classes)} class ({', '.join(sorted(classes))})"))
    return problems


def _near_duplicate_problems(frame: pd.DataFrame, rows: list[int], hashes: list[np.ndarray]) -> list[Problem]:
    """One problem per near-duplicate pair across patient ids, named at the later row."""

    pairs = pairs_within(np.array(hashes, dtype=bool).reshape(len(rows), HASH_BITS))
    problems = []
    for a, b, distance in pairs[["a", "b", "distance"]].itertuples(index=False):
        first, second = frame.loc[rows[a]], frame.loc[rows[b]]
        if first["patient_id"] == second["patient_id"]:
            continue
        problems.append(
            Problem(
                "near-duplicate",
                f"row {rows[b] + 2} ({second['filename']})",
                f"looks like row {rows[a] + 2} ({first['filename']}), distance {distance}/{HASH_BITS}, "
                f"under another patient id ({second['patient_id']} vs {first['patient_id']})",
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def split_by_patient(
    frame: pd.DataFrame,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    groups: pd.Series | None = None,
) -> pd.Series:
    """Assign every row to train/val/test so that no patient is in two splits.

    Patients are stratified by source and by their most frequent label, and shuffled with ``seed``;
    within each stratum the first 80% of patients go to train, the next 10% to validation, the rest
    to test, so every source is represented in every split. ``groups`` (one id per row, e.g.
    ``covidxr.lab.duplicates.patient_groups``) replaces the patient as the unit that is never divided,
    so near-duplicates filed under two patient ids stay together.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise CovidxrError(f"split fractions {fractions} must be non-negative and sum to 1")
    if groups is None:
        groups = frame["patient_id"]
    elif not groups.index.equals(frame.index):
        raise CovidxrError("split groups must have one entry per row of the table, with the same index")
    rng = np.random.default_rng(seed)
    source = frame["source"] if "source" in frame.columns else pd.Series("", index=frame.index)
    stratum = source.astype(str) + "|" + frame["label"].astype(str)
    group_stratum = stratum.groupby(groups).agg(lambda s: s.value_counts().index[0])
    # Sorted by label first, then source, so a single-source dataset splits as it always has.
    order = sorted(group_stratum.unique(), key=lambda value: (value.split("|")[1], value.split("|")[0]))
    assignment: dict[str, str] = {}
    for value in order:
        units = sorted(group_stratum.index[group_stratum == value])
        rng.shuffle(units)
        n = len(units)
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        if n >= 3 and fractions[1] > 0 and fractions[2] > 0:
            # Keep at least one patient (group) in validation and test for every stratum.
            n_val = max(n_val, 1)
            n_train = min(n_train, n - n_val - 1)
        for i, unit in enumerate(units):
            assignment[unit] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return groups.map(assignment).rename("split")


def run_dataset(run: Run) -> Dataset:
    """Every image a run was split from (one dataset, or several merged), with its ``split``."""
    names = [Path(d).name for d in run.info.datasets]
    return Dataset(Path(run.info.data), run.splits(), "+".join(names))
