"""The first screen's network decision and the one-button download of the ImageNet pair (AppTest), and the hub
reachability check behind them. Downloads come from loopback HTTP servers; nothing leaves the machine."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from ports import unused_port
from apptest_support import APP, DEMO, TIMEOUT, assert_clean, demo_weights_bundled, overlays, serve, zero_checkpoint
from pfnet import download, weights, zoo

pytestmark = pytest.mark.skipif(not demo_weights_bundled(), reason="bundled demo weights missing in assets/weights")


# ------------------------------------------------------------------------------------------ the hub check

def test_hub_address_comes_from_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert download.hub_address() == ("huggingface.co", 443)
    for endpoint, expected in [("https://hf-mirror.example.org", ("hf-mirror.example.org", 443)),
                               ("http://127.0.0.1:8080/", ("127.0.0.1", 8080)), ("http://mirror", ("mirror", 80)),
                               ("mirror.example.org:9000", ("mirror.example.org", 9000)),
                               ("http://host:notaport", ("host", 80)), ("   ", ("huggingface.co", 443))]:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert download.hub_address() == expected, endpoint


def test_hub_reachable_answers_for_a_listening_and_a_closed_port(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert download.hub_reachable(timeout=2.0) is True
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens there any more
    started = time.monotonic()
    assert download.hub_reachable(timeout=2.0) is False
    assert time.monotonic() - started < 1.0  # refused: no waiting for the timeout


def test_a_hanging_lookup_is_cut_off_at_the_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(3.0)
        raise OSError("never answered")

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.monotonic()
    assert download.hub_reachable(timeout=0.3) is False
    assert time.monotonic() - started < 1.5


# ------------------------------------------------------------------------------------------ the app

def online_app(monkeypatch, base: str):
    """A fresh session with the network on: the hub check sees the loopback server, downloads go there."""
    from streamlit.testing.v1 import AppTest

    from pfcam_app import core

    monkeypatch.delenv("PFCAM_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("PFCAM_GDRIVE_URL", base + "/{id}")
    core.cam_store().clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    return at


def served_weights(folder: Path, model_ids: tuple[str, ...]) -> Path:
    """Zero-valued checkpoints of the right layout where the loopback server's URLs point."""
    from safetensors.torch import save_file

    folder.mkdir()
    for model_id in model_ids:
        source = zoo.get(model_id).source
        if source.kind == "hf":
            path = folder / source.ref / "resolve" / "main" / "model.safetensors"  # the Hub's URL layout
            path.parent.mkdir(parents=True)
            save_file(zero_checkpoint(model_id), str(path))
        else:
            torch.save(zero_checkpoint(model_id), folder / source.ref)
    return folder


def test_online_the_demo_stands_until_one_button_fetches_both_and_switches_the_page(pfcam_cache, tmp_path,
                                                                                  monkeypatch):
    with serve(served_weights(tmp_path / "served", ("r50", "r50_hybrid"))) as base:
        at = online_app(monkeypatch, base)
        assert list(at.multiselect(key="models").value) == list(DEMO) + ["effnet_lite0"]
        assert len(overlays(at)) == 8 and not at.warning and not at.error  # the demo, and EfficientNet-Lite0 on photos
        assert any("Demo models on screen" in m.value for m in at.markdown)
        at.button(key="download_imagenet").click()
        at.run()
        assert_clean(at)
    assert weights.weight_status("r50") == "cached" and weights.cached_path("r50").is_file()  # the Hub cache
    assert (pfcam_cache / "r50_tv_in1k.safetensors.sha256").is_file() and (pfcam_cache / "r50_hybrid.pth").is_file()
    assert list(at.multiselect(key="models").value) == ["r50", "r50_hybrid"]
    assert list(at.multiselect(key="examples").value) == ["cat_chelsea.jpg"]
    assert [e.label for e in at.sidebar.expander] == \
        ["R50 · cached", "R50-hybrid · cached"]
    assert not [b for b in at.button if b.key == "download_imagenet"]
    assert not any("Demo models on screen" in m.value for m in at.markdown)
    assert len(overlays(at)) == 4 and not at.warning and not at.error
    assert all("⚠" not in cell.captions[0] for cell in overlays(at))  # ImageNet models on a photo: no caveat


def test_a_failed_download_keeps_its_reason_and_the_demo_stands(pfcam_cache, tmp_path, monkeypatch):
    with serve(served_weights(tmp_path / "served", ("r50_hybrid",))) as base:  # R50: HTTP 404
        at = online_app(monkeypatch, base)
        at.button(key="download_imagenet").click()
        at.run()
        assert_clean(at)
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and "R50" in errors[0] and "HTTP 404" in errors[0]
        assert (pfcam_cache / "r50_hybrid.pth").is_file()
        assert list(at.multiselect(key="models").value) == list(DEMO) + ["effnet_lite0"]  # still the demo
        assert len(overlays(at)) == 8  # still heatmaps: the scene's 4, the photos' 4
        at.multiselect(key="models").set_value(["r50", "r50_hybrid"])
        at.run()
        assert_clean(at)
        assert [e.label for e in at.sidebar.expander] == \
            ["R50 · download failed", "R50-hybrid · cached"]
        warnings = [w.value for w in at.warning]
        assert len(warnings) == 1 and "download of R50 failed" in warnings[0] and "HTTP 404" in warnings[0]
        assert "r50_tv_in1k.safetensors" in warnings[0]  # where to place the file by hand
        assert at.button(key="download_r50").label == "Try again"
        assert at.file_uploader(key="ckpt_r50") is not None  # upload stays available


def test_pfcam_offline_0_offers_downloads_without_checking(pfcam_cache, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PFCAM_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    assert at.button(key="download_imagenet") is not None
    assert not any("Offline demo" in info.value for info in at.info)
