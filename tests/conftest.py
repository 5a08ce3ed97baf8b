"""Shared pytest fixtures: no test touches the network or the user's cache unless it asks to."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pfcam-session-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    """Tests run offline (PFCAM_OFFLINE=1), as docs/testing.md says; a test may delenv it.

    The user's own checkpoint cache is never read: what is cached there would change the app's defaults.
    """
    monkeypatch.setenv("PFCAM_OFFLINE", "1")
    monkeypatch.setenv("PFCAM_CACHE", str(_session_cache))
    monkeypatch.setenv("HF_HOME", str(_session_cache / "huggingface"))  # never the user's Hugging Face cache
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pfcam_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty checkpoint cache (PFCAM_CACHE) of the test's own, offline."""
    cache = tmp_path / "pfcam-cache"
    cache.mkdir()
    monkeypatch.setenv("PFCAM_CACHE", str(cache))
    monkeypatch.setenv("PFCAM_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
    return cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CPU is shared: two OpenMP threads competing with other processes run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench-loc's fake zoo entries: TINY (random width-0.25 R50-hybrid at 64 px), GONE (bundled file missing)."""
    from bench_loc_support import install_tiny_zoo

    install_tiny_zoo(monkeypatch)


@pytest.fixture
def app(pfcam_cache):
    """A fresh session of the app, offline, with the CAM result cache emptied (models stay loaded), narrowed to the
    demo pair on the first demo scene: the page these suites were written for. (The offline first screen also puts
    EfficientNet-Lite0 on two photos; test_app.py and test_app_timm.py test that screen itself.)"""
    from apptest_support import APP, DEMO, DEMO_MISSING, FIRST_SCENE, TIMEOUT, assert_clean, demo_weights_bundled
    from streamlit.testing.v1 import AppTest

    from pfcam_app import core

    if not demo_weights_bundled():  # the offline default runs on the bundled demo models
        pytest.skip(DEMO_MISSING)
    core.cam_store().clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    if list(at.multiselect(key="models").value) != list(DEMO):
        at.multiselect(key="models").set_value(list(DEMO))
        at.multiselect(key="examples").set_value([FIRST_SCENE])
        at.run()
        assert_clean(at)
    return at


@pytest.fixture
def blank(app):
    """The app with the first screen's example deselected: only what a test adds is on the page."""
    from apptest_support import assert_clean

    app.multiselect(key="examples").set_value([])
    app.run()
    assert_clean(app)
    return app
