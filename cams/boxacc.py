"""MaxBoxAccV2 (Choe et al., "Evaluating weakly supervised object localization methods right", CVPR 2020):
box accuracy without a hand-picked threshold.

For every threshold ``t`` of a sweep (default 0, 0.01, ..., 0.99, Choe et al.'s ``cam_curve_interval``), the
heatmap is min-max normalised and cut at ``> t``; *every* contour of the result (``cv2.findContours`` with
``RETR_TREE``, so the outlines of holes too) gives a box. An image counts as correct at threshold ``t`` and IoU
level ``delta`` when any of its boxes matches any ground-truth box with IoU >= ``delta``.
``BoxAcc(delta)`` is the share of correct images at the best single threshold for the whole set (the maximum
over ``t`` of the mean over images), and **MaxBoxAccV2** the mean of ``BoxAcc`` over ``delta`` in
{0.3, 0.5, 0.7}. A flat heatmap has no contour and is never correct.

Against :func:`cams.metrics.box_accuracy` (the CAM protocol: the largest component only, IoU >= 0.5, a
threshold chosen on a validation split) it takes every component, three IoU levels and the best threshold on the
evaluated set itself, which is what makes it comparable across methods whose maps need different thresholds.

Geometry is :mod:`cams.metrics`' (half-open pixel boxes ``(x0, y0, x1, y1)``); Choe et al.'s code quantises the
map to 8 bits and counts box sides inclusively (+1 px), details that move no box by more than a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from cams import metrics as M

IOU_LEVELS: tuple[float, ...] = (0.3, 0.5, 0.7)
THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(100))

__all__ = ["IOU_LEVELS", "THRESHOLDS", "MaxBoxAcc", "heatmap_boxes", "component_boxes", "threshold_boxes", "curve_from_boxes", "best_iou_curve",
           "max_box_acc", "MaxBoxAccumulator"]


def _normalised(heatmap) -> np.ndarray:
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap [H, W], got shape {h.shape}")
    h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(h.min()), float(h.max())
    return np.zeros_like(h) if high <= low else (h - low) / (high - low)


def heatmap_boxes(heatmap, threshold: float, normalised: bool = False) -> list[M.Box]:
    """Boxes around every contour of ``min-max(heatmap) > threshold`` (none for a flat heatmap).
    ``normalised=True`` says the heatmap is already min-max normalised."""
    h = np.asarray(heatmap, dtype=np.float64) if normalised else _normalised(heatmap)
    binary = (h > float(threshold)).astype(np.uint8)
    if not binary.any():
        return []
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    for contour in contours:
        x, y, w, hh = cv2.boundingRect(contour)
        boxes.append((float(x), float(y), float(x + w), float(y + hh)))
    return boxes


def component_boxes(binary: np.ndarray) -> np.ndarray:
    """``[P, 4]`` float boxes: exactly the bounding boxes of ``cv2.findContours(binary, RETR_TREE)``'s contours,
    from two connected-component passes instead of contour tracing (several times faster on maps with thousands of
    contours, such as uniform noise). Outer borders are the 8-connected foreground components' boxes; each hole
    (a 4-connected background component that does not touch the image edge) is bordered by the foreground pixels
    4-adjacent to it, whose box is the hole's grown by one pixel on every side."""
    binary = np.ascontiguousarray(binary, dtype=np.uint8)
    height, width = binary.shape
    _, _, outer, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    _, _, holes, _ = cv2.connectedComponentsWithStats(1 - binary, connectivity=4)
    outer, holes = outer[1:], holes[1:]  # label 0: the other value's pixels
    inside = holes[(holes[:, 0] > 0) & (holes[:, 1] > 0) & (holes[:, 0] + holes[:, 2] < width)
                   & (holes[:, 1] + holes[:, 3] < height)]
    x, y, w, h = (outer[:, k].astype(np.float64) for k in range(4))
    hx, hy, hw, hh = (inside[:, k].astype(np.float64) for k in range(4))
    return np.concatenate([np.stack([x, y, x + w, y + h], axis=1),
                           np.stack([hx - 1, hy - 1, hx + hw + 1, hy + hh + 1], axis=1)]).reshape(-1, 4)


def _iou_matrix(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every box [P, 4] against every ground-truth box [G, 4] -> [P, G] (as :func:`cams.metrics.box_iou`)."""
    x0 = np.maximum(boxes[:, None, 0], truth[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], truth[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], truth[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], truth[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    union = area(boxes)[:, None] + area(truth)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


DENSE_CONTOURS = 64  # above this many contours at one threshold, the component passes are faster than tracing


def threshold_boxes(heatmap, thresholds: Sequence[float] = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Every contour box at every threshold: ``(boxes [P, 4], threshold index [P])``. Maps with many contours
    (noise) switch from contour tracing to :func:`component_boxes` (the same boxes)."""
    h = _normalised(heatmap)
    found: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    dense = False
    for j, threshold in enumerate(thresholds):
        if dense:
            boxes_j = component_boxes(h > float(threshold))
        else:
            boxes_j = np.asarray(heatmap_boxes(h, threshold, normalised=True), dtype=np.float64).reshape(-1, 4)
            dense = len(boxes_j) > DENSE_CONTOURS
        found.append(boxes_j)
        owner.append(np.full(len(boxes_j), j))
    return np.concatenate(found), np.concatenate(owner)


def curve_from_boxes(found: np.ndarray, owner: np.ndarray, boxes: M.Boxes, count: int = len(THRESHOLDS)
                     ) -> np.ndarray:
    """``[count]``: per threshold index, the best IoU of the ``found`` boxes (:func:`threshold_boxes`) with any
    ground-truth box."""
    truth = np.asarray(M.as_boxes(boxes), dtype=np.float64).reshape(-1, 4)
    curve = np.zeros(count, dtype=np.float64)
    if len(found) and len(truth):  # one IoU computation for the boxes of every threshold
        np.maximum.at(curve, owner, _iou_matrix(found, truth).max(axis=1))
    return curve


def best_iou_curve(heatmap, boxes: M.Boxes, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """``[T]``: at each threshold, the best IoU of any contour box with any ground-truth box (0 without either).
    One union-find sweep over the pixels (:func:`cams.metrics_sweep.best_iou_curve`) gives what
    :func:`threshold_boxes` and :func:`curve_from_boxes` give threshold by threshold."""
    from cams import metrics_sweep as sweep  # numba: imported when first needed

    truth = np.asarray(M.as_boxes(boxes), dtype=np.float64).reshape(-1, 4)
    if not len(truth):
        return np.zeros(len(thresholds), dtype=np.float64)
    cuts = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(cuts, kind="stable")  # the sweep takes them ascending; each value's curve point is its own
    curve = np.empty(len(cuts), dtype=np.float64)
    curve[order] = sweep.best_iou_curve(_normalised(heatmap), truth, cuts[order])
    return curve


@dataclass
class MaxBoxAcc:
    """``box_acc[delta]``: the share of images correct at the best threshold ``threshold[delta]``;
    ``value``: MaxBoxAccV2, the mean of ``box_acc`` over the IoU levels."""

    box_acc: dict[float, float]
    threshold: dict[float, float]
    n: int

    @property
    def value(self) -> float:
        return float(np.mean(list(self.box_acc.values())))


def max_box_acc(curves, thresholds: Sequence[float] = THRESHOLDS,
                iou_levels: Sequence[float] = IOU_LEVELS) -> MaxBoxAcc:
    """MaxBoxAccV2 from per-image best-IoU curves ``[N, T]`` (:func:`best_iou_curve`); ties between thresholds go
    to the lowest one."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] != len(thresholds):
        raise ValueError(f"curves must be [N, {len(thresholds)}], got {curves.shape}")
    if not len(curves):
        raise ValueError("no images to score")
    box_acc, chosen = {}, {}
    for level in iou_levels:
        accuracy = (curves >= float(level)).mean(axis=0)
        best = int(np.argmax(accuracy))
        box_acc[float(level)], chosen[float(level)] = float(accuracy[best]), float(thresholds[best])
    return MaxBoxAcc(box_acc, chosen, int(len(curves)))


@dataclass
class MaxBoxAccumulator:
    """Collects images one at a time (``add``) and scores them together (``result``)."""

    thresholds: Sequence[float] = THRESHOLDS
    iou_levels: Sequence[float] = IOU_LEVELS
    curves: list[np.ndarray] = field(default_factory=list)

    def add(self, heatmap, boxes: M.Boxes) -> None:
        self.curves.append(best_iou_curve(heatmap, boxes, self.thresholds))

    def result(self) -> MaxBoxAcc | None:
        return max_box_acc(np.stack(self.curves), self.thresholds, self.iou_levels) if self.curves else None
