"""pfnet.weights: reading every checkpoint format safely, fitting it to the zoo, caching and downloading."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import os
import pickle
import random
import threading
import urllib.parse
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as save_safetensors, save_file

from ports import unused_port

import pfnet
from pfnet import weights, zoo
from pfnet.errors import CheckpointError, PfnetError, WeightsUnavailableError
from pfnet.preprocess import Preprocess

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_checkpoint_layout.json").read_text())["models"]
TINY_CLASSES = 10
TINY = {"width_mult": 0.25}


class TinyEntry(zoo.ZooEntry):
    """A zoo entry for a width-0.25, 10-class network: fast to build, same code paths as the real ones."""

    def class_names(self) -> list[str]:
        return [f"class_{i}" for i in range(TINY_CLASSES)]


def tiny_entry(model_id: str, arch: str = "resnet50_max", kind: str = "gdrive", ref: str | None = None,
               filename: str | None = None, sha256: str | None = None) -> TinyEntry:
    source = zoo.WeightSource(kind, ref or model_id, filename or f"{model_id}.pth", sha256)
    return TinyEntry(model_id, f"Tiny {model_id}", arch, "resnet", source, Preprocess(), arch_kwargs=dict(TINY))


@pytest.fixture
def register(monkeypatch):
    """Add test entries to the zoo for one test."""

    def add(entry: zoo.ZooEntry) -> zoo.ZooEntry:
        monkeypatch.setitem(zoo.ZOO, entry.id, entry)
        return entry

    return add


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, BatchNorm statistics included (so every tensor matters for the output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", ".bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif tensor.ndim == 1:  # BatchNorm scale
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    model = randomize(timm.create_model("resnet50_max", num_classes=TINY_CLASSES, **TINY), seed=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def official_state(arch: str, device: str = "meta") -> dict[str, torch.Tensor]:
    """A state dict with the official checkpoint's keys and shapes (meta: shapes only; cpu: random values)."""
    out = {}
    for key, shape in LAYOUT[arch]["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.long, device=device)
        elif device == "meta":
            out[key] = torch.empty(shape, device="meta")
        elif key.endswith("running_var"):  # a variance: positive (a negative one is refused at load)
            out[key] = torch.rand(shape) + 0.5
        else:
            out[key] = torch.randn(shape) * 0.01
    return out


# ----------------------------------------------------------------------------------------------------------------
# Formats and wrappers
# ----------------------------------------------------------------------------------------------------------------


def _train_style(state):
    """What timm's train.py saves: weights plus optimizer state, epoch, metric and an argparse Namespace."""
    model = timm.create_model("resnet50_max", num_classes=TINY_CLASSES, **TINY)
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model="resnet50_max", lr=0.1, epochs=300, amp=True, mean=(0.485, 0.456, 0.406))
    return {"epoch": 7, "arch": "resnet50_max", "state_dict": {k: v.clone() for k, v in state.items()},
            "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": 71.3,
            "state_dict_ema": {k: v.clone() + 1 for k, v in state.items() if v.is_floating_point()}}


def _deit_style(state):
    """What DeiT's main.py saves: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}."""
    args = argparse.Namespace(model="pit_s_max", batch_size=256, drop_path=0.1)
    return {"model": dict(state), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "scaler": {"scale": 65536.0}, "args": args}


WRAPPERS = {
    "plain": lambda sd: dict(sd),
    "state_dict": lambda sd: {"state_dict": dict(sd)},
    "model": lambda sd: {"model": dict(sd)},
    "state_dict_ema": lambda sd: {"state_dict_ema": dict(sd), "epoch": 3},
    "model_ema": lambda sd: {"model_ema": dict(sd)},
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "nested": lambda sd: {"model": {"module": {f"module.{k}": v for k, v in sd.items()}}},
    "timm_train": _train_style,
    "deit_main": _deit_style,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar"])
def test_torch_checkpoints_load_strictly(wrapper, suffix, tiny_state, tmp_path, register):
    register(tiny_entry("tiny_max"))
    path = tmp_path / f"ckpt{suffix}"
    torch.save(WRAPPERS[wrapper](tiny_state), path)
    model = pfnet.load("tiny_max", weights=path, device="cpu")
    assert not model.training
    assert_same(model, tiny_state)


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.bin", "misnamed.pth"])
def test_safetensors_detected_by_content(name, tiny_state, tmp_path, register):
    register(tiny_entry("tiny_max"))
    path = tmp_path / name
    if name == "weights.bin":
        torch.save(tiny_state, path)
    else:
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    assert_same(weights.load("tiny_max", weights=str(path)), tiny_state)


def test_bytes_and_state_dict_sources(tiny_state, register):
    register(tiny_entry("tiny_max"))
    buffer = io.BytesIO()
    torch.save({"state_dict": tiny_state}, buffer)
    assert_same(weights.load("tiny_max", weights=buffer.getvalue()), tiny_state)
    assert_same(weights.load("tiny_max", weights=save_safetensors(dict(tiny_state))), tiny_state)
    assert_same(weights.load("tiny_max", weights=bytearray(buffer.getvalue())), tiny_state)
    assert_same(weights.load("tiny_max", weights=io.BytesIO(buffer.getvalue())), tiny_state)  # file-like upload
    assert_same(weights.load("tiny_max", weights=dict(tiny_state)), tiny_state)
    assert_same(weights.load("tiny_max", weights={"model": {f"module.{k}": v for k, v in tiny_state.items()}}),
                tiny_state)


def test_fp16_checkpoint_is_upcast(tiny_state, tmp_path, register):
    register(tiny_entry("tiny_max"))
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_state.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = weights.load("tiny_max", weights=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same(model, half)


def test_torchvision_v1_without_bn_counters(tiny_state, register):
    """torchvision's v1 ResNet-50 file has no num_batches_tracked: still a strict fit."""
    register(tiny_entry("tiny_pf", arch="resnet50_pf"))
    source = randomize(timm.create_model("resnet50_pf", num_classes=TINY_CLASSES, **TINY))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert_same(weights.load("tiny_pf", weights=state), {**source.state_dict()})


def test_timm_resnet50_converts_to_r50_with_same_logits():
    reference = randomize(timm.create_model("resnet50", pretrained=False), seed=3).eval()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)  # timm's own key names
    model = pfnet.load("r50", weights=buffer.getvalue(), device="cpu")
    assert isinstance(model, pfnet.PFResNet) and not model.training
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 1e-3  # a real signal, not zeros
    assert (expected - got).abs().max().item() < 1e-4


def test_full_size_official_layout_loads_strictly(tmp_path):
    state = official_state("resnet50_max", device="cpu")
    path = tmp_path / "r50_max.pth"
    torch.save({"state_dict": state}, path)
    model = weights.load("r50_max", weights=path)
    assert_same(model, state)


# ----------------------------------------------------------------------------------------------------------------
# Architecture detection and mismatches
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet50", "resnet50_max", "resnet50_hybrid", "vit_s_max", "pit_s_max"])
def test_detect_official_layouts(arch):
    timm_name = "resnet50_pf" if arch == "resnet50" else arch
    if not timm.is_model(timm_name):
        pytest.skip(f"{timm_name} is not registered in this checkout")
    fit = weights.detect_architecture(official_state(arch))
    assert fit is not None
    assert (fit.arch, fit.num_classes) == (timm_name, 1000)
    expected_ids = {e.id for e in zoo.ZOO.values() if e.arch == timm_name and not e.arch_kwargs}
    assert set(fit.model_ids) == expected_ids and fit.name == zoo.get(fit.model_ids[0]).name


@pytest.mark.parametrize("arch", ["resnet50_pf", "resnet50_max", "resnet50_hybrid"])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_detect_resnet_variants_any_width(arch, width):
    model = timm.create_model(arch, num_classes=7, width_mult=width)
    fit = weights.detect_architecture(model.state_dict())
    assert (fit.arch, fit.num_classes, fit.width_mult) == (arch, 7, width)
    assert weights.detect_architecture({"foo.weight": torch.zeros(3)}) is None


def test_detect_timm_names():
    fit = weights.detect_architecture(timm.create_model("resnet50", pretrained=False).state_dict())
    assert (fit.arch, fit.num_classes, fit.name) == ("resnet50_pf", 1000, "R50")


def test_mismatch_names_the_fitting_model_and_keys():
    with pytest.raises(CheckpointError) as caught:
        weights.load("r50_hybrid", weights=official_state("resnet50_max"))
    message = str(caught.value)
    assert "this checkpoint fits R50-max, not R50-hybrid" in message
    assert "missing keys" in message and "layer2.0.conv_block.1.0.weight" in message

    with pytest.raises(CheckpointError) as caught:
        weights.load("r50_max", weights=official_state("resnet50"))
    message = str(caught.value)
    assert "fits R50, not R50-max" in message and "unexpected keys" in message and "conv_block" in message


def test_other_num_classes_is_explained(tiny_state, register):
    register(tiny_entry("tiny_max"))
    state = dict(official_state("resnet50_max").items())
    state["fc.weight"], state["fc.bias"] = torch.empty(10, 2048, device="meta"), torch.empty(10, device="meta")
    with pytest.raises(CheckpointError) as caught:
        weights.load("r50_max", weights=state)
    message = str(caught.value)
    assert "10-class head" in message and "1000" in message and "fc.weight" in message
    # The tiny model (10 classes) with a checkpoint of another width: mis-shaped keys listed.
    wide = timm.create_model("resnet50_max", num_classes=10, width_mult=0.5).state_dict()
    with pytest.raises(CheckpointError, match=r"fits .*not Tiny tiny_max.*mis-shaped keys"):
        weights.load("tiny_max", weights=wide)


# ----------------------------------------------------------------------------------------------------------------
# Refusing what is not a checkpoint; never running code
# ----------------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would create ``marker`` (a stand-in for any code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("style", ["torch_zip", "legacy_pickle", "bytes", "inside_train_args"])
def test_code_carrying_pickle_is_refused_and_nothing_runs(style, tiny_state, tmp_path, register):
    register(tiny_entry("tiny_max"))
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if style == "torch_zip":
        torch.save({"state_dict": tiny_state, "extra": Payload(marker)}, path)
    elif style == "legacy_pickle":
        path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    elif style == "inside_train_args":
        torch.save({"state_dict": tiny_state, "args": argparse.Namespace(hook=Payload(marker))}, path)
    else:
        buffer = io.BytesIO()
        torch.save(Payload(marker), buffer)
        path = buffer.getvalue()
    with pytest.raises(CheckpointError, match="refused"):
        weights.load("tiny_max", weights=path)
    assert not marker.exists()


def _truncated_zip(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _other_zip(_state) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return buffer.getvalue()


BAD_FILES = {
    "empty": lambda sd: b"",
    "random": lambda sd: bytes(random.Random(5).getrandbits(8) for _ in range(4096)),
    "truncated_zip": _truncated_zip,
    "truncated_pickle": lambda sd: pickle.dumps({"a": 1}, protocol=2)[:-3],
    "truncated_safetensors": lambda sd: save_safetensors(dict(sd))[:2000],
    "text": lambda sd: b"these are not the weights you are looking for\n" * 20,
    "html": lambda sd: b"<!DOCTYPE html><html><head><title>Google Drive</title></head></html>",
    "other_zip": _other_zip,
    "plain_pickle": lambda sd: pickle.dumps({"a": 1}, protocol=2),
    "list": lambda sd: _saved([1, 2, 3]),
    "no_weights": lambda sd: _saved({"epoch": 3, "args": argparse.Namespace(lr=0.1)}),
    "non_tensor_values": lambda sd: _saved({"state_dict": {"conv1.0.weight": [1.0, 2.0]}}),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_not_a_checkpoint(kind, tiny_state, tmp_path, register):
    register(tiny_entry("tiny_max"))
    data = BAD_FILES[kind](tiny_state)
    path = tmp_path / "bad.pth"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(CheckpointError) as caught:
            weights.load("tiny_max", weights=source)
        assert "Traceback" not in str(caught.value) and len(str(caught.value)) < 600


def test_missing_path_and_upload_cap(tiny_state, tmp_path, monkeypatch, register):
    register(tiny_entry("tiny_max"))
    with pytest.raises(CheckpointError, match="does not exist"):
        weights.load("tiny_max", weights=tmp_path / "nope.pth")
    monkeypatch.setenv("PFCAM_MAX_BYTES", "1000")
    with pytest.raises(CheckpointError, match="limit"):
        weights.load("tiny_max", weights=save_safetensors(dict(tiny_state)))


# ----------------------------------------------------------------------------------------------------------------
# Cache, bundled files, offline
# ----------------------------------------------------------------------------------------------------------------


def test_offline_message_names_page_and_path(pfcam_cache, monkeypatch, register):
    entry = register(tiny_entry("tiny_max"))
    assert weights.weight_status("tiny_max") == "missing"
    with pytest.raises(WeightsUnavailableError) as caught:
        weights.load("tiny_max")
    message = str(caught.value)
    assert "weights for Tiny tiny_max are not cached and cannot be downloaded (offline)" in message
    assert entry.source.page in message and str(pfcam_cache / "tiny_max.pth") in message
    assert weights.cached_path("tiny_max") == pfcam_cache / "tiny_max.pth"

    with pytest.raises(WeightsUnavailableError) as caught:  # the real R50 entry: its Hugging Face page
        weights.fetch("r50")
    assert "https://huggingface.co/timm/resnet50.tv_in1k" in str(caught.value)

    monkeypatch.delenv("PFCAM_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.weight_status("tiny_max") == "missing"
    with pytest.raises(WeightsUnavailableError, match=r"\(offline\)"):
        weights.fetch("tiny_max")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert weights.weight_status("tiny_max") == "downloadable"
    assert list(pfcam_cache.iterdir()) == []


def test_file_placed_by_hand_is_used_and_then_guarded(pfcam_cache, tiny_state, register):
    register(tiny_entry("tiny_max"))
    path = weights.cached_path("tiny_max")
    torch.save(tiny_state, path)
    assert weights.weight_status("tiny_max") == "cached"
    assert_same(weights.load("tiny_max"), tiny_state)
    recorded = (pfcam_cache / "tiny_max.pth.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.save({k: v + 1 for k, v in tiny_state.items()}, path)
    with pytest.raises(CheckpointError, match="delete"):
        weights.load("tiny_max")


def test_bundled_entries(tmp_path, monkeypatch, tiny_state, register):
    monkeypatch.setattr(zoo, "DEMO_DIR", tmp_path)
    register(tiny_entry("tiny_demo", kind="bundled", filename="tiny_demo.safetensors"))
    assert weights.weight_status("tiny_demo") == "missing"
    with pytest.raises(WeightsUnavailableError, match="bundled"):
        weights.load("tiny_demo")
    save_file(dict(tiny_state), str(tmp_path / "tiny_demo.safetensors"))
    assert weights.weight_status("tiny_demo") == "bundled"
    assert weights.fetch("tiny_demo") == tmp_path / "tiny_demo.safetensors"
    assert_same(weights.load("tiny_demo"), tiny_state)
    register(tiny_entry("tiny_demo", kind="bundled", filename="tiny_demo.safetensors", sha256="0" * 64))
    with pytest.raises(CheckpointError, match="corrupt or was changed"):
        weights.load("tiny_demo")


# ----------------------------------------------------------------------------------------------------------------
# Downloads through a loopback HTTP server
# ----------------------------------------------------------------------------------------------------------------

DRIVE_HTML = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
              b"Google Drive can't scan this file for viruses.</body></html>")


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hangs up mid-body (the cancel test)
        pass


COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server:
    """A loopback server for both sources: Drive-style ``/download?id=KEY`` and the Hub's
    ``/<owner>/<repo>/resolve/<revision>/<file>`` (HEAD with X-Repo-Commit and ETag, then GET), as
    huggingface_hub expects. The key (Drive id or repo name) chooses a failure mode."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.requests: list[str] = []
        self.methods: list[str] = []
        self.authorization: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _key(self) -> str:
                parsed = urllib.parse.urlparse(self.path)
                if "/resolve/" in parsed.path:
                    return parsed.path.split("/")[2]  # /<owner>/<repo>/resolve/...
                query = urllib.parse.parse_qs(parsed.query)
                return (query.get("id") or [parsed.path.rsplit("/", 1)[-1]])[0]

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _answer(self, head: bool):
                key = self._key()
                server.requests.append(self.path)
                server.methods.append(self.command)
                server.authorization.append(self.headers.get("Authorization"))
                body = server.payload
                if key == "err500":
                    self.send_error(500, "boom")
                    return
                if key == "missing":  # what the Hub answers for a file that is not in the repository
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if key in ("html", "html_as_binary"):
                    self.send_response(200)
                    kind = "text/html; charset=utf-8" if key == "html" else "application/octet-stream"
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(DRIVE_HTML)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(DRIVE_HTML)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                self.end_headers()
                if head:
                    return
                if key == "trunc":
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(pfcam_cache, monkeypatch):
    for name in ("PFCAM_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                 "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PFCAM_TIMEOUT", "10")
    return pfcam_cache


@pytest.fixture
def server(online, tiny_state, monkeypatch):
    buffer = io.BytesIO()
    torch.save({"state_dict": tiny_state, "epoch": 1}, buffer)
    srv = Server(buffer.getvalue())
    monkeypatch.setenv("PFCAM_GDRIVE_URL", f"http://127.0.0.1:{srv.port}/download?id={{id}}&export=download")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.port}")
    yield srv
    srv.close()


def test_download_caches_records_sha_and_detects_tampering(server, online, tiny_state, register):
    register(tiny_entry("tiny_max", ref="good"))
    assert weights.weight_status("tiny_max") == "downloadable"
    calls = []
    path = weights.fetch("tiny_max", progress=lambda done, total: calls.append((done, total)))
    assert path == online / "tiny_max.pth" and path.read_bytes() == server.payload
    assert calls[-1] == (len(server.payload), len(server.payload))
    assert sorted(p.name for p in online.iterdir()) == ["tiny_max.pth", "tiny_max.pth.sha256"]
    assert (online / "tiny_max.pth.sha256").read_text().split()[0] == hashlib.sha256(server.payload).hexdigest()
    assert weights.weight_status("tiny_max") == "cached"
    assert_same(weights.load("tiny_max"), tiny_state)
    assert len(server.requests) == 1  # the second load used the cache

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"delete .*tiny_max\.pth"):
        weights.load("tiny_max")


def test_hf_download_goes_through_the_hub_cache(server, online, tiny_state, register, monkeypatch):
    register(tiny_entry("tiny_hf", kind="hf", ref="someone/tiny", filename="tiny_hf.safetensors"))
    server.payload = save_safetensors(dict(tiny_state))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_a_gated_repo")
    assert weights.weight_status("tiny_hf") == "downloadable"
    assert_same(weights.load("tiny_hf"), tiny_state)  # tqdm progress path (disabled: not a terminal)
    assert server.requests and set(server.requests) == {"/someone/tiny/resolve/main/model.safetensors"}
    assert server.methods[-1] == "GET"
    assert set(server.authorization) == {"Bearer hf_secret_for_a_gated_repo"}
    hub = weights.cached_path("tiny_hf")  # in the Hugging Face cache (HF_HOME), where timm would look
    assert hub == Path(os.environ["HF_HOME"]) / "hub" / "models--someone--tiny" / "snapshots" / COMMIT / \
        "model.safetensors"
    assert hub.read_bytes() == server.payload
    assert sorted(p.name for p in online.iterdir()) == ["tiny_hf.safetensors.sha256"]  # the record, not a copy
    assert (online / "tiny_hf.safetensors.sha256").read_text().split()[0] == hashlib.sha256(server.payload).hexdigest()
    assert weights.weight_status("tiny_hf") == "cached"
    count = len(server.requests)
    monkeypatch.setenv("PFCAM_OFFLINE", "1")
    assert_same(weights.load("tiny_hf"), tiny_state)
    assert len(server.requests) == count  # the second load used the Hub cache, offline

    data = bytearray(hub.read_bytes())
    data[len(data) // 2] ^= 0xFF
    hub.resolve().write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was changed"):
        weights.load("tiny_hf")


def test_file_timm_already_cached_is_used_offline(online, tiny_state, register, monkeypatch):
    """A file timm (huggingface_hub) put in the Hub cache is found there: nothing is downloaded again."""
    register(tiny_entry("tiny_hf", kind="hf", ref="timm/tiny.tv_in1k", filename="tiny_hf.safetensors"))
    payload = save_safetensors(dict(tiny_state))
    repo = Path(os.environ["HF_HOME"]) / "hub" / "models--timm--tiny.tv_in1k"
    blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    snapshot = repo / "snapshots" / COMMIT / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("PFCAM_OFFLINE", "1")
    assert weights.weight_status("tiny_hf") == "cached"
    assert_same(weights.load("tiny_hf"), tiny_state)


@pytest.mark.parametrize(("repo", "reason"), [
    ("missing", "the file is not in the repository (HTTP 404)"),
    ("err500", "HTTP 500"),
])
def test_failed_hub_downloads_say_why_and_leave_nothing(repo, reason, server, online, register, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    register(tiny_entry("tiny_hf", kind="hf", ref=f"someone/{repo}", filename="tiny_hf.safetensors"))
    with pytest.raises(WeightsUnavailableError) as caught:
        weights.fetch("tiny_hf")
    message = str(caught.value)
    assert reason in message and "huggingface.co/someone/" in message, message
    assert list(online.iterdir()) == []
    assert weights.weight_status("tiny_hf") == "downloadable"


def test_hub_size_cap_is_checked_before_the_transfer(server, online, tiny_state, register, monkeypatch):
    register(tiny_entry("tiny_hf", kind="hf", ref="someone/tiny", filename="tiny_hf.safetensors"))
    server.payload = save_safetensors(dict(tiny_state))
    monkeypatch.setenv("PFCAM_MAX_BYTES", "1000")
    with pytest.raises(WeightsUnavailableError, match="over the 1000-byte limit"):
        weights.fetch("tiny_hf")
    assert "GET" not in server.methods  # refused on the HEAD's size
    assert list(online.iterdir()) == []


def test_unreachable_hub_is_a_clear_message(online, register, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    register(tiny_entry("tiny_hf", kind="hf", ref="someone/tiny", filename="tiny_hf.safetensors"))
    progress = []
    with pytest.raises(WeightsUnavailableError, match="cannot reach the Hub"):
        weights.fetch("tiny_hf", progress=lambda done, total: progress.append(done))
    assert progress == []  # refused on the HEAD, before any transfer was reported
    assert list(online.iterdir()) == []


@pytest.mark.parametrize(("ref", "reason"), [
    ("err500", "HTTP 500"),
    ("trunc", "interrupted"),
    ("html", "virus-scan warning"),
    ("html_as_binary", "virus-scan warning"),
])
def test_failed_downloads_leave_nothing(ref, reason, server, online, register):
    register(tiny_entry("tiny_max", ref=ref))
    with pytest.raises(WeightsUnavailableError) as caught:
        weights.load("tiny_max")
    message = str(caught.value)
    assert reason in message and "drive.google.com" in message and str(online / "tiny_max.pth") in message
    assert list(online.iterdir()) == []


def test_refused_connection_leaves_nothing(online, monkeypatch, register):
    monkeypatch.setenv("PFCAM_GDRIVE_URL", f"http://127.0.0.1:{unused_port()}/download?id={{id}}")
    register(tiny_entry("tiny_max", ref="good"))
    with pytest.raises(WeightsUnavailableError, match="connection refused"):
        weights.fetch("tiny_max")
    assert list(online.iterdir()) == []


def test_progress_exception_and_size_cap_leave_nothing(server, online, monkeypatch, register):
    register(tiny_entry("tiny_max", ref="good"))

    def cancel(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        weights.fetch("tiny_max", progress=cancel)
    assert list(online.iterdir()) == []
    monkeypatch.setenv("PFCAM_MAX_BYTES", "1000")
    with pytest.raises(WeightsUnavailableError, match="limit"):
        weights.fetch("tiny_max", progress=lambda done, total: None)
    assert list(online.iterdir()) == []


def test_known_sha256_mismatch_is_refused(server, online, register):
    register(tiny_entry("tiny_max", ref="good", sha256="f" * 64))
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        weights.fetch("tiny_max", progress=lambda done, total: None)
    assert list(online.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Devices and the public surface
# ----------------------------------------------------------------------------------------------------------------


def test_select_device(monkeypatch):
    monkeypatch.setenv("PFCAM_DEVICE", "cpu")
    assert weights.select_device() == torch.device("cpu")
    assert pfnet.select_device("cpu") == torch.device("cpu")
    assert weights.select_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("PFCAM_DEVICE", "banana")
    with pytest.raises(PfnetError, match="PFCAM_DEVICE"):
        weights.select_device()
    assert weights.select_device("cpu") == torch.device("cpu")  # the argument wins over the environment
    monkeypatch.delenv("PFCAM_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert weights.select_device().type == expected and weights.select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(PfnetError, match="CUDA"):
            weights.select_device("cuda")
        monkeypatch.setenv("PFCAM_DEVICE", "cuda:0")
        with pytest.raises(PfnetError, match="CUDA"):
            weights.select_device()


def test_public_surface():
    assert pfnet.load is weights.load and pfnet.select_device is weights.select_device
    assert pfnet.zoo is zoo
    with pytest.raises(KeyError):
        pfnet.load("no_such_model")


def test_state_digest_follows_the_values_not_the_object_or_layout():
    def build(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return pfnet.PFResNet("hybrid", num_classes=10, width_mult=0.25).eval()

    digest = weights.state_digest(build())
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert weights.state_digest(build()) == digest  # same values, another object
    assert weights.state_digest(build().to(memory_format=torch.channels_last)) == digest
    assert weights.state_digest(build(seed=1)) != digest
    nudged = build()
    with torch.no_grad():
        nudged.fc.bias[3] += 1e-6  # one value
    assert weights.state_digest(nudged) != digest
    counted = build()
    counted.conv1[1].num_batches_tracked += 1  # a buffer counts too
    assert weights.state_digest(counted) != digest
    assert weights.state_digest(build().half()) != digest  # other numerics
