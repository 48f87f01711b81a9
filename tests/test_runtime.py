"""The runtime layer: prediction, serving, Grad-CAM, segmentation and the model card without torch.

The bundled model ships its ONNX graph, so everything a hospital runs needs numpy, Pillow and
onnxruntime only. Checked three ways: the training stack never enters ``sys.modules`` of a real
prediction; the graph and the numpy Grad-CAM agree with the torch model and pytorch-grad-cam on real
images; and a wheel installed without extras into an empty venv predicts and serves with no torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidxr.lab.explain import Explainer
from covidxr.lab.models import run_model
from covidxr.runtime.cam import DenseHead, gradcam
from covidxr.runtime.engines import OnnxEngine
from covidxr.runtime.images import read_image
from covidxr.runtime.runners import input_transform, make_engine
from covidxr.runtime.runs import default_model_path, load_run

from .conftest import free_port, run_cli

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("torch", "torchvision", "timm", "sklearn", "scipy", "skimage", "matplotlib", "pandas", "cv2")


@pytest.fixture(scope="module")
def images(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    """Real images of every class and source of cxr3."""
    picked = cxr3_meta.groupby(["label", "source"]).head(2)
    return [cxr3 / name for name in picked["filename"]]


def test_a_real_prediction_imports_nothing_of_the_training_stack(images: list[Path], tmp_path: Path) -> None:
    """predict (CLI), the Python API with Grad-CAM, the service, segment and model-card, in one fresh process."""
    script = textwrap.dedent(
        f"""
        import io, sys
        from contextlib import redirect_stdout
        from covidxr.cli import main
        images = {[str(p) for p in images[:3]]!r}

        def cli(*args):
            sys.argv = ["covidxr", *args]
            with redirect_stdout(io.StringIO()):
                try:
                    main()
                except SystemExit as exit:
                    assert not exit.code, (args, exit.code)

        cli("predict", "--json", *images)
        cli("segment", images[0], "--out", {str(tmp_path / "masks")!r})
        cli("model-card")
        cli("explain", images[0], "--out", {str(tmp_path / "maps")!r})
        import covidxr
        from fastapi.testclient import TestClient
        from covidxr.runtime.serve import create_app
        model = covidxr.load_model()
        assert model.explain(images[1])["map"].shape == (237, 237)
        with TestClient(create_app(model)) as client:
            with open(images[2], "rb") as handle:
                reply = client.post("/api/predict", files={{"file": ("x.jpg", handle.read(), "image/jpeg")}})
            assert reply.status_code == 200 and "probabilities" in reply.json(), reply.text
            reply = client.post("/api/explain", files={{"file": ("x.jpg", open(images[0], "rb").read(), "image/jpeg")}})
            assert reply.status_code == 200 and reply.json()["explanation"]["heatmap_png"], reply.text
        loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({TRAINING_STACK!r}))
        print("LOADED", loaded, sorted(name for name in sys.modules if name.startswith("covidxr.lab")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED [] []" in result.stdout, result.stdout[-2000:]


RUNTIME = REPO / "src" / "covidxr" / "runtime"
RUNTIME_MODULES = sorted(
    ".".join(path.relative_to(RUNTIME.parents[1]).with_suffix("").parts).removesuffix(".__init__")
    for path in RUNTIME.rglob("*.py")
)


def test_the_guard_sees_every_runtime_module() -> None:
    assert {"covidxr.runtime", "covidxr.runtime.api", "covidxr.runtime.runners", "covidxr.runtime.serve"} <= set(
        RUNTIME_MODULES
    )


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_a_runtime_module_imports_neither_the_training_stack_nor_the_lab(module: str) -> None:
    """Each module under covidxr/runtime/, alone in a fresh process: the folder is the layer, not a list."""
    check = (
        f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAINING_STACK!r})),"
        " sorted(m for m in sys.modules if m.startswith('covidxr.lab')))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[] []", result.stdout + result.stderr


def test_the_bundled_graph_gives_the_torch_models_probabilities(images: list[Path]) -> None:
    run = load_run(default_model_path())
    graph, torch_engine = make_engine(run, "onnx"), make_engine(run, "torch")
    assert isinstance(graph, OnnxEngine) and graph.path == run.graph  # the shipped graph, not an export
    transform = input_transform(run, graph)
    assert transform == run_model(run).input_transform  # the sidecar describes the model's own preprocessing
    inputs = np.stack([transform(read_image(p)) for p in images])
    (_, graph_logits), (_, torch_logits) = graph(inputs), torch_engine(inputs)
    to_p = lambda logits: torch.softmax(torch.from_numpy(logits).double() / run.temperature, 1).numpy()  # noqa: E731
    assert np.abs(to_p(graph_logits) - to_p(torch_logits)).max() < 1e-4


def test_numpy_gradcam_matches_pytorch_grad_cam(images: list[Path]) -> None:
    run = load_run(default_model_path())
    engine = make_engine(run, "onnx")
    inputs = np.stack([input_transform(run, engine)(read_image(p)) for p in images])
    _, logits, activations = engine.with_activations(inputs)
    for classes in (logits.argmax(1), np.full(len(images), run.labels.index("COVID-19"))):
        ours = gradcam(
            activations, DenseHead(run.path / "head.safetensors"), classes, "relu6", run_model(run).image_size
        )
        reference = Explainer(run_model(run), "gradcam")(torch.from_numpy(inputs), classes.tolist())
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < 1e-4


def test_an_altered_bundled_graph_is_one_line_and_exit_1(images: list[Path], tmp_path: Path) -> None:
    copy = shutil.copytree(default_model_path(), tmp_path / "model")
    graph = copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    graph.write_bytes(bytes(data))
    result = run_cli("predict", images[0], "--model", copy)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.onnx" in lines[0] and "fails its hash check" in lines[0], result.stderr


@pytest.mark.slow
def test_a_wheel_installed_without_extras_predicts_and_serves_without_torch(
    images: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``pip install covidxr`` (no extras) into an empty venv: predict, serve, and one line for training."""
    root = tmp_path_factory.mktemp("runtime-install")
    wheels = root / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = wheels.glob("covidxr-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, covidxr = venv / "bin" / "python", venv / "bin" / "covidxr"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    predicted = subprocess.run([str(covidxr), "predict", "--json", str(images[0])], capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    [result] = json.loads(predicted.stdout)
    assert (
        set(result["probabilities"]) == {"COVID-19", "NORMAL", "PNEUMONIA"}
        and "Research use only" in result["disclaimer"]
    )

    trained = subprocess.run(
        [str(covidxr), "train", "--data", str(images[0].parent.parent), "--out", str(root / "run")],
        capture_output=True,
        text=True,
    )
    lines = trained.stderr.strip().splitlines()
    assert trained.returncode != 0 and len(lines) == 1 and "pip install 'covidxr[train]'" in lines[0], trained.stderr
    other_method = subprocess.run(
        [str(covidxr), "explain", str(images[0]), "--method", "gradcam++", "--out", str(root / "maps")],
        capture_output=True,
        text=True,
    )
    assert other_method.returncode == 1 and "covidxr[train]" in other_method.stderr.strip().splitlines()[-1]
    torch_engine = subprocess.run(
        [str(covidxr), "predict", str(images[0]), "--engine", "torch"], capture_output=True, text=True
    )
    lines = torch_engine.stderr.strip().splitlines()
    assert torch_engine.returncode == 1 and len(lines) == 1 and "covidxr[train]" in lines[0], torch_engine.stderr

    port = free_port()
    server = subprocess.Popen(
        [str(covidxr), "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        boundary = "covidxr-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{images[1].name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + images[1].read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/predict",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            served = json.loads(reply.read())
        assert set(served["probabilities"]) == {"COVID-19", "NORMAL", "PNEUMONIA"}
    finally:
        server.terminate()
        server.wait(timeout=30)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"runtime venv: {size / 1e6:.0f} MB")  # shown with -s; the README's deploy section quotes it
    assert size < 500e6, f"the runtime install is {size / 1e6:.0f} MB"
