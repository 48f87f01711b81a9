"""The service's API documentation (/docs, /redoc) in headless Chromium with every host but this machine cut off:
it must render from what the app itself serves, and ask no other host for anything (issue 28 item 7: it loaded
Swagger UI from a CDN, so offline it was a blank page, and online it sent the hospital's browser elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import chromium
from .test_serve import ARTIFACTS, Server


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium that reaches only the loopback interface: every other host goes to a proxy that does not
    exist and resolves to nothing, so a page that needs the internet fails here as it would offline."""
    driver = chromium(
        tmp_path_factory.mktemp("chromium-offline"),
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        size=(1300, 800),
    )
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def _hosts(browser: webdriver.Chrome) -> set[str]:
    """Every host the page asked for something: the document and each resource it loaded or tried to."""
    urls = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
    )
    return {urlsplit(url).netloc for url in urls}


def test_swagger_ui_renders_offline_from_the_app_alone(offline_browser: webdriver.Chrome, server: Server) -> None:
    offline_browser.get(f"{server.url}/docs")
    wait = WebDriverWait(offline_browser, 30)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text for e in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/predict", "/api/explain", "/api/model", "/healthz"} <= paths, paths
    assert "covidxr" in offline_browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert _hosts(offline_browser) == {urlsplit(server.url).netloc}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    offline_browser.save_screenshot(str(Path(ARTIFACTS) / "docs-offline.png"))


def test_no_redoc_page_that_would_fetch_from_a_cdn(server: Server) -> None:
    """ReDoc's standalone bundle fetches its logo from cdn.redoc.ly even when served locally: it is not offered."""
    assert httpx.get(f"{server.url}/redoc").status_code == 404
