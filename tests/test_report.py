"""Reports of a real run and a real reproduce folder, opened in headless Chromium: images load, nothing external."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from covidxr import DISCLAIMER
from covidxr.config import TrainConfig
from covidxr.evaluate import evaluate_run
from covidxr.report import FIGURES, write_reproduce_report, write_run_report
from covidxr.reproduce import reproduce
from covidxr.train import train

from .conftest import REPO

FAST = TrainConfig(model="efficientnet_lite0", epochs=5, image_size=224)
CONFOUNDED = (
    "every COVID-19 image comes from ieee8023 and every NORMAL/PNEUMONIA image from kermany: "
    "the label is confounded with the source"
)


def _report_run(data: Path, out: Path) -> Path:
    """Train and evaluate on real images; the (slow) explanation checks are left to the reproduce test."""
    run = train(data, out, FAST, progress=False)
    evaluate_run(run, progress=False, explain=False)
    write_run_report(run)
    return run


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _report_run(small_dataset, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """The system Chromium and chromedriver, so that Selenium Manager never downloads anything."""
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
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_window_size(1280, 1000)
    yield driver
    driver.quit()


def _open(browser: webdriver.Chrome, page: Path, screenshot: str) -> dict[str, int]:
    """Load the page, check it is self-contained, save a full-page screenshot; return each image's width."""
    browser.get(page.resolve().as_uri())
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => [i.id, i.naturalWidth, i.src.slice(0, 22)])"
    )
    assert all(src == "data:image/png;base64," for _, _, src in loaded)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [name for name in fetched if not name.startswith("data:")] == []
    assert browser.find_elements(By.CSS_SELECTOR, "script, link, iframe, object") == []
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height, 16000))
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    browser.save_screenshot(str(artifacts / screenshot))
    return {image_id: width for image_id, width, _ in loaded}


def test_run_report_states_what_it_has_and_lacks(run: Path) -> None:
    markdown = (run / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert markdown.splitlines()[2] == f"**{DISCLAIMER}**"
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    test = splits[splits["split"] == "test"]
    covid = test[test["label"] == "COVID-19"]
    assert f"| test | {len(covid)} / {covid['patient_id'].nunique()} |" in _section(markdown, "Split")
    assert "| image_size | 224 |" in _section(markdown, "Configuration")
    low, high = metrics["accuracy_ci95"]
    assert f"Accuracy {metrics['accuracy']:.1%} (95% Wilson interval {low:.1%} to {high:.1%})" in markdown
    assert "| VGG-16 (paper) | 97.3% | not reported | 75 | by image |" in _section(markdown, "Against the paper")
    for key, name, _ in FIGURES:
        if (run / name).is_file():
            assert f"]({name})" in markdown
        else:
            assert f"Missing figure: {name}," in markdown, key
    checks = _section(markdown, "Explanation checks")
    if "explanations" in metrics:
        assert all(f"| {method} |" in checks for method in metrics["explanations"]["methods"])
    else:
        assert "not computed" in checks
    limitations = _section(markdown, "Limitations")
    assert f"In the training split, {CONFOUNDED}." in limitations
    assert "every COVID-19 image is adult and every NORMAL/PNEUMONIA image child" in limitations
    assert "No patient of the evaluated rows is in the training split." in limitations


def test_run_report_is_self_contained_in_chromium(run: Path, browser: webdriver.Chrome) -> None:
    widths = _open(browser, run / "report.html", "report.png")
    expected = {f"fig-{key}" for key, name, _ in FIGURES if (run / name).is_file()}
    assert {"fig-curves", "fig-confusion"} <= expected
    assert set(widths) == expected
    assert all(width > 0 for width in widths.values())
    assert all(browser.find_element(By.ID, anchor).get_attribute("alt") for anchor in expected)
    page = browser.find_element(By.TAG_NAME, "body").text
    assert DISCLAIMER in page
    assert "Limitations" in [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert "confounded with the source" in page


def test_reproduce_report_shows_paper_rows_skips_and_figures(
    small_dataset: Path, tmp_path: Path, browser: webdriver.Chrome
) -> None:
    folder = tmp_path / "reproduce"
    config = TrainConfig(epochs=3, image_size=224)
    reproduce(small_dataset, folder, ("vgg16", "efficientnet_lite0"), config, progress=False)
    write_reproduce_report(folder)
    markdown = (folder / "report.md").read_text()
    assert "| vgg16 | VGG-16 | 97.3% (n=75) |" in markdown
    assert "| efficientnet_lite0 | (not in the paper) | not in the paper |" in markdown
    assert "- vgg16 (VGG-16): no pretrained weights for 'vgg16'" in _section(markdown, "Skipped models")
    assert "](efficientnet_lite0/curves.png)" in markdown
    assert CONFOUNDED in _section(markdown, "Limitations")
    explanations = json.loads((folder / "efficientnet_lite0" / "metrics.json").read_text()).get("explanations", {})
    checks = markdown.split("## efficientnet_lite0\n", 1)[1].split("### Explanation checks\n", 1)[1]
    assert all(f"| {method} |" in checks for method in explanations.get("methods", {}))
    widths = _open(browser, folder / "report.html", "reproduce-report.png")
    present = {key for key, name, _ in FIGURES if (folder / "efficientnet_lite0" / name).is_file()}
    assert set(widths) == {f"efficientnet_lite0-fig-{key}" for key in present}
    assert all(width > 0 for width in widths.values())
    assert "97.3%" in browser.find_element(By.TAG_NAME, "table").text


def test_no_confounding_claimed_when_every_class_has_both_sources(small_dataset: Path, tmp_path: Path) -> None:
    """The same real images, each class split alternately over two sources: the report must not see a confounder."""
    meta = pd.read_csv(small_dataset / "metadata.csv", dtype=str, keep_default_na=False)
    mixed = meta[["filename", "label", "patient_id"]].copy()
    mixed["source"] = [["hospital-a", "hospital-b"][i % 2] for i in mixed.groupby("label").cumcount()]
    root = tmp_path / "two-sources"
    (root / "images").mkdir(parents=True)
    for name in mixed["filename"]:
        (root / name).symlink_to((small_dataset / name).resolve())
    mixed.to_csv(root / "metadata.csv", index=False)
    limitations = _section((_report_run(root, tmp_path / "run") / "report.md").read_text(), "Limitations")
    assert "confounded" not in limitations
    assert "In the training split, no source coincides with a class." in limitations


def test_explanation_checks_render_whatever_keys_they_have(run: Path, tmp_path: Path) -> None:
    """An evaluation folder apart from its run, with checks in the documented shape, one method lacking keys."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["run"] = str(run)
    metrics["explanations"] = {
        "n_images": 24,
        "geometry": {"description": "lung field, border and corners", "area": {"lung_field": 0.49, "border": 0.36}},
        "methods": {
            "gradcam": {
                "confidence_change": 0.12,
                "better_than_random": True,
                "mass": {"lung_field": 0.61, "border": 0.2},
                "flags": ["map mass on the border <b>"],
                "verdict": "warning",
            },
            "eigencam": {"verdict": "fail"},
        },
    }
    folder = tmp_path / "evaluation"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(run / "curves.png", folder)
    markdown_path, html_path = write_run_report(folder)
    checks = _section(markdown_path.read_text(), "Explanation checks")
    assert (
        "| method | confidence change | better than random | mass: lung field | mass: border | flags | verdict |"
        in checks
    )
    assert "| gradcam | 0.12 | yes | 0.61 | 0.2 | map mass on the border <b> | warning |" in checks
    assert "| eigencam | n/a | n/a | n/a | n/a | n/a | fail |" in checks
    assert "- geometry area: lung field 0.49, border 0.36" in checks
    assert "Missing figure: confusion_matrix.png, the paper's Fig. 2" in markdown_path.read_text()
    page = html_path.read_text()
    assert "map mass on the border &lt;b&gt;" in page
    assert f'id="fig-curves" alt="{metrics["model"]}: Training curves' in page
