"""Running the app the way a user does: `streamlit run app.py` in its own process, Debian's Chromium driven by
Playwright. Shared by tests/test_browser.py and benchmarks/bench_first_screen.py."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator

from ports import unused_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
START_TIMEOUT = 180  # seconds for the server to answer


class AppFailed(RuntimeError):
    """The app's server exited or did not answer; the message ends with its log."""


def fresh_env(folder: Path) -> dict[str, str]:
    """A first-run environment: no pfcam flags, empty caches under ``folder``, the hub on a closed port."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PFCAM_", "HF_")) and name != "HUGGINGFACE_HUB_CACHE"}
    for name in ("PFCAM_CACHE", "HF_HOME"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(folder / name)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{unused_port()}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def app_server(env: dict[str, str], log: Path, script: Path = ROOT / "app.py") -> Iterator[tuple[str, float]]:
    """`streamlit run app.py` (or another ``script``) on a free port; yields (url, the monotonic time the process
    was started)."""
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_health(url, proc, log)
        yield url, started
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _wait_for_health(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AppFailed(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AppFailed(f"streamlit did not answer within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def idle(page, timeout_s: float) -> None:
    """Wait until no script run is in progress (Streamlit's status widget shows one while it runs)."""
    page.wait_for_timeout(500)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')",
                           timeout=timeout_s * 1000)


def overlays(page):
    """The heatmap cells: images with a caption that is not the original's."""
    return page.locator('[data-testid="stImage"]').filter(has_text=" · ").filter(has_not_text="Original")
