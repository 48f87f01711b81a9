"""Any chest X-ray classifier as an ONNX graph plus a spec (``MODEL.yaml``): what covidxr needs to feed it.

A model covidxr did not train is described by how its input is made and what its output means::

    input:
      name: pixels          # optional: the graph's input
      size: [224, 224]      # height, width
      channels: 3           # 1 or 3
      resize: stretch       # stretch | letterbox | center-crop
      scale: 255.0          # pixel values are divided by this first
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
      layout: NCHW          # or NHWC
    output:
      name: probs           # optional
      kind: probabilities   # or logits
      labels: [COVID-19, NORMAL, PNEUMONIA]
      threshold: 0.5        # optional: p(COVID-19) at or above it is a COVID-19 call; else the top class decides

The spec is checked on load, one line per bad key, and against the graph (input rank, layout, size and
channels; output count). ``OnnxClassifier`` then turns decoded images into class probabilities with
numpy, Pillow and onnxruntime only, so auditing or serving a foreign model needs no training stack.
Resizing is Pillow's bilinear filter, so a model trained on ``prepare``'s output sees the same pixels here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covidxr.runtime.errors import CovidxrError

__all__ = [
    "COVID",
    "InputSpec",
    "ModelOutputs",
    "OnnxClassifier",
    "OutputSpec",
    "GraphSpec",
    "load_spec",
    "prepare",
    "spec_path_for",
]

COVID = "COVID-19"
RESIZES = ("stretch", "letterbox", "center-crop")
LAYOUTS = ("NCHW", "NHWC")
KINDS = ("probabilities", "logits")
# Rows of a "probabilities" output must sum to 1 within this (float32 softmax sums stray by ~1e-6).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InputSpec:
    size: tuple[int, int]  # height, width
    channels: int = 3
    resize: str = "stretch"
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    name: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    labels: tuple[str, ...]
    kind: str = "probabilities"
    name: str | None = None
    threshold: float | None = None

    @property
    def covid_index(self) -> int:
        return self.labels.index(COVID)


@dataclass(frozen=True)
class GraphSpec:
    """A validated ``MODEL.yaml``; ``path`` is where it was read from."""

    input: InputSpec
    output: OutputSpec
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML holds it (what ``load_spec`` reads back)."""
        inp, out = self.input, self.output
        data: dict[str, Any] = {
            "input": {
                "size": list(inp.size),
                "channels": inp.channels,
                "resize": inp.resize,
                "scale": inp.scale,
                "mean": list(inp.mean),
                "std": list(inp.std),
                "layout": inp.layout,
            },
            "output": {"kind": out.kind, "labels": list(out.labels)},
        }
        if inp.name is not None:
            data["input"]["name"] = inp.name
        if out.name is not None:
            data["output"]["name"] = out.name
        if out.threshold is not None:
            data["output"]["threshold"] = out.threshold
        return data

    def write(self, path: str | Path) -> Path:
        import yaml

        from covidxr.runtime.storage import atomic_write

        path = Path(path)
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# ---------------------------------------------------------------------------------------------
# Reading and checking a spec
# ---------------------------------------------------------------------------------------------

_INPUT_KEYS = ("name", "size", "channels", "resize", "scale", "mean", "std", "layout")
_OUTPUT_KEYS = ("name", "kind", "labels", "threshold")


def _bad(where: str, key: str, why: str) -> CovidxrError:
    return CovidxrError(f"{where}: {key}: {why}")


def _number(where: str, key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(where, key, f"must be a number, not {value!r}")
    if positive and value <= 0:
        raise _bad(where, key, f"must be above 0, not {value!r}")
    return float(value)


def _numbers(where: str, key: str, value: Any, count: int, positive: bool = False) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * count
    if not isinstance(value, list) or len(value) != count:
        raise _bad(where, key, f"must be a list of {count} numbers (one per channel), not {value!r}")
    return tuple(_number(where, f"{key}[{i}]", item, positive) for i, item in enumerate(value))


def _choice(where: str, key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _bad(where, key, f"must be one of {', '.join(choices)}, not {value!r}")
    return value


def _name(where: str, key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _bad(where, key, f"must be a tensor name, not {value!r}")
    return value


def _section(where: str, data: Mapping, key: str, known: Sequence[str]) -> dict:
    section = data.get(key)
    if not isinstance(section, dict):
        raise _bad(where, key, "missing, or not a mapping of keys")
    unknown = [name for name in section if name not in known]
    if unknown:
        raise _bad(where, f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(known)})")
    return section


def spec_from_dict(data: Any, where: str = "spec") -> GraphSpec:
    """A checked spec from its parsed YAML; the first bad key is one ``CovidxrError`` line naming it."""
    if not isinstance(data, dict):
        raise CovidxrError(f"{where}: not a YAML mapping with input: and output:")
    unknown = [key for key in data if key not in ("input", "output")]
    if unknown:
        raise _bad(where, str(unknown[0]), "unknown key (known: input, output)")
    inp = _section(where, data, "input", _INPUT_KEYS)
    out = _section(where, data, "output", _OUTPUT_KEYS)

    size = inp.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in size)
    ):
        raise _bad(where, "input.size", f"must be [height, width], whole numbers from 8 to 4096, not {size!r}")
    channels = inp.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise _bad(where, "input.channels", f"must be 1 or 3, not {channels!r}")
    input_spec = InputSpec(
        size=(size[0], size[1]),
        channels=channels,
        resize=_choice(where, "input.resize", inp.get("resize", "stretch"), RESIZES),
        scale=_number(where, "input.scale", inp.get("scale", 255.0), positive=True),
        mean=_numbers(where, "input.mean", inp.get("mean", 0.0), channels),
        std=_numbers(where, "input.std", inp.get("std", 1.0), channels, positive=True),
        layout=_choice(where, "input.layout", inp.get("layout", "NCHW"), LAYOUTS),
        name=_name(where, "input.name", inp.get("name")),
    )

    labels = out.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(v, str) and v for v in labels):
        raise _bad(where, "output.labels", f"must be a list of at least two class names, not {labels!r}")
    if len(set(labels)) != len(labels):
        raise _bad(where, "output.labels", f"names a class twice: {labels}")
    if COVID not in labels:
        raise _bad(where, "output.labels", f"must include {COVID} (the class covidxr audits), not {labels}")
    threshold = out.get("threshold")
    if threshold is not None:
        threshold = _number(where, "output.threshold", threshold)
        if not 0 < threshold < 1:
            raise _bad(where, "output.threshold", f"must lie between 0 and 1, not {threshold}")
    output_spec = OutputSpec(
        labels=tuple(labels),
        kind=_choice(where, "output.kind", out.get("kind", "probabilities"), KINDS),
        name=_name(where, "output.name", out.get("name")),
        threshold=threshold,
    )
    return GraphSpec(input_spec, output_spec)


def spec_path_for(graph: str | Path) -> Path:
    """Where a graph's spec lives by default: ``MODEL.yaml`` beside ``MODEL.onnx``."""
    return Path(graph).with_suffix(".yaml")


def load_spec(path: str | Path) -> GraphSpec:
    """Read and check ``MODEL.yaml``: missing, unreadable, damaged YAML or a bad key is one line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CovidxrError(f"{path}: no model spec here (write one beside the graph, or pass --spec)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CovidxrError(f"{path}: cannot be read ({type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise CovidxrError(f"{path}: damaged YAML{line}") from None
    spec = spec_from_dict(data, str(path))
    return GraphSpec(spec.input, spec.output, path)


# ---------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------


def _resized(image: Image.Image, spec: InputSpec) -> Image.Image:
    height, width = spec.size
    if spec.resize == "stretch":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    if spec.resize == "letterbox":
        ratio = min(width / image.width, height / image.height)
        inner = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        canvas = Image.new(image.mode, (width, height))
        offset = ((width - inner[0]) // 2, (height - inner[1]) // 2)
        canvas.paste(image.resize(inner, Image.Resampling.BILINEAR), offset)
        return canvas
    ratio = max(width / image.width, height / image.height)
    outer = (max(width, round(image.width * ratio)), max(height, round(image.height * ratio)))
    resized = image.resize(outer, Image.Resampling.BILINEAR)
    left, top = (outer[0] - width) // 2, (outer[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def prepare(images: Sequence[Image.Image], spec: InputSpec) -> np.ndarray:
    """The float32 batch a spec'd graph takes: grey or RGB, resized, divided by ``scale``, normalised, laid out."""
    mode = "L" if spec.channels == 1 else "RGB"
    arrays = []
    for image in images:
        pixels = np.asarray(_resized(image.convert(mode), spec), dtype=np.float32).reshape(*spec.size, spec.channels)
        arrays.append(pixels)
    batch = np.stack(arrays) / np.float32(spec.scale)
    batch = (batch - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOutputs:
    """Class probabilities of a batch; a row the model gave NaN or Inf for is NaN, with its reason."""

    probabilities: np.ndarray  # (n, classes), float64
    reasons: list[str | None]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _expected_shape(spec: InputSpec) -> tuple[int, int, int]:
    height, width = spec.size
    return (spec.channels, height, width) if spec.layout == "NCHW" else (height, width, spec.channels)


class OnnxClassifier:
    """A foreign classifier: ``MODEL.onnx`` and its spec, checked against each other on load.

    >>> model = OnnxClassifier("model.onnx")          # reads model.yaml beside it
    >>> model.predict_proba([Image.open("chest.png")]).probabilities
    """

    kind = "onnx"

    def __init__(self, graph: str | Path, spec: str | Path | GraphSpec | None = None, threads: int | None = None):
        self.path = Path(graph)
        if not self.path.is_file():
            raise CovidxrError(f"{self.path}: no such model file")
        self.spec = spec if isinstance(spec, GraphSpec) else load_spec(spec or spec_path_for(self.path))
        try:
            import onnxruntime
        except ImportError:
            raise CovidxrError("a foreign model needs onnxruntime: pip install onnxruntime") from None
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for damaged graphs
            raise CovidxrError(f"{self.path}: not a usable ONNX graph ({type(exc).__name__})") from None
        self.input_name = self._pick(self.session.get_inputs(), self.spec.input.name, "input")
        self.output_name = self._pick(self.session.get_outputs(), self.spec.output.name, "output")
        self._check_shapes()
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, labels={list(self.labels)})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.output.labels

    @property
    def covid_index(self) -> int:
        return self.spec.output.covid_index

    @property
    def threshold(self) -> float | None:
        return self.spec.output.threshold

    @property
    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256}

    def _pick(self, tensors: list, wanted: str | None, what: str) -> str:
        names = [tensor.name for tensor in tensors]
        key = f"{what}.name"
        if wanted is not None:
            if wanted not in names:
                raise CovidxrError(f"{self._where()}: {key}: the graph has no {what} {wanted!r} (it has {names})")
            return wanted
        if len(names) != 1:
            raise CovidxrError(f"{self._where()}: {key}: the graph has {len(names)} {what}s {names}; name one")
        return names[0]

    def _where(self) -> str:
        return str(self.spec.path or self.path)

    def _check_shapes(self) -> None:
        """Static dimensions of the graph must agree with the spec (symbolic ones are checked on the first run)."""
        [tensor] = [t for t in self.session.get_inputs() if t.name == self.input_name]
        shape = list(tensor.shape)
        expected = _expected_shape(self.spec.input)
        layout = self.spec.input.layout
        if len(shape) != 4:
            raise CovidxrError(
                f"{self._where()}: input.layout: the graph's input {self.input_name!r} has shape {shape}, "
                f"not a batch of images ({layout})"
            )
        for axis, (actual, wanted) in enumerate(zip(shape[1:], expected, strict=True)):
            if isinstance(actual, int) and actual > 0 and actual != wanted:
                key = "input.channels" if layout[axis + 1] == "C" else "input.size"
                raise CovidxrError(
                    f"{self._where()}: {key}: the graph's input {self.input_name!r} has shape {shape}, but the spec "
                    f"gives {layout} {[1, *expected]}"
                )
        [out] = [t for t in self.session.get_outputs() if t.name == self.output_name]
        last = out.shape[-1] if out.shape else None
        if isinstance(last, int) and last != len(self.labels):
            raise CovidxrError(
                f"{self._where()}: output.labels: the graph's output {self.output_name!r} gives {last} values per "
                f"image, the spec names {len(self.labels)} labels"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph's raw output (n, classes) for a prepared batch."""
        try:
            [raw] = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # a shape the graph refuses at run time
            raise CovidxrError(
                f"{self._where()}: the graph refused an input of shape {list(batch.shape)} "
                f"({type(exc).__name__}); check input.size, input.channels and input.layout"
            ) from None
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.labels):
            raise CovidxrError(
                f"{self._where()}: output.labels: the graph's output {self.output_name!r} has shape "
                f"{list(raw.shape)}, the spec names {len(self.labels)} labels"
            )
        return raw

    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 16) -> ModelOutputs:
        """Class probabilities in ``labels`` order; NaN rows, with a reason, where the model's output is not finite."""
        rows, reasons = [], []
        for start in range(0, len(images), batch_size):
            raw = self.run(prepare(images[start : start + batch_size], self.spec.input))
            finite = np.isfinite(raw).all(axis=1)
            probabilities = np.full_like(raw, np.nan)
            if self.spec.output.kind == "logits":
                probabilities[finite] = _softmax(raw[finite])
            else:
                good = raw[finite]
                sums = good.sum(axis=1)
                if ((good < -SUM_TOLERANCE) | (good > 1 + SUM_TOLERANCE)).any() or (
                    np.abs(sums - 1) > SUM_TOLERANCE
                ).any():
                    worst = float(sums[np.argmax(np.abs(sums - 1))]) if len(sums) else float("nan")
                    raise CovidxrError(
                        f"{self._where()}: output.kind: probabilities, but the graph's rows do not sum to 1 "
                        f"(one sums to {worst:.4g}); if it gives logits, say kind: logits"
                    )
                probabilities[finite] = np.clip(good, 0.0, 1.0)
            rows.append(probabilities)
            reasons.extend(None if ok else "the model's output is not finite (NaN or Inf)" for ok in finite)
        probabilities = np.concatenate(rows) if rows else np.zeros((0, len(self.labels)))
        return ModelOutputs(probabilities, reasons)

    def decide(self, probabilities: np.ndarray) -> list[str | None]:
        """Each row's label: COVID-19 at or above ``threshold`` where one is set, else the most probable class."""
        decisions: list[str | None] = []
        for row in probabilities:
            if not np.isfinite(row).all():
                decisions.append(None)
            elif self.threshold is not None:
                if row[self.covid_index] >= self.threshold:
                    decisions.append(COVID)
                else:
                    others = [i for i in range(len(row)) if i != self.covid_index]
                    decisions.append(self.labels[max(others, key=lambda i: row[i])])
            else:
                decisions.append(self.labels[int(np.argmax(row))])
        return decisions
