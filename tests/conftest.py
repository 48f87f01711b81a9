"""Shared fixtures: the real images of ../shared, an isolated feature cache, no network, one tiny trained
run for the modules that only read it, the ``covidxr`` command in a subprocess, free ports, headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from benchmarks.machine import linked_dataset, small_subset  # one copy, shared with the benchmarks

if TYPE_CHECKING:
    from selenium import webdriver

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COVIDXR_SHARED", REPO.parent / "shared")).resolve()
CXR3 = SHARED / "data" / "cxr3"
ADULT_CONTROLS = SHARED / "data" / "adult-controls"
COVIDXR = Path(sys.executable).with_name("covidxr")  # the venv's installed command

# Two float32 paths to one answer (onnxruntime or torch, batch or single image, another process's threads,
# another CPU's kernels: AVX2, AVX-512, AMX) agree on a probability within this; measured: ~1e-6.
PROBABILITY_TOLERANCE = 1e-4
# An answer closer than this to a decision boundary may be decided either way by another float32 path.
BORDERLINE = 1e-3


def decision_margin(probabilities: Mapping[str, float], threshold: float | None) -> float:
    """How far an answer's probabilities lie from the nearest boundary of ``covidxr``'s decision: COVID-19
    where its probability reaches ``threshold``, else the more probable of the other classes (without a
    threshold, a foreign model's, the most probable class)."""
    if threshold is None:
        top = sorted(probabilities.values())
        return top[-1] - top[-2]
    covid = probabilities["COVID-19"]
    if covid >= threshold:
        return covid - threshold
    others = sorted(p for label, p in probabilities.items() if label != "COVID-19")
    return min(threshold - covid, others[-1] - others[-2] if len(others) > 1 else float("inf"))


def assert_same_answer(got: dict, expected: dict, tolerance: float = PROBABILITY_TOLERANCE) -> None:
    """Two answers for one image computed along different float32 paths: probabilities within ``tolerance``,
    and the same label, unless ``expected`` lies within ``tolerance`` of a decision boundary (where another
    kernel's rounding may tip it); an image given no answer (guard, lung check) gets none on either path."""
    for label, p in expected["probabilities"].items():
        assert abs(got["probabilities"][label] - p) < tolerance, (label, got, expected)
    unanswered = None in (got["label"], expected["label"])
    if unanswered or decision_margin(expected["probabilities"], expected["covid_threshold"]) >= tolerance:
        assert got["label"] == expected["label"], (got, expected)


def run_cli(
    *args: str | Path,
    installed: bool = False,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600,
    **kwargs,
) -> subprocess.CompletedProcess:
    """``python -m covidxr ARGS`` in a subprocess (``installed``: the venv's ``covidxr`` command, as a user
    types it), under this session's environment unless ``env`` is given; stdout and stderr captured as text.
    ``prefix`` goes before the interpreter (``setpriv ...``); other keywords go to ``subprocess.run``."""
    program = [str(COVIDXR)] if installed else [sys.executable, "-m", "covidxr"]
    command = [*prefix, *program, *map(str, args)]
    environment = os.environ.copy() if env is None else env
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A command refused in one line: exit 1, no traceback, one ``Error:`` line holding every fragment."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr
    return error_lines[0]


def nih_halves(root: Path, seed: int = 23) -> tuple[Path, Path]:
    """The 810 NIH adult controls split by patient into two dataset folders of symlinks under ``root`` (no patient
    in both): a calibration half and a held-out half (``test_site``, ``test_monitor``, ``test_validate``)."""
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    patients = np.array(sorted(meta["patient_id"].unique()))
    first = set(np.random.default_rng(seed).permutation(patients)[: len(patients) // 2])
    in_first = meta["patient_id"].isin(first)
    return (
        linked_dataset(root / "calibration", ADULT_CONTROLS, meta[in_first]),
        linked_dataset(root / "held-out", ADULT_CONTROLS, meta[~in_first]),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the system just gave out and took back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session gets its own feature cache; nothing may try to download."""
    os.environ["COVIDXR_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    os.environ["COVIDXR_OFFLINE"] = "1"
    os.environ.pop("COVIDXR_WEIGHTS_DIR", None)


@pytest.fixture(scope="session")
def cxr3() -> Path:
    if not (CXR3 / "metadata.csv").is_file():
        pytest.fail(f"real data not found at {CXR3}; the tests need ../shared/data/cxr3")
    return CXR3


@pytest.fixture(scope="session")
def cxr3_meta(cxr3: Path) -> pd.DataFrame:
    return pd.read_csv(cxr3 / "metadata.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def small_dataset(cxr3: Path, cxr3_meta: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder of ~20 real images per class: a metadata.csv whose rows point at ../shared by symlink."""
    return linked_dataset(tmp_path_factory.mktemp("small-cxr3"), cxr3, small_subset(cxr3_meta, per_class=20))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def tiny_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One small real run (efficientnet_lite0, 8 epochs, 224 px, on small_dataset), trained once per session
    and shared by the modules that only read a run. Read-only: a test that writes into a run folder copies it first
    (``shutil.copytree(tiny_run, tmp_path / "run")``); the folder is checked unchanged at the end."""
    from covidxr.lab.train import train
    from covidxr.runtime.config import TrainConfig

    config = TrainConfig(model="efficientnet_lite0", epochs=8, image_size=224)
    run = train(small_dataset, tmp_path_factory.mktemp("tiny-run") / "run", config, progress=False)
    before = _snapshot(run)
    yield run
    assert _snapshot(run) == before, f"a test wrote into the shared tiny run {run}; copy it first"


def chromium(profile: Path, *arguments: str, size: tuple[int, int] = (1280, 1000)) -> webdriver.Chrome:
    """Headless Chromium: the system Chromium and chromedriver, so that Selenium Manager never downloads anything,
    no background traffic of its own, a fresh ``profile`` folder, and ``arguments`` on top."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *arguments,
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_window_size(*size)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium, one per module, 1280x1000."""
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def raw_sources(tmp_path: Path, cxr3: Path, meta: pd.DataFrame) -> tuple[Path, Path]:
    """The two public raw layouts, populated with real images from cxr3 under upstream-style names."""
    covid = meta[meta["label"] == "COVID-19"].head(4)
    ieee = tmp_path / "covid-chestxray-dataset"
    (ieee / "images").mkdir(parents=True)
    upstream = []
    for i, name in enumerate(covid["filename"]):
        shutil.copy(cxr3 / name, ieee / "images" / f"covid{i}.jpg")
        upstream.append(
            {
                "patientid": str(100 + i // 2),
                "finding": "Pneumonia/Viral/COVID-19",
                "modality": "X-ray",
                "view": ["PA", "AP", "AP Supine", "PA"][i],
                "folder": "images",
                "filename": f"covid{i}.jpg",
                "age": "60",
                "sex": "F",
            }
        )
    shutil.copy(cxr3 / covid["filename"].iloc[0], ieee / "images" / "lateral.jpg")
    upstream.append({**upstream[0], "view": "L", "filename": "lateral.jpg"})  # not a frontal view
    upstream.append({**upstream[1], "modality": "CT", "filename": "ct.jpg"})  # not an X-ray
    upstream.append({**upstream[2], "finding": "Pneumonia/Bacterial/Streptococcus", "filename": "strep.jpg"})
    pd.DataFrame(upstream).to_csv(ieee / "metadata.csv", index=False)

    kermany = tmp_path / "chest_xray"
    names = {
        "NORMAL": ["IM-0115-0001.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
        "PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg"],
    }
    for label, files in names.items():
        sources = meta[meta["label"] == label]["filename"].head(len(files))
        for part, file, source in zip(("train", "test"), files, sources, strict=True):
            (kermany / part / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(cxr3 / source, kermany / part / label / file)
    # The same image twice under two names: the build must keep one.
    shutil.copy(kermany / "train" / "NORMAL" / "IM-0115-0001.jpeg", kermany / "test" / "NORMAL" / "IM-0116-0001.jpeg")
    return ieee, kermany


@pytest.fixture(scope="module")
def run():
    """The bundled run."""
    from covidxr.runtime.runs import default_model_path, load_run

    return load_run(default_model_path())


@pytest.fixture(scope="module")
def runner(run):
    """The engine ``predict`` uses by default (the run's graph, exported once into the session cache)."""
    from covidxr.runtime.runners import make_engine

    return make_engine(run, "auto")
