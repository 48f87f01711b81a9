"""``covidxr serve`` as a real process on 127.0.0.1: the API over HTTP with real X-rays and DICOM, bad
uploads, overload, privacy, and the page driven in headless Chromium (screenshots kept as artifacts)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from skimage import data as skimage_data

from covidxr import DISCLAIMER, load_model
from covidxr.runtime.images import read_image
from covidxr.runtime.monitor import RULES, ks_two_sample, psi
from covidxr.runtime.serve import MAX_BATCH, MicroBatcher
from covidxr.runtime.site import describe_site, load_site

from .conftest import ADULT_CONTROLS, REPO, assert_same_answer, free_port, linked_dataset, run_cli
from .test_dicom import PATIENT, dx_dataset, save

ARTIFACTS = Path(os.environ.get("COVIDXR_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve"
STATUSES = {200, 503}


class Server:
    """``python -m covidxr serve`` in its own process, with its own empty temporary folder and a log."""

    def __init__(self, root: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True)
        self.log = root / "server.log"
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        command = [sys.executable, "-m", "covidxr", "serve", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def xrays(cxr3: Path, cxr3_meta: pd.DataFrame) -> list[Path]:
    return [cxr3 / name for name in cxr3_meta.groupby("label").head(1)["filename"]]


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


def send_concurrently(count: int, request: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """``count`` requests at once, each in its own thread; their responses in the order they came back."""
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        response = request()
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return responses


def post(server: Server, path: str, content: bytes, name: str = "x.png", field: str = "file", **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", files={field: (name, content)}, timeout=120, **kw)


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def test_predict_answers_like_the_python_api(server: Server, xrays: list[Path]) -> None:
    model = load_model()
    for i, path in enumerate(xrays):
        query = "?preview=true" if i == 0 else ""
        response = post(server, f"/api/predict{query}", path.read_bytes(), path.name)
        assert response.status_code == 200, response.text
        answer = response.json()
        [expected] = model.predict([path])
        assert answer["label"] == expected["label"]
        for label, p in expected["probabilities"].items():
            assert answer["probabilities"][label] == pytest.approx(p, abs=1e-6)
        assert answer["out_of_distribution"] is False and answer["disclaimer"] == DISCLAIMER
        assert answer["model"].startswith("efficientnet_lite0/bundled/")
        if query:
            preview = Image.open(io.BytesIO(base64.b64decode(answer["image"]["preview_png"])))
            assert max(preview.size) <= 512 and preview.format == "PNG"
        else:
            assert set(answer["image"]) == {"width", "height"}


def test_explain_returns_a_heat_map_over_the_preview(server: Server, xrays: list[Path]) -> None:
    response = post(server, "/api/explain", xrays[0].read_bytes(), xrays[0].name)
    assert response.status_code == 200, response.text
    answer = response.json()
    preview = Image.open(io.BytesIO(base64.b64decode(answer["image"]["preview_png"])))
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["explanation"]["heatmap_png"]))))
    assert heat.shape[:2] == (preview.height, preview.width) and heat.std() > 10  # a map, not a flat fill
    assert answer["explanation"]["method"] == "gradcam" and answer["explanation"]["target"] == answer["label"]
    assert answer["disclaimer"] == DISCLAIMER


def test_dicom_upload_answers_without_echoing_patient_tags(server: Server, xrays: list[Path], tmp_path: Path) -> None:
    grey = np.asarray(Image.open(xrays[0]).convert("L"))
    dicom = save(dx_dataset(grey, 8), tmp_path / "scan.dcm")
    png = post(server, "/api/predict", xrays[0].read_bytes()).json()
    response = post(server, "/api/predict", dicom.read_bytes(), "scan.dcm")
    assert response.status_code == 200, response.text
    assert response.json()["label"] == png["label"]
    for value in PATIENT.values():
        assert value not in response.text
        assert value not in server.log.read_text()


def test_an_out_of_distribution_upload_gets_no_class(server: Server, cat: Path) -> None:
    """A photograph: no label and no COVID-19 call, the reason instead; probabilities stay for research."""
    answer = post(server, "/api/predict", cat.read_bytes(), cat.name).json()
    assert answer["label"] is None and answer["covid_positive"] is None
    assert answer["no_answer_reason"].startswith("a colour photograph, not a grey chest X-ray")  # its one reason
    assert answer["out_of_distribution"] is True
    assert sum(answer["probabilities"].values()) == pytest.approx(1) and answer["disclaimer"] == DISCLAIMER


def test_model_card_health_and_openapi(server: Server) -> None:
    card = httpx.get(f"{server.url}/api/model").json()
    assert card["disclaimer"] == DISCLAIMER and "leave_one_source_out" in card and card["model"].startswith("eff")
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/api/predict", "/api/explain", "/api/model", "/healthz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    page = httpx.get(f"{server.url}/model-card")
    assert page.headers["content-type"].startswith("text/html") and "<h1>Model card" in page.text
    assert "Operating point" in page.text and DISCLAIMER in page.text


def test_bad_uploads_get_a_clear_status_and_the_server_goes_on(
    server: Server, xrays: list[Path], tmp_path: Path
) -> None:
    jpeg = xrays[0].read_bytes()
    no_pixels = dx_dataset(np.zeros((64, 64), np.uint8), 8)
    del no_pixels.PixelData
    big = tmp_path / "huge.png"
    Image.new("L", (20_000, 20_000)).save(big, optimize=False)  # compresses to ~1 MB; 400 Mpx decoded
    cases = [
        ("empty body", httpx.post(f"{server.url}/api/predict", timeout=60), 400, "empty request"),
        ("JSON body", httpx.post(f"{server.url}/api/predict", json={"file": "x.png"}), 415, "multipart field 'file'"),
        ("empty form", post(server, "/api/predict", b""), 400, "is empty"),
        ("wrong field", post(server, "/api/predict", jpeg, field="image"), 422, "no field 'file'"),
        ("text as .png", post(server, "/api/predict", b"hello, not an image", "x.png"), 415, "judged by its content"),
        ("truncated JPEG", post(server, "/api/predict", jpeg[: len(jpeg) // 3]), 400, "corrupt or truncated"),
        ("40 MB", post(server, "/api/predict", b"\xff\xd8\xff" + bytes(40 * 2**20)), 413, "over the limit of 30 MB"),
        ("DICOM, no pixels", post(server, "/api/predict", _dicom_bytes(no_pixels, tmp_path)), 400, "no pixel data"),
        ("20,000 px", post(server, "/api/predict", big.read_bytes()), 413, "over the limit"),
        ("unknown path", httpx.get(f"{server.url}/static/../../etc/passwd"), 404, ""),
    ]
    for name, response, status, fragment in cases:
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert fragment in body["error"] and body["status"] == status, (name, body)
        assert "Traceback" not in response.text
    assert post(server, "/api/predict", jpeg).status_code == 200  # still serving
    assert "Traceback" not in server.log.read_text()


def _dicom_bytes(ds, tmp_path: Path) -> bytes:
    return save(ds, tmp_path / "nopixels.dcm").read_bytes()


def test_concurrent_predictions_are_batched_and_a_bad_upload_fails_only_itself(
    server: Server, xrays: list[Path], cat: Path
) -> None:
    """Sixteen requests at once go through the micro-batcher and get the answers they get one by one; the
    corrupt upload among them gets its 400, the photo its no-answer, and nobody else is hurt."""
    alone = {path.name: post(server, "/api/predict", path.read_bytes(), path.name).json() for path in xrays}
    before = httpx.get(f"{server.url}/healthz").json()["recent_batch_sizes"]  # the last 100 engine calls
    uploads = [(path.name, path.read_bytes()) for path in xrays * 4] + [
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
        (cat.name, cat.read_bytes()),
    ]
    results: dict[int, httpx.Response] = {}
    lock = threading.Lock()

    def send(index: int) -> None:
        name, content = uploads[index]
        response = post(server, "/api/predict", content, name)
        with lock:
            results[index] = response

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(uploads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for index, (name, _) in enumerate(uploads):
        response = results[index]
        if name == "broken.png":
            assert response.status_code == 400, response.text
        elif name == cat.name:
            assert response.status_code == 200 and response.json()["label"] is None
        else:
            assert response.status_code == 200, response.text
            assert_same_answer(response.json(), alone[name])  # a batch against a batch of one
    # Every upload that decoded (the X-rays and the photo, not the broken file) went through the batcher once.
    # How many shared an engine call depends on the machine's cores and speed (decoding runs on one thread
    # per core, and a batch waits 5 ms for others), so the grouping itself is checked by the next test.
    sizes = httpx.get(f"{server.url}/healthz").json()["recent_batch_sizes"]
    new = sizes[len(before) :]
    assert sum(new) == len(uploads) - 1 and all(1 <= size <= MAX_BATCH for size in new), (before, sizes)


def test_requests_that_arrive_together_share_one_engine_call(xrays: list[Path]) -> None:
    """The micro-batcher on its own, where the grouping does not depend on the machine's speed: a full batch
    is one engine call at once, and requests queued together before the wait ends are one call after it;
    each request gets its own image's answer."""
    model = load_model()
    prepared = [model.prepare(read_image(path)) for path in xrays]
    alone = [model.answer_prepared([item])[0] for item in prepared]

    async def together(batcher: MicroBatcher, items: list) -> list[dict]:
        return await asyncio.gather(*(batcher.answer(item) for item in items))

    with ThreadPoolExecutor(1) as executor:
        full = MicroBatcher(model, executor, max_batch=len(prepared), wait=3600)  # flushed by the last arrival
        answers = asyncio.run(together(full, prepared))
        waited = MicroBatcher(model, executor, max_batch=MAX_BATCH, wait=0.05)  # flushed when the wait ends
        answers += asyncio.run(together(waited, prepared * 2))
    assert full.batch_sizes == [len(prepared)] and waited.batch_sizes == [2 * len(prepared)]
    for got, expected in zip(answers, alone * 3, strict=True):
        assert_same_answer(got, expected)


def test_uploads_leave_no_file_and_no_trace_in_the_log(server: Server, xrays: list[Path]) -> None:
    def files() -> dict[str, int]:  # a library leaves a small session file at start-up: uploads add nothing
        return {str(p): p.stat().st_size for p in server.tmp.rglob("*")}

    before = files()
    secret = "Doe_Jane_MRN7731904.png"
    assert post(server, "/api/predict", xrays[1].read_bytes(), secret).status_code == 200
    big = xrays[1].read_bytes() + bytes(3 * 2**20)  # over starlette's 1 MB spool: still kept in memory
    assert post(server, "/api/predict", big, secret).status_code == 200
    assert files() == before and sum(before.values()) < 1000
    assert secret not in server.log.read_text()
    # CORS is off: no header lets another origin's page read the answers.
    response = httpx.get(f"{server.url}/healthz", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers


def test_overload_gets_503_with_retry_after_never_a_hang(xrays: list[Path], tmp_path: Path) -> None:
    busy = Server(tmp_path, "--max-queue", "2")
    try:
        content = xrays[0].read_bytes()
        responses = send_concurrently(12, lambda: post(busy, "/api/explain", content))
        assert len(responses) == 12 and {r.status_code for r in responses} <= STATUSES
        refused = [r for r in responses if r.status_code == 503]
        assert refused and all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"] for r in refused)
        assert any(r.status_code == 200 for r in responses)
        assert httpx.get(f"{busy.url}/healthz").json()["waiting"] == 0
    finally:
        busy.stop()


# ---------------------------------------------------------------------------------------------
# The page, in a real browser
# ---------------------------------------------------------------------------------------------


def _upload(browser: webdriver.Chrome, path: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in {
        "done", "error"})  # fmt: skip


def _visible_images(browser: webdriver.Chrome) -> list[str]:
    return [image.get_attribute("id") for image in browser.find_elements(By.TAG_NAME, "img") if image.is_displayed()]


def _fully_in_view(browser: webdriver.Chrome, element_id: str) -> bool:
    return browser.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight;",
        element_id,
    )


def test_page_upload_shows_label_heat_map_and_ood_warning(
    server: Server, browser: webdriver.Chrome, xrays: list[Path], cat: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1300, 800)
    browser.get(server.url)
    disclaimer = browser.find_element(By.ID, "disclaimer")
    assert disclaimer.is_displayed() and "Research use only" in disclaimer.text
    assert _visible_images(browser) == []  # no broken-image icon before an upload
    browser.save_screenshot(str(ARTIFACTS / "page-empty.png"))

    # Keyboard: Tab reaches the file chooser (the label's input) first.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"

    _upload(browser, xrays[0])
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    label = browser.find_element(By.ID, "label").text
    assert label in {"COVID-19", "NORMAL", "PNEUMONIA"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3
    # The answer is on the first screen at 1300 x 800, without scrolling.
    assert browser.execute_script("return window.scrollY") == 0
    assert _fully_in_view(browser, "answer"), "the answer needs scrolling at 1300x800"
    browser.save_screenshot(str(ARTIFACTS / "xray-desktop.png"))  # the first screen, as a user sees it
    note = browser.find_element(By.ID, "covid-note").text
    assert ("reaches" in note) == (label == "COVID-19")  # the note and the label tell one story
    heat = browser.find_element(By.ID, "heatmap")
    assert heat.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", heat) > 0
    legend = browser.find_element(By.CSS_SELECTOR, ".legend")
    assert legend.is_displayed() and "strong influence" in legend.text
    assert "does not" in browser.find_element(By.CSS_SELECTOR, ".caveat").text
    assert not browser.find_element(By.ID, "ood").is_displayed()
    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.END)  # keyboard on the slider
    assert browser.execute_script("return getComputedStyle(arguments[0]).opacity", heat) == "1"
    slider.send_keys(*[Keys.ARROW_LEFT] * 40)
    assert browser.execute_script("return getComputedStyle(arguments[0]).opacity", heat) == "0.6"
    assert disclaimer.is_displayed()

    browser.set_window_size(768, 1024)  # a tablet held upright
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(ARTIFACTS / "xray-tablet.png"))

    browser.set_window_size(390, 844)  # a phone: the footer must not cover the end of the page
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    covered = browser.execute_script(
        "const footer = document.querySelector('.disclaimer-footer').getBoundingClientRect();"
        "const last = document.querySelector('.model').getBoundingClientRect();"
        "return last.bottom > footer.top && last.top < footer.bottom;"
    )
    assert not covered and browser.find_element(By.CSS_SELECTOR, ".disclaimer-footer").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "xray-phone.png"))
    browser.set_window_size(1300, 800)

    _upload(browser, cat)  # out of distribution: the warning instead of a class, bars and heat map
    warning = browser.find_element(By.ID, "ood")
    assert warning.is_displayed() and "no answer" in warning.text.lower()
    assert "A colour photograph, not a grey chest X-ray" in warning.text
    assert not browser.find_element(By.ID, "answer").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert not browser.find_element(By.ID, "heatmap").is_displayed()
    result_text = browser.find_element(By.CSS_SELECTOR, "section.result").text
    assert not any(name in result_text for name in ("COVID-19", "NORMAL", "PNEUMONIA"))
    assert disclaimer.is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "cat-ood.png"))

    _upload(browser, xrays[1])
    _upload(browser, REPO / "README.md")  # not an image: the server's message, and the last answer cleared
    status = browser.find_element(By.ID, "status")
    assert "judged by its content" in status.text and "error" in status.get_attribute("class")
    assert not browser.find_element(By.ID, "answer").is_displayed() and _visible_images(browser) == []
    assert browser.find_element(By.ID, "label").text == ""
    browser.save_screenshot(str(ARTIFACTS / "not-an-image.png"))

    browser.find_element(By.LINK_TEXT, "model card").click()  # opens in a new tab: a readable page
    browser.switch_to.window(browser.window_handles[-1])
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.TAG_NAME, "h1"))
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Model card")
    assert "Operating point" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(ARTIFACTS / "model-card.png"))
    browser.close()
    browser.switch_to.window(browser.window_handles[0])
    shots = ("page-empty.png", "xray-desktop.png", "xray-phone.png", "cat-ood.png", "model-card.png")
    assert all((ARTIFACTS / name).stat().st_size > 10_000 for name in shots)


# ---------------------------------------------------------------------------------------------
# A site's calibration and the live input monitor (issue 23)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A site file from ``covidxr calibrate`` on 60 NIH adult controls (specificity 95%), and 9 NIH images of
    other patients to send to the service."""
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    patients = sorted(meta["patient_id"].unique())
    calibration = meta[meta["patient_id"].isin(patients[:60])]
    others = meta[~meta["patient_id"].isin(patients[:60])].drop_duplicates("patient_id").head(9)
    root = tmp_path_factory.mktemp("nih-site")
    data = linked_dataset(root / "calibration", ADULT_CONTROLS, calibration)
    site = root / "site.json"
    result = run_cli("calibrate", data, "--specificity", "0.95", "--site-name", "NIH small", "--out", site)
    assert result.returncode == 0, result.stderr
    return site, [ADULT_CONTROLS / name for name in others["filename"]]


def test_site_answers_page_and_live_monitor_match_the_monitor_rules(
    nih_site: tuple[Path, list[Path]], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    site_path, images = nih_site
    site = load_site(site_path)
    line = describe_site(site)
    assert line.startswith(f"calibrated at NIH small on {site.images} local images: specificity ")
    server = Server(tmp_path / "server", "--site", str(site_path), "--monitor-window", "8")
    try:
        answers = []
        for count, image in enumerate(images, start=1):
            response = post(server, "/api/predict", image.read_bytes(), image.name)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["site"] == str(site_path) and answer["covid_threshold"] == site.covid_threshold
            assert answer["site_calibration"] == line and answer["disclaimer"] == DISCLAIMER
            answers.append(answer)
            if count == 5:  # fewer answers than the window: all of them, and too few for the rules
                early = httpx.get(f"{server.url}/healthz", timeout=10).json()["monitor"]
        health = httpx.get(f"{server.url}/healthz", timeout=10).json()
        page = httpx.get(f"{server.url}/monitor", timeout=10)

        browser.get(server.url)
        _upload(browser, images[0])
        calibrated = browser.find_element(By.ID, "site-calibration")
        assert calibrated.is_displayed() and line in calibrated.text
        assert "this site's operating threshold" in browser.find_element(By.ID, "covid-note").text
        assert "validation data" not in browser.find_element(By.ID, "answer").text
        assert browser.find_element(By.ID, "disclaimer").is_displayed()
        assert "Research use only" in browser.find_element(By.ID, "disclaimer").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "site-calibrated.png"))
        after = httpx.get(f"{server.url}/healthz", timeout=10).json()["monitor"]
    finally:
        server.stop()

    assert health["site_calibration"] == line
    assert early["n"] == 5 and early["note"] is None  # the rules apply from a quarter of the window (2)
    monitor = health["monitor"]
    assert monitor["n"] == 8 and monitor["window"] == 8 and after["n"] == 8  # bounded: the last 8 answers
    assert monitor["not_compared"] is None and monitor["covid_threshold"] == site.covid_threshold

    # The figures, computed here from the last 8 answers the service gave.
    last = answers[-8:]
    reference = np.asarray(site.inputs["p_covid"], dtype=np.float64)
    p = np.round([a["probabilities"]["COVID-19"] for a in last], 5)
    answered = [a for a in last if a["label"] is not None]
    expected = {
        "ood_rate": np.mean([a["out_of_distribution"] for a in last]),
        "no_answer_rate": 1 - len(answered) / len(last),
        "covid_share": np.mean([a["covid_positive"] for a in answered]) if answered else None,
        "psi": psi(reference, p),
        "ks_statistic": scipy_stats.ks_2samp(reference, p).statistic,
        "ks_pvalue": ks_two_sample(reference, p)[1],
    }
    for name, value in expected.items():
        assert monitor["figures"][name] == pytest.approx(value, abs=1e-9), name
    rules_broken = (
        expected["psi"] >= RULES["psi"],
        expected["ks_pvalue"] < RULES["ks_pvalue"] and expected["ks_statistic"] >= RULES["ks_statistic"],
        expected["ood_rate"] - site.inputs["ood_rate"] > RULES["ood_rate_rise"],
        expected["no_answer_rate"] - site.inputs["no_answer_rate"] > RULES["no_answer_rate_rise"],
    )
    assert monitor["alarm"] is any(rules_broken) and len(monitor["alarms"]) == sum(rules_broken)
    assert monitor["calibration"]["ood_rate"] == pytest.approx(site.inputs["ood_rate"])

    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    text = page.text
    assert '<span id="n">8</span>' in text and f"{expected['psi']:.3f}" in text
    assert f"{expected['ks_statistic']:.3f}" in text and f"{expected['ood_rate']:.1%}" in text
    assert f"PSI of p(COVID-19) ≥ {RULES['psi']}" in text and "Research use only" in text
    assert ("ALARM" in text) is monitor["alarm"]


def test_without_a_site_the_monitor_has_the_rates_but_no_psi_and_says_why(
    xrays: list[Path], cat: Path, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    server = Server(tmp_path / "server", "--monitor-window", "4")
    try:
        start = httpx.get(f"{server.url}/healthz", timeout=10).json()["monitor"]
        answers = [post(server, "/api/predict", path.read_bytes(), path.name).json() for path in [*xrays, cat]]
        health = httpx.get(f"{server.url}/healthz", timeout=10).json()
        page = httpx.get(f"{server.url}/monitor", timeout=10)
        browser.get(server.url)  # the page as before: the model's own threshold, no site line
        _upload(browser, xrays[0])
        assert "chosen on validation data" in browser.find_element(By.ID, "covid-note").text
        assert not browser.find_element(By.ID, "site-calibration").is_displayed()
    finally:
        server.stop()
    assert start["n"] == 0 and set(start["figures"].values()) == {None} and start["alarm"] is False
    assert all(a["site"] is None and a["site_calibration"] is None for a in answers)
    assert health["site"] is None and health["site_calibration"] is None
    monitor = health["monitor"]
    last = answers[-4:]
    answered = [a for a in last if a["label"] is not None]
    assert monitor["n"] == 4 and monitor["figures"]["ood_rate"] == pytest.approx(
        np.mean([a["out_of_distribution"] for a in last])
    )
    assert monitor["figures"]["no_answer_rate"] == pytest.approx(1 - len(answered) / 4) and len(answered) < 4
    assert monitor["figures"]["covid_share"] == pytest.approx(np.mean([a["covid_positive"] for a in answered]))
    assert monitor["figures"]["psi"] is None and monitor["figures"]["ks_statistic"] is None
    assert monitor["alarm"] is False and monitor["calibration"] is None
    assert "no site file" in monitor["not_compared"] and "--site" in monitor["not_compared"]
    assert page.status_code == 200 and "no site file" in page.text and '<span id="n">4</span>' in page.text
