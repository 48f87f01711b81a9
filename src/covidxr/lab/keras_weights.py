"""``covidxr weights import``: the paper's Keras backbones (VGG-16, ResNet-50, Xception) from the files
``keras.applications`` users hold, as covidxr's registry layout.

Two file formats are read with h5py, without Keras:

* the legacy Keras HDF5 format that ``keras.applications`` downloads (``~/.keras/models/*.h5``): a
  ``layer_names`` attribute, and per layer a group whose ``weight_names`` attribute lists its arrays;
* the Keras 3 ``*.weights.h5`` format: ``layers/<name>/vars/<i>``, where ``<name>`` is the layer's class
  in snake case with a counter (``conv2d_12``), so layers are matched by their order in the architecture.

The weights are mapped onto the torch modules covidxr builds (the "keras" variant of the registry entry,
which computes what Keras computes: ResNet-50 v1 strides and epsilons), Keras convolution biases before a
BatchNorm are folded into its running mean, and the result is written as ``<model>.safetensors`` with
the Keras preprocessing in its metadata (which ``resolve_weights`` reads) and a JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidxr.lab.registry import get_spec
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.storage import atomic_path, atomic_write

__all__ = ["KERAS_MODELS", "ImportResult", "import_keras_weights", "read_keras_layers"]

logger = logging.getLogger(__name__)

# keras.applications' name for each backbone covidxr can import.
KERAS_MODELS = {"vgg16": "VGG16", "resnet50": "ResNet50", "xception": "Xception"}
# A layer name Keras made up from the class (e.g. Xception's unnamed shortcut convolutions): matched by order.
_GENERIC = re.compile(r"^(conv2d|separable_conv2d|batch_normalization|dense)(_\d+)?$")
_KIND_OF_CLASS = {"conv2d": "conv", "separable_conv2d": "sepconv", "batch_normalization": "bn", "dense": "dense"}


@dataclass(frozen=True)
class KerasLayer:
    """One Keras layer with weights, as a file holds it: its name, kind and arrays in Keras' order."""

    name: str
    kind: str  # conv | sepconv | bn | dense
    arrays: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class _Slot:
    """A weighted layer of the ``keras.applications`` architecture, and the torch module it becomes."""

    name: str  # keras.applications' layer name (generic ones are matched by order)
    kind: str
    target: str  # state-dict prefix under the backbone body
    bn: str | None = None  # for a convolution with a bias: the BatchNorm it is folded into


@dataclass(frozen=True)
class ImportResult:
    """What ``import_keras_weights`` wrote and read."""

    weights: Path
    sidecar: Path
    file_format: str  # "legacy-h5" | "keras3"
    top: bool
    layers: int
    seconds: float


def _vgg16_slots() -> tuple[list[_Slot], list[_Slot]]:
    convs = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
    body, index = [], 0
    for block, count in convs:
        for i in range(1, count + 1):
            body.append(_Slot(f"block{block}_conv{i}", "conv", f"features.{index}"))
            index += 2
        index += 1  # the max pool
    top = [_Slot(n, "dense", "") for n in ("fc1", "fc2", "predictions")]
    return body, top


def _resnet50_slots() -> tuple[list[_Slot], list[_Slot]]:
    def conv_bn(keras: str, torch_conv: str, torch_bn: str) -> tuple[_Slot, _Slot]:
        return _Slot(f"{keras}_conv", "conv", torch_conv, bn=torch_bn), _Slot(f"{keras}_bn", "bn", torch_bn)

    body = list(conv_bn("conv1", "conv1", "bn1"))
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        for block in range(1, blocks + 1):
            keras, torch_block = f"conv{stage}_block{block}", f"layer{stage - 1}.{block - 1}"
            c1, b1 = conv_bn(f"{keras}_1", f"{torch_block}.conv1", f"{torch_block}.bn1")
            c2, b2 = conv_bn(f"{keras}_2", f"{torch_block}.conv2", f"{torch_block}.bn2")
            c3, b3 = conv_bn(f"{keras}_3", f"{torch_block}.conv3", f"{torch_block}.bn3")
            if block == 1:  # Keras lists the shortcut between the second and the third convolution
                c0, b0 = conv_bn(f"{keras}_0", f"{torch_block}.downsample.0", f"{torch_block}.downsample.1")
                body += [c1, b1, c2, b2, c0, c3, b0, b3]
            else:
                body += [c1, b1, c2, b2, c3, b3]
    return body, [_Slot("predictions", "dense", "")]


def _xception_slots() -> tuple[list[_Slot], list[_Slot]]:
    body = [
        _Slot("block1_conv1", "conv", "conv1"),
        _Slot("block1_conv1_bn", "bn", "bn1"),
        _Slot("block1_conv2", "conv", "conv2"),
        _Slot("block1_conv2_bn", "bn", "bn2"),
    ]
    # Keras block N is timm's block N-1; timm's rep holds [ReLU,] SeparableConv2d, BatchNorm per unit.
    for block, (units, starts_with_relu, shortcut) in enumerate(
        [(2, False, True), (2, True, True), (2, True, True)] + [(3, True, False)] * 8 + [(2, True, True)], start=2
    ):
        for unit in range(1, units + 1):
            position = 3 * (unit - 1) + (0 if not starts_with_relu else 1)
            body.append(_Slot(f"block{block}_sepconv{unit}", "sepconv", f"block{block - 1}.rep.{position}"))
            body.append(_Slot(f"block{block}_sepconv{unit}_bn", "bn", f"block{block - 1}.rep.{position + 1}"))
        if shortcut:  # unnamed in keras.applications: Keras calls them conv2d, conv2d_1, ...
            body.append(_Slot("conv2d", "conv", f"block{block - 1}.skip"))
            body.append(_Slot("batch_normalization", "bn", f"block{block - 1}.skipbn"))
    for unit, (conv, bn) in enumerate((("conv3", "bn3"), ("conv4", "bn4")), start=1):
        body.append(_Slot(f"block14_sepconv{unit}", "sepconv", conv))
        body.append(_Slot(f"block14_sepconv{unit}_bn", "bn", bn))
    return body, [_Slot("predictions", "dense", "")]


_SLOTS = {"vgg16": _vgg16_slots, "resnet50": _resnet50_slots, "xception": _xception_slots}


# ---------------------------------------------------------------------------------------------
# Reading the two formats
# ---------------------------------------------------------------------------------------------


def _kind(arrays: tuple[np.ndarray, ...]) -> str | None:
    """A layer's kind from its arrays' shapes (the legacy format does not store the class)."""
    dims = [a.ndim for a in arrays]
    if dims and dims[0] == 4:
        return "sepconv" if len(dims) >= 2 and dims[1] == 4 else "conv"
    if dims and dims[0] == 2:
        return "dense"
    if dims == [1, 1, 1, 1]:
        return "bn"
    return None


def _decode(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _legacy_layers(handle) -> list[KerasLayer]:
    layers = []
    for name in (_decode(n) for n in handle.attrs["layer_names"]):
        names = [_decode(w) for w in handle[name].attrs.get("weight_names", [])]
        if names:
            arrays = tuple(np.asarray(handle[name][w]) for w in names)
            layers.append(KerasLayer(name, _kind(arrays) or "unknown", arrays))
    return layers


def _keras3_layers(handle) -> list[KerasLayer]:
    group = handle["layers"]
    found = []
    for key in group:
        vars_ = group[key].get("vars")
        if vars_ is None or not len(vars_):
            continue
        match = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
        arrays = tuple(np.asarray(vars_[str(i)]) for i in range(len(vars_)))
        kind = _KIND_OF_CLASS.get(match.group(1)) or _kind(arrays) or "unknown"
        found.append((match.group(1), int(match.group(2) or 0), KerasLayer(key, kind, arrays)))
    # Within a class the counter is the order in the model; h5py lists names alphabetically (conv2d_10 < conv2d_2).
    return [layer for _, _, layer in sorted(found, key=lambda item: (item[0], item[1]))]


def read_keras_layers(path: Path) -> tuple[str, list[KerasLayer]]:
    """The weighted layers of a Keras weights file and its format; one sentence for anything else."""
    import h5py

    if not path.is_file():
        raise CovidxrError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as handle:
            if "layer_names" in handle.attrs:
                return "legacy-h5", _legacy_layers(handle)
            if "layers" in handle:
                return "keras3", _keras3_layers(handle)
    except OSError as exc:
        raise CovidxrError(f"{path}: not a readable HDF5 file, or truncated ({exc})") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise CovidxrError(f"{path}: an HDF5 file, but not laid out as Keras weights ({exc})") from None
    raise CovidxrError(f"{path}: an HDF5 file, but neither Keras' legacy weights (layer_names) nor Keras 3 (layers/)")


# ---------------------------------------------------------------------------------------------
# Matching layers to the architecture, and converting
# ---------------------------------------------------------------------------------------------


def _match(
    model: str, layers: list[KerasLayer], shapes: dict[str, list[tuple[int, ...]]], origin: Path
) -> tuple[list[tuple[_Slot, KerasLayer]], bool]:
    """Each of the architecture's slots with the file's layer for it; whether the file holds the top.

    A layer whose name is one of keras.applications' own is matched by name; the rest (Keras 3 names,
    unnamed layers) by their order among the layers of their kind."""
    body, top = _SLOTS[model]()
    slots = body + top
    named = {s.name: s for s in slots if not _GENERIC.match(s.name)}
    assigned: dict[int, KerasLayer] = {}
    by_kind: dict[str, list[KerasLayer]] = {}
    for layer in layers:
        slot = named.get(layer.name)
        if slot is not None and id(slot) not in assigned:
            assigned[id(slot)] = layer
        else:
            by_kind.setdefault(layer.kind, []).append(layer)
    for slot in slots:
        if id(slot) not in assigned and by_kind.get(slot.kind):
            assigned[id(slot)] = by_kind[slot.kind].pop(0)
    keras_name = KERAS_MODELS[model]
    pairs = [(slot, assigned[id(slot)]) for slot in slots if id(slot) in assigned]
    for slot, layer in pairs:  # the first layer in the architecture's order whose shapes differ
        if slot.kind != "dense":  # the top is left out, whatever its input size made its shapes
            _check_shapes(model, slot, layer, shapes[slot.target], origin)
    leftover = sum(len(v) for v in by_kind.values())
    has_top = all(id(s) in assigned for s in top)
    if leftover or not all(id(s) in assigned for s in body) or (not has_top and any(id(s) in assigned for s in top)):
        raise CovidxrError(
            f"{origin}: holds {len(layers)} layers with weights, but keras.applications' {keras_name} has "
            f"{len(body)} (notop) or {len(slots)} (top); no {keras_name} variant fits it"
        )
    return [(s, layer) for s, layer in pairs if s in body], has_top


def _keras_shapes(model: str, state: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, ...]]]:
    """The shapes Keras gives each slot's arrays, from the torch body covidxr builds (its ``state``)."""
    body, _ = _SLOTS[model]()
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for slot in body:
        if slot.kind == "conv":
            out, inp, kh, kw = state[f"{slot.target}.weight"].shape
            bias = slot.bn is not None or f"{slot.target}.bias" in state  # Keras' use_bias
            shapes[slot.target] = [(kh, kw, inp, out)] + ([(out,)] if bias else [])
        elif slot.kind == "sepconv":
            channels, _, kh, kw = state[f"{slot.target}.conv1.weight"].shape
            out = state[f"{slot.target}.pointwise.weight"].shape[0]
            shapes[slot.target] = [(kh, kw, channels, 1), (1, 1, channels, out)]
        else:
            shapes[slot.target] = [tuple(state[f"{slot.target}.weight"].shape)] * 4
    return shapes


def _check_shapes(model: str, slot: _Slot, layer: KerasLayer, wanted: list[tuple[int, ...]], origin: Path) -> None:
    shapes = [tuple(a.shape) for a in layer.arrays]
    if shapes != wanted:
        have = ", ".join(str(s) for s in shapes)
        need = ", ".join(str(s) for s in wanted)
        raise CovidxrError(
            f"{origin}: layer {layer.name} has shapes {have}, but {KERAS_MODELS[model]}'s {slot.name} needs {need}: "
            f"not {model} weights"
        )


def _convert(pairs: list[tuple[_Slot, KerasLayer]]) -> dict[str, torch.Tensor]:
    """Keras arrays → the keras-variant torch body's state dict (channels-last kernels transposed)."""
    state: dict[str, torch.Tensor] = {}
    biases: dict[str, np.ndarray] = {}
    for slot, layer in pairs:
        arrays = [np.asarray(a, dtype=np.float32) for a in layer.arrays]
        if slot.kind == "conv":
            state[f"{slot.target}.weight"] = torch.from_numpy(arrays[0].transpose(3, 2, 0, 1).copy())
            if len(arrays) > 1 and slot.bn is None:
                state[f"{slot.target}.bias"] = torch.from_numpy(arrays[1])
            elif len(arrays) > 1:
                biases[slot.bn] = arrays[1]
        elif slot.kind == "sepconv":
            state[f"{slot.target}.conv1.weight"] = torch.from_numpy(arrays[0].transpose(2, 3, 0, 1).copy())
            state[f"{slot.target}.pointwise.weight"] = torch.from_numpy(arrays[1].transpose(3, 2, 0, 1).copy())
        else:
            gamma, beta, mean, variance = arrays
            state[f"{slot.target}.weight"] = torch.from_numpy(gamma)
            state[f"{slot.target}.bias"] = torch.from_numpy(beta)
            state[f"{slot.target}.running_mean"] = torch.from_numpy(mean)
            state[f"{slot.target}.running_var"] = torch.from_numpy(variance)
            state[f"{slot.target}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    for bn, bias in biases.items():
        # BN(conv(x) + b) normalises conv(x) + b - mean: the bias moves into the running mean exactly.
        state[f"{bn}.running_mean"] = torch.from_numpy(state[f"{bn}.running_mean"].numpy() - bias)
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_keras_weights(source: str | Path, model: str, out: str | Path) -> ImportResult:
    """Convert a Keras weights file of ``model`` into ``out/<model>.safetensors`` and its ``.json`` sidecar.

    Nothing is written unless the whole file maps onto the architecture; the preprocessing and the
    "keras" variant are recorded so every later command builds the model as Keras did."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    if model not in KERAS_MODELS:
        raise CovidxrError(f"unknown --model {model!r}; Keras weights can be imported for: {', '.join(KERAS_MODELS)}")
    source = Path(source)
    spec = get_spec(model)
    file_format, layers = read_keras_layers(source)
    if not layers:
        raise CovidxrError(f"{source}: holds no layers with weights")
    reference = spec.body(spec.native_size, "keras").state_dict()
    pairs, top = _match(model, layers, _keras_shapes(model, reference), source)
    state = _convert(pairs)
    expected = {k for k in reference if not k.startswith(spec.classifier_prefix)}
    if set(state) != expected:  # a mapping bug, not a user error: say which key
        missing = sorted(expected - set(state)) or sorted(set(state) - expected)
        raise CovidxrError(f"{source}: the {model} mapping does not cover the torch layout (e.g. {missing[0]})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights, sidecar = out / f"{model}.safetensors", out / f"{model}.json"
    record = {
        "model": model,
        "variant": "keras",
        "preprocessing": spec.keras_preprocessing,
        "source": str(source.resolve()),
        "source_sha256": _sha256(source),
        "source_format": file_format,
        "source_top": top,
        "source_layers": len(layers),
        "keras_model": f"keras.applications.{KERAS_MODELS[model]}",
    }
    metadata = {k: str(v) for k, v in record.items() if k in {"variant", "preprocessing", "source_sha256"}}
    with atomic_path(weights) as partial:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=metadata)
    atomic_write(sidecar, json.dumps(record, indent=2) + "\n")
    return ImportResult(weights, sidecar, file_format, top, len(layers), time.perf_counter() - started)
