"""MaxBoxAccV2 in the ``wsol`` protocol against clovaai/wsolevaluation's definition: golden cases worked out by
hand from its ``compute_bboxes_from_scoremaps`` + ``calculate_multiple_iou``, and a property test against a
straightforward per-threshold reimplementation of those two functions."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cams import boxacc as B


# ------------------------------------------------------------ wsolevaluation, written out threshold by threshold


def reference_boxes(scoremap: np.ndarray, thresholds) -> list[np.ndarray]:
    """wsolevaluation's ``compute_bboxes_from_scoremaps`` (``multi_contour_eval=True``) on a map in [0, 1]."""
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    out = []
    for threshold in thresholds:
        _, binary = cv2.threshold(src=image, thresh=int(threshold * np.max(image)), maxval=255,
                                  type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            out.append(np.asarray([[0, 0, 0, 0]]))
            continue
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        out.append(np.asarray(boxes))
    return out


def reference_iou(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``calculate_multiple_iou``."""
    a = box_a[:, None, :].astype(np.float64)
    b = box_b[None, :, :].astype(np.float64)
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denominator = area_a + area_b - inter
    degenerate = denominator <= 0
    return np.where(degenerate, 0.0, inter / np.where(degenerate, 1, denominator))


def normalize_scoremap(cam: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``normalize_scoremap`` (float32)."""
    cam = np.asarray(cam, dtype=np.float32).copy()
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def reference_curve(heatmap, inclusive_truth, thresholds) -> np.ndarray:
    boxes = reference_boxes(normalize_scoremap(heatmap), thresholds)
    truth = np.asarray(inclusive_truth).reshape(-1, 4)
    return np.array([reference_iou(b, truth).max() for b in boxes])


def to_half_open(inclusive) -> list[tuple[float, ...]]:
    return [(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in np.asarray(inclusive).reshape(-1, 4)]


# ------------------------------------------------------------------------------------------------- golden


def best(heatmap, boxes) -> float:
    return float(B.best_iou_curve(heatmap, boxes, protocol="wsol").max())


def test_issue_3x6_map_one_peak_and_three_faint_pixels():
    h = np.zeros((3, 6))
    h[1, 1] = 1.0
    h[1, 2:5] = 0.003  # below 1/255 of the maximum: 0 in 8 bits
    assert best(h, (1, 1, 5, 2)) == pytest.approx(1 / 3)
    assert float(B.best_iou_curve(h, (1, 1, 5, 2), protocol="pfcam").max()) == 1.0  # pfcam's own protocol


def test_block_inside_the_map_is_one_pixel_too_big():
    h = np.zeros((5, 5))
    h[1:3, 1:3] = 1.0
    assert best(h, (1, 1, 3, 3)) == pytest.approx(4 / 9)


def test_block_at_the_right_edge_is_clipped():
    h = np.zeros((4, 4))
    h[1:3, 2:4] = 1.0
    assert best(h, (2, 1, 4, 3)) == pytest.approx(2 / 3)


def test_flat_map_is_the_origin_box_at_every_threshold():
    curve = B.best_iou_curve(np.zeros((4, 4)), (0, 0, 1, 1), protocol="wsol")
    assert np.all(curve == 1.0)
    assert np.all(B.best_iou_curve(np.full((4, 4), 7.0), (1, 1, 3, 3), protocol="wsol") == 0.0)
    assert np.all(B.best_iou_curve(np.zeros((4, 4)), (0, 0, 1, 1), protocol="pfcam") == 0.0)


def test_map_with_a_hole_scores_the_hole_contour():
    h = np.zeros((12, 12))
    h[1:10, 1:10] = 1.0
    h[3:7, 3:7] = 0.0  # the hole's contour runs on the ring pixels around it: cols/rows 2..7
    # the hole contour's box is (2, 2, 2 + 6, 2 + 6) inclusive: 7 x 7 pixels; GT those pixels
    assert best(h, (2, 2, 9, 9)) == pytest.approx(1.0)
    # the outer contour: (1, 1, 10, 10) inclusive, 10 x 10
    assert best(h, (1, 1, 11, 11)) == pytest.approx(1.0)


def test_several_ground_truth_boxes_take_the_best():
    h = np.zeros((10, 10))
    h[6:8, 6:8] = 1.0  # box (6, 6, 8, 8) inclusive: 3 x 3
    far, near = (0, 0, 2, 2), (6, 6, 9, 9)  # half-open; near is (6, 6, 8, 8) inclusive
    assert best(h, [far, near]) == pytest.approx(1.0)
    assert best(h, [far]) == 0.0


def test_threshold_cut_is_eight_bit_and_relative_to_the_eight_bit_max():
    h = np.array([[0.0, 0.5, 1.0]])
    thresholds = B.thresholds_for("wsol")
    curve = B.best_iou_curve(h, (1, 0, 3, 1), thresholds, protocol="wsol")
    expected = reference_curve(h, [[1, 0, 2, 0]], thresholds)
    np.testing.assert_array_equal(curve, expected)


def test_thresholds_and_steps():
    assert len(B.thresholds_for("wsol", 0.01)) == 100 and len(B.thresholds_for("wsol", 0.001)) == 1000
    assert B.thresholds_for("wsol", 0.001) == tuple(np.arange(0, 1, 0.001))
    assert B.thresholds_for("pfcam") == B.THRESHOLDS
    with pytest.raises(ValueError):
        B.best_iou_curve(np.zeros((3, 3)), (0, 0, 1, 1), protocol="voc")


def test_max_box_acc_of_wsol_curves():
    h = np.zeros((5, 5))
    h[1:3, 1:3] = 1.0
    acc = B.MaxBoxAccumulator()  # the wsol protocol by default
    acc.add(h, (1, 1, 3, 3))
    result = acc.result()
    assert result.box_acc == {0.3: 1.0, 0.5: 0.0, 0.7: 0.0}
    pf = B.MaxBoxAccumulator(protocol="pfcam")
    pf.add(h, (1, 1, 3, 3))
    assert pf.result().value == 1.0


# ----------------------------------------------------------------------------------------------- property


def random_maps(seed: int):
    rng = np.random.default_rng(seed)
    for index in range(40):
        height, width = rng.integers(3, 40, size=2)
        kind = index % 4
        if kind == 0:
            h = rng.random((height, width))
        elif kind == 1:  # smooth blobs with plateaus (upsampled coarse maps)
            coarse = rng.random((max(1, height // 6), max(1, width // 6))).astype(np.float32)
            h = cv2.resize(coarse, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
        elif kind == 2:  # sparse: mostly zero, a few levels
            h = rng.choice([0.0, 0.0, 0.0, 0.2, 0.6, 1.0], size=(height, width))
        else:  # ReLU'd with values near the 8-bit cut
            h = np.clip(rng.normal(size=(height, width)), 0, None) ** 3
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            x0, x1 = sorted(rng.integers(0, width, size=2))
            y0, y1 = sorted(rng.integers(0, height, size=2))
            boxes.append((int(x0), int(y0), int(x1), int(y1)))  # inclusive corners
        yield h.astype(np.float32), boxes


@pytest.mark.parametrize("step", [0.01, 0.001])
def test_wsol_protocol_equals_wsolevaluation_per_threshold(step):
    thresholds = B.thresholds_for("wsol", step)
    for index, (heatmap, inclusive) in enumerate(random_maps(int(step * 1000))):
        expected = reference_curve(heatmap, inclusive, thresholds)
        swept = B.best_iou_curve(heatmap, to_half_open(inclusive), thresholds, protocol="wsol")
        np.testing.assert_allclose(swept, expected, rtol=0, atol=1e-12, err_msg=f"map {index}")
        found, owner = B.threshold_boxes(heatmap, thresholds, protocol="wsol")
        traced = B.curve_from_boxes(found, owner, to_half_open(inclusive), len(thresholds), protocol="wsol")
        np.testing.assert_allclose(traced, expected, rtol=0, atol=1e-12, err_msg=f"map {index} (traced)")
