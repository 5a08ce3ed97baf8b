"""MaxBoxAccV2 on hand-made heatmaps whose answers are worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from cams import boxacc as B
from cams import metrics as M


def pyramid(side: int = 101) -> np.ndarray:
    """1 at the centre pixel, falling by one step per ring (Chebyshev distance): cut at any level, a square."""
    c = side // 2
    y, x = np.mgrid[:side, :side]
    return 1.0 - np.maximum(abs(y - c), abs(x - c)) / (c + 1)


def centred(width: int, height: int, side: int = 101) -> tuple[float, float, float, float]:
    c = side // 2
    return (c - width // 2, c - height // 2, c + width // 2 + 1, c + height // 2 + 1)


def test_boxes_around_every_contour():
    h = np.zeros((60, 80))
    h[5:15, 10:30] = 0.5      # a large blob off the object
    h[40:46, 60:70] = 1.0     # a small peak on it
    assert sorted(B.heatmap_boxes(h, 0.3)) == [(10.0, 5.0, 30.0, 15.0), (60.0, 40.0, 70.0, 46.0)]
    assert B.heatmap_boxes(h, 0.5) == [(60.0, 40.0, 70.0, 46.0)]  # strictly above the threshold
    assert B.heatmap_boxes(np.zeros((8, 8)), 0.0) == [] and B.heatmap_boxes(np.full((8, 8), 3.0), 0.0) == []
    # the largest-component rule of metrics.box_accuracy takes the blob and misses; every contour finds the peak
    truth = (60, 40, 70, 46)
    assert not M.box_accuracy(h, truth, 0.3)
    assert B.best_iou_curve(h, truth, [0.3], protocol="pfcam")[0] == 1.0
    ring = np.zeros((30, 30))
    ring[5:25, 5:25] = 1.0
    ring[10:20, 10:20] = 0.0  # a hole: its outline is a contour of its own
    assert len(B.heatmap_boxes(ring, 0.5)) == 2 and (5.0, 5.0, 25.0, 25.0) in B.heatmap_boxes(ring, 0.5)


def test_box_shaped_map_scores_one_everywhere():
    h = np.zeros((100, 100))
    h[30:70, 20:60] = 0.8
    curve = B.best_iou_curve(h, (20, 30, 60, 70), protocol="pfcam")
    assert curve.shape == (100,) and np.all(curve == 1.0)
    result = B.max_box_acc(curve[None])
    assert result.box_acc == {0.3: 1.0, 0.5: 1.0, 0.7: 1.0} and result.value == 1.0
    assert result.threshold == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}  # ties go to the lowest threshold


def test_best_threshold_of_a_pyramid_against_a_wide_box():
    # Squares of odd side s against a centred 41 x 21 box: IoU = 21 s / (s^2 + 861 - 21 s), best at s = 29
    # (609 / 1093 = 0.557), reached at thresholds 0.71: correct at IoU 0.3 and 0.5, never at 0.7.
    curve = B.best_iou_curve(pyramid(), centred(41, 21), protocol="pfcam")
    assert curve.max() == pytest.approx(609 / 1093)
    assert curve[71] == pytest.approx(609 / 1093)
    result = B.max_box_acc(curve[None])
    assert result.box_acc == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    assert result.value == pytest.approx(2 / 3)


def test_one_threshold_for_the_whole_set():
    # A large object needs a low threshold, a small one a high threshold: at IoU 0.7 no single threshold serves
    # both, so BoxAcc(0.7) is 1/2, though each image alone could reach IoU 1.
    large = B.best_iou_curve(pyramid(), centred(61, 61), protocol="pfcam")
    small = B.best_iou_curve(pyramid(), centred(11, 11), protocol="pfcam")
    assert large.max() == 1.0 and small.max() == 1.0
    assert not np.any((large >= 0.7) & (small >= 0.7))
    result = B.max_box_acc(np.stack([large, small]))
    assert result.box_acc[0.7] == 0.5
    assert result.n == 2


def test_any_ground_truth_box_counts_and_the_accumulator():
    h = np.zeros((50, 50))
    h[10:20, 10:20] = 1.0
    acc = B.MaxBoxAccumulator(protocol="pfcam")
    assert acc.result() is None
    acc.add(h, [(30, 30, 45, 45), (10, 10, 20, 20)])  # matches the second object
    acc.add(np.zeros((50, 50)), (10, 10, 20, 20))     # flat: never correct
    acc.add(h, [])                                    # no ground truth: never correct
    result = acc.result()
    assert result.box_acc == {0.3: 1 / 3, 0.5: 1 / 3, 0.7: 1 / 3}
    with pytest.raises(ValueError):
        B.max_box_acc(np.zeros((2, 5)))


def _contour_boxes(binary: np.ndarray) -> list[tuple[int, ...]]:
    import cv2

    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return sorted((x, y, x + w, y + h) for x, y, w, h in (cv2.boundingRect(c) for c in contours))


def test_component_boxes_equal_the_contour_boxes():
    """Outer components + holes give exactly findContours' boxes: noise, smooth maps, rings, full and empty."""
    import torch
    import torch.nn.functional as F

    from cams.boxacc import component_boxes

    rng = np.random.default_rng(1)
    ring = np.zeros((9, 9), np.uint8)
    ring[1:8, 1:8] = 1
    ring[3:6, 3:6] = 0
    ring[4, 4] = 1  # an island in the hole
    cases = [ring, np.ones((6, 7), np.uint8), np.zeros((5, 5), np.uint8)]
    for trial in range(60):
        size = int(rng.integers(5, 40))
        if trial % 2:
            heat = rng.random((size, size))
        else:
            grid = torch.rand(1, 1, int(rng.integers(2, 8)), int(rng.integers(2, 8)))
            heat = F.interpolate(grid, size=(size, size + 3), mode="bilinear").numpy()[0, 0]
        cases += [(heat > t).astype(np.uint8) for t in (0.0, 0.3, 0.6, 0.9)]
    for binary in cases:
        assert sorted(tuple(int(v) for v in box) for box in component_boxes(binary)) == _contour_boxes(binary)


def test_noise_curve_is_the_contour_curve():
    """A map dense in contours switches to component boxes; the curve is what tracing every threshold gives."""
    heat = np.random.default_rng(3).random((48, 48))
    truth = (4.0, 6.0, 30.0, 40.0)
    expected = [max((M.box_iou(box, truth) for box in _contour_boxes((heat > t).astype(np.uint8))), default=0.0)
                for t in B.THRESHOLDS]
    np.testing.assert_allclose(B.best_iou_curve(heat, [truth], protocol="pfcam"), expected, atol=1e-12)
