"""Benchmark: which onnxruntime quantisation settings keep int8 within ``covidxr quantize``'s bar (issue 21).

The bundled model's fp32 graph is quantised statically (QDQ) under each setting, calibrated on
``--calibration-images`` of its training images (chosen as ``quantize_run`` chooses them), and compared with
fp32 on its validation split: accuracy drop, COVID-19 AUC, labels changed and the largest / mean change of a
probability. int8 kernels differ between CPUs (VNNI, AMX or neither), so the figures hold for the CPU printed
in the header. Run from the repository root with the data beside it (writes nothing into the repository)::

    .venv/bin/python benchmarks/int8_settings.py --data ../shared/data
    .venv/bin/python benchmarks/int8_settings.py --data ../shared/data --settings current,keep_first_head
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from sklearn.metrics import roc_auc_score

from covidxr.lab.quantize import _inputs, graph_paths
from covidxr.runtime.calibration import POSITIVE, softmax
from covidxr.runtime.engines import OnnxEngine, int8_instructions
from covidxr.runtime.runs import default_model_path, load_run
from machine import cpu_model


def settings(nodes: list[onnx.NodeProto]) -> dict[str, dict]:
    """Each setting's keyword arguments to ``quantize_static`` (beyond QDQ, per-channel S8 weights, U8 activations)."""
    convs = [node.name for node in nodes if node.op_type == "Conv"]
    head = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    depthwise = [
        node.name
        for node in nodes
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]
    keep = [convs[0], *head]
    return {
        "current": {},
        "reduce_range": {"reduce_range": True},
        "s8_activations": {"activation_type": QuantType.QInt8},
        "keep_head": {"nodes_to_exclude": head},
        "keep_first_head": {"nodes_to_exclude": keep},  # what covidxr quantize ships
        "percentile": {"calibrate_method": CalibrationMethod.Percentile},
        "entropy": {"calibrate_method": CalibrationMethod.Entropy},
        "reduce_range_keep": {"reduce_range": True, "nodes_to_exclude": keep},
        "percentile_keep": {"calibrate_method": CalibrationMethod.Percentile, "nodes_to_exclude": keep},
        "qoperator": {"quant_format": QuantFormat.QOperator},
        "keep_depthwise": {"nodes_to_exclude": depthwise + head},
        "keep_depthwise_first_head": {"nodes_to_exclude": depthwise + keep},
        "keep_first_head_last4": {"nodes_to_exclude": keep + convs[-4:]},
        "s8_keep": {"activation_type": QuantType.QInt8, "nodes_to_exclude": keep},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="The folder holding cxr3/ and adult-controls/.")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--settings", default=None, help="Comma-separated names (default: all).")
    args = parser.parse_args()
    run = load_run(default_model_path())
    split = run.splits()
    train = [args.data / f for f in split.loc[split["split"] == "train", "filename"]]
    val = split[split["split"] == "val"]
    chosen = sorted(np.random.default_rng(run.config.seed).choice(len(train), args.calibration_images, replace=False))
    calibration = _inputs(run, [train[i] for i in chosen])
    inputs = _inputs(run, [args.data / f for f in val["filename"]])
    targets = np.array([run.labels.index(label) for label in val["label"]])
    covid = run.labels.index(POSITIVE)
    with tempfile.TemporaryDirectory(prefix="covidxr-int8-") as tmp:
        fp32_path, _ = graph_paths(run, tmp)
        fp32 = softmax(OnnxEngine(fp32_path, spin=False)(inputs)[1].astype(np.float64), run.temperature)
        fp32_accuracy = (fp32.argmax(1) == targets).mean()
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        table = settings(list(onnx.load(str(prepared)).graph.node))
        names = args.settings.split(",") if args.settings else list(table)
        print(f"int8 settings on the bundled model ({len(inputs)} validation images, {len(calibration)} calibration)")
        print(f"  CPU: {cpu_model()}; int8 instructions: {int8_instructions()}")
        print(
            f"  fp32: accuracy {fp32_accuracy:.3f}, COVID-19 AUC {roc_auc_score(targets == covid, fp32[:, covid]):.3f}"
        )
        print(f"  {'setting':28s} {'drop':>6s} {'AUC':>6s} {'changed':>8s} {'max dp':>7s} {'mean dp':>8s}")
        for name in names:

            class Batches(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

                def get_next(self) -> dict | None:
                    batch = next(self.batches, None)
                    return None if batch is None else {"image": np.ascontiguousarray(batch, dtype=np.float32)}

            options = {
                "quant_format": QuantFormat.QDQ,
                "per_channel": True,
                "weight_type": QuantType.QInt8,
                "activation_type": QuantType.QUInt8,
            } | table[name]
            out = Path(tmp) / f"{name}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(prepared), str(out), Batches(), **options)
            int8 = softmax(OnnxEngine(out, spin=False)(inputs)[1].astype(np.float64), run.temperature)
            change = np.abs(int8 - fp32).max(1)
            print(
                f"  {name:28s} {fp32_accuracy - (int8.argmax(1) == targets).mean():+6.3f} "
                f"{roc_auc_score(targets == covid, int8[:, covid]):6.3f} {(int8.argmax(1) != fp32.argmax(1)).sum():8d} "
                f"{change.max():7.3f} {change.mean():8.3f}"
            )


if __name__ == "__main__":
    main()
