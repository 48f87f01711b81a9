"""Benchmark: would an int8 lung segmenter pay (issue 27 item 3, "use the int8 segmenter if accuracy holds")?

Quantises the bundled segmenter (``bundled/lungs.onnx``) with onnxruntime's static quantisation (QDQ, per-channel
int8 weights, uint8 activations), calibrated on ``--calibration`` real cxr3 X-rays, into a temporary folder (nothing
is kept), then on ``--images`` other X-rays of the same folder, in one run:

- the session's ms per image, fp32 and int8, one thread, batches of 1 (the lung crop) and 2 (the orientation
  check's turned views), interleaved ``--repeats`` times, medians, and the ratio fp32 / int8;
- how far the int8 masks are from the fp32 ones: pixels called lung by one and not the other, the Dice of the two
  masks, the largest per-pixel probability difference, and the images whose lung reason or box changes.

The speed of int8 depends on the CPU's instructions (AVX-512 VNNI and AMX here); the header prints them. Run from
the repository root::

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/segmenter_int8.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from covidxr.runtime.engines import cpu_flags
from covidxr.runtime.images import read_image
from covidxr.runtime.lungs import GRAPH, LungSegmenter, model_input, normalise
from machine import REPO, cpu_model, describe_load, load_average


class Calibration(CalibrationDataReader):
    """The calibration images, one at a time, as onnxruntime's quantiser reads them."""

    def __init__(self, name: str, inputs: list[np.ndarray]):
        self.feeds = iter([{name: x[None, None]} for x in inputs])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    meta = pd.read_csv(args.data / "metadata.csv", dtype=str, keep_default_na=False)
    rows = np.linspace(0, len(meta) - 1, args.calibration + args.images).round().astype(int)
    greys = [np.asarray(read_image(args.data / name, 948).convert("L")) for name in meta["filename"].iloc[rows]]
    segmenter = LungSegmenter()
    inputs = [normalise(model_input(grey, segmenter.size)) for grey in greys]
    calibration, test = inputs[: args.calibration], np.stack(inputs[args.calibration :])[:, None]
    print(f"int8 lung segmenter: {len(calibration)} calibration and {len(test)} test X-rays from {args.data}")
    flags = ", ".join(cpu_flags("avx512_vnni", "avx_vnni", "amx_int8", "avx2")) or "none of them"
    print(f"  CPU: {cpu_model()}; int8 instructions: {flags}; load at start: {describe_load(load_average())}")

    with tempfile.TemporaryDirectory(prefix="covidxr-int8-lungs-") as tmp:
        prepared, quantised = Path(tmp) / "lungs-pre.onnx", Path(tmp) / "lungs-int8.onnx"
        quant_pre_process(str(GRAPH), str(prepared), skip_symbolic_shape=True)
        name = segmenter.input_name
        quantize_static(
            str(prepared),
            str(quantised),
            Calibration(name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        sessions = {"fp32": session(GRAPH), "int8": session(quantised)}
        print("\nSession, one thread, ms per image (median of interleaved repeats):")
        for batch in (1, 2):
            times: dict[str, list[float]] = {kind: [] for kind in sessions}
            for _ in range(args.repeats):
                for kind, run in sessions.items():
                    started = time.perf_counter()
                    for start in range(0, len(test), batch):
                        run.run(None, {name: test[start : start + batch]})
                    times[kind].append((time.perf_counter() - started) / len(test))
            fp32, int8 = (1000 * statistics.median(times[kind]) for kind in ("fp32", "int8"))
            print(f"  batch {batch}: fp32 {fp32:.3f} ms, int8 {int8:.3f} ms, fp32 / int8 {fp32 / int8:.2f}x")
        probabilities = {
            kind: 1.0 / (1.0 + np.exp(-run.run(None, {name: test})[0][:, 0])) for kind, run in sessions.items()
        }

    fp32, int8 = probabilities["fp32"], probabilities["int8"]
    called, other = fp32 >= segmenter.threshold, int8 >= segmenter.threshold
    dice = 2 * (called & other).sum() / (called.sum() + other.sum())
    changed = 0
    for grey, a, b in zip(greys[args.calibration :], fp32, int8, strict=True):
        one = segmenter.fields(np.rint(255 * a).astype(np.uint8), grey.shape)
        two = segmenter.fields(np.rint(255 * b).astype(np.uint8), grey.shape)
        changed += (one.box, one.reason) != (two.box, two.reason)
    print("\nMasks, int8 against fp32:")
    print(f"  pixels called differently: {(called != other).mean():.4%}; Dice {dice:.4f}")
    print(f"  largest probability difference: {np.abs(fp32 - int8).max():.3f}")
    print(f"  images whose lung box or reason changes: {changed} of {len(test)}")
    print(f"load at end: {describe_load(load_average())}")


if __name__ == "__main__":
    main()
