"""How the grid reads (AppTest): layer columns in depth order, the colour scale, what Eigen-CAM ignores, the demo
models' caveat on photos, Score-CAM's Stop / Continue, the alignment note, exports from the page's CAMs."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cams.engine
from apptest_support import (ROOT, TIMEOUT, assert_clean, demo_weights_bundled, overlays, row_notes, scene_png,
                             upload)

pytestmark = pytest.mark.skipif(not demo_weights_bundled(), reason="bundled demo weights missing in assets/weights")


def column_headers(at) -> list[str]:
    return [m.value.strip("*") for m in at.markdown if m.value.startswith("**layer") or m.value == "**stem**"]


def test_layer_columns_follow_network_depth_whatever_the_click_order(blank):
    picker = blank.multiselect(key="layers_resnet")
    assert picker.options.index("layer4.2.conv_block") < picker.options.index("layer4.2")  # op before its block
    picker.set_value(["layer4.2", "layer2.3", "layer4.1", "stem"])
    blank.run()
    upload(blank, [("one.png", scene_png(1))])
    assert column_headers(blank) == ["stem", "layer2.3", "layer4.1", "layer4.2"]
    assert list(blank.multiselect(key="layers_resnet").value) == ["stem", "layer2.3", "layer4.1", "layer4.2"]
    assert len(overlays(blank)) == 2 * 4


def test_the_colour_scale_follows_the_colormap():
    from cams.render import colormap_lut
    from pfcam_app.views import SCALE_SIZE, colour_scale

    for name in ("jet", "viridis"):
        bar = np.asarray(colour_scale(name))
        lut = colormap_lut(name)
        assert (bar[0, 0] == lut[0]).all() and (bar[0, SCALE_SIZE[0] - 1] == lut[255]).all()
        assert (bar[SCALE_SIZE[1] - 1] == bar[0]).all() and bar.shape[0] > SCALE_SIZE[1]  # labels below the bar


def test_the_page_shows_the_scale_of_the_chosen_colormap(app):
    assert any(c.value.startswith("Colour scale (jet)") for c in app.caption)
    app.selectbox(key="colormap").set_value("viridis")
    app.run()
    assert any(c.value.startswith("Colour scale (viridis)") for c in app.caption)


@pytest.mark.parametrize("method", ["eigencam", "eigencam_fixed"])
def test_eigen_cam_says_it_ignores_the_target(app, method):
    from pfcam_app import core

    app.selectbox(key="method").set_value(method)
    app.radio(key="target_kind").set_value("Top-k classes")
    app.run()
    app.slider(key="top_k").set_value(2)
    app.run()
    assert_clean(app)
    assert any("Eigen-CAM draws the first principal component" in c.value for c in app.caption)  # sidebar
    notes = row_notes(app)
    assert len(notes) == 4 and all("Eigen-CAM: the same map for any target" in n for n in notes)
    results = [r for r in core.cam_store().values() if r["heatmaps"].shape[0] == 2]
    assert len(results) == 2 and all(np.array_equal(r["heatmaps"][0], r["heatmaps"][1]) for r in results)
    app.selectbox(key="method").set_value("gradcam")
    app.run()
    assert not any("same map for any target" in n for n in row_notes(app))


def test_photos_are_marked_at_the_demo_models_cells(blank):
    blank.multiselect(key="examples").set_value(["cat_chelsea.jpg"])
    blank.run()
    assert_clean(blank)
    cells = overlays(blank)
    assert len(cells) == 4
    assert all(c.captions[0].endswith(" · ⚠ photo: not one of the 10 shapes this demo model knows") for c in cells)
    warnings = [w.value for w in blank.warning]
    assert len(warnings) == 1 and warnings[0].startswith("This is a photograph") and "circle" in warnings[0]


def test_score_cam_shows_a_stop_button_while_it_computes_and_can_be_continued(app, monkeypatch):
    """Pressing Stop interrupts the running script at its next progress step (Streamlit raises in the script
    thread); here the interruption is raised by a wrapped engine after its first progress report."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    app.multiselect(key="models").set_value(["demo_r50"])
    app.multiselect(key="layers_resnet").set_value(["layer1.2", "layer2.3"])  # 64 + 128 masked forward passes
    real = cams.engine.explain
    reports = []

    def interrupted(*args, progress=None, **kwargs):
        def report(done, total):
            reports.append((done, total))
            progress(done, total)
            raise StopException()  # what a click on Stop makes the next progress update do

        return real(*args, progress=report, **kwargs)

    monkeypatch.setattr(cams.engine, "explain", interrupted)
    app.selectbox(key="method").set_value("scorecam")
    app.run()
    assert reports == [(32, 192)]  # channels done / total
    assert not overlays(app) and app.button(key="stop_cams").label == "Stop Score-CAM"
    app.button(key="stop_cams").click()
    app.run()
    assert_clean(app)
    assert any(i.value == "Score-CAM stopped: 1 image × model result not computed." for i in app.info)
    assert sum("stopped before it was computed" in c.value for c in app.caption) == 1
    assert not overlays(app) and len(reports) == 1  # nothing computed while stopped
    monkeypatch.setattr(cams.engine, "explain", real)
    upload(app, [("new.png", scene_png(2))])  # new work is not stopped
    assert len(overlays(app)) == 2 and sum("stopped before" in c.value for c in app.caption) == 1
    app.button(key="resume_cams").click()
    app.run()
    assert_clean(app)
    assert len(overlays(app)) == 4 and not any("Score-CAM stopped" in i.value for i in app.info)
    assert not [b for b in app.button if b.key in ("stop_cams", "resume_cams")]  # nothing left to stop


def test_the_model_card_names_the_layers_drawn_with_each_offset(app):
    notes = [c.value for c in app.caption if c.value.startswith("Alignment measured for these weights")]
    assert len(notes) == 2
    for note in notes:
        assert "every stride-32 layer (layer4.0.conv_block … layer4.2 (6 layers)) is drawn moved by (-" in note
        assert "layers of other strides are drawn unshifted" in note


def test_exports_take_the_cams_already_on_the_page(blank, tmp_path, monkeypatch):
    upload(blank, [("a.png", scene_png(6)), ("b.png", scene_png(7))])
    calls = []
    real = cams.engine.explain
    monkeypatch.setattr(cams.engine, "explain", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    monkeypatch.setenv("PFCAM_EXPORT_ROOT", str(tmp_path))
    blank.text_input(key="export_dir").set_value("out")
    blank.run()
    blank.button(key="export_folder").click()
    blank.run()
    assert_clean(blank)
    assert calls == []  # nothing explained again
    summary = [s.value for s in blank.success]
    assert len(summary) == 1 and "Exported 8 heatmaps of 2 image(s)" in summary[0]
    assert "4 image × model results taken from the page" in summary[0]
    blank.button(key="build_zip").click()
    blank.run()
    assert_clean(blank)
    assert calls == [] and [b.label for b in blank.download_button] == ["Download ZIP"]
    # a class picked on the page is what the export explains: new slots beside the top-class ones, every one of
    # them from the page's CAMs of that class (a new image's too: the page drew it)
    blank.radio(key="target_kind").set_value("A class I pick")
    blank.run()
    blank.selectbox(key="target_class").set_value("star")
    upload(blank, [("a.png", scene_png(6)), ("b.png", scene_png(7)), ("c.png", scene_png(8))])
    calls.clear()
    blank.button(key="export_folder").click()
    blank.run()
    assert_clean(blank)
    assert calls == []
    assert "Exported 12 heatmaps of 3 image(s)" in blank.success[0].value
    assert "(12 computed, 0 kept from an earlier export; 6 image × model results" in blank.success[0].value
    rows = json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"]
    assert sorted({row["target"] for row in rows}) == ["class3", "top1"] and len(rows) == 8 + 12


def test_the_page_runs_as_its_own_script():
    """`streamlit run pfcam_app/page.py` (the `pfcam app` command) gives the same page as app.py."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pfcam_app" / "page.py"), default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    assert at.title[0].value == "pfcam · Grad-CAM workbench"
    assert len(overlays(at)) == 8  # the demo scene (demo pair x 2 layers), two photos (EfficientNet-Lite0 x 2)
