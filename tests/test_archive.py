"""``predict --ray`` on a real local Ray cluster (2 CPUs) started here: the same rows as local prediction on real
X-rays and bad files, an actor killed mid-run losing nothing, a half-written output resumed, a cluster that cannot
be reached refused in one line."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from PIL import Image

from covidxr.runtime.archive import _ray_predictions, predict_archive
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.inference import expand_inputs
from covidxr.runtime.runs import load_run
from covidxr.runtime.writer import predict_to_file

from .conftest import assert_one_line_error, free_port, run_cli

N_GOOD = 32  # real X-rays: in batches of 4, both actors still hold work when the first rows are written
TOLERANCE = 1e-5  # the bound for Ray against local probabilities


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster of 2 CPUs, for this module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real X-rays in two folders, a Latin-1 (non-UTF-8) name, a broken link, a text file named .png and a
    truncated JPEG."""
    root = tmp_path_factory.mktemp("archive")
    names = cxr3_meta["filename"].iloc[::13].head(N_GOOD)
    for i, name in enumerate(names):
        target = root / f"ward{i % 2}" / Path(name).name
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(cxr3 / name)
    data = (cxr3 / names.iloc[0]).read_bytes()
    (root / "ward0" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(data)
    (root / "ward0" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "ward1" / "notes.png").write_text("not an image")
    (root / "ward1" / "cut.jpg").write_bytes(data[: len(data) // 3])
    Image.new("L", (1, 1)).save(root / "ward1" / "dot.png")
    return root


@pytest.fixture(scope="module")
def local(run, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder predicted locally (the reference)."""
    out = tmp_path_factory.mktemp("local") / "local.csv"
    predict_to_file(run, [folder], out, progress=False)
    return out


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_rows(got: Path, expected: Path) -> None:
    """The same files in the same order, the same columns, errors, labels and model; probabilities within 1e-5."""
    a, b = _table(got), _table(expected)
    assert list(a.columns) == list(b.columns)
    assert a["file"].tolist() == b["file"].tolist() and a["file"].is_unique
    probabilities = [c for c in a.columns if c.startswith("p_") or c == "ood_score"]
    for column in a.columns.difference(probabilities):
        assert a[column].tolist() == b[column].tolist(), column
    numbers = lambda t: t[probabilities].replace("", "nan").astype(float)  # noqa: E731
    assert ((numbers(a) - numbers(b)).abs().fillna(0) < TOLERANCE).all().all()


def test_ray_gives_the_rows_of_local_prediction(cluster, run, folder: Path, local: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray.csv"
    rows, new = predict_archive(run, [folder], out, address=None, progress=False)
    assert new == len(rows) == N_GOOD + 5
    assert_same_rows(out, local)
    errors = _table(out).set_index("file")["error"]
    assert "broken symlink" in errors[str(folder / "ward0" / "gone.png")]
    assert "caf\\xe9.jpg" in "".join(errors.index) and errors[str(folder / "ward0" / "caf\\xe9.jpg")] == ""


def test_killed_actor_loses_and_repeats_nothing(cluster, run, folder: Path, local: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray.csv"
    outcome: dict = {}

    def predict() -> None:
        try:
            outcome["rows"] = predict_archive(
                run, [folder], out, address=None, progress=False, chunk_size=4, batch_size=4
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    earlier = set(_actor_processes())  # actors of the previous tests' pools, if any are still shutting down
    worker = threading.Thread(target=predict)
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and len(out.read_text().splitlines()) > 1):
        time.sleep(0.02)
    actors = [pid for pid in _actor_processes() if pid not in earlier]
    assert actors, "no live prediction actor of this run to kill"
    os.kill(actors[0], signal.SIGKILL)  # the worker process dies as in a crash or an out-of-memory kill
    written_at_kill = len(out.read_text().splitlines()) - 1
    worker.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    assert written_at_kill < N_GOOD + 5  # killed mid-run
    assert_same_rows(out, local)


def _actor_processes() -> list[int]:
    """The process ids of the live prediction actors, by the title Ray gives an actor's worker process
    (``ray::MapWorker(MapBatches(ArchivePredictor))``); Ray's state API would need its dashboard, which the
    ``ray`` extra does not install."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::MapWorker(MapBatches(ArchivePredictor))"):
            found.append(int(entry.name))
    return sorted(found)


def test_resume_completes_a_half_written_output(cluster, run, folder: Path, local: Path, tmp_path: Path) -> None:
    lines = local.read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    out = tmp_path / "ray.csv"
    out.write_bytes(b"".join(lines[:half]) + lines[half][:20])  # a torn last row, as a crash mid-write leaves
    rows, new = predict_archive(run, [folder], out, address=None, resume=True, progress=False, threads=2)
    assert new == len(lines) - half and len(rows) == len(lines) - 1
    assert out.read_bytes()[: sum(map(len, lines[:half]))] == b"".join(lines[:half])  # finished rows untouched
    assert_same_rows(out, local)


def test_unreachable_cluster_is_one_line_and_writes_nothing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray.csv"
    result = run_cli("predict", folder, "--ray", f"127.0.0.1:{free_port()}", "--out", out, timeout=120)
    assert_one_line_error(result, "cannot be reached", "ray start --head")
    assert not out.exists()
    result = run_cli("predict", folder / "ward0", "--ray", "local", timeout=120)
    assert_one_line_error(result, "--ray", "--out")


def test_workers_without_the_model_or_with_another_are_one_error(cluster, run, folder: Path, tmp_path: Path) -> None:
    """Actors that cannot load the model (its folder missing where they run: a node without the shared storage),
    or that predict with another model than the driver's: one CovidxrError each, never a Ray traceback."""
    files = expand_inputs([folder / "ward0"])[:4]
    with pytest.raises(CovidxrError, match=r"a worker predicted with another model .* not this one \(driver's\)"):
        list(_ray_predictions(run, "driver's", "auto", None, 2, 4)(files))  # one actor of 2 threads
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    gone = load_run(copy)
    shutil.rmtree(copy)  # after the driver has loaded the run, before any actor starts
    with pytest.raises(CovidxrError, match=r"--ray: the cluster failed .*--resume"):
        list(_ray_predictions(gone, "driver's", "auto", None, 2, 4)(files))
