"""Fault injection: a user's worst day, on the bundled model and real X-rays.

Names that are not UTF-8, torn rows and full disks, resuming with another model, files the system
will not open, tampered caches, DICOM headers that lie, multi-page TIFF, EXIF rotation, degenerate
arrays in the Python API, a burst of large uploads, and checkpoints that would run code. Each test
states the exact outcome (the row and its error, a clean run's results, one line and the exit code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from safetensors.torch import load_file, save_file

import covidxr
from covidxr.lab.export import TorchEngine, cached_export, sidecar
from covidxr.lab.features import FeatureCache, compute_features
from covidxr.lab.loop import CHECKPOINT
from covidxr.lab.models import run_model
from covidxr.lab.quantize import report_digest
from covidxr.lab.train import checkpoint_matches
from covidxr.runtime.engines import OnnxEngine, graph_sha256
from covidxr.runtime.errors import CovidxrError, ImageTooLarge
from covidxr.runtime.images import MAX_IMAGE_PIXELS, read_image
from covidxr.runtime.inference import output_name, path_from_output_name
from covidxr.runtime.runners import make_engine
from covidxr.runtime.runs import default_model_path, load_run
from covidxr.runtime.writer import predict_to_file

from .conftest import PROBABILITY_TOLERANCE, decision_margin
from .conftest import run_cli as cli
from .test_dicom import decoded_grey, diff, dx_dataset, grey, save, to_bits
from .test_serve import Server, send_concurrently

MB = 1024 * 1024


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    return [cxr3 / name for name in cxr3_meta["filename"].iloc[::37].head(30)]


def one_line_error(stderr: str) -> str:
    """The error a command ended with, which must be one line and no traceback."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_same_results(actual: pd.DataFrame, expected: pd.DataFrame, threshold: float) -> None:
    """Same rows, errors and flags; probabilities and scores equal to float32 precision (the batches differ,
    and another CPU's kernels may round a batch of one otherwise); the same labels, except where an image
    lies on the decision boundary (``threshold``: the run's COVID-19 operating point)."""
    assert list(actual.columns) == list(expected.columns) and len(actual) == len(expected)
    numeric = [c for c in expected.columns if c.startswith("p_") or c == "ood_score"]
    decisions = ["label", "covid_positive"]
    exact = [c for c in expected.columns if c not in numeric + decisions]
    pd.testing.assert_frame_equal(actual[exact], expected[exact])
    as_float = lambda frame, column: frame[column].replace("", "nan").astype(float)  # noqa: E731
    for column in numeric:
        tolerance = {"rtol": 1e-4, "atol": 0} if column == "ood_score" else {"rtol": 0, "atol": PROBABILITY_TOLERANCE}
        np.testing.assert_allclose(as_float(actual, column), as_float(expected, column), **tolerance)
    labels = [c.removeprefix("p_") for c in numeric if c.startswith("p_")]
    margins = [
        decision_margin(dict(zip(labels, row, strict=True)), threshold)
        for row in np.stack([as_float(expected, f"p_{label}") for label in labels], axis=1)
    ]
    clear = [not margin < PROBABILITY_TOLERANCE for margin in margins]  # an unreadable file's NaN: compared too
    pd.testing.assert_frame_equal(actual.loc[clear, decisions], expected.loc[clear, decisions])


# ---------------------------------------------------------------------------------------------
# 1. Names that are not valid UTF-8
# ---------------------------------------------------------------------------------------------


def test_names_that_are_not_utf8_get_rows_escaped_reversibly_and_resume(run, runner, xrays, tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    names = {
        "plain.jpg": "plain.jpg",
        os.fsdecode(b"caf\xe9.jpg"): "caf\\xe9.jpg",  # Latin-1, as old archives and shared drives have
        os.fsdecode(b"r\xf6ntgen\\x41.jpg"): "r\\xf6ntgen\\x5cx41.jpg",  # and a literal backslash
        "thorax-é.jpg": "thorax-é.jpg",  # valid UTF-8 stays as it is
    }
    for name in names:
        shutil.copy(xrays[0], folder / name)
    expected_files = sorted(str(folder / name) for name in names)

    for suffix in (".csv", ".json"):
        out = tmp_path / f"p{suffix}"
        rows, new = predict_to_file(run, [folder], out, progress=False, engine=runner)
        assert new == 4 and all(row["error"] == "" for row in rows)
        written = table(out) if suffix == ".csv" else pd.DataFrame(json.loads(out.read_text())["predictions"])
        assert sorted(written["file"]) == sorted(str(folder) + "/" + escaped for escaped in names.values())
        assert sorted(str(path_from_output_name(name)) for name in written["file"]) == expected_files
        assert all(path_from_output_name(name).is_file() for name in written["file"])
        assert written["label"].nunique() == 1  # one image under four names: one answer
    assert output_name(folder / "plain.jpg") == str(folder / "plain.jpg")

    # Resume: the escaped names are recognised as done, the missing one is redone.
    out = tmp_path / "p.csv"
    complete = out.read_bytes()
    out.write_bytes(b"".join(complete.splitlines(keepends=True)[:3]))
    rows, new = predict_to_file(run, [folder], out, resume=True, progress=False, engine=runner)
    assert new == 2 and len(rows) == 4 and table(out)["file"].is_unique


# ---------------------------------------------------------------------------------------------
# 2. A crash in the middle of a write, and a full disk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "malformed"])
def test_torn_or_malformed_last_row_is_cut_and_redone_on_resume(run, runner, xrays, tmp_path: Path, damage) -> None:
    clean = tmp_path / "clean.csv"
    predict_to_file(run, xrays[:4], clean, progress=False, engine=runner)
    data = clean.read_bytes()
    lines = data.splitlines(keepends=True)
    if damage == "torn":  # power lost in the middle of the last row: half of it, no newline
        broken = data[: len(data) - len(lines[-1]) // 2]
    else:  # a last line that is not a whole row
        broken = b"".join(lines[:-1]) + lines[-1][:40] + b"\n"
    out = tmp_path / "p.csv"
    out.write_bytes(broken)
    rows, new = predict_to_file(run, xrays[:4], out, resume=True, progress=False, engine=runner)
    assert new == 1 and len(rows) == 4
    assert out.read_bytes().endswith(b"\n") and len(out.read_bytes().splitlines()) == 5
    assert_same_results(table(out), table(clean), run.covid_threshold)


def test_damage_before_the_last_row_is_refused_and_the_file_kept(run, runner, xrays, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    predict_to_file(run, xrays[:3], out, progress=False, engine=runner)
    lines = out.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + lines[1][:30] + b"\n" + b"".join(lines[2:])
    out.write_bytes(damaged)
    with pytest.raises(CovidxrError, match=r"p\.csv: cannot resume from it \(row 2 is damaged\)"):
        predict_to_file(run, xrays[:4], out, resume=True, progress=False, engine=runner)
    assert out.read_bytes() == damaged


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 KiB tmpfs: a disk that fills up after about fifteen rows."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_keeps_whole_rows_for_resume(run, runner, xrays, tmp_path: Path, small_disk) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, path in enumerate(xrays):
        (folder / f"{i:02d}.jpg").symlink_to(path)
    out = small_disk / "p.csv"
    result = cli("predict", str(folder), "--out", str(out), "--chunk-size", "2")
    assert result.returncode == 1
    kept = table(out)
    assert one_line_error(result.stderr) == (
        f"Error: {out}: cannot write (No space left on device); the {len(kept)} finished row(s) are kept: "
        "free some space and rerun with --resume"
    )
    assert 2 <= len(kept) < len(xrays) and out.read_bytes().endswith(b"\n") and (kept["error"] == "").all()

    roomy = tmp_path / "p.csv"
    shutil.copy(out, roomy)
    rows, new = predict_to_file(run, [folder], roomy, resume=True, progress=False, engine=runner)
    assert new == len(xrays) - len(kept) and len(table(roomy)) == len(xrays)
    pd.testing.assert_frame_equal(table(roomy).head(len(kept)), kept)


# ---------------------------------------------------------------------------------------------
# 3. Resume with another model or engine
# ---------------------------------------------------------------------------------------------


def test_resume_with_another_model_or_engine_is_refused(run, runner, xrays, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "bundled"  # same folder name, different head: only its hash tells
    shutil.copytree(default_model_path(), other)
    head = load_file(other / "head.safetensors")
    first = next(iter(head))
    head[first] = head[first] + 0.01
    save_file(head, other / "head.safetensors")
    # Its shipped graph was exported from the old head: refused, never used with the new one.
    with pytest.raises(CovidxrError, match="model.onnx: was exported from another head or backbone"):
        predict_to_file(load_run(other), xrays[:1], tmp_path / "stale.csv", progress=False)
    (other / "model.onnx").unlink()  # without it, the run is exported from its own head (training install)
    for suffix in (".csv", ".json"):
        out = tmp_path / f"p{suffix}"
        predict_to_file(run, xrays[:2], out, progress=False, engine=runner)
        before = out.read_bytes()
        for model, engine, what in [
            (run, TorchEngine(run_model(run)), "engine=torch"),
            (load_run(other), None, "head="),
        ]:
            with pytest.raises(CovidxrError, match=f"{out.name}: made by another model or engine .*{what}") as error:
                predict_to_file(model, xrays[:3], out, resume=True, progress=False, engine=engine or "auto")
            assert "resume with the same --model, --engine and --site" in str(error.value)
            assert out.read_bytes() == before
    assert json.loads((tmp_path / "p.json").read_text())["model"].startswith("efficientnet_lite0 run=bundled head=")
    assert table(tmp_path / "p.csv")["model"].str.contains("engine=onnx").all()


# ---------------------------------------------------------------------------------------------
# 4. Files the system will not open
# ---------------------------------------------------------------------------------------------


def test_unreadable_files_links_and_folders_get_rows_with_the_real_reason(xrays, tmp_path: Path) -> None:
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv is missing: permissions cannot be denied")
    # As root, drop the capabilities that bypass file permissions, as an ordinary user has none.
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps=-all")
    folder = tmp_path / "in"
    (folder / "locked-folder").mkdir(parents=True)
    shutil.copy(xrays[0], folder / "good.jpg")
    shutil.copy(xrays[1], folder / "locked-folder" / "hidden.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    locked = tmp_path / "locked.jpg"
    shutil.copy(xrays[2], locked)
    locked.chmod(0)
    (folder / "locked-folder").chmod(0)
    try:
        out = tmp_path / "p.csv"
        result = cli("predict", str(locked), str(xrays[3]), str(folder), "--out", str(out), prefix=prefix)
    finally:
        (folder / "locked-folder").chmod(0o755)
    assert result.returncode == 1 and re.fullmatch(r"Error: .*\b4\b.*\b6\b.*", one_line_error(result.stderr))
    errors = dict(zip(table(out)["file"], table(out)["error"], strict=True))
    unlisted = folder / "locked-folder"
    assert errors == {
        str(locked): f"{locked}: permission denied",
        str(xrays[3]): "",
        str(folder / "dangling.jpg"): f"{folder / 'dangling.jpg'}: broken symlink (its target does not exist)",
        str(folder / "good.jpg"): "",
        str(unlisted): f"{unlisted}: permission denied (a folder that cannot be listed)",
        str(folder / "loop.jpg"): f"{folder / 'loop.jpg'}: symlink loop (the link points back at itself)",
    }
    assert (table(out).set_index("file").loc[[str(xrays[3]), str(folder / "good.jpg")], "label"] != "").all()


# ---------------------------------------------------------------------------------------------
# 5. Caches altered in place
# ---------------------------------------------------------------------------------------------


def test_a_tampered_onnx_export_is_rebuilt_not_used(run, runner, xrays, tmp_path: Path) -> None:
    inputs = torch.stack([run_model(run).input_tensor(read_image(path)) for path in xrays[:2]])
    info = sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold)
    path = cached_export(run_model(run), info)  # a run without a shipped graph is exported into the cache
    _, clean = OnnxEngine(path, threads=1)(inputs)
    data = bytearray(path.read_bytes())
    size = len(data)
    middle = size // 2  # inside the backbone's weights: still a valid graph, other numbers
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    _, tampered = OnnxEngine(path, threads=1)(inputs)
    assert np.abs(tampered - clean).max() > 1e-3  # the altered graph loads and answers differently

    rebuilt = cached_export(run_model(run), info)
    _, logits = OnnxEngine(rebuilt, threads=1)(inputs)
    np.testing.assert_allclose(logits, clean, rtol=0, atol=1e-5)


def test_a_tampered_int8_graph_is_refused_not_used(run, runner, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fp32 = cached_export(
        run_model(run), sidecar(run_model(run), run.labels, run.temperature, run.covid_threshold), cache
    )
    # An accepted int8 graph where `covidxr quantize` keeps it (here a copy of the fp32 graph: a real
    # graph; quantising for real needs the calibration data), with the hash its report records.
    int8 = fp32.with_name(f"{fp32.stem}-int8.onnx")
    shutil.copy(fp32, int8)
    fields = json.loads(fp32.with_suffix(".json").read_text())  # what feeds the graph, as quantize copies it
    report = fields | {"format": "covidxr-int8-1", "accepted": True, "sha256": graph_sha256(int8)}
    report["ood_threshold"] = run.ood_guard.threshold
    int8.with_suffix(".json").write_text(json.dumps(report | {"report_sha256": report_digest(report)}))
    assert make_engine(run, "int8", cache).path == int8
    data = bytearray(int8.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    int8.write_bytes(bytes(data))
    with pytest.raises(CovidxrError) as error:
        make_engine(run, "int8", cache)
    assert str(error.value) == (
        f"{int8}: the int8 graph does not match the SHA-256 recorded when it was accepted (altered, or "
        f"accepted before covidxr recorded it); run `covidxr quantize {run.path}` again"
    )


def test_a_tampered_feature_entry_is_recomputed_not_used(xrays, tmp_path: Path) -> None:
    model = run_model(load_run(default_model_path()))
    cache_dir = tmp_path / "cache"  # torch: no export needed to check the cache
    clean, errors = compute_features(model, xrays[:2], cache_dir, progress=False, engine="torch")
    assert not errors
    cache = FeatureCache(model, cache_dir, engine="torch")
    entries = [cache._path(covidxr.runtime.images.file_sha256(path)) for path in xrays[:2]]
    # The second image's entry copied over the first's: same size, valid numbers, wrong image.
    shutil.copy(entries[1], entries[0])
    # And numbers in the second changed in place.
    data = bytearray(entries[1].read_bytes())
    data[-200:-196] = np.float32(123.0).tobytes()
    entries[1].write_bytes(bytes(data))
    again, _ = compute_features(model, xrays[:2], cache_dir, progress=False, engine="torch")
    np.testing.assert_allclose(again, clean, rtol=0, atol=1e-5)
    assert all(cache.get(covidxr.runtime.images.file_sha256(path)) is not None for path in xrays[:2])  # rebuilt


# ---------------------------------------------------------------------------------------------
# 6-8. Images decoded as garbage: DICOM, multi-page TIFF, EXIF orientation
# ---------------------------------------------------------------------------------------------


def test_dicom_voi_lut_with_8_bit_output_is_applied_not_scrambled(xrays, tmp_path: Path) -> None:
    stored = to_bits(grey(xrays[0]), 12)
    table_8bit = np.rint(255 * (np.arange(4096) / 4095) ** 0.6).astype(np.uint16)  # 12-bit in, 8-bit out
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])  # LUTDescriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", table_8bit.tolist())  # LUTData
    path = save(dx_dataset(stored, 12, VOILUTSequence=Sequence([item])), tmp_path / "voi-8bit.dcm")
    assert diff(decoded_grey(path), table_8bit[stored]).max() <= 1


def test_dicom_data_beyond_bits_stored_is_widened_to_the_data(xrays, tmp_path: Path) -> None:
    source = grey(xrays[0])
    stored = to_bits(source, 16)  # 16-bit data under a header that says 12 bits
    path = save(dx_dataset(stored, 12), tmp_path / "understated.dcm")
    assert diff(decoded_grey(path), source).max() <= 1
    # Where the header declares an overlay in the unused high bits, those bits are masked instead.
    twelve = to_bits(source, 12)
    with_overlay = twelve | np.where(np.arange(twelve.shape[1]) % 50 < 5, 1 << 15, 0).astype(np.uint16)
    ds = dx_dataset(with_overlay.astype(np.uint16), 12)
    ds.add_new(0x60000102, "US", 15)  # OverlayBitPosition, with no OverlayData: embedded in the pixels
    assert diff(decoded_grey(save(ds, tmp_path / "overlay.dcm")), source).max() <= 1


def test_multi_page_tiff_is_refused_in_one_line(xrays, tmp_path: Path) -> None:
    page = read_image(xrays[0]).convert("L")
    path = tmp_path / "two-pages.tif"
    page.save(path, save_all=True, append_images=[page.rotate(90)])
    with pytest.raises(CovidxrError) as error:
        read_image(path)
    assert str(error.value) == f"{path}: has 2 pages; give one image per file"


def test_exif_orientation_is_applied(run, xrays, tmp_path: Path) -> None:
    upright = read_image(xrays[0])
    sideways = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=100, subsampling=0, exif=exif)
    shown = read_image(sideways)
    assert shown.size == upright.size
    assert diff(np.asarray(shown), np.asarray(upright)).mean() < 1.5
    model = covidxr.load_model()
    [a, b] = model.predict([xrays[0], sideways])
    assert abs(a["probabilities"]["COVID-19"] - b["probabilities"]["COVID-19"]) < 0.01


# ---------------------------------------------------------------------------------------------
# 9. The Python API holds in-memory images to the file limits
# ---------------------------------------------------------------------------------------------


def test_api_arrays_and_images_get_the_file_limits() -> None:
    model = covidxr.load_model()
    cases = [
        (np.zeros((0, 0), np.uint8), CovidxrError, r"image array .*\(0, 0\).* empty"),
        (np.zeros((1, 1), np.uint8), CovidxrError, "1x1 pixels is too small to be a chest radiograph"),
        (Image.new("L", (1, 1)), CovidxrError, "1x1 pixels is too small to be a chest radiograph"),
        (np.zeros((20_000, 3_001), np.uint8), ImageTooLarge, f"over the limit of {MAX_IMAGE_PIXELS:,}"),
    ]
    for image, kind, message in cases:
        with pytest.raises(kind, match=message):
            model.predict(image)  # one image: its error is raised
        [row] = model.predict([image])  # in a list: an error row, as an unreadable path gets
        assert re.search(message, row["error"]), row


# ---------------------------------------------------------------------------------------------
# 10. A burst of large uploads: 503 before the body is read
# ---------------------------------------------------------------------------------------------


def _upload_head(port: int, length: int, *extra: str) -> bytes:
    lines = [
        "POST /api/predict HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: image/png",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_burst_of_large_uploads_gets_503_before_the_bodies_are_read(tmp_path: Path) -> None:
    size = 29 * MB
    body = b"\x89PNG\r\n\x1a\n" + bytes(size - 8)
    server = Server(tmp_path, "--max-queue", "2")
    stalled: list[socket.socket] = []
    try:
        # Two uploads that are still arriving fill the queue: each is admitted, its body half sent.
        for _ in range(2):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(_upload_head(server.port, size) + body[:MB])
            stalled.append(connection)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/healthz").json()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/healthz").json()["waiting"] == 2

        # A client that waits for 100 Continue gets its 503 at once, without sending a byte of its body.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as probe:
            probe.sendall(_upload_head(server.port, size, "Expect: 100-continue"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += probe.recv(4096)
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()

        # Sixteen concurrent 29 MB uploads: every one refused, none of their bodies kept in memory.
        pid = server.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak-memory count here
        before = _status_kib(pid, "VmRSS")
        responses = send_concurrently(
            16,
            lambda: httpx.post(
                f"{server.url}/api/predict", content=body, headers={"Content-Type": "image/png"}, timeout=120
            ),
        )
        assert [r.status_code for r in responses] == [503] * 16
        assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"] for r in responses)
        peak_growth_mib = (_status_kib(pid, "VmHWM") - before) / 1024
        assert peak_growth_mib < 29, f"the refused uploads cost {peak_growth_mib:.0f} MiB"
    finally:
        for connection in stalled:
            connection.close()
        server.stop()


# ---------------------------------------------------------------------------------------------
# 11. Checkpoints that would run code
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """What a hostile checkpoint carries: unpickling it calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"fingerprint": "f", "history": [], "payload": _RunsCode(marker)}, out / CHECKPOINT)
    with pytest.raises(CovidxrError, match=r"checkpoint\.pt: damaged \(UnpicklingError\)"):
        checkpoint_matches(out, "f")
    assert not marker.exists()
    # A checkpoint of tensors and plain values, as training writes, still loads.
    plain = {"fingerprint": "f", "history": [{"epoch": 1, "val_loss": 0.5}], "best_loss": float("inf")}
    torch.save(plain, out / CHECKPOINT)
    assert checkpoint_matches(out, "f")
