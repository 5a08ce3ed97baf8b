"""End to end in a real browser: `streamlit run app.py` + Debian's Chromium driven by Playwright (sync API).

A fresh machine as the README's quick start meets it: no pfcam flags, empty PFCAM_CACHE and HF_HOME, the hub
unreachable (HF_ENDPOINT on a closed loopback port). The first screen must show the demo models' heatmaps of a
demo scene and EfficientNet-Lite0's of two bundled photos without a click; the test checks that they are not
blank, saves a screenshot (and copies it to $PFCAM_SCREENSHOT when set: that is how docs/screenshot.png is
refreshed), then uploads an image through the page's file input and checks its heatmaps too.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_support import CHROMIUM, CHROMIUM_FLAGS, app_server, fresh_env, idle, overlays

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RENDER_TIMEOUT = 600  # seconds for the heatmaps (cold start: imports, model loads, CAMs on a small shared CPU)


def scene_file(tmp_path: Path) -> Path:
    """A demo scene (not one of the app's own examples) written as a PNG, to upload like a user would."""
    from pfdemo import scenes
    from pfnet import zoo

    scene = scenes.render_scene(4242, 3, zoo.get("demo_r50").preprocess.input_size)
    path = tmp_path / f"my_{scene.class_name}.png"
    Image.fromarray(scene.image).save(path)
    return path


def assert_not_blank(page, url: str, cell) -> None:
    """The cell's image, fetched as served and as shown on screen, has real colour variation."""
    image = cell.locator("img")
    image.evaluate("img => img.complete ? true : new Promise(r => img.addEventListener('load', r))")
    src = image.get_attribute("src")
    response = page.request.get(src if src.startswith("http") else url + src)
    assert response.ok, src
    pixels = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"), dtype=np.float32)
    assert min(pixels.shape[:2]) >= 32
    assert pixels.std() > 10.0, f"{src} looks blank (std {pixels.std():.1f})"
    assert len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0)) > 100, f"{src} has too few colours"
    shown = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"), dtype=np.float32)
    assert shown.std() > 10.0, f"{src} is blank on screen"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_fresh_first_screen_in_chromium_shows_heatmaps_and_an_upload_adds_its_own(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from pfnet import weights

    if not all(weights.weight_status(model_id) == "bundled" for model_id in ("demo_r50", "demo_r50_hybrid")):
        pytest.skip("bundled demo weights missing in assets/weights (made by `pfcam train-demo`)")

    image_path = scene_file(tmp_path)
    with app_server(fresh_env(tmp_path / "fresh"), tmp_path / "streamlit.log") as (url, _), \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(RENDER_TIMEOUT * 1000)
            expect.set_options(timeout=RENDER_TIMEOUT * 1000)
            page.goto(url)
            expect(page.get_by_text("pfcam · Grad-CAM workbench").first).to_be_visible()
            # The first screen, without a click: the demo scene and its heatmaps.
            expect(page.get_by_text("Offline demo").first).to_be_visible()
            images = page.locator('[data-testid="stImage"]')
            cells = overlays(page)
            expect(cells).to_have_count(8)  # the scene: 2 demo models x 2 layers; cat, coffee: EfficientNet-Lite0 x 2
            expect(images.filter(has_text="ground truth")).to_have_count(1)
            expect(cells.filter(has_text="energy in box")).to_have_count(4)
            expect(cells.filter(has_text="espresso")).to_have_count(2)  # real ImageNet classes on the photos
            for index in range(8):
                assert_not_blank(page, url, cells.nth(index))
            # The first run ends with the model cards; uploading while it still runs can race its re-render.
            expect(page.get_by_text("Model card · EfficientNet-Lite0")).to_be_visible()
            idle(page, RENDER_TIMEOUT)

            # Screenshot of the whole first screen: the viewport grows to the main area's scroll height.
            height = page.locator('[data-testid="stMain"]').evaluate("el => el.scrollHeight")
            page.set_viewport_size({"width": 1600, "height": int(min(max(height, 1000), 3400))})
            page.wait_for_timeout(1500)
            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("PFCAM_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["PFCAM_SCREENSHOT"])
            text = page.locator("body").inner_text()
            assert str(tmp_path) not in text and "/tmp" not in text  # nothing of this run's temporary folders

            uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Upload images")
            uploader.locator('input[type="file"]').set_input_files(str(image_path))
            expect(uploader.get_by_text(image_path.name)).to_be_visible()
            expect(cells).to_have_count(14)  # the upload's 6 cells (every model: unknown content) before the 8
            expect(images.filter(has_text="Original")).to_have_count(4)
            expect(page.get_by_text("computed in").first).to_be_visible()
            for index in range(4):
                cell = cells.nth(index)
                caption = cell.inner_text()
                assert " · " in caption and "%" in caption and "shape scenes only" in caption, caption
                assert_not_blank(page, url, cell)

            idle(page, RENDER_TIMEOUT)
            text = page.locator("body").inner_text()
            assert "Traceback" not in text
            expect(page.locator('[data-testid="stException"]')).to_have_count(0)
            expect(page.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
        finally:
            browser.close()
