"""Datasets: reading images and metadata, checking them, building them from raw sources, splitting.

A dataset is a folder with ``metadata.csv`` (``filename, label, patient_id`` and optionally
``source``) plus the images, or a class-per-folder tree (``COVID-19/``, ``NORMAL/``,
``PNEUMONIA/``) whose patient id is the file stem.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from covidxr import dicom
from covidxr.errors import CovidxrError, ImageTooLarge

LABELS: tuple[str, ...] = ("COVID-19", "NORMAL", "PNEUMONIA")
_LABEL_ALIASES = {
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "normal": "NORMAL",
    "pneumonia": "PNEUMONIA",
    "other infection": "PNEUMONIA",
    "infection": "PNEUMONIA",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
REQUIRED_COLUMNS = ("filename", "label", "patient_id")
# Larger than any radiograph (a 43x43 cm detector at 0.1 mm is ~18 Mpx); bigger files are refused.
MAX_IMAGE_PIXELS = 60_000_000
MIN_IMAGE_SIDE = 32  # a 1x1 or thumbnail "image" carries no anatomy to classify
SPLITS = ("train", "val", "test")


def canonical_label(value: object) -> str | None:
    """The canonical class name for a label spelling, or None when it is not one of ours."""
    text = str(value).strip()
    if text in LABELS:
        return text
    return _LABEL_ALIASES.get(text.lower())


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file into 8-bit RGB (see ``_decode``); refuse images too small to be a radiograph."""
    path = Path(path)
    problem = unreadable_reason(path)
    if problem:
        raise CovidxrError(f"{path}: {problem}")
    return _checked_size(_decode(path, path.suffix.lower()), path)


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, in words a user can act on (permission denied, a
    broken symlink, a symlink loop, a folder, an empty file), or None when it can be opened.

    Checked before decoding, so a file the system refuses is never reported as a corrupt image."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            os.listdir(path)
            return "is a folder, not an image file"
        if not stat.S_ISREG(mode):
            return "not a regular file (a device, pipe or socket)"
        with open(path, "rb") as handle:
            if not handle.read(1):
                return "empty file"
    except FileNotFoundError:
        return "broken symlink (its target does not exist)" if path.is_symlink() else "file not found"
    except PermissionError:
        return "permission denied" + (" (a folder that cannot be listed)" if path.is_dir() else "")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link points back at itself)"
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def decode_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """Decode an image held in memory (an upload) exactly as ``read_image`` decodes a file, without
    writing it anywhere; ``name`` labels the error messages."""
    if not data:
        raise CovidxrError(f"{name}: empty file")
    buffer = io.BytesIO(data)
    buffer.name = name
    return _checked_size(_decode(buffer, Path(name).suffix.lower()), name)


def check_dimensions(width: int, height: int, name: str | Path) -> None:
    """Refuse an image too small to hold anatomy, or over the pixel limit (``ImageTooLarge``): the
    same limits for files, uploads and in-memory images."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{name}: image is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise CovidxrError(
            f"{name}: {width}x{height} pixels is too small to be a chest radiograph "
            f"(at least {MIN_IMAGE_SIDE} pixels a side)"
        )


def _checked_size(image: Image.Image, path: str | Path) -> Image.Image:
    check_dimensions(image.width, image.height, path)
    return image


def _decode(source: dicom.Source, suffix: str) -> Image.Image:
    """Decode a file (or an in-memory buffer) into 8-bit RGB, whatever its mode (16-bit, RGBA, palette,
    grey) or DICOM.

    High-bit-depth images are scaled by their own range, so 12-bit data in a 16-bit container
    keeps its contrast. DICOM is recognised by its content (``DICM`` after the preamble), or by a
    ``.dcm``/``.dicom`` name (``suffix``) when no other image format matches, and decoded by
    ``covidxr.dicom`` (modality and VOI transforms, MONOCHROME1 inverted). Raises CovidxrError naming
    the file for anything that is not a readable, complete image (ImageTooLarge over the pixel limit).
    """
    path = dicom.source_label(source)
    if dicom.has_dicom_magic(source):
        return dicom.read_dicom(source, max_pixels=MAX_IMAGE_PIXELS)
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageTooLarge(
                    f"{path}: image is {img.width}x{img.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}"
                )
            if getattr(img, "n_frames", 1) > 1:
                what = "pages" if img.format == "TIFF" else "frames"
                raise CovidxrError(f"{path}: has {img.n_frames} {what}; give one image per file")
            img.load()
            return _to_rgb8(_upright(img))
    except CovidxrError:
        raise
    except UnidentifiedImageError as exc:
        if suffix not in dicom.DICOM_SUFFIXES:
            raise CovidxrError(f"{path}: not a readable image ({type(exc).__name__})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{path}: image is over the limit of {MAX_IMAGE_PIXELS:,} pixels (refused before decoding: "
            "a decompression bomb or not a radiograph)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CovidxrError(f"{path}: corrupt or truncated image ({exc})") from None
    # A .dcm/.dicom file that no image format recognised: a DICOM without preamble, or not an image at all.
    if not isinstance(source, str | Path):
        source.seek(0)
    return dicom.read_dicom(source, max_pixels=MAX_IMAGE_PIXELS)


def _upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated or flipped as its EXIF orientation says (a phone
    photo of a film, a scanner's rotated JPEG), so the model never sees it sideways."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the usual background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def file_sha256(path: str | Path) -> str:
    """Content hash of a file: the identity of an image for de-duplication and the feature cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    from covidxr.duplicates import HashCache  # here, as covidxr.duplicates imports this module

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
    from covidxr.duplicates import HASH_BITS, pairs_within  # here, as covidxr.duplicates imports this module

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
# Building datasets from the public raw layouts
# ---------------------------------------------------------------------------------------------

IEEE8023_VIEWS = {"PA", "AP", "AP Supine"}


def read_ieee8023(root: str | Path) -> pd.DataFrame:
    """COVID-19 frontal X-rays of the ieee8023 covid-chestxray-dataset (``metadata.csv`` + ``images/``)."""
    root = Path(root)
    table = root / "metadata.csv"
    if not table.is_file():
        raise CovidxrError(f"{root}: no metadata.csv (expected the ieee8023 covid-chestxray-dataset layout)")
    meta = pd.read_csv(table, dtype=str, keep_default_na=False)
    missing = [c for c in ("patientid", "finding", "modality", "view", "filename") if c not in meta.columns]
    if missing:
        raise CovidxrError(f"{table}: missing ieee8023 column(s) {', '.join(missing)}")
    keep = (
        meta["finding"].str.contains("COVID-19", case=False)
        & (meta["modality"].str.strip() == "X-ray")
        & meta["view"].str.strip().isin(IEEE8023_VIEWS)
    )
    meta = meta[keep]
    folder = meta["folder"] if "folder" in meta.columns else pd.Series("images", index=meta.index)
    rows = pd.DataFrame(
        {
            "path": [str(root / f / n) for f, n in zip(folder, meta["filename"], strict=True)],
            "label": "COVID-19",
            "finding": meta["finding"].values,
            "patient_id": ["ieee8023-" + p for p in meta["patientid"]],
            "source": "ieee8023",
            "view": meta["view"].str.strip().values,
        }
    )
    if "age" in meta.columns:
        rows["age"] = meta["age"].values
    if "sex" in meta.columns:
        rows["sex"] = meta["sex"].values
    return rows


_KERMANY_PATIENT = re.compile(r"^(person\d+|(?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def kermany_patient(stem: str) -> str:
    """Patient of a Kermany file: ``person12_virus_44`` → ``person12``, ``IM-0115-0001`` → ``IM-0115``."""
    match = _KERMANY_PATIENT.match(stem)
    return match.group(1) if match else stem


def read_kermany(root: str | Path) -> pd.DataFrame:
    """NORMAL and PNEUMONIA images of Kermany's ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}`` tree."""
    root = Path(root)
    if (root / "chest_xray").is_dir():
        root = root / "chest_xray"
    rows = []
    for part in ("train", "test", "val"):
        for label in ("NORMAL", "PNEUMONIA"):
            folder = root / part / label
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                finding = "no finding"
                if label == "PNEUMONIA":
                    finding = "viral pneumonia" if "virus" in file.stem.lower() else "bacterial pneumonia"
                rows.append(
                    {
                        "path": str(file),
                        "label": label,
                        "finding": finding,
                        "patient_id": f"kermany-{label.lower()}-{kermany_patient(file.stem)}",
                        "source": "kermany",
                    }
                )
    if not rows:
        raise CovidxrError(f"{root}: no {{train,test,val}}/{{NORMAL,PNEUMONIA}} images (expected the Kermany layout)")
    return pd.DataFrame(rows)


def build_dataset(sources: pd.DataFrame, out: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Copy raw images into ``out/images`` and write ``out/metadata.csv``, dropping identical images.

    Returns the metadata and one message per skipped file (unreadable or duplicate).
    """
    out = Path(out)
    if (out / "metadata.csv").exists():
        raise CovidxrError(f"{out}: already holds a dataset; choose an empty --out folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept, skipped, seen = [], [], {}
    for row in sources.to_dict("records"):
        src = Path(row.pop("path"))
        try:
            read_image(src)
        except CovidxrError as exc:
            skipped.append(f"skipped {exc}")
            continue
        digest = file_sha256(src)
        if digest in seen:
            skipped.append(f"skipped {src}: identical to {seen[digest]}")
            continue
        seen[digest] = src
        name = (
            f"images/{row['source']}_{src.parent.name}_{src.name}"
            if row["source"] == "kermany"
            else (f"images/{row['source']}_{src.name}")
        )
        shutil.copy2(src, out / name)
        kept.append({"filename": name, **row, "orig_filename": src.name})
    if not kept:
        raise CovidxrError("no readable images found in the given sources")
    frame = pd.DataFrame(kept)
    frame.to_csv(out / "metadata.csv", index=False)
    return frame, skipped


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
    ``covidxr.duplicates.patient_groups``) replaces the patient as the unit that is never divided,
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
