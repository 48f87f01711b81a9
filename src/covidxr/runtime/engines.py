"""Engines: what turns a batch of preprocessed images into backbone features and logits (runtime layer).

Every frozen-backbone path of covidxr (prediction, the out-of-distribution features, the web service,
the feature cache) spends nearly all its time in this one forward pass, so the engine decides how
fast covidxr is on a CPU:

- ``OnnxEngine`` (here) runs an exported graph in onnxruntime: numpy in, numpy out, no torch, several
  times faster than PyTorch on a CPU. A run that ships its graph (``model.onnx`` + ``model.json``
  sidecar, as the bundled model does) predicts with nothing but numpy, Pillow and onnxruntime.
- ``TorchEngine`` (``covidxr.lab.export``, training install) runs the model itself; fine-tuning and the
  Grad-CAM methods that need autograd always use torch.

``--engine auto`` (the default) picks onnxruntime where it is installed, torch otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.records import ModelSidecar

__all__ = [
    "ENGINES",
    "GRAPH_FILE",
    "OnnxEngine",
    "RUNNERS",
    "TRAIN_EXTRA",
    "cpu_flags",
    "graph_sha256",
    "int8_instructions",
    "onnxruntime_available",
    "physical_cores",
    "shared_engine_threads",
    "read_sidecar",
    "torch_available",
]

ENGINES = ("auto", "torch", "onnx")  # what computes frozen features for training (TrainConfig.feature_engine)
RUNNERS = ("auto", "onnx", "torch", "int8")  # what predicts (--engine; covidxr.runtime.runners.make_engine)
GRAPH_FILE = "model.onnx"  # a run's exported graph; its sidecar is model.json beside it
TRAIN_EXTRA = "pip install 'covidxr[train]'"


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's arithmetic units, so intra-op
    threads beyond the physical cores only add contention)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return usable
    cores = {
        (block.split("physical id")[1].split("\n")[0], block.split("core id")[1].split("\n")[0])
        for block in text.split("\n\n")
        if "physical id" in block and "core id" in block
    }
    return max(1, min(usable, len(cores) or usable))


def shared_engine_threads() -> int:
    """Intra-op threads of a predicting engine that shares the cores with decoding threads (folders, the
    service): half the physical cores. Per image, decoding, the lung segmenter and the checks cost about as much
    CPU as the classifier, and a session on every core waits at each parallel section for any of its threads that
    the decoders, or another job, pre-empted: on a quiet machine both settings serve alike, under another job's
    load one thread served far more (benchmarks/archive.py --compare-threads measures both side by side)."""
    return max(1, physical_cores() // 2)


def cpu_flags(*names: str) -> list[str]:
    """Those of ``names`` that /proc/cpuinfo lists as this CPU's flags (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return [name for name in names if name in flags]


def int8_instructions() -> str:
    """The int8 dot-product instructions onnxruntime's kernels can use here. Its int8 results differ
    between CPUs with and without VNNI (and AMX), so int8 figures hold only for the CPU they were measured on."""
    present = cpu_flags("amx_int8", "avx512_vnni", "avx_vnni")
    return ", ".join(present) if present else "no VNNI (AVX2 or older int8 kernels)"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def torch_available() -> bool:
    """Whether the training install (torch) is present, without importing it."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def graph_sha256(path: str | Path) -> str:
    """The SHA-256 of an exported graph, kept in its sidecar: bytes changed in place (same size, and
    still a loadable graph) would otherwise change predictions silently."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(path: str | Path) -> ModelSidecar:
    """The JSON sidecar of the graph at ``path``, after checking the graph's bytes against the SHA-256 it
    records: an altered, truncated or swapped graph is refused with one line, never run."""
    path = Path(path)
    where = path.with_suffix(".json")
    try:
        info = ModelSidecar.from_dict(json.loads(where.read_text()), where)
    except (OSError, ValueError) as exc:
        raise CovidxrError(f"{where}: missing or damaged graph sidecar ({type(exc).__name__})") from None
    if not isinstance(info.sha256, str):
        raise CovidxrError(f"{where}: missing or damaged graph sidecar (no sha256)")
    try:
        actual = graph_sha256(path)
    except OSError as exc:
        raise CovidxrError(f"{path}: cannot read the graph ({exc.strerror or type(exc).__name__})") from None
    if actual != info.sha256:
        raise CovidxrError(
            f"{path}: the graph fails its hash check (SHA-256 {actual[:12]}, its sidecar records {info.sha256[:12]}); "
            "it was altered or damaged: restore it (reinstall covidxr, or rerun covidxr export)"
        )
    return info


class OnnxEngine:
    """An exported graph run by onnxruntime on ``threads`` intra-op threads (default: the physical cores).

    ``spin=False`` stops idle onnxruntime threads from busy-waiting between calls: where decoding
    threads share the cores with the session (``predict`` over folders, feature extraction), spinning
    threads would take their CPU time.
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        try:
            import onnxruntime
        except ImportError:
            raise CovidxrError("the onnx engine needs onnxruntime: pip install onnxruntime") from None
        cores = os.cpu_count() or 1
        if threads is not None and not 1 <= threads <= cores:
            raise CovidxrError(f"threads must be between 1 and {cores} (the cores of this machine), not {threads}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise CovidxrError(f"{path}: not a usable ONNX graph ({type(exc).__name__})") from None
        self.path = Path(path)
        self.outputs = [output.name for output in self.session.get_outputs()]
        # The out-of-distribution threshold for this graph's features where it differs from the run's (int8).
        self.ood_threshold: float | None = None
        self.description = f"onnxruntime {onnxruntime.__version__} (CPU, {options.intra_op_num_threads} threads)"

    @cached_property
    def sidecar(self) -> ModelSidecar | None:
        """The graph's sidecar (``<graph>.json``: its input size, pipeline, normalisation, Grad-CAM step), read
        once per engine; None for a graph without one."""
        path = self.path.with_suffix(".json")
        return ModelSidecar.load(path) if path.is_file() else None

    def _run(self, names: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(names, {"image": np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))})

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """Pooled backbone features of a preprocessed batch."""
        return self._run(["features"], inputs)[0]

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "logits" not in self.outputs:
            raise CovidxrError("this ONNX graph holds the backbone only (no head): it gives features, not logits")
        features, logits = self._run(["features", "logits"], inputs)
        return features, logits

    def with_activations(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, logits and the Grad-CAM layer's activations (graphs exported since covidxr ships its
        graph hold them), for ``covidxr.runtime.cam``."""
        if "activations" not in self.outputs:
            raise CovidxrError(f"{self.path}: this graph has no Grad-CAM activations; export it again")
        features, logits, activations = self._run(["features", "logits", "activations"], inputs)
        return features, logits, activations
