"""Opt-in int8: a run's exported graph quantised by onnxruntime's tools, kept only where it stays accurate.

Static quantisation (QDQ, int8 weights per channel, uint8 activations; the first convolution and the
dense head stay in fp32) is calibrated on the run's own training images; dynamic quantisation (weights
only) needs no calibration. ``quantize_run`` measures what int8 costs and gains on the run's validation
split — the accuracy of the labels users get (``predict``'s decision: the operating threshold, the
out-of-distribution guard, the lung and blank checks; an image given no answer is not right, as ``evaluate``
counts it), the share answered, COVID-19-versus-rest AUC, images per second, each beside fp32 — and refuses (keeping
nothing) when accuracy or AUC drop by more than ``MAX_DROP`` (a graph accepted before stays). int8 kernels
differ between CPUs (VNNI, AMX or neither), so the verdict holds for the CPU it was measured on, which the
report names. An accepted graph is cached beside the fp32 export, keyed by it, and used by
``covidxr predict --engine int8``; the report is written beside it and printed. Grad-CAM keeps using
torch, which has the gradients.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from covidxr import DISCLAIMER
from covidxr.lab.export import cached_export, sidecar
from covidxr.lab.models import run_model
from covidxr.runtime.batches import iterate_batches
from covidxr.runtime.calibration import POSITIVE
from covidxr.runtime.engines import OnnxEngine, graph_sha256, int8_instructions, shared_engine_threads
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import answer
from covidxr.runtime.ood import MARGIN, QUANTILE
from covidxr.runtime.preprocess import InputTransform
from covidxr.runtime.records import ModelSidecar
from covidxr.runtime.runners import input_transform, make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import exclusive_temp, stable_digest

__all__ = ["METHODS", "graph_paths", "int8_path", "int8_runner", "quantize_graph", "quantize_run", "report_digest"]

METHODS = ("static", "dynamic")
MAX_DROP = 0.02  # largest accepted loss of validation accuracy or AUC (absolute), unless told otherwise
CALIBRATION_IMAGES = 128


def quantize_graph(source: Path, out: Path, calibration_inputs: np.ndarray | None, method: str = "static") -> Path:
    """Quantise the ONNX graph at ``source`` into ``out`` (static: calibrated on ``calibration_inputs``,
    float32 [N, 3, S, S] preprocessed images; dynamic: weights only)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if method not in METHODS:
        raise CovidxrError(f"quantisation method must be one of {', '.join(METHODS)}, not {method!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = exclusive_temp(out, ".pre.onnx")  # new files of random names: a planted link is never followed
    tmp = exclusive_temp(out, ".tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(source), str(prepared))  # shape inference and graph clean-up first
            kept_in_fp32 = _fp32_nodes(onnx.load(str(prepared)).graph.node)
            if method == "dynamic":
                quantize_dynamic(
                    str(prepared),
                    str(tmp),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    nodes_to_exclude=kept_in_fp32,
                )
            else:
                if calibration_inputs is None or not len(calibration_inputs):
                    raise CovidxrError("static quantisation needs calibration images")

                class Batches(CalibrationDataReader):
                    def __init__(self) -> None:
                        self.batches = iter(np.array_split(calibration_inputs, max(1, len(calibration_inputs) // 16)))

                    def get_next(self) -> dict | None:
                        batch = next(self.batches, None)
                        return None if batch is None else {"image": np.ascontiguousarray(batch, dtype=np.float32)}

                quantize_static(
                    str(prepared),
                    str(tmp),
                    Batches(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    nodes_to_exclude=kept_in_fp32,
                )
        os.replace(tmp, out)
    except CovidxrError:
        raise
    except Exception as exc:  # onnxruntime's tools raise many types; any of them means no usable graph
        raise CovidxrError(f"{source}: could not be quantised ({type(exc).__name__}: {exc})") from None
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def _fp32_nodes(nodes) -> list[str]:
    """The first convolution (it sees the raw image, whose range calibration fits worst) and the dense head
    (a few thousand multiply-adds, where int8 gains nothing and every logit error shows): kept in fp32.
    Measured on the bundled model's 185 validation images, this changes 9 labels instead of 12."""
    first_conv = next((node.name for node in nodes if node.op_type == "Conv"), None)
    head = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    return ([first_conv] if first_conv else []) + head


def graph_paths(run: Run, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The fp32 export of ``run`` (made if missing) and where its int8 copy lives: beside it, named after it."""
    fp32 = cached_export(
        run_model(run), sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold), cache_dir
    )
    return fp32, fp32.with_name(f"{fp32.stem}-int8.onnx")


def int8_path(run: Run, cache_dir: str | Path | None = None) -> Path:
    """Where the int8 graph of ``run`` lives."""
    return graph_paths(run, cache_dir)[1]


def _inputs(run: Run, paths: list[Path]) -> np.ndarray:
    """Preprocessed images (unreadable ones are refused: the run's own data must be readable)."""
    batches = []
    for _, inputs, errors, *_ in iterate_batches(paths, run_model(run).input_transform, 32, 1, None):
        if any(errors):
            raise CovidxrError(next(e for e in errors if e))
        batches.append(inputs)
    return np.concatenate(batches)


def _validation(run: Run, transform: InputTransform, paths: list[Path]) -> tuple[np.ndarray, list[bool], list]:
    """The validation images as ``predict`` prepares them (reduced decoding, the lung check, the blank check):
    inputs, blank flags and lung reasons. Unreadable ones are refused: the run's own data must be readable."""
    inputs, blanks, reasons = [], [], []
    for _, batch, errors, flat, lungs, _ in iterate_batches(
        paths, transform, 32, 1, None, check_lungs=True, draft=True
    ):
        if any(errors):
            raise CovidxrError(next(e for e in errors if e))
        inputs.append(batch)
        blanks += flat
        reasons += [reason or None for reason in lungs]
    return np.concatenate(inputs), blanks, reasons


def _forward(engine: OnnxEngine, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Features, logits and images per second (batches of 32, after a warm-up of both batch shapes)."""
    engine(inputs[:32]), engine(inputs[len(inputs) - len(inputs) % 32 :] if len(inputs) % 32 else inputs[:32])
    started = time.perf_counter()
    outputs = [engine(inputs[i : i + 32]) for i in range(0, len(inputs), 32)]
    seconds = time.perf_counter() - started
    features = np.concatenate([batch_features for batch_features, _ in outputs])
    return features, np.concatenate([batch_logits for _, batch_logits in outputs]), round(len(inputs) / seconds, 1)


def _score(run: Run, forward: tuple, blanks: list[bool], reasons: list, targets: np.ndarray, ood: float | None) -> dict:
    """What users get, scored as ``evaluate`` scores it: the labels ``predict`` gives (``inference.answer``: the
    operating threshold, the out-of-distribution guard at ``ood``, the lung and blank checks), an image given no
    answer counting as not right; also the share answered and the COVID-19-versus-rest AUC of p(COVID-19)."""
    features, logits, speed = forward
    answers = answer(run, features, logits, blanks, reasons, ood)
    labels = [result["label"] for result in answers]
    right = np.array([label == run.labels[target] for label, target in zip(labels, targets, strict=True)])
    answered = np.array([label is not None for label in labels])
    covid = np.array([result["probabilities"][POSITIVE] for result in answers])
    is_covid = targets == run.labels.index(POSITIVE)
    auc = float(roc_auc_score(is_covid, covid)) if 0 < is_covid.sum() < len(targets) else None
    return {
        "accuracy": float(right.mean()),
        "answered": float(answered.mean()),
        "accuracy_when_answered": float(right[answered].mean()) if answered.any() else None,
        "covid_auc": auc,
        "images_per_second": speed,
        "labels": labels,
    }


def quantize_run(
    run: Run,
    method: str = "static",
    max_drop: float = MAX_DROP,
    calibration_images: int = CALIBRATION_IMAGES,
    cache_dir: str | Path | None = None,
    data_root: str | Path | None = None,
) -> dict:
    """Quantise ``run``'s graph, compare it with fp32 on the validation split, and keep it only if
    neither accuracy nor AUC drops by more than ``max_drop``. Returns the report (also written as
    ``<int8 graph>.json``); raises CovidxrError, keeping nothing, when refused.

    ``data_root``: the folder the run's ``splits.csv`` file names are relative to (default: the one
    recorded in the run; the bundled model records none, so pass the folder holding cxr3 and
    adult-controls)."""
    if not 0 <= max_drop < 1:
        raise CovidxrError(f"--max-drop must be in [0, 1), not {max_drop}")
    root = Path(data_root or run.info.data)
    split = run.splits()
    missing = [f for f in split["filename"][:1] if not (root / f).is_file()]
    if missing:
        raise CovidxrError(f"{root / missing[0]}: not found; pass the folder the run's images are in (--data)")
    train_paths = [root / f for f in split.loc[split["split"] == "train", "filename"]]
    val = split[split["split"] == "val"]
    if not len(val):
        raise CovidxrError(f"{run.path}: has no validation split to check the quantised model on")
    rng = np.random.default_rng(run.config.seed)
    chosen = sorted(rng.choice(len(train_paths), min(calibration_images, len(train_paths)), replace=False))
    calibration = _inputs(run, [train_paths[i] for i in chosen]) if method == "static" else None
    fp32_path, out = graph_paths(run, cache_dir)
    fp32_info = ModelSidecar.load(fp32_path.with_suffix(".json"))
    candidate = out.with_name(f"{out.stem}.{os.getpid()}.candidate.onnx")  # an accepted graph stays until replaced
    started = time.perf_counter()
    quantize_graph(fp32_path, candidate, calibration, method)
    quantize_seconds = time.perf_counter() - started
    # The fp32 graph predict runs: the run's own where it ships one (the bundled model does), else the export.
    fp32_engine = make_engine(run, "onnx", cache_dir) if run.graph is not None else OnnxEngine(fp32_path, spin=False)
    val_inputs, blanks, reasons = _validation(
        run, input_transform(run, fp32_engine), [root / f for f in val["filename"]]
    )
    targets = np.array([run.labels.index(label) for label in val["label"]])
    fp32 = _score(run, _forward(fp32_engine, val_inputs), blanks, reasons, targets, None)
    try:
        int8_forward = _forward(OnnxEngine(candidate, spin=False), val_inputs)
    except BaseException:
        candidate.unlink(missing_ok=True)
        raise
    # int8 features lie further from the fp32 training statistics than fp32 features do, so the
    # out-of-distribution guard's threshold is chosen again, by its own rule, on int8 validation features.
    ood_threshold = _int8_guard_threshold(run, int8_forward[0])
    int8 = _score(run, int8_forward, blanks, reasons, targets, ood_threshold)
    drops = {"accuracy": fp32["accuracy"] - int8["accuracy"]}
    if fp32["covid_auc"] is not None:
        drops["covid_auc"] = fp32["covid_auc"] - int8["covid_auc"]
    accepted = all(drop <= max_drop for drop in drops.values())
    report = {
        "format": "covidxr-int8-1",
        "run": str(run.path),
        "method": method,
        "calibration_images": 0 if calibration is None else len(calibration),
        "validation_images": len(val),
        # Scored on the labels users get (threshold, OOD guard, lung and blank checks; no answer is not right).
        "scored": "decisions",
        "fp32": {k: v for k, v in fp32.items() if k != "labels"},
        "int8": {k: v for k, v in int8.items() if k != "labels"},
        "speed_up": round(int8["images_per_second"] / fp32["images_per_second"], 2),
        "labels_changed": sum(a != b for a, b in zip(fp32["labels"], int8["labels"], strict=True)),
        "drop": drops,
        "max_drop": max_drop,
        "accepted": accepted,
        "quantize_seconds": round(quantize_seconds, 1),
        # int8 kernels, and so int8 figures, differ between CPUs with and without VNNI.
        "cpu_int8_instructions": int8_instructions(),
        "graph": str(out) if accepted else None,
        "ood_threshold": ood_threshold,
        # What the runtime needs to feed the graph (as the fp32 graph's sidecar says).
        "image_size": fp32_info.image_size,
        "pipeline": fp32_info.pipeline,
        "normalisation": fp32_info.normalisation,
        "labels": fp32_info.labels,
        "disclaimer": DISCLAIMER,
    }
    if not accepted:
        candidate.unlink(missing_ok=True)
        worst = max(drops, key=drops.get)
        raise CovidxrError(
            f"int8 refused: validation {worst.replace('covid_auc', 'COVID-19 AUC')} drops by "
            f"{drops[worst]:.3f} (> {max_drop}; {len(val)} images, one is {1 / len(val):.3f}; "
            f"CPU int8: {report['cpu_int8_instructions']}); the fp32 engine stays in use"
        )
    os.replace(candidate, out)
    report["sha256"] = graph_sha256(out)
    report["report_sha256"] = report_digest(report)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


def report_digest(report: dict) -> str:
    """The SHA-256 of an int8 report, over every key but this one (``sha256``, the graph's, among them), so
    the graph and what feeds and judges it (input size, pipeline, normalisation, OOD threshold) are checked
    together: an edited report is refused like an edited graph. It catches edits and damage, not forgery."""
    return stable_digest({key: value for key, value in report.items() if key != "report_sha256"})


def _int8_guard_threshold(run: Run, val_features: np.ndarray) -> float | None:
    """The guard's threshold rule (``MARGIN`` x the ``QUANTILE`` of validation scores) on int8 features."""
    guard = run.ood_guard
    if guard is None:
        return None
    return float(np.quantile(guard.score(val_features), QUANTILE) * MARGIN)


def int8_runner(run: Run, requested: str, cache_dir: str | Path | None, threads: int | None) -> OnnxEngine:
    """The ``int8`` runner (entry point ``covidxr.runners``): the accepted int8 graph of ``run``
    (``covidxr quantize`` first)."""
    path = int8_path(run, cache_dir)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise CovidxrError(f"{run.path}: no accepted int8 model yet; run `covidxr quantize {run.path}` first")
    where = path.with_suffix(".json")
    again = f"run `covidxr quantize {run.path}` again"
    try:
        report = json.loads(where.read_text())
        sealed = report.get("report_sha256") == report_digest(report)
    except (OSError, ValueError, AttributeError, TypeError):
        report, sealed = {}, False
    if not sealed:
        raise CovidxrError(
            f"{where}: the int8 report does not match the SHA-256 recorded when it was accepted (altered, "
            f"damaged, or accepted before covidxr recorded it); {again}"
        )
    if report.get("sha256") != graph_sha256(path):
        # It cannot be rebuilt here (that needs the calibration images and the acceptance test).
        raise CovidxrError(
            f"{path}: the int8 graph does not match the SHA-256 recorded when it was accepted (altered, or "
            f"accepted before covidxr recorded it); {again}"
        )
    engine = OnnxEngine(path, shared_engine_threads() if threads is None else threads, spin=False)
    engine.sidecar = ModelSidecar.from_dict(report, where)  # what was checked is what feeds the graph
    engine.ood_threshold = report["ood_threshold"]
    return engine
