"""cams.export: folder layout, manifest, bad inputs, re-runs, safety; and ``python -m cams export``.

A tiny PFResNet (width 0.25, 10 classes, 64 px input) behind a fake zoo entry keeps every run to seconds.
All test images, good and bad, are generated here.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cams.engine
from cams.export import MANIFEST_COLUMNS, ExportError, collect_inputs, run_export, safe_name, zip_directory
from pfnet import PFResNet, zoo
from cams.images import load_image
from pfnet.preprocess import Preprocess, prepare
from pfnet.version import __version__

CLASSES = [f"shape {i}" for i in range(10)]


@dataclass
class FakeEntry:
    """What run_export needs of a zoo entry."""

    id: str = "tiny"
    name: str = "Tiny R50"
    preprocess: Preprocess = field(default_factory=lambda: Preprocess(64, 64))

    def class_names(self) -> list[str]:
        return list(CLASSES)


def tiny(variant: str = "conv", seed: int = 0) -> PFResNet:
    torch.manual_seed(seed)
    return PFResNet(variant, num_classes=10, width_mult=0.25).eval()


@pytest.fixture(scope="module")
def models() -> dict:
    return {"tiny": (tiny(), FakeEntry())}


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def rotated_jpeg() -> bytes:
    """Stored 60x30, EXIF orientation 6: upright it is 30x60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(60, 30, 7), "JPEG", exif=exif.tobytes())


GOOD = {  # relative path -> upright (width, height)
    "rgb.png": (48, 40),
    "photo.jpg": (70, 50),
    "deep16.png": (40, 40),
    "cmyk.jpg": (36, 30),
    "rgba.png": (40, 32),
    "gray.png": (30, 44),
    "rotated.jpg": (30, 60),
    "sub/dir/nested.webp": (50, 50),
}
BAD = {"empty.png": "empty file", "truncated.png": "truncated or corrupt", "fake.jpg": "not an image"}
UPLOAD_NAME = "../../escape.png"


def make_inputs(folder: Path) -> None:
    (folder / "sub" / "dir").mkdir(parents=True)
    noise(48, 40, 1).save(folder / "rgb.png")
    noise(70, 50, 2).save(folder / "photo.jpg", quality=90)
    Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40).save(folder / "deep16.png")
    Image.new("CMYK", (36, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    rgba = noise(40, 32, 3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 32)))
    rgba.save(folder / "rgba.png")
    noise(30, 44, 4).convert("L").save(folder / "gray.png")
    (folder / "rotated.jpg").write_bytes(rotated_jpeg())
    noise(50, 50, 5).save(folder / "sub" / "dir" / "nested.webp")
    (folder / "empty.png").write_bytes(b"")
    whole = encode(noise(64, 64, 6), "PNG")
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "fake.jpg").write_text("this is not a JPEG\n")
    (folder / "notes.txt").write_text("a text file\n")


def upload() -> tuple[str, bytes]:
    return UPLOAD_NAME, encode(noise(40, 30, 9), "PNG")


def folder_for(stem: str, key: str) -> str:
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def expected_folders(inputs: Path) -> dict[str, str]:
    """label -> image folder, computed from the documented layout."""
    folders = {str(inputs / rel): folder_for(Path(rel).stem, str((inputs / rel).resolve())) for rel in GOOD}
    name, data = upload()
    folders[name] = folder_for("escape", f"upload:{name}:{hashlib.sha256(data).hexdigest()}")
    return folders


def tree(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns
            for path in sorted(folder.rglob("*")) if path.is_file()}


class CountingExplain:
    """Wraps cams.engine.explain and records the batch sizes it was called with."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        self.real = cams.engine.explain
        monkeypatch.setattr(cams.engine, "explain", self)

    def __call__(self, model, images, *args, **kwargs):
        self.calls.append(int(images.shape[0]))
        return self.real(model, images, *args, **kwargs)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, models):
    base = tmp_path_factory.mktemp("export")
    inputs = base / "in"
    inputs.mkdir()
    make_inputs(inputs)
    before = tree(inputs)
    calls = []
    report = run_export([inputs, upload()], base / "out", models, method="gradcam", topk=1, batch_size=4,
                        progress=lambda done, total, message: calls.append((done, total, message)))
    return base, inputs, before, report, calls


def test_folder_of_good_and_bad_images_gives_exactly_the_expected_files(first_run):
    base, inputs, _, report, _ = first_run
    out = base / "out"
    folders = expected_folders(inputs)
    assert report.ok and report.processed == 9
    assert {row["image"] for row in report.rows} == set(folders)
    assert len(report.rows) == 9 * 2  # default layers of a ResNet: layer3, layer4; top-1
    expected = {"manifest.json", "manifest.csv", ".manifest.lock"}  # the lock the manifests merge under
    for label, folder in folders.items():
        rows = [row for row in report.rows if row["image"] == label]
        assert [row["layer"] for row in rows] == ["layer3", "layer4"]
        for row in rows:
            assert row["image_dir"] == folder and row["model"] == "tiny" and row["method"] == "gradcam"
            assert row["rank"] == 1 and row["status"] == "computed"
            assert row["class_name"] == CLASSES[row["class_id"]] and 0.0 <= row["probability"] <= 1.0
            stem = f"{folder}/tiny/{row['layer']}__gradcam__top1-{safe_name(row['class_name'])}"
            assert (row["overlay"], row["heatmap"]) == (stem + ".png", stem + ".npy")
            assert row["grid"] == f"{folder}/grid__gradcam__top1.png"
            expected |= {row["overlay"], row["heatmap"], row["grid"]}
        expected.add(f"{folder}/tiny/results__gradcam.json")
    assert set(tree(out)) == expected
    assert sorted(report.files) == sorted(expected - {"manifest.json", "manifest.csv", ".manifest.lock"})


def test_bad_and_unsupported_inputs_are_listed_with_reasons(first_run):
    base, inputs, _, report, _ = first_run
    reasons = {item["input"]: item["reason"] for item in report.skipped}
    assert set(reasons) == {str(inputs / name) for name in BAD} | {str(inputs / "notes.txt")}
    for name, reason in BAD.items():
        assert reasons[str(inputs / name)].startswith(reason)
    assert "not a supported image type (.txt)" in reasons[str(inputs / "notes.txt")]
    manifest = json.loads((base / "out" / "manifest.json").read_text())
    assert {item["input"]: item["reason"] for item in manifest["skipped"]} == reasons
    bad_images = [image for image in manifest["images"] if image["status"] == "bad"]
    assert {image["input"] for image in bad_images} == {str(inputs / name) for name in BAD}


def test_manifest_json_and_csv(first_run):
    base, _, _, report, _ = first_run
    manifest = json.loads((base / "out" / "manifest.json").read_text())
    assert {"pfcam", "torch", "timm"} <= set(manifest["versions"])
    assert manifest["versions"]["pfcam"] == __version__  # the one version string
    assert manifest["versions"]["torch"] == torch.__version__
    settings = manifest["settings"]
    assert settings["method"] == "gradcam" and settings["topk"] == 1 and settings["mode"] == "full"
    assert settings["models"]["tiny"]["layers"] == ["layer3", "layer4"]
    assert manifest["started_at"] <= manifest["finished_at"]
    assert manifest["columns"] == list(MANIFEST_COLUMNS)
    assert [{key: row[key] for key in MANIFEST_COLUMNS} for row in manifest["rows"]] == \
        [{key: row[key] for key in MANIFEST_COLUMNS} for row in report.rows]
    assert all(row["input_size"] == 64 and len(row["crop_box"]) == 4 for row in manifest["rows"])
    with open(base / "out" / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == len(report.rows)
    assert rows[0]["overlay"] == report.rows[0]["overlay"] and rows[0]["status"] == "computed"
    upload_rows = [row for row in rows if row["image"].endswith("escape.png")]
    assert upload_rows and upload_rows[0]["image"] == UPLOAD_NAME


def test_outputs_have_the_documented_content(first_run):
    base, inputs, _, report, _ = first_run
    out = base / "out"
    by_image = {row["image"]: row for row in report.rows if row["layer"] == "layer4"}
    for label, row in by_image.items():
        heat = np.load(out / row["heatmap"], allow_pickle=False)
        assert heat.dtype == np.float32 and heat.shape == (64, 64)
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        size = GOOD[str(Path(label).relative_to(inputs))] if label != UPLOAD_NAME else (40, 30)
        assert Image.open(out / row["overlay"]).size == size  # original (upright) size
    rotated = by_image[str(inputs / "rotated.jpg")]
    assert Image.open(out / rotated["overlay"]).size == (30, 60)
    grid_image = Image.open(out / rotated["grid"])
    assert grid_image.width > 2 * 224 and grid_image.height > 224  # one row (model), two columns (layers)


def test_nothing_is_written_outside_the_output_folder(first_run):
    base, inputs, before, _, _ = first_run
    assert sorted(path.name for path in base.iterdir()) == ["in", "out"]
    assert tree(inputs) == before
    names = list(tree(base / "out"))
    assert all(".." not in Path(name).parts for name in names)
    assert any(name.startswith("escape-") for name in names)


def test_progress_counts_image_model_steps(first_run):
    *_, calls = first_run
    assert calls[0][:2] == (0, 12)  # 11 image files (3 of them bad) + 1 upload, x 1 model
    assert calls[-1][0] == calls[-1][1] == 12
    assert [done for done, _, _ in calls] == sorted(done for done, _, _ in calls)


def test_images_go_through_in_batches(tmp_path, models, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_inputs(inputs)
    counter = CountingExplain(monkeypatch)
    two = dict(models)
    two["tiny_max"] = (tiny("max", 1), FakeEntry("tiny_max", "Tiny R50-max"))
    report = run_export([inputs, upload()], tmp_path / "out", two, layers=["layer4"], batch_size=4)
    assert counter.calls == [4, 4, 4, 4, 1, 1]  # per batch: one call per model, all layers and targets
    assert len(report.rows) == 9 * 2
    grid_row = report.rows[0]
    assert Image.open(tmp_path / "out" / grid_row["grid"]).height > Image.open(
        tmp_path / "out" / grid_row["overlay"]).height  # grid: 2 rows of cells


def test_rerun_skips_what_is_done_and_overwrite_recomputes(first_run, tmp_path, models, monkeypatch):
    base, inputs, *_ = first_run
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    before = tree(out)
    counter = CountingExplain(monkeypatch)
    again = run_export([inputs, upload()], out, models, batch_size=4)
    assert counter.calls == []
    assert again.files == [] and again.processed == 9
    assert {row["status"] for row in again.rows} == {"existing"}
    assert [(row["image"], row["overlay"]) for row in again.rows] == \
        [(row["image"], row["overlay"]) for row in first_run[3].rows]
    after = tree(out)
    assert {name: stamp for name, stamp in after.items() if not name.startswith("manifest")} == \
        {name: stamp for name, stamp in before.items() if not name.startswith("manifest")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["rows"]) == 18 and len(manifest["skipped"]) == 4

    # one missing heatmap: only that image is recomputed, only the missing file is written
    victim = again.rows[3]["heatmap"]
    (out / victim).unlink()
    partial = run_export([inputs, upload()], out, models, batch_size=4)
    assert counter.calls == [1]
    folder = victim.split("/")[0]
    assert sorted(partial.files) == sorted([victim, f"{folder}/tiny/results__gradcam.json",
                                            f"{folder}/grid__gradcam__top1.png"])
    assert sorted(row["status"] for row in partial.rows).count("computed") == 1

    overwritten = run_export([inputs, upload()], out, models, batch_size=4, overwrite=True)
    assert counter.calls == [1, 4, 4, 1]
    assert {row["status"] for row in overwritten.rows} == {"computed"}
    changed = tree(out)
    assert all(changed[name] != after[name] for name in after if name.endswith(".png") and name != victim)


def test_other_settings_are_kept_and_flagged_without_overwrite(first_run, tmp_path, models):
    base, inputs, *_ = first_run
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    report = run_export([inputs / "rgb.png"], out, models, colormap="viridis")
    assert {row["status"] for row in report.rows} == {"stale"} and report.files == []
    assert any("other settings" in warning for warning in report.warnings)


def test_other_weights_or_a_file_changed_in_place_are_flagged_stale(first_run, tmp_path, models, monkeypatch):
    base, inputs, *_ = first_run
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    first = json.loads((base / "out" / "manifest.json").read_text())
    digest = first["settings"]["models"]["tiny"]["weights"]
    assert len(digest) == 16 and digest != "0" * 16

    # the same weights in another model object: nothing to redo
    counter = CountingExplain(monkeypatch)
    same = run_export([inputs / "rgb.png"], out, {"tiny": (tiny(seed=0), FakeEntry())})
    assert counter.calls == [] and {row["status"] for row in same.rows} == {"existing"}

    # other weights under the same model id: kept, flagged, and the warning says why
    other = {"tiny": (tiny(seed=1), FakeEntry())}
    kept = run_export([inputs / "rgb.png"], out, other)
    assert counter.calls == [] and kept.files == []
    assert {row["status"] for row in kept.rows} == {"stale"}
    assert any("other weights" in warning and "--overwrite" in warning for warning in kept.warnings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["models"]["tiny"]["weights"] not in ("", digest)

    redone = run_export([inputs / "rgb.png"], out, other, overwrite=True)
    assert counter.calls == [1] and {row["status"] for row in redone.rows} == {"computed"}
    stored = np.load(out / next(row["heatmap"] for row in redone.rows if row["layer"] == "layer4"))
    tensor = prepare(load_image(inputs / "rgb.png"), FakeEntry().preprocess, "full").tensor[None]
    fresh = counter.real(other["tiny"][0], tensor, ["layer4"])
    np.testing.assert_allclose(stored, fresh.heatmaps[0, 0, 0].numpy(), atol=1e-5)

    # the file rewritten in place (same path, so the same output folder): its earlier outputs are stale;
    # a copy with the same bytes and only a new modification time is not
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(noise(80, 60, seed=3), "PNG"))
    run_export([folder], out, models)
    os.utime(folder / "a.png", (1_000_000_000, 1_000_000_000))
    assert {row["status"] for row in run_export([folder], out, models).rows} == {"existing"}
    (folder / "a.png").write_bytes(encode(noise(80, 60, seed=4), "PNG"))
    changed = run_export([folder], out, models)
    assert {row["status"] for row in changed.rows} == {"stale"} and changed.files == []


def test_topk_and_unknown_layers(tmp_path, models):
    source = ("cat.png", encode(noise(40, 40), "PNG"))
    report = run_export([source], tmp_path / "out", models, layers=["layer4", "nope"], topk=2)
    assert any("'nope'" in warning and "tiny" in warning for warning in report.warnings)
    assert [(row["layer"], row["rank"]) for row in report.rows] == [("layer4", 1), ("layer4", 2)]
    first, second = report.rows
    assert first["class_id"] != second["class_id"] and first["probability"] >= second["probability"]
    assert first["overlay"].endswith(f"layer4__gradcam__top1-{safe_name(first['class_name'])}.png")
    assert second["grid"].endswith("grid__gradcam__top2.png")
    assert (tmp_path / "out" / second["grid"]).is_file()


def test_target_classes_are_explained_for_every_image(tmp_path, models, monkeypatch):
    images = [("a.png", encode(noise(48, 40, seed=1), "PNG")), ("b.png", encode(noise(40, 56, seed=2), "PNG"))]
    out = tmp_path / "out"
    counter = CountingExplain(monkeypatch)
    report = run_export(images, out, models, layers=["layer3", "layer4"], target="Shape 7, 3,shape 7")
    assert counter.calls == [2] and report.warnings == []
    assert [(row["image"], row["layer"], row["target"]) for row in report.rows] == [
        (image, layer, target) for image in ("a.png", "b.png") for layer in ("layer3", "layer4")
        for target in ("class7", "class3")]
    network = models["tiny"][0]
    for index, (_name, data) in enumerate(images):
        tensor = prepare(load_image(data), FakeEntry().preprocess, "full").tensor[None]
        fresh = counter.real(network, tensor, ["layer3", "layer4"], targets=[7, 3])
        probs = fresh.probs[0]
        for row in report.rows[4 * index:4 * index + 4]:
            class_id = int(row["target"][5:])
            assert row["class_id"] == class_id and row["class_name"] == f"shape {class_id}"
            assert row["rank"] == int((probs > probs[class_id]).sum()) + 1  # where the model ranks the class
            assert row["probability"] == pytest.approx(float(probs[class_id]), abs=1e-6)
            assert row["overlay"].endswith(f"{row['layer']}__gradcam__{row['target']}-shape_{class_id}.png")
            assert row["grid"].endswith(f"grid__gradcam__{row['target']}.png") and (out / row["grid"]).is_file()
            heatmap = fresh.heatmaps[0, [7, 3].index(class_id), ["layer3", "layer4"].index(row["layer"])]
            np.testing.assert_allclose(np.load(out / row["heatmap"]), heatmap.numpy(), atol=1e-4)  # batch of 2 vs 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["target"] == ["Shape 7", "3"]
    assert manifest["settings"]["models"]["tiny"]["classes"] == [7, 3]
    with open(out / "manifest.csv", newline="") as handle:
        assert [row["target"] for row in csv.DictReader(handle)] == [row["target"] for row in report.rows]

    # a re-run keeps them; the predicted class is another slot beside them, not a replacement
    again = run_export(images, out, models, layers=["layer3", "layer4"], target=["shape 7", 3])
    assert counter.calls == [2] and {row["status"] for row in again.rows} == {"existing"}
    predicted = run_export(images, out, models, layers=["layer3", "layer4"])
    assert counter.calls == [2, 2] and {row["target"] for row in predicted.rows} == {"top1"}
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert sorted({row["target"] for row in rows}) == ["class3", "class7", "top1"] and len(rows) == 12


def test_target_classes_a_model_lacks_are_skipped_with_a_reason(tmp_path, models):
    source = [("a.png", encode(noise(40, 40), "PNG"))]
    report = run_export(source, tmp_path / "out", models, layers=["layer4"], target="12,shape 2,cat")
    assert [row["target"] for row in report.rows] == ["class2"]
    assert any("class id 12 is out of range (it has 10 classes)" in w for w in report.warnings)
    assert any("has no class named 'cat'" in w for w in report.warnings)
    nothing = run_export(source, tmp_path / "none", models, layers=["layer4"], target="cat")
    assert not nothing.ok and nothing.rows == []
    assert any("none of the target classes exists; model skipped" in w for w in nothing.warnings)
    with pytest.raises(ExportError, match="top-k .* or target classes"):
        run_export(source, tmp_path / "both", models, topk=2, target="shape 1")
    assert not (tmp_path / "both").exists()
    class TwoDogs(FakeEntry):
        def class_names(self) -> list[str]:
            return ["dog", "Dog", *CLASSES[2:]]

    shared = {"tiny": (tiny(), TwoDogs())}
    twice = run_export(source, tmp_path / "twice", shared, layers=["layer4"], target="dog,1")
    assert any("2 classes are named 'dog' (ids 0, 1); give the id" in w for w in twice.warnings)
    assert [row["target"] for row in twice.rows] == ["class1"]


def labelled_folder(base: Path) -> Path:
    folder = base / "labelled"
    (folder / "sub").mkdir(parents=True)
    for name, seed in (("a.png", 1), ("sub/b.png", 2), ("c.png", 3), ("d.png", 4)):
        (folder / name).write_bytes(encode(noise(40 + 8 * seed, 40, seed=seed), "PNG"))
    # bench-loc's boxes.csv: extra columns, two rows for a.png (one label), paths relative to the CSV
    (folder / "boxes.csv").write_text("image,x0,y0,x1,y1,label\na.png,1,1,9,9,shape 4\na.png,2,2,8,8,Shape 4\n"
                                      "sub/b.png,0,0,5,5,8\nc.png,0,0,5,5,cat\nghost.png,0,0,1,1,shape 1\n"
                                      "d.png,0,0,5,5,\n")
    return folder


def test_labels_give_each_image_its_own_class(tmp_path, models, monkeypatch):
    folder = labelled_folder(tmp_path)
    out = tmp_path / "out"
    counter = CountingExplain(monkeypatch)
    report = run_export([folder], out, models, layers=["layer4"], labels=folder / "boxes.csv", batch_size=4)
    assert counter.calls == [2]  # a.png and sub/b.png: c.png's label is no class, d.png has none
    assert [(Path(row["image"]).name, row["target"], row["class_id"]) for row in report.rows] == [
        ("a.png", "label", 4), ("b.png", "label", 8)]
    warnings = "\n".join(report.warnings)
    assert "line 7: no label" in warnings and "1 label(s) are not among its classes ('cat'" in warnings
    assert "1 image(s) have no label" in warnings and "d.png" in warnings
    assert sorted(path.name.split("-")[0] for path in out.iterdir() if path.is_dir()) == ["a", "b"]  # no empty ones
    network = models["tiny"][0]
    tensors = torch.stack([prepare(load_image(folder / name), FakeEntry().preprocess, "full").tensor
                           for name in ("a.png", "sub/b.png")])
    fresh = counter.real(network, tensors, ["layer4"], targets=[[4], [8]])
    for position, row in enumerate(report.rows):
        probs = fresh.probs[position]
        assert row["rank"] == int((probs > probs[row["class_id"]]).sum()) + 1
        assert row["overlay"].endswith(f"layer4__gradcam__label-shape_{row['class_id']}.png")
        assert row["grid"].endswith("grid__gradcam__label.png")
        np.testing.assert_allclose(np.load(out / row["heatmap"]), fresh.heatmaps[position, 0, 0].numpy(), atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["settings"]["target"] == "label"

    # the same labels again: kept; another label for b.png: its result is stale; a mapping works as the file does
    same = run_export([folder], out, models, layers=["layer4"], labels=folder / "boxes.csv", batch_size=4)
    assert counter.calls == [2] and {row["status"] for row in same.rows} == {"existing"}
    changed = run_export([folder / "a.png", folder / "sub" / "b.png"], out, models, layers=["layer4"],
                         labels={str(folder / "a.png"): "4", str(folder / "sub/b.png"): "shape 2"})
    assert counter.calls == [2] and [row["status"] for row in changed.rows] == ["existing", "stale"]

    with pytest.raises(ExportError, match="leave out top-k and target classes"):
        run_export([folder], tmp_path / "no", models, labels=folder / "boxes.csv", target="shape 1")
    with pytest.raises(ExportError, match="leave out top-k"):
        run_export([folder], tmp_path / "no", models, labels=folder / "boxes.csv", topk=2)


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file"), (b"image,class\na.png,1\n", "'image' and 'label' columns"),
    (b"image,label\n\xff\xfe,1\n", "not UTF-8"), (b"image,label\n", "gives no image a label"),
    ("fifo", "not a regular file"), (b"image,label\n\"" + b"x" * 200_000 + b"\",1\n", "line"),
    (b"image,label\n" + b"x" * (64 * 2**20), "larger than 64 MB")])
def test_a_labels_file_that_cannot_be_used_is_refused(tmp_path, models, capsys, content, message):
    from pfcam.cli import main

    path = tmp_path / "labels.csv"
    if content == "fifo":
        os.mkfifo(path)  # reading it would block: refused before opening
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=message):
        run_export([("a.png", encode(noise(40, 40), "PNG"))], tmp_path / "out", models, labels=path)
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "cli"), "--models", "demo_r50",
                 "--labels", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_rows_of_an_older_manifest_get_their_target(first_run, tmp_path, models):
    base, inputs, *_ = first_run
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    for row in manifest["rows"]:
        del row["target"]  # as written before fixed targets existed
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = run_export([inputs / "rgb.png"], out, models)
    assert {row["status"] for row in again.rows} == {"existing"}
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert len(rows) == 18 and {row["target"] for row in rows} == {"top1"}


def test_center_mode_records_the_crop_box(tmp_path, models):
    report = run_export([("wide.png", encode(noise(80, 40), "PNG"))], tmp_path / "out", models,
                        layers=["layer4"], mode="center")
    row = report.manifest["rows"][0]
    assert row["crop_box"] == [20.0, 0.0, 60.0, 40.0]  # resize_size == input_size: crop = shorter side
    assert Image.open(tmp_path / "out" / row["overlay"]).size == (80, 40)


def test_nothing_processable(tmp_path, models):
    report = run_export([("bad.jpg", b"nope"), tmp_path / "missing.png"], tmp_path / "out", models)
    assert not report.ok and report.rows == []
    assert [(item["input"], item["reason"]) for item in report.skipped] == [
        (str(tmp_path / "missing.png"), "no such file or folder"),
        ("bad.jpg", "not an image (supported: JPEG, PNG, WEBP, BMP, TIFF, GIF)")]
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_bad_settings_and_foreign_folders_are_refused(tmp_path, models):
    with pytest.raises(ExportError, match="method"):
        run_export([], tmp_path / "a", models, method="magic")
    with pytest.raises(ExportError, match="colormap"):
        run_export([], tmp_path / "a", models, colormap="rainbow")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(ExportError, match="not written by pfcam"):
        run_export([], foreign, models)
    assert (foreign / "manifest.json").read_text() == '{"mine": true}'


def test_symlink_in_output_folder_is_not_followed(tmp_path, models):
    name, data = "x.png", encode(noise(20, 20), "PNG")
    folder = folder_for("x", f"upload:{name}:{hashlib.sha256(data).hexdigest()}")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ExportError, match="symbolic link"):
        run_export([(name, data)], out, models)
    assert list(elsewhere.iterdir()) == []


def test_output_folder_inside_an_input_folder_is_not_read_back(tmp_path, models):
    noise(20, 20).save(tmp_path / "a.png")
    run_export([tmp_path], tmp_path / "cams_out", models, layers=["layer4"])
    again = run_export([tmp_path], tmp_path / "cams_out", models, layers=["layer4"])
    assert {row["image"] for row in again.rows} == {str(tmp_path / "a.png")}


def test_collect_inputs_order_and_duplicates(tmp_path):
    for name in ["b.png", "a.PNG", "z/c.jpg", "y.svg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items, skipped = collect_inputs([tmp_path, tmp_path / "b.png", ("u.png", b"1"), ("u.png", b"1")])
    assert [item.label for item in items] == [str(tmp_path / n) for n in ["a.PNG", "b.png", "z/c.jpg"]] + ["u.png"]
    assert [item["input"] for item in skipped] == [str(tmp_path / "y.svg")]


@pytest.mark.parametrize(("text", "expected"), [
    ("../../etc/passwd", "etc_passwd"), ("..", "x"), ("", "x"), ("a/b\\c", "a_b_c"),
    ("caf\u00e9 \u2603 bar", "cafe_bar"), ("evil\x00\n\x1bname", "evil_name"), ("CON", "_CON"),
    (".hidden", "hidden"), ("great white shark", "great_white_shark"), ("x" * 300, "x" * 64),
])
def test_safe_name(text, expected):
    assert safe_name(text) == expected


def test_upload_names_cannot_escape(tmp_path, models):
    data = encode(noise(20, 20), "PNG")
    names = ["../../../up.png", "/abs/path.png", "..\\..\\win.png", "\x00\x1b.png", "..", "a/../../b.png"]
    report = run_export([(name, data) for name in names], tmp_path / "out", models, layers=["layer4"])
    assert report.processed == len(names)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    for path in (tmp_path / "out").rglob("*"):
        assert path.resolve().is_relative_to((tmp_path / "out").resolve())
        assert not any(ord(ch) < 32 for ch in path.name)


def test_zip_directory(first_run):
    base, *_ = first_run
    data = zip_directory(base / "out")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert set(names) == set(tree(base / "out")) - {".manifest.lock"}  # the lock is no result
        assert json.loads(archive.read("manifest.json"))["format"].startswith("pfcam-export")
    assert all(not name.startswith("/") and ".." not in name.split("/") for name in names)


# ------------------------------------------------------------------------------------------------ the CLI
def demo_checkpoint(folder: Path) -> Path:
    """A checkpoint for zoo id demo_r50 (random weights of the right shape), as --weights takes it."""
    from pfnet import zoo

    torch.manual_seed(0)
    path = folder / "demo_r50.pth"
    torch.save(zoo.get("demo_r50").build().state_dict(), path)
    return path


def test_cli_export_with_a_weights_file(tmp_path, capsys, pfcam_cache):
    from pfcam.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    noise(50, 40).save(inputs / "one.png")
    (inputs / "broken.jpg").write_bytes(b"")
    weights = demo_checkpoint(tmp_path)
    out = tmp_path / "out"
    argv = ["export", str(inputs), "--out", str(out), "--models", "r50,demo_r50", "--weights",
            f"demo_r50={weights}", "--layers", "layer4", "--device", "cpu", "--batch-size", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping r50" in captured.err and "demo_r50,demo_r50_hybrid" in captured.err  # offline, no cache
    assert "broken.jpg: empty file" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(row["model"], row["layer"]) for row in manifest["rows"]] == [("demo_r50", "layer4")]
    assert manifest["settings"]["weights"] == {"demo_r50": str(weights)}
    assert manifest["settings"]["models"]["demo_r50"]["cam_offsets"] == {}  # measured for the bundled weights only
    assert (out / manifest["rows"][0]["overlay"]).is_file()

    assert main(argv) == 0  # re-run: everything kept, still listed
    assert json.loads((out / "manifest.json").read_text())["rows"][0]["status"] == "existing"
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["rows"][0]["status"] == "computed"

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    bad_argv = ["export", str(tmp_path / "bad"), "--out", str(tmp_path / "out2"), "--models", "demo_r50",
                "--weights", f"demo_r50={weights}", "--device", "cpu"]
    assert main(bad_argv) != 0
    assert "nothing could be processed" in capsys.readouterr().err


def test_cli_without_any_loadable_model_fails_clearly(tmp_path, capsys, pfcam_cache):
    from pfcam.cli import main

    noise(20, 20).save(tmp_path / "a.png")
    code = main(["export", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--models", "r50_hybrid,nope"])
    assert code != 0
    err = capsys.readouterr().err
    assert "skipping r50_hybrid" in err and "skipping nope" in err and "no model could be loaded" in err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", "no-equals-sign"])


def test_cli_export_without_models_falls_back_to_the_demo_pair_when_the_imagenet_weights_are_missing(
        tmp_path, capsys, pfcam_cache, monkeypatch):
    """The newcomer's command (no --models, empty cache, no network) exports with the embedded default and says so
    (here without EfficientNet-Lite0's package, the first fallback: tests/test_real_networks.py covers that one);
    naming the ImageNet models still fails, with the hint."""
    from pfcam.cli import main
    from pfnet import weights
    from pfnet.weights import weight_status

    monkeypatch.setattr(weights, "package_file", lambda ref: None)

    if any(weight_status(model_id) != "bundled" for model_id in ("demo_r50", "demo_r50_hybrid")):
        pytest.skip("the bundled demo weights (assets/weights) are not there")
    noise(64, 48).save(tmp_path / "photo.png")
    assert main(["export", str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "skipping r50:" in err and "skipping r50_hybrid:" in err
    assert "exporting with the bundled demo models demo_r50, demo_r50_hybrid instead" in err
    rows = json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"]
    assert {row["model"] for row in rows} == {"demo_r50", "demo_r50_hybrid"} and all(
        (tmp_path / "out" / row["heatmap"]).is_file() for row in rows)

    code = main(["export", str(tmp_path / "photo.png"), "--out", str(tmp_path / "named"), "--models", "r50,r50_hybrid",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "demo_r50,demo_r50_hybrid" in err and "instead" not in err
    assert not (tmp_path / "named" / "manifest.json").exists()


def test_cli_export_with_the_bundled_demo_models(tmp_path, capsys):
    from pfcam.cli import main
    from pfnet.weights import weight_status

    if any(weight_status(model_id) != "bundled" for model_id in ("demo_r50", "demo_r50_hybrid")):
        pytest.skip("the bundled demo weights (assets/weights) are not there")
    example = Path(__file__).resolve().parent.parent / "assets" / "examples" / "coffee.jpg"
    out = tmp_path / "out"
    assert main(["export", str(example), "--out", str(out), "--models", "demo_r50,demo_r50_hybrid",
                 "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(row["model"], row["layer"]) for row in manifest["rows"]] == [
        ("demo_r50", "layer3"), ("demo_r50", "layer4"), ("demo_r50_hybrid", "layer3"), ("demo_r50_hybrid", "layer4")]
    for model_id in ("demo_r50", "demo_r50_hybrid"):  # drawn with the offsets measured for the bundled weights
        recorded = {layer: list(offset) for layer, offset in zoo.get(model_id).cam_offsets.items() if any(offset)}
        assert recorded and manifest["settings"]["models"][model_id]["cam_offsets"] == recorded
    grid_image = Image.open(out / manifest["rows"][0]["grid"])
    assert grid_image.height > 2 * 224  # two models: two rows
    assert "4 results computed" in capsys.readouterr().out

    # --align none: the plain resize; recorded as such, and the aligned outputs are not reused for it
    plain = tmp_path / "plain"
    assert main(["export", str(example), "--out", str(plain), "--models", "demo_r50", "--device", "cpu",
                 "--align", "none"]) == 0
    settings = json.loads((plain / "manifest.json").read_text())["settings"]
    assert settings["align"] == "none" and settings["models"]["demo_r50"]["cam_offsets"] == {}
    aligned_npy = np.load(out / manifest["rows"][1]["heatmap"])   # demo_r50 layer4, aligned
    plain_rows = json.loads((plain / "manifest.json").read_text())["rows"]
    plain_npy = np.load(plain / plain_rows[1]["heatmap"])
    assert plain_rows[1]["layer"] == "layer4" and not np.allclose(aligned_npy, plain_npy)
    assert main(["export", str(example), "--out", str(out), "--models", "demo_r50", "--device", "cpu",
                 "--align", "none"]) == 0
    rerun = json.loads((out / "manifest.json").read_text())["rows"]
    # made with other settings: kept, flagged; the folder's other results stay listed (the manifest is its index)
    assert {row["status"] for row in rerun if row["model"] == "demo_r50"} == {"stale"}
    assert [(row["model"], row["layer"]) for row in rerun] == [
        ("demo_r50", "layer3"), ("demo_r50", "layer4"), ("demo_r50_hybrid", "layer3"), ("demo_r50_hybrid", "layer4")]
    assert all(row["settings"]["align"] == "model" for row in rerun)  # each row: the settings that made it

    # --target: a class by name for every image, from the command line; --topk beside it is refused
    star = tmp_path / "star"
    assert main(["export", str(example), "--out", str(star), "--models", "demo_r50", "--device", "cpu",
                 "--layers", "layer4", "--target", "Star"]) == 0
    with open(star / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["target"], row["class_name"]) for row in rows] == [("class3", "star")]
    assert main(["export", str(example), "--out", str(tmp_path / "both"), "--models", "demo_r50",
                 "--topk", "2", "--target", "star"]) == 2
    assert "either top-k" in capsys.readouterr().err


def record_settings(out: Path) -> list[dict]:
    """Every per-image record's settings (what a re-run compares to decide whether an output is stale)."""
    return [json.loads(path.read_text())["settings"] for path in sorted(out.rglob("results__*.json"))]


def test_cli_eigen_smooth_writes_the_engines_maps_records_them_and_a_plain_rerun_does_not_pass_them_off(
        tmp_path, capsys):
    from cams.images import load_image as read
    from pfcam.cli import main
    from pfnet import load
    from pfnet.weights import weight_status

    if weight_status("demo_r50") != "bundled":
        pytest.skip("the bundled demo weights (assets/weights) are not there")
    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    noise(48, 40, 11).save(photo)
    out = tmp_path / "out"
    base = ["export", str(photo), "--out", str(out), "--models", "demo_r50", "--layers", "layer4", "--device", "cpu",
            "--no-overlays"]
    assert main([*base, "--eigen-smooth"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["eigen_smooth"] is True and manifest["settings"]["aug_smooth"] is False
    assert [row["settings"]["eigen_smooth"] for row in manifest["rows"]] == [True]
    assert [settings.get("eigen_smooth") for settings in record_settings(out)] == [True]

    network = load("demo_r50", device="cpu")
    tensor = prepare(read(photo), zoo.get("demo_r50").preprocess, "full").tensor[None]
    smoothed = cams.engine.explain(network, tensor, ["layer4"], eigen_smooth=True).heatmaps[0, 0, 0].numpy()
    plain = cams.engine.explain(network, tensor, ["layer4"]).heatmaps[0, 0, 0].numpy()
    written = np.load(out / manifest["rows"][0]["heatmap"])
    np.testing.assert_allclose(written, smoothed, atol=1e-5)
    assert np.abs(written - plain).max() > 0.05  # the option changed the map

    # without the option: the smoothed map is not passed off as a plain one (kept, flagged stale, as for every
    # other setting), and --overwrite computes the plain map in its place
    capsys.readouterr()
    assert main(base) == 0
    assert "other settings" in capsys.readouterr().err
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["stale"]
    np.testing.assert_allclose(np.load(out / rows[0]["heatmap"]), smoothed, atol=1e-5)
    assert main([*base, "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [row["status"] for row in manifest["rows"]] == ["computed"]
    assert manifest["settings"]["eigen_smooth"] is False
    assert "eigen_smooth" not in record_settings(out)[0]  # absent when off: records of older runs still match
    np.testing.assert_allclose(np.load(out / manifest["rows"][0]["heatmap"]), plain, atol=1e-5)


def test_aug_smooth_export_writes_the_engines_maps_and_takes_no_page_cams_made_without_it(tmp_path, models,
                                                                                         monkeypatch):
    network, entry = models["tiny"]
    image = noise(48, 40, 12)
    tensor = prepare(image, entry.preprocess, "full").tensor[None]
    plain = cams.engine.explain(network, tensor, ["layer4"], class_names=CLASSES)
    counter = CountingExplain(monkeypatch)
    offered = []

    def page_cams(model_id, item, decoded):  # the app's page holds the plain maps of this image
        offered.append(model_id)
        return plain

    report = run_export([("photo.png", encode(image, "PNG"))], tmp_path / "out", models, layers=["layer4"],
                        aug_smooth=True, overlays=False, reuse=page_cams)
    # offered, refused, computed: the image's call, then the six augmented copies' inner call
    assert report.ok and offered == ["tiny"] and counter.calls == [1, 6]
    made_with_it = counter.real(network, tensor, ["layer4"], class_names=CLASSES, aug_smooth=True)
    smoothed = made_with_it.heatmaps[0, 0, 0]
    written = np.load(tmp_path / "out" / report.rows[0]["heatmap"])
    np.testing.assert_allclose(written, smoothed.numpy(), atol=1e-5)
    assert np.abs(written - plain.heatmaps[0, 0, 0].numpy()).max() > 0.05
    settings = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert (settings["aug_smooth"], settings["eigen_smooth"]) == (True, False)
    assert record_settings(tmp_path / "out")[0]["aug_smooth"] is True

    # the page's maps made with the same options are taken as they are
    counter.calls.clear()
    again = run_export([("photo.png", encode(image, "PNG"))], tmp_path / "again", models, layers=["layer4"],
                       aug_smooth=True, overlays=False, reuse=lambda *_: made_with_it)
    assert again.ok and counter.calls == []
    np.testing.assert_array_equal(np.load(tmp_path / "again" / again.rows[0]["heatmap"]), smoothed.numpy())


def test_eigen_smooth_with_a_method_it_does_not_change_is_dropped_with_a_warning(tmp_path, models):
    report = run_export([("a.png", encode(noise(40, 40), "PNG"))], tmp_path / "out", models, layers=["layer4"],
                        method="eigencam_fixed", eigen_smooth=True, overlays=False)
    assert report.ok and any("eigen_smooth does not change Eigen-CAM" in warning for warning in report.warnings)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["eigen_smooth"] is False
    assert "eigen_smooth" not in record_settings(tmp_path / "out")[0]


def test_bfloat16_with_a_method_without_extra_forwards_is_dropped_with_a_warning(tmp_path, models):
    report = run_export([("a.png", encode(noise(40, 40), "PNG"))], tmp_path / "out", models, layers=["layer4"],
                        method="gradcam", precision="bfloat16", overlays=False)
    assert report.ok and any("Grad-CAM runs in float32" in warning for warning in report.warnings)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["precision"] == "float32"
    assert "precision" not in record_settings(tmp_path / "out")[0]


@pytest.mark.parametrize("option", ["aug_smooth", "eigen_smooth"])
def test_an_option_that_is_not_a_bool_is_refused(tmp_path, models, option):
    with pytest.raises(ExportError, match=f"{option} must be True or False"):
        run_export([("a.png", encode(noise(40, 40), "PNG"))], tmp_path / "out", models, **{option: "yes"})
    assert not (tmp_path / "out").exists()
