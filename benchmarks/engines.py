"""Benchmark: backbone features with every engine and precision covidxr has on a CPU: torch eager fp32, torch
channels-last fp32, torch bf16 autocast, onnxruntime fp32 and onnxruntime int8 (static quantisation).

Nearly all of covidxr's time goes into one forward pass, preprocessed image → pooled backbone features (what
the feature cache stores), so this script measures that pass alone, side by side in one run, for each model
with pretrained weights here (``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``, at their
native sizes, ``create_model(name, pretrained=True)``) and for one larger network, ``resnet50`` at 224 px with
random weights (``create_model("resnet50", pretrained=False, image_size=224, seed=0)``): its timings are
those of the real network (random weights cost the same arithmetic), but its int8 accuracy says little
about a trained ResNet-50 (random activations have other ranges).

**Images.** ``--images`` real X-rays evenly spaced over ``metadata.csv`` of ``--data`` (every class, every
source) are decoded and preprocessed once per model (``covidxr.runtime.images.read_image`` + ``model.input_tensor``:
the model's own size and normalisation) into one tensor in memory; decoding is timed for reference and
never counted. ``--calibration-images`` *other* images, evenly spaced over the remaining rows, are prepared
the same way for the int8 calibration only.

**Variants**, each computing the pooled features of a preprocessed batch:

1. *torch eager fp32*: ``model.features(x)`` on the NCHW batch under ``torch.inference_mode()`` (the
   reference);
2. *torch channels-last fp32*: ``covidxr.lab.export.TorchEngine(model).features(x)``;
3. *torch bf16 autocast*: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``, where
   ``covidxr.lab.loop.bf16_supported`` says this CPU can ("not supported" otherwise);
4. *onnxruntime fp32*: ``covidxr.lab.export.feature_engine(model, "onnx", cache)``, which exports the backbone
   graph once into ``<cache>/onnx/`` of a fresh temporary cache (that call, export + onnx check + validation
   load + session, is timed once and printed, not counted);
5. *onnxruntime int8*: ``covidxr.lab.quantize.quantize_graph`` (static, QDQ) of that exported fp32 graph
   (``cached_export(model, backbone_sidecar(model), cache)``), calibrated on the calibration images
   (timed once, not counted), run by ``OnnxEngine``; "unavailable: reason" where it cannot be made.

Both onnxruntime sessions get the same settings: ``--threads`` intra-op threads (default: ``OnnxEngine``'s,
the physical cores) and no spinning between calls, as ``feature_engine`` builds its session. torch uses
``torch.get_num_threads()`` threads.

**Timing** (forward pass only, on the in-memory tensors): every batch shape of every variant is warmed up
first (2 untimed calls each); then each repetition runs, variant after variant (interleaved, so a slower
moment of a shared machine hits all of them), batch 1 over the first ``--latency-images`` images (one call
each) and ``--batch-size`` over all ``--images``. The median over ``--repeats`` repetitions is reported.
img/s: images over the whole pass; ms/img at batch 1 and ms/batch: the median call; ms/img at the batch
size: 1000 / img/s; x eager: img/s over torch eager fp32's at the same batch size; spread: (max - min) /
median of the batched img/s over the repetitions.

**Accuracy cost**: every variant's features at the batch size, on all images, against torch eager fp32's
on the same images: the largest absolute difference, that relative to the largest eager feature, and the
cosine similarity per image (mean and minimum over the images).

Run from the repository root on an otherwise idle machine (not part of the test suite; it writes nothing
into the repository)::

    .venv/bin/python benchmarks/engines.py
    .venv/bin/python benchmarks/engines.py --models efficientnet_lite0,resnet50 --threads 1
    .venv/bin/python benchmarks/engines.py --models efficientnet_lite0 --images 8 --latency-images 2 --repeats 1
    .venv/bin/python benchmarks/engines.py --integrity --images 32 --repeats 2

**Integrity checks** (``--integrity``, instead of everything above): what the content hashes on cached
exports and feature-cache entries cost, on the bundled model (EfficientNet-Lite0 + its head, engine
auto = onnxruntime) and the same ``--images``, with the checks as shipped and with them switched off in
this process only (``covidxr.runtime.engines.graph_sha256`` answering the sidecar's own hash without reading the
graph; ``FeatureCache.get`` loading an entry without hashing it; ``put`` still hashes). Interleaved over
``--repeats``, median reported: feature extraction with ``compute_features`` into an emptied feature
cache (forward passes + writes) and from the full cache (reads only), and ``predict_files`` (which builds
its engine each call: sidecar key, graph hash, validation load, session), plus the hash of the graph
alone and of one entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidxr.lab.export import TorchEngine, backbone_sidecar, cached_export, feature_engine
from covidxr.lab.loop import bf16_supported
from covidxr.lab.models import CovidxrNet, create_model, run_model
from covidxr.runtime.engines import OnnxEngine, physical_cores
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from machine import describe_load, isolated_cache, load_average, machine_lines, timed_pass, warm_up

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr3"
PRETRAINED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RANDOM = "resnet50"  # the larger network, randomly initialised (no weights here)

Forward = Callable[[torch.Tensor], np.ndarray]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    parser.add_argument(
        "--models",
        default=",".join([*PRETRAINED, RANDOM]),
        help=f"comma-separated, of {', '.join([*PRETRAINED, RANDOM])} (default: all)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=64,
        help="real X-rays timed, spaced evenly over metadata.csv (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="other X-rays, for the int8 calibration only (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-images",
        type=int,
        default=16,
        help="images timed one per call at batch 1 (at most --images; default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batched call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of everything (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: OnnxEngine's, physical cores)"
    )
    parser.add_argument(
        "--integrity", action="store_true", help="only measure the cache integrity checks (with vs without)"
    )
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - {*PRETRAINED, RANDOM})
    if unknown or not args.models:
        parser.error(f"--models: choose from {', '.join([*PRETRAINED, RANDOM])}, not {', '.join(unknown) or 'none'}")
    if min(args.images, args.calibration_images, args.latency_images, args.batch_size, args.repeats) < 1:
        parser.error("--images, --calibration-images, --latency-images, --batch-size and --repeats must be at least 1")
    cores = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cores:
        parser.error(f"--threads must be between 1 and {cores}")
    args.latency_images = min(args.latency_images, args.images)
    return args


def choose_images(data: Path, count: int, calibration: int) -> tuple[list[Path], list[Path]]:
    """``count`` files evenly spaced over ``metadata.csv``, and ``calibration`` others evenly spaced over the rest
    (int8 must not be calibrated on the images it is judged on)."""
    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    if count + calibration > len(meta):
        raise SystemExit(f"--images + --calibration-images = {count + calibration}: {data} has only {len(meta)}")
    timed = np.unique(np.linspace(0, len(meta) - 1, count).round().astype(int))
    rest = np.setdiff1d(np.arange(len(meta)), timed)
    others = rest[np.unique(np.linspace(0, len(rest) - 1, calibration).round().astype(int))]
    return [data / meta["filename"].iloc[i] for i in timed], [data / meta["filename"].iloc[i] for i in others]


def build_model(name: str) -> CovidxrNet:
    if name == RANDOM:
        return create_model(name, pretrained=False, image_size=224, seed=0)
    return create_model(name, pretrained=True)


def prepare(model: CovidxrNet, paths: list[Path]) -> torch.Tensor:
    """The model's input tensors of ``paths``, decoded and preprocessed once (the timed passes exclude this)."""
    return torch.stack([model.input_tensor(read_image(path)) for path in paths])


# ---------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of computing the features, its timings per repetition and its features of the last one."""

    name: str
    short: str
    forward: Forward | None  # None: not measured here (``note`` says why)
    note: str = ""
    single_rates: list[float] = field(default_factory=list)  # img/s at batch 1, one per repetition
    single_calls: list[float] = field(default_factory=list)  # seconds per call at batch 1, every call
    batch_rates: list[float] = field(default_factory=list)
    batch_calls: list[float] = field(default_factory=list)  # seconds per full batch, every call
    features: np.ndarray | None = None  # at the batch size, every image, last repetition


def eager(model: CovidxrNet) -> Forward:
    """The reference: the model's own modules on the NCHW batch, fp32."""

    @torch.inference_mode()
    def forward(inputs: torch.Tensor) -> np.ndarray:
        return model.features(inputs.contiguous()).numpy()

    return forward


def bf16(engine: TorchEngine) -> Forward:
    def forward(inputs: torch.Tensor) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return engine.features(inputs)

    return forward


def onnx_fp32(model: CovidxrNet, cache: Path, threads: int | None) -> tuple[Forward, Path, float]:
    """``feature_engine``'s onnx engine (with ``threads``: the same graph in a session of that many threads),
    the exported graph, and the seconds the first ``feature_engine`` call took (the export)."""
    started = time.perf_counter()
    engine = feature_engine(model, "onnx", cache)
    export_seconds = time.perf_counter() - started
    path = cached_export(model, backbone_sidecar(model), cache)
    if threads is not None:
        engine = OnnxEngine(path, threads=threads, spin=False)
    return engine.features, path, export_seconds


def onnx_int8(
    fp32: Path, calibration: list[Path], model: CovidxrNet, threads: int | None
) -> tuple[Forward | None, str, float | None]:
    """The statically quantised copy of the fp32 graph in an onnxruntime session like the fp32 one, a note,
    and the seconds quantisation took; no engine and the reason where it cannot be made."""
    try:
        from covidxr.lab.quantize import quantize_graph
    except ImportError as exc:
        return None, f"unavailable: covidxr.lab.quantize cannot be imported ({exc})", None
    inputs = prepare(model, calibration).numpy()
    started = time.perf_counter()
    try:
        path = quantize_graph(fp32, fp32.with_name(f"{fp32.stem}-int8.onnx"), inputs, "static")
        seconds = time.perf_counter() - started
        engine = OnnxEngine(path, threads=threads, spin=False)
    except CovidxrError as exc:
        return None, f"unavailable: {exc}", None
    return engine.features, "", seconds


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(variants: list[Variant], inputs: torch.Tensor, args: argparse.Namespace, label: str) -> None:
    active = [v for v in variants if v.forward is not None]
    for variant in active:
        warm_up(variant.forward, inputs, args.batch_size)
    latency_inputs = inputs[: args.latency_images]
    for repeat in range(args.repeats):
        print(f"  {label}: repetition {repeat + 1} of {args.repeats} ...", file=sys.stderr, flush=True)
        for variant in active:
            seconds, calls, _ = timed_pass(variant.forward, latency_inputs, 1)
            variant.single_rates.append(len(latency_inputs) / seconds)
            variant.single_calls += calls
            seconds, calls, outputs = timed_pass(variant.forward, inputs, args.batch_size)
            variant.features = np.concatenate(outputs)
            variant.batch_rates.append(len(inputs) / seconds)
            variant.batch_calls += calls


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def agreement(features: np.ndarray, reference: np.ndarray) -> tuple[float, float, float, float]:
    """Largest absolute difference, that over the largest reference feature, and the per-image cosine
    similarity's mean and minimum."""
    features, reference = features.astype(np.float64), reference.astype(np.float64)
    largest = float(np.abs(features - reference).max())
    cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
    return largest, largest / float(np.abs(reference).max()), float(cosine.mean()), float(cosine.min())


def print_table(variants: list[Variant], args: argparse.Namespace, n_images: int) -> None:
    b = args.batch_size
    print(
        f"   {'':<31s}{'batch 1':>9s}{'':>9s}{'batch ' + str(b):>10s}{'':>20s}{'x eager':>16s}{'':>8s}"
        f"{'features vs eager fp32 (batch ' + str(b) + ')':>40s}"
    )
    print(
        f"   {'variant':<31s}{'img/s':>9s}{'ms/img':>9s}{'img/s':>10s}{'ms/batch':>10s}{'ms/img':>10s}"
        f"{'b1':>8s}{'b' + str(b):>8s}{'spread':>8s}{'max |df|':>10s}{'rel':>10s}{'cos mean':>10s}{'cos min':>10s}"
    )
    reference = variants[0]
    for variant in variants:
        if variant.forward is None:
            print(f"   {variant.name:<31s}{variant.note}")
            continue
        single, batched = median(variant.single_rates), median(variant.batch_rates)
        spread = (max(variant.batch_rates) - min(variant.batch_rates)) / batched
        largest, relative, cos_mean, cos_min = agreement(variant.features, reference.features)
        print(
            f"   {variant.name:<31s}{single:>9.1f}{median(variant.single_calls) * 1000:>9.1f}"
            f"{batched:>10.1f}{median(variant.batch_calls) * 1000:>10.1f}{1000 / batched:>10.2f}"
            f"{single / median(reference.single_rates):>7.2f}x{batched / median(reference.batch_rates):>7.2f}x"
            f"{spread:>8.0%}{largest:>10.1e}{relative:>10.1e}{cos_mean:>10.6f}{cos_min:>10.6f}"
            + (f"  {variant.note}" if variant.note else "")
        )
    full = n_images // b
    print(
        f"   batch 1 over {args.latency_images} image(s), batch {b} over {n_images} ({full} full batch(es)"
        + (f" + one of {n_images % b}" if n_images % b else "")
        + f"); median of {args.repeats} repetition(s). img/s: images over the whole pass; ms/img at batch 1 and "
        f"ms/batch: median call; ms/img at batch {b}: 1000 / img/s; x eager: img/s over torch eager fp32's; "
        f"spread: (max - min) / median of the batch-{b} img/s over the repetitions; rel: max |df| over the "
        "largest eager |feature|; cos: cosine similarity of each image's features to eager's."
    )


def print_summary(results: dict[str, list[Variant]], batch: int) -> None:
    """Every model's batched img/s per variant and x eager, in one table."""
    shorts = [v.short for v in next(iter(results.values()))]
    print(f"summary: img/s at batch {batch} (x torch eager fp32)")
    print(f"   {'model':<20s}" + "".join(f"{short:>20s}" for short in shorts))
    for name, variants in results.items():
        eager_rate = median(variants[0].batch_rates)
        cells = [
            f"{median(v.batch_rates):.1f} ({median(v.batch_rates) / eager_rate:.2f}x)" if v.forward else "n/a"
            for v in variants
        ]
        print(f"   {name:<20s}" + "".join(f"{cell:>20s}" for cell in cells))
    print()


# ---------------------------------------------------------------------------------------------


def benchmark_model(
    name: str, paths: list[Path], calibration: list[Path], args: argparse.Namespace, cache: Path
) -> list[Variant]:
    started = time.perf_counter()
    model = build_model(name)
    build_seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.backbone.parameters())
    print(
        f"{name}: {model.weights.kind} weights ({model.weights.location}), {model.image_size} x {model.image_size}, "
        f"{model.spec.num_features} features, {parameters / 1e6:.1f} M backbone parameters; built in "
        f"{build_seconds:.1f} s"
    )
    started = time.perf_counter()
    inputs = prepare(model, paths)
    decode_seconds = time.perf_counter() - started
    print(
        f"   images: {len(paths)} decoded and preprocessed in {decode_seconds:.2f} s "
        f"({len(paths) / decode_seconds:.1f} img/s, one core; not counted), {inputs.numel() * 4 / 2**20:.0f} MiB"
    )

    torch_engine = TorchEngine(model)
    can_bf16 = bf16_supported(torch.device("cpu"))
    fp32_forward, fp32_path, export_seconds = onnx_fp32(model, cache, args.threads)
    int8_forward, int8_note, quantize_seconds = onnx_int8(fp32_path, calibration, model, args.threads)
    print(
        f"   onnx export of the backbone graph (feature_engine, fresh cache): {export_seconds:.1f} s once, not counted"
    )
    if quantize_seconds is not None:
        print(
            f"   int8 static quantisation (quantize_graph, {len(calibration)} other calibration images): "
            f"{quantize_seconds:.1f} s, once; not counted"
        )
    variants = [
        Variant("torch eager fp32 (NCHW)", "eager fp32", eager(model), "reference"),
        Variant("torch channels-last fp32", "ch-last fp32", torch_engine.features, "TorchEngine"),
        Variant(
            "torch bf16 autocast (ch-last)",
            "bf16",
            bf16(torch_engine) if can_bf16 else None,
            "" if can_bf16 else "not supported",
        ),
        Variant("onnxruntime fp32", "onnx fp32", fp32_forward, "feature_engine"),
        Variant("onnxruntime int8 (static QDQ)", "onnx int8", int8_forward, int8_note),
    ]
    measure(variants, inputs, args, name)
    print_table(variants, args, len(paths))
    print()
    return variants


def integrity_costs(paths: list[Path], repeats: int, cache: Path) -> None:
    """Throughput with the content-hash checks on cached exports and feature entries, and without them."""
    import covidxr.runtime.engines as engines
    from covidxr.lab.features import FeatureCache, compute_features
    from covidxr.runtime.inference import predict_files
    from covidxr.runtime.runs import default_model_path, load_run

    run = load_run(default_model_path())
    checked_graph, checked_get = engines.graph_sha256, FeatureCache.get

    def unchecked_graph(path: str | Path) -> str:
        return json.loads(Path(path).with_suffix(".json").read_text())["sha256"]

    def unchecked_get(self: FeatureCache, digest: str) -> np.ndarray | None:
        path = self._path(digest)
        return np.load(path, allow_pickle=False)["features"] if path.exists() else None

    def switch(on: bool) -> None:
        engines.graph_sha256 = checked_graph if on else unchecked_graph
        FeatureCache.get = checked_get if on else unchecked_get

    compute_features(run_model(run), paths[:1], cache, progress=False)  # exports the backbone graph once
    predict_files(run, paths[:1], cache, progress=False)  # and the run's graph
    timings: dict[tuple[str, bool], list[float]] = {}
    for repeat in range(repeats):
        print(f"  integrity: repetition {repeat + 1} of {repeats} ...", file=sys.stderr, flush=True)
        for on in (True, False):
            switch(on)
            shutil.rmtree(cache / "features", ignore_errors=True)
            for what, call in (
                ("extract, empty cache", lambda: compute_features(run_model(run), paths, cache, progress=False)),
                ("extract, full cache", lambda: compute_features(run_model(run), paths, cache, progress=False)),
                ("predict_files", lambda: predict_files(run, paths, cache, progress=False)),
            ):
                started = time.perf_counter()
                call()
                timings.setdefault((what, on), []).append(time.perf_counter() - started)
    switch(True)
    print(f"integrity checks: {len(paths)} images, bundled model, engine auto (onnxruntime), median of {repeats}")
    print(f"   {'':<24s}{'with check img/s':>18s}{'without img/s':>16s}{'cost':>9s}")
    for what in ("extract, empty cache", "extract, full cache", "predict_files"):
        with_check, without = (len(paths) / median(timings[(what, on)]) for on in (True, False))
        print(f"   {what:<24s}{with_check:>18.1f}{without:>16.1f}{(without / with_check - 1):>9.1%}")
    graph = cached_export(
        run_model(run), engines.sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold), cache
    )
    started = time.perf_counter()
    engines.graph_sha256(graph)
    graph_ms = (time.perf_counter() - started) * 1000
    cached = FeatureCache(run_model(run), cache, engine="onnx")
    digest = next((cache / "features").rglob("*.npy")).stem
    started = time.perf_counter()
    for _ in range(1000):
        cached.get(digest)
    get_checked = (time.perf_counter() - started) * 1000
    switch(False)
    started = time.perf_counter()
    for _ in range(1000):
        cached.get(digest)
    get_unchecked = (time.perf_counter() - started) * 1000
    switch(True)
    print(
        f"   graph SHA-256 ({graph.stat().st_size / 2**20:.1f} MiB): {graph_ms:.1f} ms per engine built; "
        f"feature entry read: {get_checked:.0f} us checked, {get_unchecked:.0f} us unchecked"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = load_average()
    started_all = time.perf_counter()
    if args.integrity:
        with isolated_cache("integrity") as tmp:
            paths, _ = choose_images(args.data, args.images, 1)
            print("covidxr engines benchmark: the cost of the cache integrity checks")
            print(machine_lines())
            print(f"  load avg:    {describe_load(load_at_start)} at start")
            integrity_costs(paths, args.repeats, tmp / "cache")
        print(f"total {time.perf_counter() - started_all:.0f} s")
        return
    with isolated_cache("engines") as tmp:
        paths, calibration = choose_images(args.data, args.images, args.calibration_images)
        print("covidxr engines benchmark: backbone features with torch (fp32, channels-last, bf16) and onnxruntime")
        print("(fp32, int8), forward pass only, on real X-rays")
        print(f"  data:        {Path(args.data).resolve()}")
        print(
            f"  images:      {len(paths)} timed (batch 1: the first {args.latency_images}), evenly spaced over "
            f"metadata.csv; {len(calibration)} others for int8 calibration"
        )
        print(machine_lines())
        print(
            f"  threads:     torch {torch.get_num_threads()}, onnxruntime intra-op "
            + (f"{args.threads} (--threads)" if args.threads else f"{physical_cores()} (OnnxEngine's default)")
        )
        print(f"  load avg:    {describe_load(load_at_start)} at start")
        print()
        results = {name: benchmark_model(name, paths, calibration, args, tmp / "cache") for name in args.models}
        print_summary(results, args.batch_size)
    print(f"total {time.perf_counter() - started_all:.0f} s; load average at the end: ", end="")
    print(describe_load(load_average(), torch.get_num_threads()))


if __name__ == "__main__":
    main()
