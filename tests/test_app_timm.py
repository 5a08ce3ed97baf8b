"""The app with networks pfnet did not build: a timm model added by name (random weights on request, marked), the
paper's baselines in one click, the bundled photos' boxes in the Measure panel. Offline, AppTest."""
from __future__ import annotations

from apptest_support import DEMO, assert_clean, overlays, row_notes

SMALL = "test_resnet.r160_in1k"  # timm's own tiny test network
SMALL_ID = f"timm:{SMALL}"


def add_timm(at, name: str) -> None:
    at.text_input(key="timm_name").input(name)
    next(button for button in at.button if button.label == "Add").click()
    at.run()
    assert_clean(at)


def test_a_timm_model_added_by_name_is_explained_with_random_weights_marked(blank):
    import pfnet
    from cams.layers import available_layers
    from pfcam_app.views import layer_choices

    app = blank
    add_timm(app, SMALL)
    assert list(app.multiselect(key="models").value) == list(DEMO) + [SMALL_ID]
    assert f"timm {SMALL} · missing" in [e.label for e in app.sidebar.expander]  # offline, nothing cached
    assert any(f"timm {SMALL}" in w.value and "huggingface.co/timm/" in w.value for w in app.warning)

    app.toggle(key=f"random_{SMALL_ID}").set_value(True)
    app.multiselect(key="examples").set_value(["coffee.jpg"])
    app.run()
    assert_clean(app)
    key = f"layers_{SMALL_ID}"  # its own layer picker: its names are its own
    model = pfnet.load(SMALL_ID, weights="random", device="cpu")  # the same names as the page's copy
    names, _, default = layer_choices(model)
    assert app.multiselect(key=key).options == names and list(app.multiselect(key=key).value) == default
    depth = [spec.name for spec in available_layers(model)]
    assert [depth.index(name) for name in names] == sorted(depth.index(name) for name in names)  # depth order
    notes = row_notes(app)
    assert any(f"timm {SMALL} (random weights)" in note for note in notes)
    assert not any("Demo R50" in note for note in notes)  # a photo: the demo models stay off it
    assert len(overlays(app)) == len(default)
    assert f"Model card · timm {SMALL} (random weights)" in [e.label for e in app.expander]
    captions = [c.value for c in app.caption]
    assert any("Alignment: not measured" in c for c in captions)
    assert any(w.value.startswith("Random weights, as asked for") for w in app.warning)


def test_an_unknown_timm_name_is_one_line_and_nothing_is_added(blank):
    app = blank
    add_timm(app, "no_such_network")
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "has no model" in errors[0] and "\n" not in errors[0]
    assert list(app.multiselect(key="models").value) == list(DEMO)


def test_a_parameter_free_model_adds_its_baseline_in_one_click(blank):
    app = blank
    app.multiselect(key="models").set_value(["vit_s_max"])
    app.run()
    assert_clean(app)
    app.button(key="baseline_vit_s_max").click()
    app.run()
    assert_clean(app)
    assert list(app.multiselect(key="models").value) == ["vit_s_max", "vit_s"]
    assert not [b for b in app.button if b.key == "baseline_vit_s_max"]  # it is on the page now


def test_the_bundled_photos_come_with_their_boxes_for_measure():
    from pfcam_app import core
    from pfcam_app.measure import measurable

    targets = measurable([core.photo_source("coffee.jpg"), core.photo_source("astronaut.jpg")], {})
    assert [(t.source.name, t.label) for t in targets] == [("coffee.jpg", "espresso"), ("astronaut.jpg", None)]
    assert targets[0].boxes == [(115.0, 10.0, 273.0, 198.0)]
