"""Near-duplicate radiographs: perceptual hashes, the pairs they link, and splits that keep them together.

Public chest X-ray collections republish one radiograph re-encoded, resized or cropped, sometimes under
another patient id (ieee8023 has several). A patient-disjoint split can then still put the radiograph in
train and its copy in test, and test accuracy rewards memory. SHA-256 cannot see such copies; a perceptual
hash (``imagehash.phash``) can.

The hash has 256 bits, not imagehash's default 64: on ``cxr3`` the 64-bit hash puts radiographs of two
different Kermany children 2 bits apart, as close as a re-encoded copy, so no threshold separates them.
The 256-bit hash (every DCT coefficient of a 16x16 thumbnail) keeps radiographs of different people on
``cxr3`` and ``adult-controls`` at least 48 bits apart, while copies stay below ``NEAR_DUPLICATE_DISTANCE``
= 40: the radiographs ieee8023 published under two patient ids are at most 32 apart (one carries an added
"day 1" caption), and re-encodings (JPEG quality 60, resized by 10%, cropped by 4 px a side) at most 30
in 99% of cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from covidxr.lab.cache import default_cache_dir
from covidxr.lab.labels import SPLITS
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256, read_image
from covidxr.runtime.storage import atomic_write

__all__ = [
    "HASH_BITS",
    "HASH_SIZE",
    "HashCache",
    "NEAR_DUPLICATE_DISTANCE",
    "crossing_pairs",
    "file_hashes",
    "near_duplicate_pairs",
    "pairs_within",
    "patient_groups",
    "perceptual_hash",
]

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
# highfreq_factor 1: hash the whole DCT of the 16x16 thumbnail; the thumbnail's resize is the low-pass filter.
_HIGHFREQ_FACTOR = 1
NEAR_DUPLICATE_DISTANCE = 40
# Rows of the distance matrix computed at once, so memory grows with n, not n squared (~6 MB per 1,000 images).
_ROWS_PER_BLOCK = 512


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """The HASH_BITS bits of an image's pHash, as a bool vector (grey levels only, as radiographs are)."""
    return imagehash.phash(image.convert("L"), hash_size=HASH_SIZE, highfreq_factor=_HIGHFREQ_FACTOR).hash.ravel()


class HashCache:
    """Perceptual hashes on disk, one small file per image content hash, so a re-check decodes nothing.

    Keyed by the file's SHA-256 and by the hash parameters (in the folder name), so an edited image or a
    changed hash can never reuse a stale entry.
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.dir = Path(cache_dir or default_cache_dir()) / "phash" / f"{HASH_SIZE}x{HASH_SIZE}-hf{_HIGHFREQ_FACTOR}"

    def path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.hex"

    def get(self, digest: str) -> np.ndarray | None:
        """The cached bits, or None when absent or damaged (a damaged entry is then recomputed)."""
        try:
            packed = bytes.fromhex(self.path(digest).read_text())
        except (OSError, ValueError):
            return None
        if len(packed) * 8 != HASH_BITS:
            return None
        return np.unpackbits(np.frombuffer(packed, dtype=np.uint8)).astype(bool)

    def put(self, digest: str, bits: np.ndarray) -> None:
        """Write atomically: a concurrent or interrupted run never leaves half an entry."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, np.packbits(bits).tobytes().hex())

    def hash_of(self, digest: str, image: Image.Image) -> np.ndarray:
        """The hash of an image already decoded by the caller, from the cache when it is there."""
        bits = self.get(digest)
        if bits is None:
            bits = perceptual_hash(image)
            self.put(digest, bits)
        return bits

    def hash_file(self, path: Path) -> np.ndarray | None:
        """The hash of a file, decoding it only on a cache miss; None when it cannot be read."""
        try:
            digest = file_sha256(path)
        except OSError:
            return None
        bits = self.get(digest)
        if bits is None:
            try:
                bits = perceptual_hash(read_image(path))
            except CovidxrError:
                return None
            self.put(digest, bits)
        return bits


def pairs_within(hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> pd.DataFrame:
    """Every pair ``a < b`` of rows of a ``(n, HASH_BITS)`` bool matrix within ``max_distance`` bits.

    Bits become +-1 so that one matrix product gives all Hamming distances: ``(bits - s_a . s_b) / 2``;
    done a block of rows at a time so memory stays linear in n.
    """
    signs = np.where(hashes, 1.0, -1.0).astype(np.float32)
    found = [pd.DataFrame({"a": [], "b": [], "distance": []}, dtype=np.int64)]
    for start in range(0, len(signs), _ROWS_PER_BLOCK):
        distance = np.rint((HASH_BITS - signs[start : start + _ROWS_PER_BLOCK] @ signs.T) / 2).astype(np.int64)
        rows, cols = np.nonzero(distance <= max_distance)
        later = cols > rows + start
        rows, cols = rows[later], cols[later]
        found.append(pd.DataFrame({"a": rows + start, "b": cols, "distance": distance[rows, cols]}))
    return pd.concat(found, ignore_index=True)  # in (a, b) order, as np.nonzero walks row by row


def file_hashes(paths: Sequence[Path], cache_dir: str | Path | None = None) -> list[np.ndarray | None]:
    """The perceptual hash of each file (None for a missing or unreadable one: ``data check`` names those)."""
    cache = HashCache(cache_dir)
    return [cache.hash_file(Path(path)) for path in paths]


def near_duplicate_pairs(
    frame: pd.DataFrame,
    root: Path,
    max_distance: int = NEAR_DUPLICATE_DISTANCE,
    cache_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Pairs of rows whose images are near-duplicates: columns ``a < b`` (row positions) and ``distance``.

    Exact copies (distance 0) are included; unreadable images are left out.
    """
    hashes = file_hashes([Path(root) / name for name in frame["filename"]], cache_dir)
    readable = np.array([i for i, bits in enumerate(hashes) if bits is not None], dtype=np.int64)
    matrix = np.array([hashes[i] for i in readable], dtype=bool).reshape(len(readable), HASH_BITS)
    pairs = pairs_within(matrix, max_distance)
    return pairs.assign(a=readable[pairs["a"].to_numpy()], b=readable[pairs["b"].to_numpy()])


def patient_groups(frame: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """For every row, the group of patients linked through near-duplicates, to split on instead of patients.

    A group is named after its smallest patient id, so a patient without near-duplicates elsewhere keeps
    its own id and a split on these groups equals the split on patients when nothing is linked.
    """
    codes, patients = pd.factorize(frame["patient_id"])
    links = coo_matrix(
        (np.ones(len(pairs)), (codes[pairs["a"].to_numpy()], codes[pairs["b"].to_numpy()])),
        shape=(len(patients), len(patients)),
    )
    _, component = connected_components(links, directed=False)
    group_name = pd.Series(np.asarray(patients, dtype=object)).groupby(component).transform("min").to_numpy()
    return pd.Series(group_name[codes], index=frame.index, name="group")


def crossing_pairs(pairs: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """The pairs whose two images sit in different splits (train/val/test), with ``split_a`` and ``split_b``.

    ``split`` is aligned with the rows the pairs were computed on; rows in no split are ignored.
    """
    sides = split.to_numpy()
    split_a = sides[pairs["a"].to_numpy()]
    split_b = sides[pairs["b"].to_numpy()]
    crossing = (split_a != split_b) & np.isin(split_a, SPLITS) & np.isin(split_b, SPLITS)
    return pairs[crossing].assign(split_a=split_a[crossing], split_b=split_b[crossing]).reset_index(drop=True)
