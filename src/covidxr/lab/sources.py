"""Building a dataset folder from the public raw layouts (ieee8023 covid-chestxray-dataset, Kermany)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import IMAGE_SUFFIXES, file_sha256, read_image

__all__ = ["build_dataset", "kermany_patient", "read_ieee8023", "read_kermany"]


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
