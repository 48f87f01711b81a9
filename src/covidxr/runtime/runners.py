"""What predicts with a run: one ``Engine`` protocol, a registry of runners, and one chooser (``make_engine``).

The runtime registers ``onnx`` (the run's own graph on onnxruntime). The lab's runners, ``torch`` (the model
itself, or exported once into the cache for a run without a graph) and ``int8`` (the graph ``covidxr quantize``
accepted), are declared as entry points of the group ``covidxr.runners`` in ``pyproject.toml`` and loaded
by name on first use, so the runtime never imports the lab: where torch is missing, the ``torch`` runner is
refused in one line naming the extra. Another package can add a runner the same way, or by
``register_runner`` (as timm's ``register_model`` does for models).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file

from covidxr.runtime.engines import (
    GRAPH_FILE,
    RUNNERS,
    TRAIN_EXTRA,
    OnnxEngine,
    onnxruntime_available,
    read_sidecar,
    shared_engine_threads,
    torch_available,
)
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.plugins import entry_point
from covidxr.runtime.preprocess import ImagePipeline, InputTransform, Preprocessing
from covidxr.runtime.records import ModelSidecar
from covidxr.runtime.runs import HEAD_FILE, Run
from covidxr.runtime.storage import hash_arrays

__all__ = [
    "ENTRY_POINTS",
    "RUNNERS",
    "Engine",
    "Runner",
    "check_run_graph",
    "head_digest",
    "input_transform",
    "make_engine",
    "register_runner",
]

ENTRY_POINTS = "covidxr.runners"


class Engine(Protocol):
    """Preprocessed images (N x 3 x S x S float32) in, pooled features and logits out."""

    name: str
    description: str

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


Runner = Callable[[Run, str, "str | Path | None", "int | None"], Engine]  # (run, requested, cache_dir, threads)
_runners: dict[str, Runner] = {}


def register_runner(name: str) -> Callable[[Runner], Runner]:
    """Register ``runner`` under ``name`` (a duplicate name is refused)."""

    def add(runner: Runner) -> Runner:
        if name in _runners:
            raise ValueError(f"a runner named {name!r} is already registered")
        _runners[name] = runner
        return runner

    return add


def _runner(name: str) -> Runner:
    """The runner registered as ``name``, loading its entry point on first use."""
    if name not in _runners:
        _runners[name] = entry_point(ENTRY_POINTS, name)
    return _runners[name]


@register_runner("onnx")
def _onnx_runner(run: Run, requested: str, cache_dir: str | Path | None, threads: int | None) -> Engine:
    check_run_graph(run)
    return OnnxEngine(run.graph, shared_engine_threads() if threads is None else threads, spin=False)


def make_engine(
    run: Run, engine: str = "auto", cache_dir: str | Path | None = None, threads: int | None = None
) -> Engine:
    """The engine that predicts with ``run``.

    - ``auto`` (default) and ``onnx``: the run's own graph (``model.onnx``, written by ``covidxr export``;
      the bundled model ships it), checked against its sidecar's hash and the run's head, and run by
      onnxruntime on ``threads`` threads (default ``shared_engine_threads``: half the cores, the rest decode): no
      torch. A run without a graph is exported once into the cache
      (training install); where that fails, ``auto`` warns in one line and runs torch.
    - ``torch``: the model itself (training install).
    - ``int8``: the graph ``covidxr quantize`` accepted.
    """
    if engine not in RUNNERS:
        raise CovidxrError(f"engine must be one of {', '.join(RUNNERS)}, not {engine!r}")
    if engine == "int8":
        return _runner("int8")(run, engine, cache_dir, threads)
    if engine != "torch" and run.graph is not None and onnxruntime_available():
        return _runner("onnx")(run, engine, cache_dir, threads)
    if engine == "onnx" and not onnxruntime_available():
        raise CovidxrError("the onnx engine needs onnxruntime: pip install onnxruntime (or use --engine torch)")
    if not torch_available():
        if engine == "torch":
            raise CovidxrError(f"the torch engine needs the training install: {TRAIN_EXTRA}")
        raise CovidxrError(
            f"{run.path}: holds no exported graph ({GRAPH_FILE}) to predict with onnxruntime alone; "
            f"make it with `covidxr export {run.path}` where the training install is ({TRAIN_EXTRA})"
        )
    return _runner("torch")(run, engine, cache_dir, threads)


def head_digest(run: Run) -> str:
    """The SHA-256 of the run's trained head (``covidxr.runtime.storage.hash_arrays`` of its safetensors)."""
    return hash_arrays(load_file(str(run.path / HEAD_FILE)))


def check_run_graph(run: Run) -> ModelSidecar:
    """The sidecar of the run's graph, after checking that the graph is intact (its SHA-256) and was
    exported from this run (its head and its model key): a stale or altered graph is one line, never used."""
    info = read_sidecar(run.graph)
    if info.key.get("head_sha256") != head_digest(run) or info.key.get("model_key") != run.info.model_key:
        raise CovidxrError(
            f"{run.graph}: was exported from another head or backbone than this run's; "
            f"export it again (`covidxr export {run.path}`) or delete it"
        )
    return info


def input_transform(run: Run, engine: Engine) -> InputTransform:
    """What turns a decoded image into the engine's input: for a graph, what its sidecar records (so no
    torch is needed; the graph itself was checked against the sidecar before the engine was made); other
    engines carry their own (the torch engine: its model's)."""
    info = engine.sidecar if isinstance(engine, OnnxEngine) else None
    if info is not None:
        return InputTransform(
            int(info.image_size),
            Preprocessing.from_dict(info.normalisation),
            ImagePipeline.from_dict(info.pipeline),
        )
    return engine.input_transform
