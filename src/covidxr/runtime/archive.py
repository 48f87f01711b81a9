"""``predict --ray``: a whole archive predicted on Ray Data, one machine or a cluster (the ``ray`` extra).

The driver walks the inputs exactly as local prediction does (``expand_inputs``: unreadable files, broken
links and non-UTF-8 names keep their rows), skips the rows an output already holds (``--resume``), and hands
the file names to a Ray Data pipeline: ``map_batches`` over a pool of actors, each holding the classifier's and
the lung segmenter's onnxruntime sessions, reading and decoding its files with covidxr's own decoder
(``iterate_predictions``: DICOM, 16-bit, EXIF, the same errors). Rows come back whole, in order, and go
through the same writer as local prediction (``covidxr.runtime.writer``): the same columns, the same model
identity, synced chunk by chunk, with a progress bar.

Why not ``ray.data.read_binary_files``: it fails the whole dataset on one broken link or unreadable file
(``FileNotFoundError``), where covidxr owes that file a row saying why; the map step reads each file itself.
Ray restarts an actor that dies and retries its batch (``max_restarts`` and ``max_task_retries`` default to
-1 for Ray Data's actor pools), and the driver writes a row only when its batch has come back, so a dead
worker loses and duplicates nothing.

The model folder and the images must be at the same paths on every node (shared storage), as for any Ray
Data job that reads files.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

import covidxr
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import iterate_predictions, output_name, path_from_output_name
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.storage import locked
from covidxr.runtime.writer import CHUNK, model_identity, output_and_files, predict_locked

__all__ = ["RAY_EXTRA", "ArchivePredictor", "connect", "plan_actors", "predict_archive"]

logger = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'covidxr[ray]'"
BATCH = 16  # images per actor call: one batch of the segmenter and the classifier
ACTOR_CPUS = 0.75  # Ray CPUs reserved per actor thread: fractional, so Ray Data's own tasks still get scheduled
CONNECT_TIMEOUT_S = 5.0  # how long a cluster address may take to accept a connection before it is refused


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CovidxrError(f"--ray needs Ray Data: {RAY_EXTRA}") from None
    return ray


def _reachable(address: str) -> None:
    """Refuse in one line a ``host:port`` (or ``ray://host:port``) that accepts no connection: ``ray.init``
    itself retries an unreachable cluster for minutes."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise CovidxrError(f"--ray {address}: not local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CovidxrError(
            f"--ray {address}: the Ray cluster cannot be reached ({exc.strerror or type(exc).__name__}); "
            "start it with `ray start --head` or check the address"
        ) from None


def connect(address: str | None) -> None:
    """Join the Ray cluster ``address`` names: ``local`` starts one on this machine, ``auto`` joins the one
    running here (``ray start --head``, or ``RAY_ADDRESS``), ``HOST:PORT`` or ``ray://HOST:PORT`` a remote one;
    ``None`` uses the one this process already joined. Then check that the workers run this covidxr."""
    ray = _ray()
    if address is not None and not ray.is_initialized():
        if address not in {"local", "auto"}:
            _reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        except ConnectionError as exc:
            raise CovidxrError(f"--ray {address}: the Ray cluster cannot be reached ({exc})") from None
    elif not ray.is_initialized():
        raise CovidxrError("no Ray cluster: give --ray local, auto or an address")
    version = ray.get(ray.remote(num_cpus=0)(_worker_covidxr()).remote())
    if version != covidxr.__version__:
        where = "lacks covidxr" if version is None else f"runs covidxr {version}, not {covidxr.__version__}"
        raise CovidxrError(f"--ray: the Ray cluster's workers' environment {where}: {RAY_EXTRA} on every node")


def _worker_covidxr():
    """A function that reports a worker's covidxr version (None where it is missing). Built here so Ray pickles
    it by value: a module-level function would need covidxr in the worker merely to be unpickled."""

    def version() -> str | None:
        try:
            import covidxr as installed
        except ImportError:
            return None
        return installed.__version__

    return version


def plan_actors(threads: int | None) -> tuple[int, int]:
    """How many actors and intra-op threads each: ``threads`` per actor (default 1: one image stream per core
    keeps decoding and both sessions busy without contention), and as many actors as the cluster's CPUs hold."""
    ray = _ray()
    threads = 1 if threads is None else threads
    if threads < 1:
        raise CovidxrError(f"--threads must be at least 1, not {threads}")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // threads), threads


class ArchivePredictor:
    """One Ray Data actor: the run's engine and the lung segmenter, loaded once; each call predicts a batch of
    files (names as ``output_name`` writes them) into JSON rows, with the model identity that made them."""

    def __init__(self, run: Run, engine: str, cache_dir: str | None, threads: int) -> None:
        self.run = run
        self.runner = make_engine(run, engine, cache_dir, threads)
        self.identity = model_identity(run, self.runner)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [path_from_output_name(str(name)) for name in batch["file"]]
        results = [
            json.dumps(result)
            for answers in iterate_predictions(self.run, paths, self.runner, len(paths), num_workers=0)
            for result in answers
        ]
        return {"result": np.array(results, dtype=object), "model": np.array([self.identity] * len(results))}


def _ray_predictions(
    run: Run, identity: str, engine: str, cache_dir: str | None, threads: int | None, batch_size: int
) -> Callable[[list[Path]], Iterator[list[dict]]]:
    """The writer's ``predictions(todo)``: batches of results, in order, from a pool of actors."""
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the writer draws the one bar
    context.execution_options.preserve_order = True  # the same file order as local prediction
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    actors, per_actor = plan_actors(threads)

    def predictions(todo: list[Path]) -> Iterator[list[dict]]:
        if not todo:
            return
        names = [{"file": output_name(path)} for path in todo]
        dataset = ray.data.from_items(names, override_num_blocks=math.ceil(len(names) / batch_size))
        dataset = dataset.map_batches(
            ArchivePredictor,
            fn_constructor_kwargs={"run": run, "engine": engine, "cache_dir": cache_dir, "threads": per_actor},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),  # Ray Data spreads actors over the nodes by default
            num_cpus=ACTOR_CPUS * per_actor,
            batch_format="numpy",
        )
        logger.info("Ray Data: %d actor(s) x %d thread(s), batches of %d", actors, per_actor, batch_size)
        try:
            yield from _checked(dataset.iter_batches(batch_size=batch_size, batch_format="numpy"), identity)
        except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as exc:
            # an actor that cannot start on a node (its model folder missing there), a lost cluster: one line
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise CovidxrError(f"--ray: the cluster failed ({first}); the finished rows are kept: --resume") from None

    return predictions


def _checked(batches: Iterator[dict[str, np.ndarray]], identity: str) -> Iterator[list[dict]]:
    """The results of each batch, refusing any made by another model than the driver's."""
    for batch in batches:
        others = set(batch["model"].tolist()) - {identity}
        if others:
            raise CovidxrError(
                f"--ray: a worker predicted with another model ({sorted(others)[0]}), not this one ({identity}); "
                "every node needs the same covidxr and the same model folder"
            )
        yield [json.loads(text) for text in batch["result"]]


def predict_archive(
    run: Run,
    inputs: Sequence[str | Path],
    out: str | Path,
    address: str | None = "local",
    resume: bool = False,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    chunk_size: int = CHUNK,
    batch_size: int = BATCH,
) -> tuple[list[dict], int]:
    """``predict_to_file`` on Ray Data: the same rows, columns, model identity, resumption and refusals, the
    files predicted by a pool of actors on the cluster ``address`` names (``connect``). Returns every row (old,
    then new) and how many are new."""
    out, files = output_and_files(out, inputs)
    identity = model_identity(run, make_engine(run, engine, cache_dir, 1))
    connect(address)
    cache = None if cache_dir is None else str(cache_dir)
    predictions = _ray_predictions(run, identity, engine, cache, threads, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out, "prediction file"):
        return predict_locked(run, files, out, resume, identity, predictions, progress, chunk_size)
