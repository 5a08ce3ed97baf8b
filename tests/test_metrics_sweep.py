"""The one-pass threshold sweeps give exactly what the per-threshold computations give: MaxBoxAccV2's curve (every
contour box at every threshold, traced by OpenCV) and the validation's largest-component boxes (one labelling per
fraction), on random, flat, multi-component, hole-ridden and tie-heavy maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cams import boxacc as B
from cams import metrics as M
from cams.metrics_sweep import largest_component_boxes


def _smooth(rng, grid: int, side: int) -> np.ndarray:
    """A CAM-like map: a random grid, bilinearly upsampled."""
    cells = torch.from_numpy(rng.random((1, 1, grid, grid)).astype(np.float32))
    return torch.nn.functional.interpolate(cells, (side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def _blobs(rng, height: int, width: int) -> np.ndarray:
    """Several separate plateaus of a few levels, some with holes."""
    h = np.zeros((height, width))
    for _ in range(5):
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        dy, dx = rng.integers(3, 12), rng.integers(3, 12)
        h[y:y + dy, x:x + dx] = rng.choice([0.25, 0.5, 1.0])
        if dy > 4 and dx > 4:
            h[y + 2:y + dy - 2, x + 2:x + dx - 2] = 0.0
    return h


def _maps() -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    maps = [_smooth(rng, grid, side) for grid, side in ((4, 64), (8, 64), (7, 50))]
    maps += [rng.random((48, 40)).astype(np.float32), rng.random((1, 30)), rng.random((25, 1))]  # noise, 1-px strips
    maps += [np.round(rng.random((33, 29)) * 3) / 3 for _ in range(3)]      # ties: a few values, many equal pixels
    maps += [(rng.random((24, 24)) > 0.5).astype(np.float64) for _ in range(2)]  # binary noise: holes in holes
    maps += [_blobs(rng, 40, 52) for _ in range(3)]
    maps += [np.zeros((12, 12)), np.full((9, 9), 0.7), -rng.random((16, 16))]  # flat, flat, all negative
    maps += [np.array([[np.nan, 1.0, 0.2], [np.inf, 0.5, -np.inf], [0.3, 0.3, 0.9]])]  # non-finite values
    return maps


def _truth(rng, height: int, width: int) -> list[tuple[float, float, float, float]]:
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
        boxes.append((x0, y0, rng.uniform(x0 + 0.5, max(width, x0 + 1)), rng.uniform(y0 + 0.5, max(height, y0 + 1))))
    return boxes


def _contour_curve(heatmap, boxes, thresholds) -> np.ndarray:
    """The definition, threshold by threshold: every ``cv2.findContours`` box, the best IoU with the truth."""
    truth = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    curve = np.zeros(len(thresholds))
    for j, threshold in enumerate(thresholds):
        found = np.asarray(B.heatmap_boxes(heatmap, threshold), dtype=np.float64).reshape(-1, 4)
        if len(found):
            curve[j] = B._iou_matrix(found, truth).max()
    return curve


@pytest.mark.parametrize("index", range(len(_maps())))
def test_best_iou_curve_equals_the_per_threshold_contours(index):
    heatmap = _maps()[index]
    rng = np.random.default_rng(index)
    boxes = _truth(rng, *heatmap.shape)
    swept = B.best_iou_curve(heatmap, boxes, protocol="pfcam")
    assert np.array_equal(swept, _contour_curve(heatmap, boxes, B.THRESHOLDS))
    cached = B.curve_from_boxes(*B.threshold_boxes(heatmap, protocol="pfcam"), boxes, protocol="pfcam")
    assert np.array_equal(swept, cached)  # the cached path's
    if index < 3:
        assert swept.max() > 0  # the CAM-like maps meet their boxes somewhere


def test_best_iou_curve_takes_thresholds_in_any_order_and_without_truth():
    heatmap = _maps()[1]
    boxes = [(10.0, 12.0, 40.0, 50.0)]
    thresholds = [0.9, 0.1, 0.5, 0.5, 0.0]
    assert np.array_equal(B.best_iou_curve(heatmap, boxes, thresholds, protocol="pfcam"),
                          _contour_curve(heatmap, boxes, thresholds))
    assert np.array_equal(B.best_iou_curve(heatmap, None), np.zeros(len(B.THRESHOLDS)))


@pytest.mark.parametrize("index", range(len(_maps())))
def test_largest_component_boxes_equal_heatmap_box_per_fraction(index):
    heatmap = _maps()[index]
    fractions = M.DEFAULT_THRESHOLDS + (0.0, 1.0, 0.33)  # unsorted tail, both ends
    expected = [M.heatmap_box(heatmap, fraction) for fraction in fractions]
    assert largest_component_boxes(M._heatmap(heatmap), fractions, M.heatmap_box) == expected


def test_ties_for_the_largest_component_go_to_the_labelling_order():
    h = np.zeros((20, 20))
    h[2:5, 12:15] = 1.0  # two 9-pixel squares; OpenCV labels in 2 x 2 blocks, so the lower left one comes first
    h[3:6, 1:4] = 1.0
    calls = []

    def labelled(heatmap, fraction):
        calls.append(fraction)
        return M.heatmap_box(heatmap, fraction)

    assert largest_component_boxes(h, [0.5], labelled) == [M.heatmap_box(h, 0.5)] == [(1.0, 3.0, 4.0, 6.0)]
    assert calls == [0.5]


def test_choose_threshold_sees_the_per_fraction_accuracies():
    rng = np.random.default_rng(3)
    maps = [_smooth(rng, 6, 48) for _ in range(6)] + [_blobs(rng, 48, 48)]
    boxes = [_truth(rng, 48, 48) for _ in maps]
    per_fraction = np.array([[M.box_accuracy(h, b, f) for f in M.DEFAULT_THRESHOLDS] for h, b in zip(maps, boxes)])
    assert np.array_equal(M.box_accuracy_curve(maps, boxes), per_fraction.mean(axis=0))
