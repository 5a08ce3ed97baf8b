"""Finite but pathological weights (issue #26): refused at load by one probe forward, naming the first module whose
output is not finite; and a forward that still gives NaN for an image is that image's error, never a silent NaN:
in the engine (``Explanation.errors``), the export (a manifest reason, no NaN in any JSON) and the app."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cams import explain
from cams.export import run_export
from pfnet import weights
from pfnet.errors import CheckpointError
from test_export import FakeEntry, tiny

DEMO = "demo_r50"


@pytest.fixture(scope="module")
def demo_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pfnet import zoo

    path = zoo.DEMO_DIR / zoo.get(DEMO).source.filename
    if not path.is_file():
        pytest.skip("bundled demo weights missing")
    return {key: value.float() if value.is_floating_point() else value for key, value in load_file(path).items()}


def pathological(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    state = {key: value.clone() for key, value in state.items()}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if kind == "every weight 1e38" and not key.endswith(("running_var", "running_mean")):
            value.fill_(1e38)
        elif kind == "head at float32 max" and key.startswith("fc."):
            value.fill_(torch.finfo(torch.float32).max)
        elif kind == "running_var 0" and key.endswith("running_var"):
            value.zero_()
        elif kind == "running_var -1" and key == "layer2.0.reduction_block.1.running_var":
            value.fill_(-1.0)
    if kind == "a convolution x 1e30":
        state["layer1.0.reduction_block.0.weight"] *= 1e30
    return state


@pytest.mark.parametrize(("kind", "module"), [
    ("every weight 1e38", "conv1.0"), ("head at float32 max", "fc"), ("running_var 0", "layer"),
    ("running_var -1", "BatchNorm layer2.0.reduction_block.1"),
    ("a convolution x 1e30", "layer1.0.reduction_block.0")])
def test_the_five_pathological_checkpoints_are_refused_naming_the_module(demo_state, kind, module):
    with pytest.raises(CheckpointError, match="refused") as refused:
        weights.load(DEMO, weights=pathological(demo_state, kind), device="cpu")
    assert module in str(refused.value)
    assert "NaN" in str(refused.value)


def test_the_probe_verdict_is_cached_per_weights_digest(demo_state, monkeypatch):
    import pfnet.probe

    calls = []
    real = pfnet.probe.refusal
    monkeypatch.setattr(pfnet.probe, "refusal", lambda *args: calls.append(1) or real(*args))
    state = pathological(demo_state, "none")
    state["fc.bias"] = state["fc.bias"] + 1e-3  # weights of their own: a digest not probed before
    weights.load(DEMO, weights=state, device="cpu")
    weights.load(DEMO, weights=state, device="cpu")
    assert calls == [1]


def nan_for_bright() -> torch.nn.Module:
    """The export tests' tiny network, with logits NaN for bright images (mean input above zero)."""
    model = tiny()

    def hook(module, inputs, logits):
        bright = inputs[0].mean(dim=(1, 2, 3)) > 0
        return logits.masked_fill(bright[:, None], float("nan"))

    model.register_forward_hook(hook)
    return model.eval()


def test_the_engine_names_each_image_whose_forward_is_nan():
    model = nan_for_bright()
    images = torch.cat([torch.full((2, 3, 64, 64), 2.0), torch.full((2, 3, 64, 64), -2.0)])
    result = explain(model, images, ["layer4"])
    assert [bool(error) for error in result.errors] == [True, True, False, False]
    assert "NaN" in result.errors[0]


def no_nan(text: str) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a JSON file")

    json.loads(text, parse_constant=refuse)


def test_a_nan_forward_in_an_export_is_a_manifest_reason_and_no_json_holds_nan(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, value in (("bright.png", 250), ("dark.png", 5), ("dark2.png", 10)):
        Image.fromarray(np.full((48, 48, 3), value, np.uint8)).save(folder / name)
    out = tmp_path / "out"
    report = run_export([folder], out, {"tiny": (nan_for_bright(), FakeEntry())}, layers=["layer4"])
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {Path(item["input"]).name: item for item in manifest["skipped"]}
    assert reasons["bright.png"]["stage"] == "explain" and "NaN" in reasons["bright.png"]["reason"]
    assert sorted(Path(row["image"]).name for row in manifest["rows"]) == ["dark.png", "dark2.png"]
    assert report.ok
    for path in out.rglob("*.json"):
        no_nan(path.read_text())
    assert all(math.isfinite(row["probability"]) for row in manifest["rows"])


def test_the_app_shows_a_nan_forward_as_the_images_error():
    from cams.layers import CamError
    from pfcam_app import core

    image = Image.fromarray(np.full((48, 48, 3), 250, np.uint8))
    key = ("digest-nan", "slot", DEMO, ("layer4",), "gradcam", ("top", 1), "full", "none", core.CamOptions())
    with pytest.raises(CamError, match="NaN"):
        core.compute_cams(key, image, nan_for_bright())
    assert core.cam_store().get(key) is None  # never stored, never shown as a class
