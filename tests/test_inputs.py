"""Inputs: one decoding and one set of checks for every route (path, bytes, PIL, array, CLI, HTTP), folders read by
content (issue 29 F5, F15; issue 28 item 10), and films that are not upright (issue 29 F6)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as skimage_data

import covidxr
from covidxr.cli import cli
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from tests.conftest import ADULT_CONTROLS, CXR3, PROBABILITY_TOLERANCE, run_cli
from tests.test_dicom import dx_dataset, save
from tests.test_serve import Server

# A real adult film the bundled model answers (COVID-19, p ≈ 0.57, far from the 0.100 threshold).
XRAY = sorted((CXR3 / "images").glob("*.jpg"))[0]
NOT_UPRIGHT = "not upright"


@pytest.fixture(scope="module")
def model() -> covidxr.Model:
    return covidxr.load_model()  # the bundled model, as the CLI and the service use it


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.asarray(read_image(XRAY).convert("L"))


def kinds(folder: Path, grey: np.ndarray) -> dict[str, Path]:
    """Every kind of input, made here from one real X-ray (and a colour photograph), by the name of its file."""
    folder.mkdir(parents=True, exist_ok=True)
    xray = Image.fromarray(grey)
    made = {
        "grey8.png": lambda path: xray.save(path),
        "grey16.png": lambda path: Image.fromarray(grey.astype(np.uint16) * 257).save(path),
        "lossless.webp": lambda path: xray.save(path, lossless=True),
        "transparent.png": lambda path: _transparent(xray).save(path),
        "pages.tif": lambda path: xray.save(path, save_all=True, append_images=[xray]),
        "animated.gif": lambda path: xray.save(path, save_all=True, append_images=[xray.rotate(5)]),
        "photo.png": lambda path: Image.fromarray(skimage_data.chelsea()).save(path),
        "upside-down.png": lambda path: xray.transpose(Image.Transpose.ROTATE_180).save(path),
        "IM000001": lambda path: save(dx_dataset(grey, 8), path),  # DICOM exported without an extension
    }
    paths = {}
    for name, make in made.items():
        make(folder / name)
        paths[name] = folder / name
    whole = (folder / "grey8.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    paths["truncated.png"] = folder / "truncated.png"
    return paths


def _transparent(xray: Image.Image) -> Image.Image:
    rgba = xray.convert("RGBA")
    rgba.putalpha(0)
    return rgba


# What each kind must get, on every route: the label of the upright film, a reason for no answer, or an error.
EXPECTED = {
    "grey8.png": "answer",
    "grey16.png": "answer",
    "lossless.webp": "answer",
    "IM000001": "answer",
    "transparent.png": "no answer: a nearly uniform (blank) image",
    "photo.png": "no answer: a colour photograph",
    "upside-down.png": f"no answer: {NOT_UPRIGHT}",
    "pages.tif": "error",
    "animated.gif": "error",
    "truncated.png": "error",
}
# Kinds a PIL image or an array can stand for (a DICOM is no PIL image; an array holds one frame, fully decoded).
PIL_KINDS = set(EXPECTED) - {"IM000001"}
ARRAY_KINDS = PIL_KINDS - {"pages.tif", "animated.gif", "truncated.png"}


def outcome(result: dict | None) -> tuple[str, dict | None]:
    """A result as ("answer" | "no answer: REASON" | "error" | "crash: EXCEPTION", probabilities)."""
    if result is not None and "crash" in result:
        return f"crash: {result['crash']}", None
    if result is None or "error" in result:
        return "error", None
    if result["label"] is None:
        return f"no answer: {result['no_answer_reason']}", result["probabilities"]
    return "answer", result["probabilities"]


def through_api(call) -> dict | None:
    """The API's result, None for its one-line refusal (``CovidxrError``), or what else it raised."""
    try:
        return call()
    except CovidxrError:
        return None
    except Exception as exc:  # noqa: BLE001 (anything else is a fault of the route, listed with the others)
        return {"crash": type(exc).__name__}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def test_every_input_kind_gets_one_outcome_on_every_route(
    model: covidxr.Model, grey: np.ndarray, server: Server, tmp_path: Path
) -> None:
    """F15, issue 28 item 10: the same file by path, bytes, PIL image, array, the CLI and HTTP gets the same answer
    (the same probabilities), the same reason for no answer, or an error; and the one it should."""
    files = kinds(tmp_path / "kinds", grey)
    upright = model.predict(str(files["grey8.png"]))
    assert upright["label"] == "COVID-19"
    listed = list(files.values())
    cli = run_cli("predict", *listed, "--json")
    by_cli = {Path(row["file"]).name: row for row in json.loads(cli.stdout)}
    assert cli.returncode == 1 and len(by_cli) == len(files), cli.stderr  # three kinds cannot be read
    problems = []  # every disagreement, so one run lists them all
    for name, path in files.items():
        routes = {
            "path": through_api(lambda path=path: model.predict(path)),
            "bytes": through_api(lambda path=path: model.predict(path.read_bytes())),
            "CLI": by_cli[name],
        }
        if name in PIL_KINDS:
            routes["PIL"] = through_api(lambda path=path: model.predict(Image.open(path)))  # lazily loaded
        if name in ARRAY_KINDS:
            routes["array"] = through_api(lambda path=path: model.predict(np.asarray(Image.open(path))))
        response = httpx.post(f"{server.url}/api/predict", files={"file": (name, path.read_bytes())}, timeout=120)
        routes["HTTP"] = response.json() if response.status_code == 200 else None
        if response.status_code not in (200, 400):
            problems.append((name, "HTTP", response.status_code, response.text))
        kind, _, reason = EXPECTED[name].partition(": ")
        for route, result in routes.items():
            said, probabilities = outcome(result)
            if said.partition(": ")[0] != kind or reason not in said:
                problems.append((name, route, said))
            elif probabilities is not None:  # an answered copy is the film; a refused one is what the path gets
                same = upright if kind == "answer" else routes["path"] or {"probabilities": probabilities}
                for label, p in same["probabilities"].items():
                    if abs(probabilities[label] - p) >= PROBABILITY_TOLERANCE:
                        problems.append((name, route, label, probabilities[label], p))
    assert not problems, "\n".join(map(str, problems))


def test_explain_refuses_and_answers_as_predict_does(model: covidxr.Model, grey: np.ndarray, server: Server) -> None:
    """F15: a colour photograph and an upside-down film get predict's reason from explain, on the API and HTTP."""
    photo = Image.fromarray(skimage_data.chelsea())
    upside_down = Image.fromarray(grey[::-1, ::-1].copy())
    for image in (photo, upside_down):
        predicted, explained = model.predict(image), model.explain(image)
        assert predicted["label"] is None and explained["no_answer_reason"] == predicted["no_answer_reason"]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        response = httpx.post(f"{server.url}/api/explain", files={"file": ("x.png", buffer.getvalue())}, timeout=120)
        assert response.status_code == 200 and response.json()["no_answer_reason"] == predicted["no_answer_reason"]


def test_arrays_in_every_documented_form_answer_alike(model: covidxr.Model, grey: np.ndarray) -> None:
    """Issue 28 item 10: float images in [0, 1] and 16-bit arrays are accepted and answer as the 8-bit image does;
    values outside [0, 1] or not finite are refused in one line."""
    expected = model.predict(grey)["probabilities"]
    for array in (grey / 255.0, (grey / 255.0).astype(np.float32), grey.astype(np.uint16) * 257, grey[..., None]):
        assert model.predict(array)["probabilities"] == pytest.approx(expected, abs=PROBABILITY_TOLERANCE)
    with pytest.raises(CovidxrError, match=r"in \[0, 1\], not \[0, 255\]"):
        model.predict(grey.astype(np.float64))
    nan = grey / 255.0
    nan[5, 5] = np.nan
    with pytest.raises(CovidxrError, match="not a finite image"):
        model.predict(nan)


def test_batch_sizes_and_empty_lists_are_handled_in_one_way(model: covidxr.Model) -> None:
    """F15: a bad batch_size is refused in words, never a silently empty result; an empty list is an empty list."""
    for size in (-1, 0):
        with pytest.raises(CovidxrError, match=f"batch_size must be at least 1, not {size}"):
            model.predict([XRAY], batch_size=size)
    assert model.predict([]) == [] and model.explain([]) == []


@pytest.fixture(scope="module")
def archive(grey: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PACS export: DICOM without extensions, a .webp, a .jpe, a symlinked sub-folder and a text file."""
    root = tmp_path_factory.mktemp("archive")
    export = root / "export"
    export.mkdir()
    save(dx_dataset(grey, 8), export / "IM000001")
    save(dx_dataset(grey[::-1, ::-1].copy(), 8), export / "IM000002")
    Image.fromarray(grey).save(export / "film.webp", lossless=True)
    (export / "film.jpe").write_bytes(XRAY.read_bytes())
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(grey).save(elsewhere / "linked.png")
    (export / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    (export / "notes.txt").write_text("not an image")
    return export


def test_folders_are_read_by_content_and_every_file_gets_a_row(model: covidxr.Model, archive: Path) -> None:
    """F5: files without extensions, .webp, .jpe and symlinked sub-folders are read; a text file gets a row
    saying it is no image (exit 1) unless --pattern leaves it out; the Python API reads the folder alike."""
    result = CliRunner().invoke(cli, ["predict", str(archive), "--json"])
    rows = {Path(row["file"]).name: row for row in json.loads(result.stdout)}
    assert sorted(rows) == ["IM000001", "IM000002", "film.jpe", "film.webp", "linked.png", "notes.txt"]
    assert "not a readable image" in rows["notes.txt"]["error"] and result.exit_code == 1
    assert all(rows[name]["label"] == "COVID-19" for name in ("IM000001", "film.jpe", "film.webp", "linked.png"))
    assert NOT_UPRIGHT in rows["IM000002"]["no_answer_reason"]

    result = CliRunner().invoke(cli, ["predict", str(archive), "--pattern", "IM*", "--pattern", "*.png", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(Path(row["file"]).name for row in json.loads(result.stdout)) == ["IM000001", "IM000002", "linked.png"]

    by_api = {Path(row["file"]).name: row for row in model.predict(archive)}
    assert by_api.keys() == rows.keys() and "not a readable image" in by_api["notes.txt"]["error"]
    for name, row in rows.items():
        assert outcome(by_api[name])[0] == outcome(row)[0], name


def test_an_empty_input_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    """F5: an empty folder, or a pattern that matches nothing, is refused by every command that reads folders."""
    empty = tmp_path / "empty"
    empty.mkdir()
    commands = [
        ["predict", str(empty)],
        ["predict", str(empty), "--out", str(tmp_path / "p.csv")],
        ["segment", str(empty), "--out", str(tmp_path / "masks")],
        ["explain", str(empty), "--out", str(tmp_path / "maps")],
    ]
    for args in commands:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and result.output.strip() == f"Error: {empty}: no files to read", result.output
    Image.new("L", (64, 64)).save(tmp_path / "one.png")
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "--pattern", "*.dcm"])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {tmp_path}: no files matching *.dcm to read"
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "masks" / "segment.csv").exists()


def test_explain_reads_a_folder_and_draws_a_contact_sheet(model: covidxr.Model, archive: Path, tmp_path: Path) -> None:
    """Issue 28 item 10: `explain DIR` as `predict DIR` reads it, with one contact sheet of every heat map."""
    result = CliRunner().invoke(cli, ["explain", str(archive), "--out", str(tmp_path), "--pattern", "film.*"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.glob("*.gradcam.png")) == [
        "contact-sheet.gradcam.png",
        "film-1.gradcam.png",
        "film.gradcam.png",
    ]
    with Image.open(tmp_path / "contact-sheet.gradcam.png") as sheet:
        assert sheet.width > sheet.height > 100  # two overlays side by side, with their captions
    assert len(model.explain(archive)) == 6


def test_orientation_is_checked_on_real_films(model: covidxr.Model) -> None:
    """F6: real films turned 180° or flipped top to bottom get no answer, with the reason; upright ones are not
    refused for their orientation (benchmarks/orientation.py measures the rates on every shared image)."""
    paths = sorted((CXR3 / "images").glob("*.jpg"))[::150] + sorted((ADULT_CONTROLS / "images").glob("*"))[::160]
    upright = [read_image(path) for path in paths]
    turned = [image.transpose(turn) for turn in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM)
              for image in upright]  # fmt: skip
    for path, result in zip(paths, model.predict(upright), strict=True):
        assert NOT_UPRIGHT not in (result["no_answer_reason"] or ""), path
    for path, result in zip(paths * 2, model.predict(turned), strict=True):
        assert result["label"] is None and NOT_UPRIGHT in result["no_answer_reason"], (path, result)


def test_every_command_has_a_summary_that_fits() -> None:
    """Issue 28 item 10: `covidxr --help` (80 columns) shows every command's whole summary, never cut short."""
    for args in (["--help"], ["data", "--help"], ["weights", "--help"]):
        result = CliRunner().invoke(cli, args, terminal_width=80)
        commands = result.output.split("Commands:\n")[1].splitlines()
        assert commands and not [line for line in commands if line.endswith("...")], result.output
