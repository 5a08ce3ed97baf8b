"""pfcam.explain, the three-line API: the core's heatmaps for the same inputs, every input form, top_k= and
classes=, clear errors, and Result's overlay / figure / save (the export's files)."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cams
import pfcam
import pfnet
from cams.export import run_export
from cams.images import ImageError, load_image
from cams.render import overlay
from pfcam import api
from pfnet import zoo
from pfnet.errors import UnknownModelError
from pfnet.preprocess import Preprocess, prepare_batch

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
COFFEE = ROOT / "assets" / "examples" / "coffee.jpg"
ROCKET = ROOT / "assets" / "examples" / "rocket.jpg"
DEMO = "demo_r50_hybrid"
LAYERS = ["layer3", "layer4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo():
    return pfnet.load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def small_picture() -> Image.Image:
    """A small photo (the tests run many explains): coffee.jpg shrunk, as a validated RGB picture."""
    return load_image(COFFEE).resize((96, 64))


def core(model, pictures, layers=LAYERS, targets=None, preprocess=None, mode="full", **kwargs):
    """What cams.explain gives for the same pictures, preprocessed by hand (the four-statement way)."""
    entry = zoo.get(DEMO)
    tensor, boxes = prepare_batch(pictures, preprocess or entry.preprocess, mode)
    return cams.explain(model, tensor, layers, targets=targets, class_names=entry.class_names(), **kwargs), boxes


def test_a_zoo_id_and_a_path_give_the_cores_heatmaps(demo):
    result = pfcam.explain(DEMO, str(COFFEE), layers=LAYERS)
    expected, boxes = core(demo, [load_image(COFFEE)])
    assert torch.equal(result.heatmaps, expected.heatmaps)
    assert torch.equal(result.classes, expected.targets) and result.heatmaps.shape == (1, 1, 2, 128, 128)
    assert result.crop_boxes == tuple(boxes) and result.layers == tuple(LAYERS) and result.model == DEMO
    assert result.class_name() in zoo.SCENE_CLASSES
    assert result.caption(layer="layer3").startswith("layer3: ")


def test_the_engines_options_pass_through(demo, small_picture):
    result = pfcam.explain(demo, small_picture, layers=LAYERS, eigen_smooth=True)
    expected, _ = core(demo, [small_picture], eigen_smooth=True)
    plain, _ = core(demo, [small_picture])
    assert torch.equal(result.heatmaps, expected.heatmaps) and not torch.equal(result.heatmaps, plain.heatmaps)
    assert dict(result.explanation.options) == {"eigen_smooth": True}
    smoothed = pfcam.explain(demo, small_picture, layers=["layer4"], aug_smooth=True)
    expected, _ = core(demo, [small_picture], layers=["layer4"], aug_smooth=True)
    assert torch.allclose(smoothed.heatmaps, expected.heatmaps)


def test_the_default_layers_are_the_models(demo, small_picture):
    result = pfcam.explain(demo, small_picture)
    assert result.layers == tuple(cams.default_layers(demo))
    assert result.model == type(demo).__name__


def test_every_input_form_gives_the_same_heatmaps(demo, small_picture):
    pixels = np.asarray(small_picture)
    buffer = io.BytesIO()
    small_picture.save(buffer, format="PNG")
    forms = {
        "bytes": buffer.getvalue(),
        "picture": small_picture,
        "picture RGBA": small_picture.convert("RGBA"),
        "uint8 array": pixels,
        "float array": pixels.astype(np.float32) / 255,
        "uint8 tensor": torch.from_numpy(pixels.copy()).permute(2, 0, 1),
        "float tensor": torch.from_numpy(pixels.copy()).permute(2, 0, 1).double() / 255,
    }
    expected, _ = core(demo, [small_picture])
    for name, image in forms.items():
        result = pfcam.explain(demo, image, layers=LAYERS)
        assert torch.equal(result.heatmaps, expected.heatmaps), name
        assert np.array_equal(np.asarray(result.images[0]), pixels), name
    batches = {"list": [small_picture, pixels], "4-D array": np.stack([pixels, pixels]),
               "4-D tensor": torch.from_numpy(np.stack([pixels, pixels])).permute(0, 3, 1, 2)}
    pair, _ = core(demo, [small_picture, small_picture])  # the same batch: a batch of one may differ in 1e-6
    for name, images in batches.items():
        result = pfcam.explain(demo, images, layers=LAYERS)
        assert len(result) == 2, name
        assert torch.equal(result.heatmaps, pair.heatmaps), name


def test_a_grey_array_is_an_rgb_image(demo):
    grey = np.linspace(0, 255, 48 * 64).reshape(48, 64).astype(np.uint8)
    result = pfcam.explain(demo, grey, layers="layer4")
    expected, _ = core(demo, [Image.fromarray(grey).convert("RGB")], layers=["layer4"])
    assert torch.equal(result.heatmaps, expected.heatmaps)


def test_top_k_explains_the_most_probable_classes_in_order(demo, small_picture):
    result = pfcam.explain(demo, [small_picture, load_image(ROCKET)], layers=LAYERS, top_k=3)
    expected, _ = core(demo, [small_picture, load_image(ROCKET)], targets=3)
    assert torch.equal(result.heatmaps, expected.heatmaps)
    assert result.heatmaps.shape[:3] == (2, 3, 2)
    top3 = result.explanation.probs.topk(3, dim=1).indices
    assert torch.equal(result.classes, top3)
    assert bool((result.probabilities[:, :-1] >= result.probabilities[:, 1:]).all())


def test_classes_are_ids_or_names_for_every_image_or_one_list_per_image(demo, small_picture):
    pictures = [small_picture, load_image(ROCKET)]
    with pytest.raises(ValueError, match="class_names"):  # a module knows no names of its own
        pfcam.explain(demo, pictures, classes="square")
    by_id = pfcam.explain(demo, pictures, layers=LAYERS, classes=[2, "square"], class_names=zoo.SCENE_CLASSES)
    assert by_id.classes.tolist() == [[2, 1], [2, 1]]  # "square" is class 1 of the scenes
    expected, _ = core(demo, pictures, targets=[2, 1])
    assert torch.equal(by_id.heatmaps, expected.heatmaps)
    one = pfcam.explain(demo, pictures, layers=LAYERS, classes=5)
    assert one.classes.tolist() == [[5], [5]]
    assert pfcam.explain(DEMO, pictures, layers=LAYERS, classes="star").classes.tolist() == [[3], [3]]
    per_image = pfcam.explain(demo, pictures, layers=LAYERS, classes=[[0], [7]])
    assert per_image.classes.tolist() == [[0], [7]]
    assert torch.equal(per_image.heatmaps, core(demo, pictures, targets=[[0], [7]])[0].heatmaps)


def test_a_module_with_its_own_preprocessing_and_no_class_names(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet50_hybrid", width_mult=0.25, num_classes=10, depths=(1, 1, 1, 1),
                              pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 0.8}).eval()
    picture = load_image(COFFEE)
    result = pfcam.explain(model, picture, layers="layer4", mode="center", top_k=2, name="tiny")
    preprocess = Preprocess(64, 80)
    tensor, boxes = prepare_batch([picture], preprocess, "center")
    expected = cams.explain(model, tensor, ["layer4"], targets=2)
    assert torch.equal(result.heatmaps, expected.heatmaps) and result.crop_boxes == tuple(boxes)
    assert result.class_name() == str(int(result.classes[0, 0]))
    written = result.save(tmp_path)
    first = result.classes[0, 0]
    assert (tmp_path / result.items[0].folder / "tiny" / f"layer4__gradcam__top1-class{first}.npy") in written


def test_a_timm_name_is_loaded_by_pfnet_and_brings_its_preprocessing(monkeypatch, small_picture, tmp_path):
    """"timm:<name>" goes to pfnet.load as given; its pretrained_cfg preprocesses, a 1000-class head has ImageNet's
    names."""
    torch.manual_seed(0)
    network = timm.create_model("resnet50_hybrid", width_mult=0.25, depths=(1, 1, 1, 1),
                                pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 1.0}).eval()
    asked = []
    monkeypatch.setattr(api, "load", lambda model_id, device=None: asked.append(model_id) or network)
    result = pfcam.explain("timm:tiny_hybrid", small_picture, layers="layer4")
    assert asked == ["timm:tiny_hybrid"] and result.model == "timm:tiny_hybrid"
    tensor, boxes = prepare_batch([small_picture], Preprocess(64, 64))
    assert torch.equal(result.heatmaps, cams.explain(network, tensor, ["layer4"]).heatmaps)
    assert result.class_name() == zoo.imagenet_classes()[int(result.classes[0, 0])]
    assert all(path.parent.name == "timm_tiny_hybrid" for path in result.save(tmp_path))


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"top_k": 0}, ValueError),
    ({"top_k": True}, ValueError),
    ({"top_k": 2, "classes": [1]}, ValueError),
    ({"classes": []}, ValueError),
    ({"classes": "no such class"}, ValueError),
    ({"classes": [99]}, ValueError),
    ({"layers": ["layer9"]}, ValueError),
    ({"method": "nomethod"}, ValueError),
    ({"mode": "stretch"}, ValueError),
    ({"preprocess": "imagenet"}, ValueError),
])
def test_bad_arguments_are_refused_clearly(demo, small_picture, kwargs, error):
    with pytest.raises(error):
        pfcam.explain(demo, small_picture, **kwargs)


@pytest.mark.parametrize(("images", "error", "words"), [
    ([], ValueError, "no images"),
    (5, ValueError, "must be a path"),
    ([5], ValueError, "not an image"),
    (np.zeros((8, 8, 5), np.uint8), ValueError, "HxW or HxWx3"),
    (np.full((8, 8, 3), 2.0), ValueError, "a normalised batch"),
    (np.zeros((8, 8, 3), np.int64), ValueError, "uint8 or float"),
    (torch.zeros(2, 8, 8), ValueError, "[3, H, W]"),
    ("no/such/file.jpg", ImageError, "no/such/file.jpg"),
    (b"not an image", ImageError, "image 0"),
])
def test_bad_images_are_refused_clearly(demo, images, error, words):
    with pytest.raises(error, match=None) as raised:
        pfcam.explain(demo, images)
    assert words in str(raised.value)


def test_bad_models_are_refused_clearly():
    for model, error in ((42, ValueError), ("", ValueError), ("no_such_model", UnknownModelError)):
        with pytest.raises(error):
            pfcam.explain(model, COFFEE)


def test_a_model_in_training_mode_is_warned_about(demo, small_picture):
    training = copy.deepcopy(demo).train()  # its forward changes its BatchNorm statistics: not the shared model
    with pytest.warns(UserWarning, match="training mode"):
        pfcam.explain(training, small_picture, layers="layer4")


def test_overlay_and_figure_draw_every_image_and_layer(demo, small_picture):
    result = pfcam.explain(demo, [small_picture, load_image(ROCKET)], layers=LAYERS)
    picture = result.overlay(image=1, layer="layer3", colormap="viridis", opacity=0.3)
    expected = overlay(result.images[1], result.heatmap(1, 0, "layer3"), result.crop_boxes[1], "viridis", 0.3)
    assert picture.size == result.images[1].size and np.array_equal(np.asarray(picture), np.asarray(expected))
    assert np.array_equal(np.asarray(result.overlay()), np.asarray(result.overlay(layer="layer4")))
    figure = result.figure()
    assert len(figure.axes) == 4 and figure.axes[1].get_title() == result.caption(0, 0, "layer4")
    result.show()  # Agg: nothing to show, nothing raised


def test_save_writes_what_pfcam_export_writes(demo, tmp_path):
    """The same files, names and heatmaps as `pfcam export` for the same image, model, layers and top-k."""
    result = pfcam.explain(DEMO, COFFEE, layers=LAYERS, top_k=2)
    written = result.save(tmp_path / "api")
    assert len(written) == 2 * 2 * 2 and all(path.is_file() for path in written)
    report = run_export([COFFEE], tmp_path / "export", {DEMO: (demo, zoo.get(DEMO))}, layers=LAYERS, topk=2)
    exported = {path for path in report.files if path.endswith((".png", ".npy")) and "/grid__" not in f"/{path}"}
    assert {path.relative_to(tmp_path / "api").as_posix() for path in written} == exported
    for path in written:
        twin = tmp_path / "export" / path.relative_to(tmp_path / "api")
        if path.suffix == ".npy":
            assert np.array_equal(np.load(path), np.load(twin))
        else:
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))
    assert Image.open(written[0]).size == result.images[0].size


def test_save_refuses_a_folder_it_cannot_write(demo, small_picture, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = pfcam.explain(demo, small_picture, layers="layer4")
    with pytest.raises(cams.export.ExportError, match="saving into"):
        result.save(blocker / "out")
    with pytest.raises(ValueError, match="overlay format"):
        result.save(tmp_path, overlay_format="gif")


def test_the_three_lines_from_another_folder(tmp_path):
    """The acceptance line, in a fresh interpreter outside the checkout."""
    code = f"import pfcam; r = pfcam.explain({DEMO!r}, {str(COFFEE)!r}); print(len(r.save({str(tmp_path)!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
    assert len(list(tmp_path.glob("coffee-*/demo_r50_hybrid/layer4__gradcam__top1-*.png"))) == 1
    assert len(list(tmp_path.glob("coffee-*/demo_r50_hybrid/layer4__gradcam__top1-*.npy"))) == 1
