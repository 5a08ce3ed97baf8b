"""End to end in a real browser: `streamlit run app.py` + Debian's Chromium driven by Playwright (sync API).

Offline (PFCAM_OFFLINE=1, empty PFCAM_CACHE): the app starts with the bundled demo models. The test uploads an
image through the page's file input, waits for the heatmaps, saves a screenshot (and copies it to
$PFCAM_SCREENSHOT when set: that is how docs/screenshot.png is refreshed) and checks that every heatmap image is
there and not blank.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT = 180  # seconds for the server to answer
RENDER_TIMEOUT = 600  # seconds for the heatmaps (cold start: imports, model loads, CAMs on a small shared CPU)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"streamlit did not answer within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def scene_file(tmp_path: Path) -> Path:
    """A demo scene (not one of the app's own examples) written as a PNG, to upload like a user would."""
    from pfdemo import scenes
    from pfnet import zoo

    scene = scenes.render_scene(4242, 3, zoo.get("demo_r50").preprocess.input_size)
    path = tmp_path / f"my_{scene.class_name}.png"
    Image.fromarray(scene.image).save(path)
    return path


def idle(page) -> None:
    """Wait until no script run is in progress (Streamlit's status widget shows one while it runs)."""
    page.wait_for_timeout(500)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')",
                           timeout=RENDER_TIMEOUT * 1000)


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
def test_upload_in_chromium_renders_non_blank_heatmaps(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from pfnet import weights

    if not all(weights.weight_status(model_id) == "bundled" for model_id in ("demo_r50", "demo_r50_hybrid")):
        pytest.skip("bundled demo weights missing in assets/weights (made by `pfcam train-demo`)")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PFCAM_OFFLINE": "1", "PFCAM_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("PFCAM_DEVICE", None)
    log = tmp_path / "streamlit.log"
    image_path = scene_file(tmp_path)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_server(url, proc, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(RENDER_TIMEOUT * 1000)
                expect.set_options(timeout=RENDER_TIMEOUT * 1000)
                page.goto(url)
                expect(page.get_by_text("pfcam · Grad-CAM workbench").first).to_be_visible()
                expect(page.get_by_text("Offline demo").first).to_be_visible()
                # The first run ends with the model cards; uploading while it still runs can race its re-render.
                expect(page.get_by_text("Model card · Demo R50-hybrid (scenes)")).to_be_visible()
                idle(page)

                uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Upload images")
                uploader.locator('input[type="file"]').set_input_files(str(image_path))
                expect(uploader.get_by_text(image_path.name)).to_be_visible()

                images = page.locator('[data-testid="stImage"]')
                overlays = images.filter(has_not_text="Original")
                expect(overlays).to_have_count(4)  # 2 demo models x 2 layers
                expect(images.filter(has_text="Original")).to_have_count(1)
                expect(page.get_by_text("computed in").first).to_be_visible()
                for index in range(4):
                    cell = overlays.nth(index)
                    caption = cell.inner_text()
                    assert " · " in caption and "%" in caption, caption
                    assert_not_blank(page, url, cell)

                # A bundled demo scene, picked from the examples: ground-truth box and localisation scores.
                picker = page.locator('[data-testid="stMultiSelect"]').filter(has_text="…or pick examples")
                picker.locator("input").click()
                page.keyboard.type("scene_00")
                page.keyboard.press("Enter")
                page.keyboard.press("Escape")
                expect(picker.get_by_text("scene_00", exact=False)).to_be_visible()
                expect(images.filter(has_text="ground truth")).to_have_count(1)
                expect(overlays).to_have_count(8)
                scored = overlays.filter(has_text="energy in box")
                expect(scored).to_have_count(4)
                for index in range(4):
                    assert_not_blank(page, url, scored.nth(index))

                idle(page)
                # Screenshot of the whole page: the viewport grows to the main area's scroll height.
                height = page.locator('[data-testid="stMain"]').evaluate("el => el.scrollHeight")
                page.set_viewport_size({"width": 1600, "height": int(min(max(height, 1000), 3400))})
                page.wait_for_timeout(1500)
                shot = tmp_path / "screenshot.png"
                page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("PFCAM_SCREENSHOT"):
                    shutil.copyfile(shot, os.environ["PFCAM_SCREENSHOT"])

                text = page.locator("body").inner_text()
                assert "Traceback" not in text
                expect(page.locator('[data-testid="stException"]')).to_have_count(0)
                expect(page.locator('[data-testid="stAlertContentError"]')).to_have_count(0)
            finally:
                browser.close()
    finally:
        stop(proc)
