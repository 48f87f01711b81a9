"""The frozen-feature cache: each image's pooled backbone features are computed once and reused.

Entries are keyed by the model key (model, weights hash, preprocessing, input size, feature layer)
and by the SHA-256 of the image file, so a change to any of them can never reuse stale features.
Each entry is written atomically as its batch finishes: an interrupted extraction loses nothing. Each
entry carries the SHA-256 of its content, checked on load: an altered entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidxr.lab.augment import AcquisitionAugment
from covidxr.lab.cache import default_cache_dir
from covidxr.lab.export import feature_engine
from covidxr.lab.models import CovidxrNet
from covidxr.runtime.batches import iterate_batches
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import file_sha256
from covidxr.runtime.storage import atomic_path, stable_digest

__all__ = ["AugmentedView", "FeatureCache", "backbone_features", "compute_features", "extract_features"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentedView:
    """The ``index``-th augmented copy of every image: fixed per image (seeded by the run's seed, the
    view number and the image's content hash), so it can be encoded once and cached like the original."""

    augment: AcquisitionAugment
    seed: int
    index: int

    def key(self) -> dict:
        return {"augment": self.augment.to_dict(), "seed": self.seed, "view": self.index}

    def generator(self, digest: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, int(digest[:15], 16)])


class FeatureCache:
    """Pooled features of one model key (augmented view and engine), one ``.npy`` file per image content hash.

    The engine (``torch`` or ``onnx``; default: the one ``compute_features`` uses for this model) is part
    of the key: onnxruntime's features match torch's to about 1e-5, not bit for bit, so a run's features
    all come from the engine its ``run.json`` names."""

    def __init__(
        self,
        model: CovidxrNet,
        cache_dir: str | Path | None = None,
        view: AugmentedView | None = None,
        engine: str | None = None,
    ):
        key = model.model_key() | ({"view": view.key()} if view else {})
        engine = engine or feature_engine(model, "auto", cache_dir).name  # default: what extraction uses
        if engine != "torch":  # absent for torch, so caches made before the engines existed stay valid
            key["engine"] = engine
        name = stable_digest(key)[:24]  # model_key_hash() + view
        self.dir = Path(cache_dir or default_cache_dir()) / "features" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(key, indent=2, sort_keys=True))
        self.num_features = model.spec.num_features

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def _entry_type(self) -> np.dtype:
        return np.dtype([("features", np.float32, (self.num_features,)), ("sha256", np.uint8, (32,))])

    def get(self, digest: str) -> np.ndarray | None:
        """The cached vector, or None when absent, damaged or altered (such an entry is recomputed):
        each entry holds the SHA-256 of its image digest and numbers, checked on every load, so an
        entry overwritten in place, or another image's entry copied over it, is never used."""
        path = self._path(digest)
        if not path.exists():
            return None
        try:
            entry = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if entry.dtype != self._entry_type() or entry.shape != ():
            return None  # damaged, or written before entries carried their hash
        vector = entry["features"]
        if entry["sha256"].tobytes() != _content_hash(digest, vector) or not np.isfinite(vector).all():
            logger.warning("feature cache entry %s does not match its content hash; recomputing it", path)
            return None
        return vector

    def put(self, digest: str, vector: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(exist_ok=True)
        entry = np.zeros((), dtype=self._entry_type())
        entry["features"] = vector
        entry["sha256"] = np.frombuffer(_content_hash(digest, entry["features"]), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, entry)


def _content_hash(digest: str, vector: np.ndarray) -> bytes:
    """What a cache entry must hash to: its image's digest and its numbers (float32, little-endian)."""
    return hashlib.sha256(digest.encode() + np.ascontiguousarray(vector, dtype="<f4").tobytes()).digest()


def backbone_features(
    model: CovidxrNet, inputs: torch.Tensor, cache_dir: str | Path | None = None, engine: str = "auto"
) -> np.ndarray:
    """Pooled features of a preprocessed batch, by the requested feature engine (a run's ``feature_engine``;
    ``covidxr.lab.export.feature_engine`` resolves it)."""
    return feature_engine(model.eval(), engine, cache_dir).features(inputs)


def compute_features(
    model: CovidxrNet,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    view: AugmentedView | None = None,
    engine: str = "auto",
) -> tuple[np.ndarray, dict[int, str]]:
    """Features for every readable path (of its augmented ``view``, if given), from the cache where
    present; computes and caches the rest.

    Returns the feature matrix (zero rows for unreadable files) and ``{index: error message}``.
    """
    paths = [Path(p) for p in paths]
    runner = feature_engine(model.eval(), engine, cache_dir)
    cache = FeatureCache(model, cache_dir, view, runner.name)
    features = np.zeros((len(paths), cache.num_features), dtype=np.float32)
    digests: list[str | None] = []
    todo: list[int] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            digest = file_sha256(path)
        except OSError as exc:
            errors[i] = f"{path}: cannot read ({exc.strerror or exc})"
            digests.append(None)
            continue
        digests.append(digest)
        cached = cache.get(digest)
        if cached is None:
            todo.append(i)
        else:
            features[i] = cached
    if todo:
        desc = (f"features {model.spec.name}" + (f" view {view.index}" if view else "")) if progress else None
        batches = iterate_batches(
            [paths[i] for i in todo],
            model.input_transform,
            batch_size,
            num_workers,
            desc,
            view,
            [digests[i] for i in todo],
        )
        for positions, inputs, batch_errors, *_ in batches:
            vectors = runner.features(inputs)
            for position, vector, error in zip(positions, vectors, batch_errors, strict=True):
                index = todo[position]
                if error:
                    errors[index] = error
                    continue
                features[index] = vector
                cache.put(digests[index], vector)
    return features, errors


def extract_features(
    model: CovidxrNet,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
    view: AugmentedView | None = None,
    engine: str = "auto",
) -> np.ndarray:
    """Features for every path; raises CovidxrError naming the first unreadable file.

    The error comes only after every readable image is cached, so fixing the bad file and
    rerunning redoes nothing.
    """
    features, errors = compute_features(model, paths, cache_dir, batch_size, num_workers, progress, view, engine)
    if errors:
        first = errors[min(errors)]
        more = f" (and {len(errors) - 1} more unreadable files)" if len(errors) > 1 else ""
        raise CovidxrError(f"{first}{more}")
    return features
