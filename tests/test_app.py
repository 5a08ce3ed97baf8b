"""The Streamlit app, driven headless with streamlit.testing.v1.AppTest.

Offline (PFCAM_OFFLINE=1) with an empty PFCAM_CACHE: the app must fall back to the bundled demo models; weights come
from assets/weights or from synthetic checkpoints written by the tests, never from the network. The first-screen
test runs without the flag, the hub pointed at a closed loopback port; the download tests serve the weights from
a loopback HTTP server.
"""
from __future__ import annotations

import io
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from ports import unused_port
from apptest_support import (APP, CAPTION, DEMO, FIRST_SCENE, TIMEOUT, UPLOAD_NOTE, assert_clean,
                             expected_top1, originals, overlays, row_notes, scene_png, upload)

FIRST_SCREEN_LIMIT = 90  # seconds: the first run of a fresh page, on this small shared CPU


def test_first_screen_without_flags_or_network_shows_an_example_and_heatmaps(tmp_path, monkeypatch):
    """The README's `streamlit run app.py` on a fresh machine: no PFCAM_OFFLINE, empty caches, hub unreachable."""
    from streamlit.testing.v1 import AppTest

    from pfcam_app import core

    for name in ("PFCAM_OFFLINE", "HF_HUB_OFFLINE", "PFCAM_GDRIVE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("PFCAM_CACHE", "HF_HOME"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port()}")
    core.cam_store().clear()
    at = AppTest.from_file(str(APP), default_timeout=FIRST_SCREEN_LIMIT)
    started = time.monotonic()
    at.run()  # raises if the run takes longer than FIRST_SCREEN_LIMIT
    assert_clean(at)
    assert time.monotonic() - started < FIRST_SCREEN_LIMIT
    assert not at.error and not at.warning
    assert [o.captions[0] for o in originals(at)] == ["Original · 160×160 · ground truth: triangle (green box)",
                                                      "Original · 400×266", "Original · 400×267"]
    cells = overlays(at)
    scene = [cell for cell in cells if " · pointing " in cell.captions[0]]
    assert len(scene) == 4  # the scene: 2 demo models x 2 layers, nothing else
    assert all(re.search(r" · pointing (hit ✓|miss ✗) · energy in box ", cell.captions[0]) for cell in scene)
    assert len({str(cell.value) for cell in scene}) == 4  # four different pictures
    photos = [cell.captions[0] for cell in cells if cell not in scene]
    assert len(photos) == 4  # the cat and the coffee: EfficientNet-Lite0 x 2 layers, real ImageNet classes
    assert sum(c.startswith("espresso · ") for c in photos) == 2 and sum(c.startswith("Egyptian cat · ")
                                                                         for c in photos) == 2
    maps = [heat for result in core.cam_store().values() for heat in result["heatmaps"][0]]
    assert len(maps) == 8 and sum(float(heat.max() - heat.min()) > 0.5 for heat in maps) >= 4  # real heatmaps
    banner = " ".join(info.value for info in at.info)
    assert "Offline demo" in banner and "cannot be reached" in banner and "PFCAM_OFFLINE" in banner
    assert "EfficientNet-Lite0" in banner
    assert list(at.multiselect(key="models").value) == list(DEMO) + ["effnet_lite0"]
    assert [e.label for e in at.sidebar.expander] == \
        ["Demo R50 (scenes) · bundled", "Demo R50-hybrid (scenes) · bundled", "EfficientNet-Lite0 · installed"]
    at.toggle(key="every_model").set_value(True)  # every model on every image: the demo models on the photos too
    at.run()
    assert_clean(at)
    photos = [cell.captions[0] for cell in overlays(at) if " · pointing " not in cell.captions[0]]
    assert len(photos) == 12 and sum(caption.startswith("espresso · ") for caption in photos) == 2
    assert any("forced guess" in warning.value for warning in at.warning)  # what a demo model on a photo means
    scene = [cell for cell in overlays(at) if " · pointing " in cell.captions[0]]
    assert len(scene) == 6  # and EfficientNet-Lite0 on the scene
    at.toggle(key="every_model").set_value(False)
    at.multiselect(key="models").set_value(list(DEMO) + ["r50"])
    at.run()
    assert any(e.label == "R50 · no network" for e in at.expander)  # not "can download"
    assert not [b for b in at.button if b.key in ("download_imagenet", "download_r50")]


def test_offline_start_uses_demo_models_and_says_so(app):
    assert list(app.multiselect(key="models").value) == list(DEMO)
    assert list(app.multiselect(key="layers_resnet").value) == ["layer3.5", "layer4.2"]
    banner = " ".join(info.value for info in app.info)
    assert "Offline demo" in banner and "PFCAM_OFFLINE=1" in banner
    options = app.multiselect(key="examples").options
    assert any(o.startswith("scene_") for o in options) and "cat_chelsea.jpg" in options
    assert list(app.multiselect(key="examples").value) == [FIRST_SCENE]
    assert len(originals(app)) == 1 and len(overlays(app)) == 4  # heatmaps without a click
    assert not app.error and not app.warning
    assert not [b for b in app.button if b.key == "download_imagenet"]  # offline: nothing to download
    app.multiselect(key="examples").set_value([])
    app.run()
    assert "Upload images or pick examples" in " ".join(info.value for info in app.info)


def test_two_uploads_give_a_model_by_layer_grid_and_restyling_reuses_the_cams(blank):
    app = blank
    files = [("first.png", scene_png(0)), ("second.png", scene_png(1))]
    upload(app, files)
    assert not app.error, [e.value for e in app.error]
    assert [o.captions[0].split(" · ")[0] for o in originals(app)] == ["Original", "Original"]
    cells = overlays(app)
    assert len(cells) == 2 * 2 * 2  # images x models x layers
    for cell in cells:
        assert CAPTION.match(cell.captions[0]), cell.captions[0]
    # Document order: per image, model rows of (layer3.5, layer4.2); both layers explain the same class.
    for i, (_name, data) in enumerate(files):
        for j, model_id in enumerate(DEMO):
            row = cells[4 * i + 2 * j: 4 * i + 2 * j + 2]
            cls, prob = expected_top1(model_id, data)
            for cell in row:  # class and probability, a note if the map is flat, the demo models' caveat
                assert re.fullmatch(re.escape(f"{cls} · {100 * prob:.1f}%")
                                    + r"( · flat map: no positive evidence at this layer)?" + re.escape(UPLOAD_NOTE),
                                    cell.captions[0])
    assert [m.value for m in app.markdown].count("**layer3.5**") == 2
    assert [m.value for m in app.markdown].count("**layer4.2**") == 2
    notes = row_notes(app)
    assert len(notes) == 4 and all(":gray[computed in" in n for n in notes)
    top5 = [m.value for m in app.markdown if "· top-5" in m.value]
    assert len(top5) == 4 and all(len(re.findall(r"\d\. [a-z_]+ — \d+\.\d%", t)) == 5 for t in top5)

    # Colormap and opacity only re-render: same captions, new pixels, nothing recomputed.
    before = [(c.value[0], c.captions[0]) for c in overlays(app)]
    app.selectbox(key="colormap").set_value("viridis")
    app.slider(key="opacity").set_value(0.8)
    app.run()
    assert_clean(app)
    after = [(c.value[0], c.captions[0]) for c in overlays(app)]
    assert [c for _, c in after] == [c for _, c in before]
    assert all(a != b for (a, _), (b, _) in zip(after, before))
    notes = row_notes(app)
    assert len(notes) == 4 and all("from cache" in n for n in notes)

    # Another method recomputes, and the heatmaps change.
    app.selectbox(key="method").set_value("layercam")
    app.run()
    assert_clean(app)
    notes = row_notes(app)
    assert len(notes) == 4 and all(":gray[computed in" in n for n in notes)
    changed = [(c.value[0], c.captions[0]) for c in overlays(app)]
    assert len(changed) == 8
    assert sum(a != b for (a, _), (b, _) in zip(changed, after)) >= 4


def test_a_corrupt_upload_shows_an_error_and_the_good_image_still_renders(blank):
    app = blank
    upload(app, [("good.png", scene_png(2)), ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)])
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "corrupt.png" in errors[0]
    assert "Traceback" not in errors[0]
    assert len(originals(app)) == 1 and len(overlays(app)) == 4


def test_an_oversized_upload_is_refused_with_a_message(blank):
    app = blank
    big = b"\x00" * (21 * 1024 * 1024)
    upload(app, [("huge.png", big), ("fine.png", scene_png(3))])
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "huge.png" in errors[0] and "20 MB" in errors[0]
    assert len(overlays(app)) == 4


def test_demo_scene_examples_show_ground_truth_and_localisation_scores(app):
    option = [o for o in app.multiselect(key="examples").options if o.startswith("scene_")][2]
    app.multiselect(key="examples").set_value([option])
    app.run()
    assert_clean(app)
    label = option.rsplit("_", 1)[-1].removesuffix(".png")
    assert originals(app)[0].captions[0].endswith(f"ground truth: {label} (green box)")
    cells = overlays(app)
    assert len(cells) == 4
    for cell in cells:
        assert re.search(r" · pointing (hit ✓|miss ✗) · energy in box \d+\.\d%$", cell.captions[0]), cell.captions[0]


def test_top_k_target_adds_a_row_per_class(blank):
    app = blank
    upload(app, [("one.png", scene_png(4))])
    app.radio(key="target_kind").set_value("Top-k classes")
    app.run()
    app.slider(key="top_k").set_value(2)
    app.run()
    assert_clean(app)
    cells = overlays(app)
    assert len(cells) == 2 * 2 * 2  # models x targets x layers
    first, second = cells[0].captions[0], cells[2].captions[0]
    assert first.split(" · ")[0] != second.split(" · ")[0]  # two different classes for the same model
    assert float(CAPTION.match(first)["pct"]) >= float(CAPTION.match(second)["pct"])


def test_a_class_picked_by_name_is_explained_by_every_model(blank):
    app = blank
    upload(app, [("one.png", scene_png(9))])
    app.radio(key="target_kind").set_value("A class I pick")
    app.run()
    assert "star" in app.selectbox(key="target_class").options
    app.selectbox(key="target_class").set_value("star")
    app.run()
    assert_clean(app)
    cells = overlays(app)
    assert len(cells) == 4 and all(c.captions[0].startswith("star · ") for c in cells)


def test_the_export_explains_the_picked_class_with_the_pages_cams(blank, tmp_path, monkeypatch):
    app = blank
    upload(app, [("one.png", scene_png(9))])
    app.radio(key="target_kind").set_value("A class I pick")
    app.run()
    app.selectbox(key="target_class").set_value("star")
    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    app.text_input(key="export_dir").set_value("exports")
    app.run()
    assert any("explain the class picked in the sidebar ('star')" in c.value for c in app.caption)
    app.button(key="export_folder").click()
    app.run()
    assert_clean(app)
    assert not app.error and not [w.value for w in app.warning if "skipped" in w.value or "fail" in w.value]
    summary = " ".join(s.value for s in app.success)
    assert "Exported 4 heatmaps of 1 image(s)" in summary and "2 image × model results taken from the page" in summary
    rows = json.loads((tmp_path / "root" / "exports" / "manifest.json").read_text())["rows"]
    assert len(rows) == 4 and {row["model"] for row in rows} == set(DEMO)
    assert {(row["target"], row["class_id"], row["class_name"]) for row in rows} == {("class3", 3, "star")}
    assert all(row["overlay"].split("/")[-1].startswith(f"{row['layer']}__gradcam__class3-star")
               and row["grid"].endswith("grid__gradcam__class3.png") for row in rows)


def test_model_cards_show_measured_and_paper_figures(app):
    upload(app, [("one.png", scene_png(5))])
    titles = [e.label for e in app.expander]
    assert "Model card · Demo R50 (scenes)" in titles and "Model card · Demo R50-hybrid (scenes)" in titles
    tables = [m.value for m in app.markdown if m.value.startswith("| | Measured here | Paper |")]
    assert len(tables) == 2
    for table in tables:
        assert re.search(r"\| Parameters \| \d+\.\d\d M \|", table)
        assert re.search(r"\| MACs \(\d+×\d+\) \| \d+\.\d{3} G \|", table)
        assert re.search(r"\| Latency \(cpu, batch 1\) \| \d+\.\d ms \|", table)
    card = [c.value for c in app.caption if c.value.startswith("Demo card (from training)")]
    assert len(card) == 2 and all("test accuracy" in c and "pointing game at layer4" in c for c in card)


def test_alignment_toggle_redraws_the_demo_heatmaps(blank):
    app = blank
    upload(app, [("one.png", scene_png(8))])
    assert_clean(app)
    offsets = [c.value for c in app.caption if c.value.startswith("Alignment measured for these weights")]
    assert len(offsets) == 2 and all("layer4 (-" in c for c in offsets)  # both demo models record one
    aligned = [(c.value[0], c.captions[0]) for c in overlays(app)]
    app.toggle(key="align").set_value(False)
    app.run()
    assert_clean(app)
    notes = row_notes(app)
    assert len(notes) == 2 and all(":gray[computed in" in n for n in notes)  # a new computation, not the cache
    plain = [(c.value[0], c.captions[0]) for c in overlays(app)]
    assert len(plain) == len(aligned) == 4
    # layer4 (the second cell of each row) moves; the prediction does not
    assert all(plain[i][0] != aligned[i][0] for i in (1, 3))
    assert [c.split(" · ")[:2] for _, c in plain] == [c.split(" · ")[:2] for _, c in aligned]


def test_the_options_offered_follow_the_method(blank):
    app = blank  # no image on the page: only the sidebar runs
    assert app.checkbox(key="aug_smooth").disabled is False and app.checkbox(key="eigen_smooth").disabled is False
    assert "bf16" not in [box.key for box in app.checkbox]  # Grad-CAM has no extra forwards
    helps = {box.key: " ".join(box.help.split()) for box in app.checkbox}
    assert "six augmented copies" in helps["aug_smooth"] and "about 6× the time" in helps["aug_smooth"]
    assert "first principal component" in helps["eigen_smooth"] and "SVD per map" in helps["eigen_smooth"]
    for method in ("scorecam", "ablationcam"):
        app.selectbox(key="method").set_value(method)
        app.run()
        assert_clean(app)
        assert app.checkbox(key="bf16").label == "bfloat16 for the masked forwards"
        assert "bfloat16 autocast" in app.checkbox(key="bf16").help
    app.checkbox(key="eigen_smooth").check()
    app.selectbox(key="method").set_value("eigencam_fixed")
    app.run()
    assert_clean(app)
    assert app.checkbox(key="eigen_smooth").disabled is True
    assert any(c.value == "Eigen smoothing does not apply: Eigen-CAM is a principal component already."
               for c in app.caption)


def test_eigen_smoothing_recomputes_the_maps_says_so_and_exports_them(blank, tmp_path, monkeypatch):
    from cams.engine import explain
    from cams.images import load_image
    from pfcam_app import core
    from pfnet import weights, zoo
    from pfnet.preprocess import prepare

    app = blank
    data = scene_png(4)
    upload(app, [("one.png", data)])
    plain = [cell.value[0] for cell in overlays(app)]
    assert not any("options:" in note for note in row_notes(app))
    app.checkbox(key="eigen_smooth").check()
    app.run()
    assert_clean(app)
    notes = row_notes(app)
    # a new computation under its own cache key (not the plain maps from the cache), and each row says which options
    assert len(notes) == 2 and all(":gray[computed in" in n and ":blue[options: eigen\\_smooth]" in n for n in notes)
    smoothed = [cell.value[0] for cell in overlays(app)]
    assert len(smoothed) == len(plain) == 4 and all(a != b for a, b in zip(smoothed, plain))

    # the stored maps are cams.explain's with eigen_smooth=True
    entry = zoo.get("demo_r50")
    tensor = prepare(load_image(data, "one.png"), entry.preprocess, "full").tensor[None]
    network = weights.load("demo_r50", device="cpu")
    layers = ["layer3.5", "layer4.2"]
    expected = explain(network, tensor, layers, class_names=entry.class_names(), eigen_smooth=True).heatmaps[0]
    unsmoothed = explain(network, tensor, layers, class_names=entry.class_names()).heatmaps[0]
    stored = [value["heatmaps"] for value in core.cam_store().values() if value["heatmaps"].shape == expected.shape]
    assert any(np.allclose(maps, expected.numpy(), atol=1e-5) for maps in stored)
    assert any(np.allclose(maps, unsmoothed.numpy(), atol=1e-5) for maps in stored)  # the plain ones: another key
    assert not np.allclose(expected.numpy(), unsmoothed.numpy(), atol=1e-2)

    # the export writes the page's smoothed maps (taken from the page, made with the same options) and records them
    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    app.text_input(key="export_dir").set_value("smoothed")
    app.run()
    app.button(key="export_folder").click()
    app.run()
    assert_clean(app)
    assert any("2 image × model results taken from the page" in s.value for s in app.success), \
        [s.value for s in app.success] + [w.value for w in app.warning] + [e.value for e in app.error]
    manifest = json.loads((tmp_path / "root" / "smoothed" / "manifest.json").read_text())
    assert manifest["settings"]["eigen_smooth"] is True and manifest["settings"]["aug_smooth"] is False
    row = next(row for row in manifest["rows"] if row["model"] == "demo_r50" and row["layer"] == "layer4.2")
    np.testing.assert_allclose(np.load(tmp_path / "root" / "smoothed" / row["heatmap"]), expected[0, 1].numpy(),
                               atol=1e-5)


def test_export_to_folder_writes_the_manifest(blank, tmp_path, monkeypatch):
    app = blank
    upload(app, [("a.png", scene_png(6)), ("b.png", scene_png(7))])
    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path / "root"))
    out = tmp_path / "root" / "exports"  # the server's root, the browser's sub-folder
    app.text_input(key="export_dir").set_value("exports")
    app.run()
    app.button(key="export_folder").click()
    app.run()
    assert_clean(app)
    assert not app.error, [e.value for e in app.error]
    assert any("Exported 8 heatmaps of 2 image(s)" in s.value for s in app.success)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["rows"] if isinstance(manifest, dict) else manifest
    assert len(rows) == 2 * 2 * 2
    assert {row["model"] for row in rows} == set(DEMO)
    assert {row["layer"] for row in rows} == {"layer3.5", "layer4.2"}
    assert {row["image"] for row in rows} == {"a.png", "b.png"}
    for row in rows:
        assert row["method"] == "gradcam" and row["rank"] == 1 and row["status"] == "computed"
        assert (out / row["overlay"]).is_file() and (out / row["heatmap"]).is_file()

    # "Download ZIP": the same export, zipped.
    app.button(key="build_zip").click()
    app.run()
    assert_clean(app)
    assert [b.label for b in app.download_button] == ["Download ZIP"]
    names = zipfile.ZipFile(io.BytesIO(app.session_state["_zip"][1])).namelist()
    assert "manifest.json" in names and "manifest.csv" in names
    assert sorted(n for n in names if n.endswith(".png") and "/grid__" not in n) == \
        sorted(row["overlay"] for row in rows)


def test_a_checkpoint_for_another_architecture_is_explained(blank):
    app = blank
    from pfnet import zoo

    state = zoo.get("demo_r50_max").build().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    app.file_uploader(key="ckpt_demo_r50").set_value(("other.pth", buffer.getvalue(), "application/octet-stream"))
    app.run()
    assert_clean(app)
    errors = " ".join(e.value for e in app.error)
    assert "Detected" in errors and "not Demo R50 (scenes)" in errors and "Demo R50-max (scenes)" in errors
    # The model keeps its bundled weights and the page keeps working.
    upload(app, [("one.png", scene_png(8))])
    assert len(overlays(app)) == 4


def test_cached_imagenet_weights_make_r50_and_r50_hybrid_the_default(pfcam_cache):
    from safetensors.torch import save_file
    from streamlit.testing.v1 import AppTest

    from pfnet import zoo

    for model_id in ("r50", "r50_hybrid"):  # synthetic checkpoints: random weights, right layout
        entry = zoo.get(model_id)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in entry.build().state_dict().items()}
        state = {k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
                 for k, s in shapes.items()}
        save_file(state, str(pfcam_cache / Path(entry.source.filename).with_suffix(".safetensors")))
        if not entry.source.filename.endswith(".safetensors"):
            torch.save(state, pfcam_cache / entry.source.filename)
            (pfcam_cache / Path(entry.source.filename).with_suffix(".safetensors")).unlink()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    assert list(at.multiselect(key="models").value) == ["r50", "r50_hybrid"]
    assert not any("Offline demo" in info.value for info in at.info)
    assert not at.warning and not at.error


def test_weights_missing_offline_say_what_to_do_and_the_rest_keeps_working(blank):
    app = blank
    app.multiselect(key="models").set_value(["demo_r50", "r50_max"])
    app.run()
    assert_clean(app)
    warnings = [w.value for w in app.warning]
    assert len(warnings) == 1 and "R50-max" in warnings[0]
    assert "offline" in warnings[0] and "save it as" in warnings[0] and "r50_max.pth" in warnings[0]
    assert any(e.label == "R50-max · missing" for e in app.expander)
    upload(app, [("one.png", scene_png(10))])
    assert len(overlays(app)) == 2  # demo_r50 x 2 layers; R50-max is skipped, not fatal


def test_scene_scores_use_the_mask_at_any_model_input_size():
    """A 160-px scene scored for a 128-px model: the mask is resized, not replaced by the box."""
    from pfcam_app.core import Source
    from pfcam_app.views import scene_scores

    mask = np.zeros((160, 160), bool)
    yy, xx = np.mgrid[:160, :160]
    mask[(yy - 80) ** 2 + (xx - 100) ** 2 <= 40 ** 2] = True  # a disc; its box corners are off the object
    source = Source("scene.png", b"", "d", kind="scene", box=(60, 40, 141, 121), mask=mask, label="circle")
    heat = np.zeros((128, 128), np.float32)
    heat[64, 80] = 1.0  # the disc's centre at 128 px
    assert scene_scores(source, heat, (0, 0, 160, 160), (160, 160)).startswith("pointing hit ✓")
    corner = np.zeros((128, 128), np.float32)
    corner[33, 49] = 1.0  # the box's corner at 128 px: 13 px from the disc (tolerance 8.6), a box would say hit
    assert scene_scores(source, corner, (0, 0, 160, 160), (160, 160)).startswith("pointing miss ✗")
    cropped = scene_scores(source, heat, (20, 20, 140, 140), (160, 160))  # centre crop: box geometry only
    assert cropped.startswith("pointing ") and "energy in box" in cropped
