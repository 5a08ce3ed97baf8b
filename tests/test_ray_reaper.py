"""The local Ray runtime does not outlive pfcam (issue #26): an ``--engine ray`` export killed with SIGKILL leaves
no Ray process 10 s later (before, its dashboard and runtime-env agents kept running)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.name())
        except psutil.Error:
            continue
    return alive


def below(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow
def test_a_killed_ray_export_leaves_no_ray_process(tmp_path):
    pytest.importorskip("ray", reason="Ray is installed by requirements-test.txt")
    photos = tmp_path / "in"  # enough images that the export is still running when Ray is up
    photos.mkdir()
    for index in range(40):
        for photo in (ROOT / "assets" / "examples").glob("*.jpg"):
            shutil.copy(photo, photos / f"{index}-{photo.name}")
    ray_tmp = Path(tempfile.mkdtemp(prefix="pfk", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    driver = subprocess.Popen([sys.executable, "-m", "pfcam", "export", str(photos), "--out", str(tmp_path / "out"),
                               "--models", "demo_r50", "--layers", "layer4", "--engine", "ray"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_side: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:  # until Ray's agents and workers run
            names = running(below(driver.pid))
            if sum("Agent" in name for name in names) >= 2 and any(name.startswith("ray::") and "Agent" not in name
                                                                   for name in names):
                break
            time.sleep(0.5)
        ray_side = [p for p in below(driver.pid) if "ray_reaper" not in " ".join(p.cmdline())]
        assert driver.poll() is None and ray_side, "the export ended before Ray was up"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        time.sleep(10)
        left = running(ray_side)
        assert not left, f"Ray processes left running 10 s after SIGKILL: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for process in ray_side:  # a failed run must not leave them to other tests
            try:
                process.kill()
            except psutil.Error:
                continue
        shutil.rmtree(ray_tmp, ignore_errors=True)
