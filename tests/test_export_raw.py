"""Raw maps (issue #23): ``cams.explain(keep_raw=True)`` and ``run_export(raw_maps=True)`` keep each layer's map
before min-max normalisation, exported as ``.raw.npy`` with its range in the manifest; manifests without them
still read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cams
from pfnet.resnet import PFResNet


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PFResNet("conv", num_classes=3, width_mult=0.125, depths=(1, 1, 1, 1)).eval()


def test_raw_maps_min_max_to_the_heatmaps(tiny):
    images = torch.randn(2, 3, 64, 64)
    result = cams.explain(tiny, images, ["layer2", "layer3"], method="layercam", align={"layer3": (1.0, -2.0)},
                          keep_raw=True)
    assert result.raw is not None and result.raw.shape == result.heatmaps.shape
    raw = result.raw.numpy()
    assert (raw >= 0).all()
    flat = raw.reshape(-1, raw.shape[-2] * raw.shape[-1])
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    assert (high - low > 1e-4).all()  # maps with a range (a near-flat one is 0 after the engine's 1e-7 guard)
    rebuilt = ((flat - low) / (high - low)).reshape(raw.shape)
    np.testing.assert_allclose(rebuilt, result.heatmaps.numpy(), atol=2e-5)
    assert cams.explain(tiny, images, ["layer3"]).raw is None
    # the scale differs between images: what the min-max removes
    assert not np.isclose(raw[0, 0, 1].max(), raw[1, 0, 1].max())


def test_export_writes_raw_npy_with_its_range(tiny, tmp_path):
    from PIL import Image

    from cams.export import run_export
    from pfnet import zoo

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(image)
    entry = zoo.get("demo_r50")
    models = {"demo_r50": (tiny, entry)}
    out = tmp_path / "out"
    report = run_export([image.parent], out, models, layers=["layer4"], raw_maps=True)
    assert not report.warnings and not report.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    (row,) = manifest["rows"]
    assert manifest["settings"]["raw_maps"] is True and "raw_npy" in manifest["settings"]
    raw = np.load(out / row["raw_heatmap"])
    heat = np.load(out / row["heatmap"])
    assert raw.dtype == np.float32 and raw.shape == heat.shape
    assert row["raw_min"] == pytest.approx(float(raw.min())) and row["raw_max"] == pytest.approx(float(raw.max()))
    np.testing.assert_allclose((raw - row["raw_min"]) / (row["raw_max"] - row["raw_min"]), heat, atol=2e-5)
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert "raw" not in header  # the CSV's columns are unchanged
    # a run without raw maps on the same folder: the earlier files are usable, nothing recomputed, rows read
    again = run_export([image.parent], out, models, layers=["layer4"])
    (row2,) = json.loads((out / "manifest.json").read_text())["rows"]
    assert row2["status"] == "existing" and again is not None
    # asking for raw maps where an earlier run wrote none recomputes that result
    plain = tmp_path / "plain"
    run_export([image.parent], plain, models, layers=["layer4"])
    assert "raw_heatmap" not in json.loads((plain / "manifest.json").read_text())["rows"][0]
    run_export([image.parent], plain, models, layers=["layer4"], raw_maps=True)
    (row3,) = json.loads((plain / "manifest.json").read_text())["rows"]
    assert row3["status"] == "computed" and (plain / row3["raw_heatmap"]).is_file()
