"""The app's Measure panel (issue #14, item 4): localization across depth for the chosen images that have boxes,
one value per block per loaded model, a chart and a table; a bad boxes CSV gets a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apptest_support import DEMO, assert_clean, scene_png, upload


def measured(at):
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    tables = [frame.value for frame in at.dataframe]
    assert len(tables) == 1, "one table beneath the chart"
    return tables[0]


def charts(at) -> list:
    return list(at.get("vega_lite_chart"))


def chart_series(at) -> dict[str, list[float]]:
    """The line chart's data: model -> its values in depth order (Streamlit sends it long-form: depth, line, value)."""
    import pyarrow as pa

    (chart,) = charts(at)
    (dataset,) = chart.proto.datasets
    frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
    series: dict[str, list[float]] = {}
    for _, (_depth, line, value) in frame.iloc[:, :3].sort_values(frame.columns[0]).iterrows():
        series.setdefault(str(line), []).append(float(value))
    return series


def expected_last_block(model_id: str, image, box, targets=None, **options) -> tuple[float, float]:
    """Pointing game and energy in box at a model's last block, computed here from cams directly."""
    from cams import metrics
    from cams.engine import explain
    from cams.layers import block_layers
    from pfnet import weights, zoo
    from pfnet.preprocess import prepare

    model = weights.load(model_id, device="cpu")
    prepared = prepare(image, zoo.get(model_id).preprocess, "full")
    layer = block_layers(model)[-1]
    result = explain(model, prepared.tensor.unsqueeze(0), [layer], targets=targets, **options)
    heatmap = result.heatmaps[0, 0, 0].numpy()
    mapped = metrics.map_box(box, prepared.crop_box, heatmap.shape[::-1])
    return float(metrics.pointing_game(heatmap, box=mapped)), metrics.energy_in_box(heatmap, box=mapped)


def test_the_default_scene_gets_one_value_per_block_per_model_and_a_chart(app):
    from cams.layers import block_layers
    from pfnet import weights

    assert not charts(app) and not app.dataframe  # nothing is measured before the user asks
    app.button(key="measure_start").click()
    app.run()
    table = measured(app)
    assert charts(app), "a line chart of the metric against depth"
    names = {}
    for model_id in DEMO:
        from pfnet import zoo

        names[zoo.get(model_id).name] = block_layers(weights.load(model_id, device="cpu"))
    assert set(table["model"]) == set(names)
    for name, layers in names.items():
        rows = table[table["model"] == name]
        assert list(rows["layer"]) == layers and list(rows["depth"]) == list(range(1, len(layers) + 1))
        for column in ("Pointing game", "Energy in box", "MaxBoxAccV2"):
            values = rows[column].to_numpy(dtype=float)
            assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all(), (name, column, values)
        assert (rows["n"] == 1).all()  # the default page holds one scene
    series = chart_series(app)  # one line per model, one point per block: the pointing game first
    assert {name: len(values) for name, values in series.items()} == {name: len(v) for name, v in names.items()}
    for name, values in series.items():
        assert values == list(table[table["model"] == name]["Pointing game"])
    app.radio(key="measure_metric").set_value("energy_in_box")
    app.run()
    assert_clean(app)
    for name, values in chart_series(app).items():
        assert values == pytest.approx(list(table[table["model"] == name]["Energy in box"]))


@pytest.mark.parametrize("eigen_smooth", [False, True])
def test_a_users_image_with_a_boxes_csv_is_measured_as_computed_directly(blank, eigen_smooth):
    import io

    from PIL import Image

    from pfdemo import scenes
    from pfnet import zoo

    size = zoo.get("demo_r50").preprocess.input_size
    scene = scenes.render_scene(31337, 6, size)  # the picture scene_png(6) draws
    upload(blank, [("mine.png", scene_png(6))])
    box = ",".join(str(int(v)) for v in scene.box)
    blank.file_uploader(key="measure_boxes").set_value([("boxes.csv", f"image,x0,y0,x1,y1,label\nmine.png,{box},x\n"
                                                         "other.png,1,2,3,4\n".encode(), "text/csv")])
    if eigen_smooth:  # the sidebar's option reaches the measurement, and its caption says so
        blank.checkbox(key="eigen_smooth").check()
    blank.run()
    assert_clean(blank)
    blank.button(key="measure_start").click()
    blank.run()
    table = measured(blank)
    assert any(("eigen_smooth" in caption.value) == eigen_smooth and "target:" in caption.value
               for caption in blank.caption)
    image = Image.open(io.BytesIO(scene_png(6))).convert("RGB")
    for model_id in DEMO:
        rows = table[table["model"] == zoo.get(model_id).name]
        hit, energy = expected_last_block(model_id, image, scene.box, eigen_smooth=eigen_smooth)
        last = rows.iloc[-1]
        assert last["Pointing game"] == hit and last["Energy in box"] == pytest.approx(energy, abs=1e-5)


def test_the_ground_truth_class_is_measured_when_asked(blank):
    import io

    from PIL import Image

    from pfdemo import scenes
    from pfnet import zoo

    size = zoo.get("demo_r50").preprocess.input_size
    mine, yours = (scenes.render_scene(31337, index, size) for index in (6, 7))  # what scene_png(6 / 7) draw
    other = (mine.label + 3) % len(scenes.CLASS_NAMES)  # a label that is not the scene's: its CAM differs
    upload(blank, [("mine.png", scene_png(6)), ("yours.png", scene_png(7))])
    rows = ["image,x0,y0,x1,y1,label",
            f"mine.png,{','.join(str(int(v)) for v in mine.box)},{scenes.CLASS_NAMES[other].upper()}",
            f"yours.png,{','.join(str(int(v)) for v in yours.box)},no such shape"]
    blank.file_uploader(key="measure_boxes").set_value([("boxes.csv", "\n".join(rows).encode(), "text/csv")])
    blank.run()
    blank.toggle(key="measure_truth").set_value(True)
    blank.run()
    blank.button(key="measure_start").click()
    blank.run()
    table = measured(blank)
    notes = " ".join(c.value for c in blank.caption)
    assert "yours.png: 'no such shape' is not one of the model's classes; its top class was explained" in notes
    images = [Image.open(io.BytesIO(scene_png(index))).convert("RGB") for index in (6, 7)]
    for model_id in DEMO:
        last = table[table["model"] == zoo.get(model_id).name].iloc[-1]
        assert last["n"] == 2
        labelled = expected_last_block(model_id, images[0], mine.box, targets=[other])
        top = expected_last_block(model_id, images[1], yours.box)  # no usable label: its top class
        assert last["Energy in box"] == pytest.approx((labelled[1] + top[1]) / 2, abs=1e-5)
        predicted = expected_last_block(model_id, images[0], mine.box)
        assert abs(predicted[1] - labelled[1]) > 1e-3  # the label, not the prediction, was explained


@pytest.mark.parametrize(("data", "message"), [
    (b"PK\x03\x04\0\0image,x0", "binary, not a CSV"),
    (b"name,left,top\nmine.png,1,2\n", "missing column(s) image, x0, y0, x1, y1"),
    (b"image,x0,y0,x1,y1\nmine.png,nan,0,5,5\nmine.png,9,9,1,1\n", "empty or not finite"),
    (b"image,x0,y0,x1,y1\n", "no rows"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not UTF-8"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_a_malformed_boxes_csv_gets_a_clear_message(blank, data, message):
    upload(blank, [("mine.png", scene_png(6))])
    blank.file_uploader(key="measure_boxes").set_value([("boxes.csv", data, "text/csv")])
    blank.run()
    assert_clean(blank)
    shown = [w.value for w in blank.warning] + [i.value for i in blank.info]
    assert any(message in text for text in shown), shown
    assert any("None of the chosen images has boxes" in text for text in shown)  # nothing usable: nothing to run


def test_parse_boxes_bounds_and_merges_rows():
    from pfcam_app.measure import BOXES_LIMIT_BYTES, parse_boxes

    boxes, labels, problems = parse_boxes(b"image,x0,y0,x1,y1\na.png,0,0,4,4\na.png,1,1,2,2\n,1,1,2,2\n")
    assert boxes == {"a.png": [(0.0, 0.0, 4.0, 4.0), (1.0, 1.0, 2.0, 2.0)]}
    assert problems == ["boxes CSV line 4: no image name; skipped"]
    boxes, labels, problems = parse_boxes(b"x" * (BOXES_LIMIT_BYTES + 1))
    assert boxes == {} and "the limit is 1 MB" in problems[0]


def test_depth_scores_on_hand_made_maps():
    from cams.depth import DepthScores

    scores = DepthScores(["a", "b"])
    on = np.zeros((2, 10, 10), dtype=np.float32)
    on[0, 2:5, 2:5] = 1.0  # layer a: all the mass on the box
    on[1, 8, 8] = 1.0  # layer b: a peak far from it
    scores.add(on, [(2, 2, 5, 5)])
    scores.add(on, [(2, 2, 5, 5)])
    values = scores.values()
    assert values["pointing_game"] == [1.0, 0.0]
    assert values["energy_in_box"] == [1.0, 0.0]
    # wsolevaluation's protocol (the default): the 3 x 3 block's box is 4 x 4 inclusive, IoU 9/16: BoxAcc .3, .5
    assert values["maxboxacc_v2"][0] == pytest.approx(2 / 3) and values["maxboxacc_v2"][1] < 2 / 3
    own = DepthScores(["a", "b"], "pfcam")
    own.add(on, [(2, 2, 5, 5)])
    assert own.values()["maxboxacc_v2"][0] == 1.0  # pfcam's protocol: the block's own pixels
    assert [row["depth"] for row in scores.rows()] == [1, 2] and scores.n == 2
    with pytest.raises(ValueError):
        scores.add(torch.zeros(3, 10, 10).numpy(), [(2, 2, 5, 5)])
