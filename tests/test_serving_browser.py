"""The upload page driven in a real headless Chromium (Debian's package) against a live service.

The service runs as ``python -m cxr_pipeline.serving`` under uvicorn on a
loopback port, serving a one-epoch CNN trained by jobs/train_cnn.py on the
sample tree (so the page also shows a Grad-CAM map). Set
CXR_SERVING_SCREENSHOT=/path/shot.png to keep a screenshot of the result page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import serving_support as support
from tolerances import same_probability

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed: run `make browser` (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, sample_tree):
    model = support.cnn_run(support.runs_base(tmp_path_factory), sample_tree)
    with support.live_service(model, tmp_path_factory.mktemp("service") / "serve.log") as port:
        yield port


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()


def test_upload_a_sample_image_and_read_the_result(page, service, sample_tree):
    image = support.sample_images(sample_tree)[-1]
    status, api = support.post_image(service, image.read_bytes(), image.name)
    assert status == 200

    page.goto(f"http://127.0.0.1:{service}/")
    assert page.inner_text("#model-id") == api["model_id"]
    page.set_input_files("#file", str(image))
    page.click("#submit")
    page.wait_for_selector("#result")

    assert page.inner_text("#result-class") == api["class"]
    shown = float(page.get_attribute("#result-probability", "data-value"))
    assert shown == same_probability(api["probability"])  # two requests: batch composition may differ
    # the text is the page's own value rounded to 4 decimals
    assert float(page.inner_text("#result-probability")) == pytest.approx(shown, abs=5e-5)
    assert float(page.get_attribute("#result-threshold", "data-value")) == pytest.approx(api["threshold"])
    # Both pictures really rendered (decoded by the browser, not just present in the HTML).
    for selector in ("#result-image", "#result-heatmap"):
        assert page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"), selector
    assert page.query_selector("#error") is None

    shot = os.environ.get("CXR_SERVING_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_upload_a_dicom_named_after_its_patient_and_see_its_heat_map(page, service, sample_tree, tmp_path):
    """A PACS export (a real DICOM with planted patient data, named after the patient): the page shows the
    result and the Grad-CAM map, and neither the file name nor any header value."""
    from cxr_pipeline.datasets.dicom_from_images import FAKE_IDENTITY, jpeg_dicom

    image = support.sample_images(sample_tree)[-1]
    export = tmp_path / "Planted^Jane^Quincy_MRN-PLANTED-4711.dcm"
    export.write_bytes(jpeg_dicom(image.read_bytes(), identity=FAKE_IDENTITY))
    page.goto(f"http://127.0.0.1:{service}/")
    page.set_input_files("#file", str(export))
    page.click("#submit")
    page.wait_for_selector("#result")
    for selector in ("#result-image", "#result-heatmap"):
        assert page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"), selector
    assert page.query_selector("#heatmap-error") is None
    shown = page.inner_text("body").lower()
    assert "dicom" in shown  # the image line: width x height DICOM
    for value in FAKE_IDENTITY.values():
        assert value.lower() not in shown, value


def test_a_non_image_gets_a_clear_message(page, service, tmp_path):
    bogus = tmp_path / "notes.jpeg"
    bogus.write_bytes(support.not_an_image())
    page.goto(f"http://127.0.0.1:{service}/")
    page.set_input_files("#file", str(bogus))
    page.click("#submit")
    page.wait_for_selector("#error")
    assert "not an image" in page.inner_text("#error-message")
    assert page.get_attribute("#error", "data-code") == "not_an_image"
    assert page.query_selector("#result") is None
    # The form is still there to try again.
    assert page.query_selector("#file") is not None
