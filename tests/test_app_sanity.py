"""The app's Sanity panel (issue #23): the model-randomisation cascade beside Measure, one chart per method, the
table of median Spearman/SSIM per step, and Stop/Continue like Measure."""
from __future__ import annotations

import numpy as np

from apptest_support import DEMO, assert_clean


def test_cascade_per_method_starts_at_one_and_falls(app):
    from cams.sanity import randomisation_units
    from pfnet import weights, zoo

    assert not app.dataframe
    app.multiselect(key="sanity_methods").set_value(["gradcam", "layercam"])
    app.run()
    app.button(key="sanity_start").click()
    app.run()
    assert_clean(app)
    assert not app.error, [e.value for e in app.error]
    (table,) = [frame.value for frame in app.dataframe]
    assert len(list(app.get("vega_lite_chart"))) == 2  # one chart per method
    for model_id in DEMO:
        name = zoo.get(model_id).name
        units = randomisation_units(weights.load(model_id, device="cpu"))
        for method in ("gradcam", "layercam"):
            rows = table[(table["model"] == name) & (table["method"] == method)]
            for layer in set(rows["layer"]):
                series = rows[rows["layer"] == layer].sort_values("depth")
                assert list(series["depth"]) == list(range(len(units) + 1))
                spearman = series["Spearman (median)"].to_numpy(dtype=float)
                assert abs(spearman[0] - 1.0) < 1e-9  # the unchanged copy
                assert np.all(spearman[1:] <= 1.0) and spearman[-1] < 0.9, (name, method, layer, spearman)
    app.radio(key="sanity_metric").set_value("ssim")
    app.run()
    assert_clean(app)


def test_stop_keeps_the_finished_steps_and_continue_finishes(app):
    from pfcam_app import sanity

    app.button(key="sanity_start").click()
    app.run()
    (sig, runs) = app.session_state[sanity.RESULTS_KEY]
    assert runs and all(run.done for run in runs.values())
    # a stopped check: the state a Stop leaves (the step being computed is dropped), then Continue
    for run in runs.values():
        run.next = 2
        del run.rows[2 * len(run.layers) * len(run.trained):]
    app.session_state[sanity.STOP_KEY] = sig
    app.run()
    assert any("stopped" in info.value for info in app.info)
    app.button(key="sanity_continue").click()
    app.run()
    assert_clean(app)
    (_, runs) = app.session_state[sanity.RESULTS_KEY]
    assert all(run.done for run in runs.values())
    table = app.dataframe[0].value
    assert not table.duplicated(["model", "method", "layer", "depth"]).any()
