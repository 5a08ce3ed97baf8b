"""MaxBoxAccV2 (Choe et al., "Evaluating weakly supervised object localization methods right", CVPR 2020):
box accuracy without a hand-picked threshold, in two named protocols (``protocol=``).

For every threshold ``t`` of a sweep (0, 0.01, ..., 0.99 by default; ``step=0.001`` is wsolevaluation's own
``cam_curve_interval`` default), the heatmap is min-max normalised and cut at ``t``; *every* contour of the result
(``cv2.findContours`` with ``RETR_TREE``, so the outlines of holes too) gives a box. An image counts as correct at
threshold ``t`` and IoU level ``delta`` when any of its boxes matches any ground-truth box with IoU >= ``delta``.
``BoxAcc(delta)`` is the share of correct images at the best single threshold for the whole set (the maximum
over ``t`` of the mean over images), and **MaxBoxAccV2** the mean of ``BoxAcc`` over ``delta`` in
{0.3, 0.5, 0.7}.

Protocols:

* ``"wsol"`` (the default): clovaai/wsolevaluation's ``compute_bboxes_from_scoremaps`` +
  ``calculate_multiple_iou`` exactly. The normalised map (float32, as its ``normalize_scoremap``) is quantised to
  8 bits, ``uint8(map * 255)``, and cut at ``> int(t * max)``; a contour's ``cv2.boundingRect`` ``(x, y, w, h)``
  becomes the *inclusive* box ``(x, y, min(x + w, W - 1), min(y + h, H - 1)``) (one pixel wider and taller than
  the contour, except at the right/bottom edge); IoUs count pixels inclusively (``x1 - x0 + 1``); a threshold
  that leaves no pixel (a flat map at every threshold) gives the box ``[0, 0, 0, 0]``, the origin pixel, which
  is scored like any box. Thresholds are ``np.arange(0, 1, step)``. Ground truth, given as pfcam's half-open
  boxes, is read inclusively as ``(x0, y0, x1 - 1, y1 - 1)``. These are the numbers of the WSOL literature.
* ``"pfcam"``: the float map cut at ``> t`` (no quantisation), the contour's box half-open
  ``(x, y, x + w, y + h)`` (exactly the pixels it covers), the plain IoU of :func:`cams.metrics.box_iou`, and no
  box at all when nothing passes (a flat map is never correct). It is geometrically consistent with the rest of
  pfcam, but it is *not* the published quantity: a box differs by a pixel on each right/bottom side, the 8-bit
  cut drops values below 1/255 of the maximum, so per-image best IoUs differ by up to 0.25 and set-level
  MaxBoxAccV2 by a few points (``tests/test_boxacc_wsol.py`` has the minimal cases).

Against :func:`cams.metrics.box_accuracy` (the CAM protocol: the largest component only, IoU >= 0.5, a
threshold chosen on a validation split) it takes every component, three IoU levels and the best threshold on the
evaluated set itself, which is what makes it comparable across methods whose maps need different thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence

import cv2
import numpy as np

from cams import metrics as M

IOU_LEVELS: tuple[float, ...] = (0.3, 0.5, 0.7)
THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(100))
PROTOCOLS: tuple[str, ...] = ("wsol", "pfcam")
DEFAULT_PROTOCOL = "wsol"
STEPS: tuple[float, ...] = (0.01, 0.001)  # wsolevaluation's cam_curve_interval (its code's default: 0.001)
PROTOCOL_LABELS = {"wsol": "wsolevaluation protocol", "pfcam": "pfcam protocol"}

__all__ = ["IOU_LEVELS", "THRESHOLDS", "PROTOCOLS", "DEFAULT_PROTOCOL", "STEPS", "PROTOCOL_LABELS", "MaxBoxAcc",
           "thresholds_for", "check_protocol", "wsol_scoremap", "wsol_truth", "wsol_iou_matrix", "heatmap_boxes",
           "component_boxes", "threshold_boxes", "curve_from_boxes", "best_iou_curve", "max_box_acc",
           "MaxBoxAccumulator"]


def check_protocol(protocol: str) -> str:
    """``protocol`` when it is one of :data:`PROTOCOLS`, else a ValueError."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
    return protocol


def thresholds_for(protocol: str = DEFAULT_PROTOCOL, step: float = 0.01) -> tuple[float, ...]:
    """The threshold sweep of a protocol: wsolevaluation's ``np.arange(0, 1, step)`` (its floats as they are) for
    ``"wsol"``; ``0, step, ..`` rounded for ``"pfcam"`` (:data:`THRESHOLDS` at 0.01)."""
    check_protocol(protocol)
    if not 0.0 < float(step) < 1.0:
        raise ValueError(f"step must lie in (0, 1); got {step}")
    if protocol == "wsol":
        return tuple(float(t) for t in np.arange(0, 1, float(step)))
    count = int(round(1.0 / float(step)))
    return tuple(round(float(step) * i, 6) for i in range(count))


def wsol_scoremap(heatmap) -> np.ndarray:
    """The 8-bit map wsolevaluation thresholds: min-max normalised in float32 (``normalize_scoremap``; a flat map
    becomes zeros), times 255, truncated to uint8. Non-finite values count as 0."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if h.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap [H, W], got shape {h.shape}")
    if h.min() == h.max():
        return np.zeros(h.shape, dtype=np.uint8)
    h = h - h.min()
    h /= h.max()
    return (h * 255).astype(np.uint8)


def wsol_truth(boxes: M.Boxes) -> np.ndarray:
    """pfcam's half-open boxes ``[G, 4]`` as wsolevaluation's inclusive corners ``(x0, y0, x1 - 1, y1 - 1)``."""
    truth = np.asarray(M.as_boxes(boxes), dtype=np.float64).reshape(-1, 4)
    return truth - np.array([0.0, 0.0, 1.0, 1.0])


def wsol_iou_matrix(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``calculate_multiple_iou``: inclusive boxes ``[P, 4]`` x ``[G, 4]`` -> ``[P, G]``, areas
    ``(x1 - x0 + 1) (y1 - y0 + 1)``, 0 where the union is not positive."""
    boxes, truth = np.asarray(boxes, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    x0 = np.maximum(boxes[:, None, 0], truth[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], truth[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], truth[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], truth[None, :, 3])
    inter = np.maximum(0, x1 - x0 + 1) * np.maximum(0, y1 - y0 + 1)
    area = lambda b: (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # noqa: E731
    union = area(boxes)[:, None] + area(truth)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _wsol_cuts(scoremap: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """wsolevaluation's integer cut per threshold: ``int(t * max(scoremap))``."""
    return np.floor(np.asarray(thresholds, dtype=np.float64) * float(scoremap.max()))  # int() of a value >= 0


def _wsol_box(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Half-open contour boxes ``[P, 4]`` -> wsolevaluation's ``(x, y, min(x + w, W - 1), min(y + h, H - 1))``."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 2] = np.minimum(out[:, 2], shape[1] - 1)
    out[:, 3] = np.minimum(out[:, 3], shape[0] - 1)
    return out


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


def threshold_boxes(heatmap, thresholds: Sequence[float] | None = None, protocol: str = DEFAULT_PROTOCOL
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every contour box at every threshold: ``(boxes [P, 4], threshold index [P])``, in the protocol's box
    convention (``"wsol"``: inclusive, edge-clipped, ``[0, 0, 0, 0]`` for a threshold with no contour). Maps with
    many contours (noise) switch from contour tracing to :func:`component_boxes` (the same boxes)."""
    check_protocol(protocol)
    thresholds = thresholds_for(protocol) if thresholds is None else thresholds
    if protocol == "wsol":
        scoremap = wsol_scoremap(heatmap)
        h, thresholds = scoremap.astype(np.float64), _wsol_cuts(scoremap, thresholds)
        found, owner = _threshold_boxes(h, thresholds)
        found = _wsol_box(found, scoremap.shape)
        empty = np.setdiff1d(np.arange(len(thresholds)), owner)  # no contour: wsolevaluation's [0, 0, 0, 0]
        order = np.argsort(np.concatenate([owner, empty]), kind="stable")
        return (np.concatenate([found, np.zeros((len(empty), 4))])[order],
                np.concatenate([owner, empty])[order])
    return _threshold_boxes(_normalised(heatmap), thresholds)


def _threshold_boxes(h: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
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


def curve_from_boxes(found: np.ndarray, owner: np.ndarray, boxes: M.Boxes, count: int = len(THRESHOLDS),
                     protocol: str = DEFAULT_PROTOCOL) -> np.ndarray:
    """``[count]``: per threshold index, the best IoU of the ``found`` boxes (:func:`threshold_boxes`, same
    ``protocol``) with any ground-truth box."""
    check_protocol(protocol)
    wsol = protocol == "wsol"
    truth = wsol_truth(boxes) if wsol else np.asarray(M.as_boxes(boxes), dtype=np.float64).reshape(-1, 4)
    curve = np.zeros(count, dtype=np.float64)
    if len(found) and len(truth):  # one IoU computation for the boxes of every threshold
        np.maximum.at(curve, owner, (wsol_iou_matrix if wsol else _iou_matrix)(found, truth).max(axis=1))
    return curve


def best_iou_curve(heatmap, boxes: M.Boxes, thresholds: Sequence[float] | None = None,
                   protocol: str = DEFAULT_PROTOCOL) -> np.ndarray:
    """``[T]``: at each threshold (default: :func:`thresholds_for` the protocol at step 0.01), the best IoU of any
    contour box with any ground-truth box (0 without ground truth), in ``protocol``'s conventions (module
    docstring). One union-find sweep over the pixels (:func:`cams.metrics_sweep.best_iou_curve`) gives what
    :func:`threshold_boxes` and :func:`curve_from_boxes` give threshold by threshold."""
    from cams import metrics_sweep as sweep  # numba: imported when first needed

    check_protocol(protocol)
    thresholds = thresholds_for(protocol) if thresholds is None else thresholds
    wsol = protocol == "wsol"
    truth = wsol_truth(boxes) if wsol else np.asarray(M.as_boxes(boxes), dtype=np.float64).reshape(-1, 4)
    if not len(truth):
        return np.zeros(len(thresholds), dtype=np.float64)
    if wsol:
        scoremap = wsol_scoremap(heatmap)
        h, cuts = scoremap.astype(np.float64), _wsol_cuts(scoremap, thresholds)
    else:
        h, cuts = _normalised(heatmap), np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(cuts, kind="stable")  # the sweep takes them ascending; each value's curve point is its own
    curve = np.empty(len(cuts), dtype=np.float64)
    curve[order] = sweep.best_iou_curve(h, truth, cuts[order], inclusive=wsol)
    if wsol:  # no pixel above the cut: wsolevaluation scores the box [0, 0, 0, 0]
        empty = cuts >= h.max()
        if empty.any():
            curve[empty] = wsol_iou_matrix(np.zeros((1, 4)), truth).max()
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


def max_box_acc(curves, thresholds: Sequence[float] | None = None,
                iou_levels: Sequence[float] = IOU_LEVELS) -> MaxBoxAcc:
    """MaxBoxAccV2 from per-image best-IoU curves ``[N, T]`` (:func:`best_iou_curve`; ``thresholds``, default
    0, 0.01, .., 0.99, only name the chosen ones); ties between thresholds go to the lowest one."""
    curves = np.asarray(curves, dtype=np.float64)
    thresholds = THRESHOLDS if thresholds is None else thresholds
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
    """Collects images one at a time (``add``) and scores them together (``result``), in ``protocol``; the
    thresholds default to the protocol's sweep at ``step``."""

    thresholds: Sequence[float] | None = None
    iou_levels: Sequence[float] = IOU_LEVELS
    curves: list[np.ndarray] = field(default_factory=list)
    protocol: str = DEFAULT_PROTOCOL
    step: float = 0.01

    def __post_init__(self) -> None:
        if self.thresholds is None:
            self.thresholds = thresholds_for(self.protocol, self.step)

    def add(self, heatmap, boxes: M.Boxes) -> None:
        self.curves.append(best_iou_curve(heatmap, boxes, self.thresholds, self.protocol))

    def result(self) -> MaxBoxAcc | None:
        return max_box_acc(np.stack(self.curves), self.thresholds, self.iou_levels) if self.curves else None
