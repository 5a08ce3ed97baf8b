"""cams.metrics on hand-made heatmaps whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cams import metrics as M

BOX = (50, 60, 100, 120)  # x0, y0, x1, y1 (half-open): columns 50..99, rows 60..119


def box_heatmap(side=224, box=BOX, value=1.0):
    h = np.zeros((side, side), np.float32)
    x0, y0, x1, y1 = box
    h[y0:y1, x0:x1] = value
    return h


def spike(side, y, x):
    h = np.zeros((side, side), np.float32)
    h[y, x] = 1.0
    return h


# ------------------------------------------------------------------------------------------ geometry


def test_box_to_mask_is_half_open_and_unions_boxes():
    m = M.box_to_mask(BOX, (224, 224))
    assert m.sum() == 50 * 60 and m[60, 50] and m[119, 99] and not m[120, 99] and not m[60, 100]
    both = M.box_to_mask([BOX, (0, 0, 10, 10)], (224, 224))
    assert both.sum() == 50 * 60 + 100
    assert M.box_to_mask([], (8, 8)).sum() == 0


def test_map_box_into_input_geometry():
    # "full": a 400x200 image squashed to 100x100
    assert M.map_box((100, 50, 300, 150), (0, 0, 400, 200), 100) == (25.0, 25.0, 75.0, 75.0)
    # centre crop of a 300x200 image: crop box (50, 0, 250, 200) -> input 100; the box is clipped
    assert M.map_box((0, 0, 150, 100), (50, 0, 250, 200), 100) == (0.0, 0.0, 50.0, 50.0)
    assert M.map_box((0, 0, 40, 100), (50, 0, 250, 200), 100) is None  # entirely outside the crop


# -------------------------------------------------------------------------------------- pointing game


def test_box_heatmap_scores_energy_one_and_a_hit():
    h = box_heatmap()
    assert M.energy_in_box(h, BOX) == pytest.approx(1.0)
    assert M.pointing_game(h, BOX) and M.pointing_game(h, BOX, tolerance=0)
    mask = M.box_to_mask(BOX, h.shape)
    assert M.energy_in_box(h, mask=mask) == pytest.approx(1.0)
    assert M.pointing_game(h, mask=mask, tolerance=0)


def test_pointing_tolerance_is_15px_at_224_and_scales():
    assert M.pointing_tolerance((224, 224)) == 15.0
    assert M.pointing_tolerance((112, 112)) == 7.5
    assert M.pointing_tolerance((3, 160, 320)) == pytest.approx(15 * 160 / 224)


def test_peak_10px_outside_is_a_15px_hit_but_strict_miss_20px_a_miss():
    right = BOX[2] - 1  # last object column
    y = 90
    near, far = spike(224, y, right + 10), spike(224, y, right + 20)
    assert M.pointing_game(near, BOX)
    assert not M.pointing_game(near, BOX, tolerance=0)
    assert not M.pointing_game(far, BOX)
    # diagonal: 10 px right and 10 px below the corner pixel is ~14.1 px away (hit), 11/11 is 15.6 (miss)
    assert M.pointing_game(spike(224, 119 + 10, right + 10), BOX)
    assert not M.pointing_game(spike(224, 119 + 11, right + 11), BOX)
    # with a mask the distance is to the mask, not its box
    mask = np.zeros((224, 224), bool)
    mask[80:100, 60:70] = True
    assert M.pointing_game(spike(224, 90, 69 + 15), mask=mask)
    assert not M.pointing_game(spike(224, 90, 69 + 16), mask=mask)


def test_tolerance_scales_at_112px():
    box = (25, 30, 50, 60)
    right = box[2] - 1
    assert M.pointing_game(spike(112, 40, right + 7), box)       # 7 <= 7.5
    assert not M.pointing_game(spike(112, 40, right + 10), box)  # 10 px: a hit at 224, a miss at 112
    assert M.pointing_game(spike(112, 40, right + 10), box, tolerance=15)


def test_ties_hit_when_any_maximum_hits_and_flat_maps_miss():
    h = np.zeros((224, 224), np.float32)
    h[5, 5] = h[90, 70] = 1.0  # first maximum (row-major) is far from the box, the other on it
    assert M.peak(h) == (5, 5)
    assert M.pointing_game(h, BOX) and M.pointing_game(h, BOX, tolerance=0)
    h[90, 70] = 0.0
    assert not M.pointing_game(h, BOX)
    box_at_origin = (0, 0, 30, 30)  # the first argmax of a flat map would lie on it
    assert not M.pointing_game(np.zeros((64, 64)), box_at_origin)
    assert not M.pointing_game(np.full((64, 64), 0.7), box_at_origin)
    assert not M.pointing_game(box_heatmap(), [])  # no object at all


def test_any_box_rule_for_several_objects():
    h = spike(224, 200, 200)
    assert not M.pointing_game(h, BOX)
    assert M.pointing_game(h, [BOX, (190, 190, 210, 210)], tolerance=0)


# --------------------------------------------------------------------------------------------- energy


def test_energy_in_box_shares():
    h = np.ones((224, 224), np.float32)
    assert M.energy_in_box(h, BOX) == pytest.approx(50 * 60 / 224 ** 2)
    half = box_heatmap() + box_heatmap(box=(150, 150, 200, 210))  # two equal blobs, one in the box
    assert M.energy_in_box(half, BOX) == pytest.approx(0.5)
    assert M.energy_in_box(np.zeros((10, 10)), (0, 0, 5, 5)) == 0.0
    assert M.energy_in_box(-box_heatmap(), BOX) == 0.0  # negative values carry no mass


# --------------------------------------------------------------------------------------- box accuracy


def test_box_iou():
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_box_accuracy_on_matching_and_non_matching_blobs():
    blob = box_heatmap(box=(52, 62, 98, 118))  # close to BOX: IoU = 46*56 / 3000 = 0.86
    assert M.heatmap_box(blob, 0.5) == (52.0, 62.0, 98.0, 118.0)
    assert M.box_accuracy(blob, BOX, 0.5)
    small = box_heatmap(box=(60, 70, 80, 90))  # IoU = 400 / 3000
    assert not M.box_accuracy(small, BOX, 0.5)
    elsewhere = box_heatmap(box=(150, 150, 200, 210))
    assert not M.box_accuracy(elsewhere, BOX, 0.5)
    assert M.box_accuracy(elsewhere, [BOX, (150, 150, 200, 210)], 0.5)  # any box
    assert not M.box_accuracy(np.zeros((224, 224)), BOX, 0.5)


def test_largest_component_wins_and_threshold_matters():
    h = box_heatmap(box=(50, 60, 100, 120), value=0.6)    # big, weaker blob on the object
    h[150:160, 150:160] = 1.0                               # small, strong blob elsewhere
    assert M.heatmap_box(h, 0.8) == (150.0, 150.0, 160.0, 160.0)  # only the strong blob survives
    assert M.heatmap_box(h, 0.5) == (50.0, 60.0, 100.0, 120.0)    # both survive; the larger one wins
    assert not M.box_accuracy(h, BOX, 0.8) and M.box_accuracy(h, BOX, 0.5)


def test_choose_threshold_maximises_box_accuracy():
    # a Gaussian blob whose sigma-level set matches the box only around one threshold
    ys, xs = np.mgrid[0:224, 0:224]
    boxes, maps = [], []
    for cx, cy in [(80, 90), (140, 120), (100, 150)]:
        maps.append(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 20.0 ** 2)))
        boxes.append((cx - 20, cy - 20, cx + 20, cy + 20))  # the 1-sigma square
    curve = M.box_accuracy_curve(maps, boxes, M.DEFAULT_THRESHOLDS)
    best = M.choose_threshold(maps, boxes, M.DEFAULT_THRESHOLDS)
    assert curve.max() == 1.0 and curve.min() == 0.0
    assert 0.4 <= best <= 0.75  # exp(-1/2) = 0.61 gives the 1-sigma disc
    assert best == min(c for c, a in zip(M.DEFAULT_THRESHOLDS, curve) if a == curve.max())
    assert M.choose_threshold(maps, boxes, [0.05, 0.95]) == 0.05  # tie (both 0) -> the smallest


# ----------------------------------------------------------------------------------- reference maps


def test_centre_gaussian_peaks_at_centre():
    g = M.centre_gaussian((160, 160))
    assert g.dtype == np.float32 and g.max() == pytest.approx(1.0) and g.min() > 0
    y, x = M.peak(g)
    assert abs(y - 79.5) <= 0.5 and abs(x - 79.5) <= 0.5
    odd = M.centre_gaussian((101, 121))
    assert M.peak(odd) == (50, 60) and odd[50, 60] == 1.0
    assert M.pointing_game(g, (70, 70, 90, 90), tolerance=0)


def test_uniform_random_is_seeded():
    a, b = M.uniform_random((4, 32, 32), seed=3), M.uniform_random((4, 32, 32), seed=3)
    c = M.uniform_random((4, 32, 32), seed=4)
    assert a.dtype == np.float32 and a.shape == (4, 32, 32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() < 1.0


# --------------------------------------------------------------------------------- deletion/insertion


class RegionModel(nn.Module):
    """Two classes; p(class 0) is exactly the mean of channel 0 over a region (inputs in [0, 1])."""

    def __init__(self, region):
        super().__init__()
        self.region = region
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        assert not torch.is_grad_enabled()
        y0, y1, x0, x1 = self.region
        p = x[:, 0, y0:y1, x0:x1].mean(dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_auc_is_a_normalised_trapezoid():
    assert M.auc([1, 1, 1]) == pytest.approx(1.0)
    assert M.auc([1, 0]) == pytest.approx(0.5)
    assert M.auc([0, 1, 1], [0, 0.5, 1]) == pytest.approx(0.75)
    np.testing.assert_allclose(M.auc(np.array([[1, 0, 0], [0, 0, 0]])), [0.25, 0.0])


def test_deletion_insertion_known_answers():
    side = 16
    region = (0, 8, 0, 8)  # rows 0..7, columns 0..7: a quarter of the image
    images = torch.zeros(3, 3, side, side)
    images[:, 0, :8, :8] = 1.0  # p(class 0) = 1 on the intact image
    right = np.zeros((side, side), np.float32)
    right[:8, :8] = 1.0 + np.linspace(0, 1, 64).reshape(8, 8)      # the region is most salient
    wrong = 1.0 - right / right.max()                              # the region is least salient
    wrong[:8, :8] = 0.0
    flat_order = np.zeros((side, side), np.float32)                # ties -> row-major order
    model = RegionModel(region)
    result = M.deletion_insertion(model, images, np.stack([right, wrong, flat_order]), [0, 0, 0], steps=8,
                                  baseline=0.0, batch_size=5)
    np.testing.assert_allclose(result.fractions, np.arange(9) / 8)
    # right: the region (1/4 of the pixels) goes in the first two steps
    np.testing.assert_allclose(result.deletion[0], [1, 0.5, 0, 0, 0, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(result.insertion[0], [0, 0.5, 1, 1, 1, 1, 1, 1, 1], atol=1e-5)
    assert result.deletion_auc[0] == pytest.approx(0.125, abs=1e-5)
    assert result.insertion_auc[0] == pytest.approx(0.875, abs=1e-5)
    # wrong: the region goes last
    assert result.deletion_auc[1] == pytest.approx(0.875, abs=1e-5)
    assert result.insertion_auc[1] == pytest.approx(0.125, abs=1e-5)
    # flat: row-major order removes 8 of the region's 64 pixels per 32-pixel step (rows 0-1, 2-3, ...)
    np.testing.assert_allclose(result.deletion[2][:5], [1, 0.75, 0.5, 0.25, 0], atol=1e-5)
    # batched; every variant once, the two end points (image, baseline) once per image
    assert all(b <= 5 for b in model.calls) and sum(model.calls) == 3 * (2 + 2 * 7)
    assert result.deletion_auc.min() >= 0.0 and result.insertion_auc.max() <= 1.0
    # several heatmaps per image ([N, R, H, W]) give the same curves, end points shared
    model.calls.clear()
    both = M.deletion_insertion(model, images[:2], np.stack([np.stack([right, wrong])] * 2), [0, 0], steps=8,
                                baseline=0.0, batch_size=7)
    assert both.deletion.shape == (2, 2, 9) and both.deletion_auc.shape == (2, 2)
    np.testing.assert_allclose(both.deletion[0], result.deletion[:2], atol=1e-6)
    np.testing.assert_allclose(both.insertion[1], result.insertion[:2], atol=1e-6)
    assert sum(model.calls) == 2 * (2 + 2 * 2 * 7)


def test_deletion_insertion_other_class_and_baselines():
    side = 16
    images = torch.zeros(1, 3, side, side)
    images[:, 0, :8, :8] = 1.0
    h = np.zeros((1, side, side), np.float32)
    h[0, :8, :8] = 1.0
    model = RegionModel((0, 8, 0, 8))
    result = M.deletion_insertion(model, images, h, [1], steps=4, baseline=0.0)
    assert result.deletion[0, 0] == pytest.approx(0.0, abs=1e-5)  # class 1 = 1 - p
    assert result.deletion[0, -1] == pytest.approx(1.0, abs=1e-5)
    # 'mean' baseline: the region is filled with the image's mean of channel 0 (1/4)
    mean_run = M.deletion_insertion(model, images, h, [0], steps=4, baseline="mean")
    assert mean_run.deletion[0, -1] == pytest.approx(0.25, abs=1e-5)
    assert mean_run.insertion[0, 0] == pytest.approx(0.25, abs=1e-5)
    blurred = M.baseline_images(images, "blur")
    assert blurred.shape == images.shape
    assert float(blurred[0, 0].sum()) == pytest.approx(float(images[0, 0].sum()), rel=0.05)  # blur keeps the mass
    assert 0.0 < float(blurred[0, 0, 7, 7]) < 1.0
    with pytest.raises(ValueError):
        M.baseline_images(images, "noise")
