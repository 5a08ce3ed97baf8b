"""Threshold sweeps in one pass: every threshold's connected components from a union-find over the pixels in
threshold order, instead of one labelling (or contour tracing) per threshold.

As the threshold falls, the foreground ``heatmap > t`` only grows: each pixel joins once, at the first threshold
that admits it, and merges with the components it touches. A component keeps its bounding box until it grows
or merges, so every component "version" is scored once, over the thresholds it lives through. Holes (the
background's 4-connected components away from the image edge) are swept the same way with the threshold rising.

The results equal the per-threshold computations they replace (tests/test_metrics_sweep.py):

* :func:`best_iou_curve`: :func:`cams.boxacc.best_iou_curve`'s per-threshold best IoU of any contour box (the
  8-connected foreground components and the holes grown by a pixel: the boxes of ``cv2.findContours`` with
  ``RETR_TREE``, see :func:`cams.boxacc.component_boxes`).
* :func:`largest_component_boxes`: :func:`cams.metrics.heatmap_box` at many fractions (the largest 8-connected
  component of ``heatmap >= fraction * max``); where two components tie for the largest, that fraction is left
  to ``heatmap_box`` itself, whose labelling order breaks the tie.

The kernels are compiled by numba (cached on disk after the first call) and release the GIL.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numba import njit

Box = tuple[float, float, float, float]

__all__ = ["best_iou_curve", "largest_component_boxes"]


@njit(cache=True, nogil=True)
def _find(parent, p):
    root = p
    while parent[root] != root:
        root = parent[root]
    while parent[p] != root:  # path compression
        parent[p], p = root, parent[p]
    return root


@njit(cache=True, nogil=True)
def _best_iou(x0, y0, x1, y1, truth, inclusive, width, height):
    """The best IoU of box (x0, y0, x1, y1) with any row of ``truth`` [G, 4], in the arithmetic of
    ``cams.boxacc._iou_matrix`` (the same float64 operations, so the same values); ``inclusive``: of
    ``cams.boxacc.wsol_iou_matrix`` for the box ``(x0, y0, min(x1, W - 1), min(y1, H - 1))`` (wsolevaluation)."""
    best = 0.0
    if inclusive:
        x1, y1 = min(x1, width - 1.0), min(y1, height - 1.0)
        for g in range(truth.shape[0]):
            ix = min(x1, truth[g, 2]) - max(x0, truth[g, 0]) + 1.0
            iy = min(y1, truth[g, 3]) - max(y0, truth[g, 1]) + 1.0
            inter = max(0.0, ix) * max(0.0, iy)
            area = (x1 - x0 + 1.0) * (y1 - y0 + 1.0)
            area_truth = (truth[g, 2] - truth[g, 0] + 1.0) * (truth[g, 3] - truth[g, 1] + 1.0)
            union = area + area_truth - inter
            iou = inter / union if union > 0 else 0.0
            if iou > best:
                best = iou
        return best
    for g in range(truth.shape[0]):
        ix = min(x1, truth[g, 2]) - max(x0, truth[g, 0])
        iy = min(y1, truth[g, 3]) - max(y0, truth[g, 1])
        inter = max(ix, 0.0) * max(iy, 0.0)
        area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
        area_truth = max(truth[g, 2] - truth[g, 0], 0.0) * max(truth[g, 3] - truth[g, 1], 0.0)
        union = area + area_truth - inter
        iou = inter / union if union > 0 else 0.0
        if iou > best:
            best = iou
    return best


@njit(cache=True, nogil=True)
def _pixel_order(entry, steps):
    """Pixels sorted by entry step (a counting sort; -1: never enters) -> (order, start of each step)."""
    starts = np.zeros(steps + 1, np.int64)
    for p in range(entry.shape[0]):
        if entry[p] >= 0:
            starts[entry[p] + 1] += 1
    for s in range(steps):
        starts[s + 1] += starts[s]
    order = np.empty(starts[steps], np.int64)
    fill = starts[:steps].copy()
    for p in range(entry.shape[0]):
        if entry[p] >= 0:
            order[fill[entry[p]]] = p
            fill[entry[p]] += 1
    return order, starts


@njit(cache=True, nogil=True)
def _neighbours(eight):
    if eight:
        return np.array([-1, -1, -1, 0, 0, 1, 1, 1]), np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    return np.array([-1, 0, 0, 1]), np.array([0, -1, 1, 0])


@njit(cache=True, nogil=True)
def _record(out, x0, y0, x1, y1, width, height, holes, truth, first, last, inclusive):
    """Score one component version over steps ``first..last``; a hole only away from the edge, grown by one."""
    if holes:
        if x0 == 0 or y0 == 0 or x1 == width or y1 == height:
            return
        x0, y0, x1, y1 = x0 - 1, y0 - 1, x1 + 1, y1 + 1
    iou = _best_iou(float(x0), float(y0), float(x1), float(y1), truth, inclusive, float(width), float(height))
    for s in range(first, last + 1):
        if iou > out[s]:
            out[s] = iou


@njit(cache=True, nogil=True)
def _iou_sweep(entry, height, width, steps, eight, holes, truth, inclusive):
    """``[steps]``: per step, the best IoU with ``truth`` of any component's box (``holes``: of any component
    away from the edge, grown by a pixel) of the pixels entered so far (``entry[p]``: the step pixel ``p`` joins
    at, -1 never)."""
    order, starts = _pixel_order(entry, steps)
    n = height * width
    parent = np.full(n, -1, np.int32)  # -1: not entered yet
    size = np.zeros(n, np.int32)
    x0, y0 = np.zeros(n, np.int32), np.zeros(n, np.int32)
    x1, y1 = np.zeros(n, np.int32), np.zeros(n, np.int32)
    born = np.zeros(n, np.int32)  # the step at which a root's box last changed
    dy, dx = _neighbours(eight)
    out = np.zeros(steps)
    for s in range(steps):
        for i in range(starts[s], starts[s + 1]):
            p = order[i]
            py = p // width
            px = p - py * width
            parent[p], size[p], born[p] = p, 1, s
            x0[p], y0[p], x1[p], y1[p] = px, py, px + 1, py + 1
            a = p  # the new pixel's root
            for k in range(dy.shape[0]):
                qy, qx = py + dy[k], px + dx[k]
                if qy < 0 or qy >= height or qx < 0 or qx >= width:
                    continue
                q = qy * width + qx
                if parent[q] < 0 or parent[q] == a:  # not entered, or already in the new pixel's component
                    continue
                b = _find(parent, q)
                if a == b:
                    continue
                if born[b] < s:  # a version that lived through earlier steps ends here
                    _record(out, x0[b], y0[b], x1[b], y1[b], width, height, holes, truth, born[b], s - 1, inclusive)
                if size[a] < size[b]:
                    a, b = b, a
                parent[b], size[a], born[a] = a, size[a] + size[b], s
                x0[a], y0[a] = min(x0[a], x0[b]), min(y0[a], y0[b])
                x1[a], y1[a] = max(x1[a], x1[b]), max(y1[a], y1[b])
    for p in range(n):
        if parent[p] == p:
            _record(out, x0[p], y0[p], x1[p], y1[p], width, height, holes, truth, born[p], steps - 1, inclusive)
    return out


@njit(cache=True, nogil=True)
def _largest_sweep(entry, height, width, steps):
    """Per step: the box [steps, 4] of the largest 8-connected component of the pixels entered so far, its area
    (0: none) and whether another component has the same area."""
    order, starts = _pixel_order(entry, steps)
    n = height * width
    parent = np.full(n, -1, np.int32)
    size = np.zeros(n, np.int32)
    x0, y0 = np.zeros(n, np.int32), np.zeros(n, np.int32)
    x1, y1 = np.zeros(n, np.int32), np.zeros(n, np.int32)
    dy, dx = _neighbours(True)
    boxes = np.zeros((steps, 4), np.int32)
    areas = np.zeros(steps, np.int32)
    tied = np.zeros(steps, np.bool_)
    best, largest, tie = -1, 0, False
    for s in range(steps):
        for i in range(starts[s], starts[s + 1]):
            p = order[i]
            py = p // width
            px = p - py * width
            parent[p], size[p] = p, 1
            x0[p], y0[p], x1[p], y1[p] = px, py, px + 1, py + 1
            root = p
            for k in range(8):
                qy, qx = py + dy[k], px + dx[k]
                if qy < 0 or qy >= height or qx < 0 or qx >= width or parent[qy * width + qx] < 0:
                    continue
                a, b = _find(parent, p), _find(parent, qy * width + qx)
                if a == b:
                    continue
                if size[a] < size[b]:
                    a, b = b, a
                parent[b], size[a] = a, size[a] + size[b]
                x0[a], y0[a] = min(x0[a], x0[b]), min(y0[a], y0[b])
                x1[a], y1[a] = max(x1[a], x1[b]), max(y1[a], y1[b])
                root = a
            # components only grow, so a component as large as the largest is the new largest or its twin
            if size[root] > largest:
                best, largest, tie = root, size[root], False
            elif size[root] == largest and root != best:
                tie = True
        if largest:
            boxes[s, 0], boxes[s, 1], boxes[s, 2], boxes[s, 3] = x0[best], y0[best], x1[best], y1[best]
        areas[s], tied[s] = largest, tie
    return boxes, areas, tied


@njit(cache=True, nogil=True)
def _curve(h, thresholds, truth, inclusive):
    height, width = h.shape
    steps = thresholds.shape[0]
    below = np.searchsorted(thresholds, h.ravel(), side="left")  # thresholds < value: foreground at 0..below-1
    # the foreground sweep runs from the highest threshold down (step T-below), the holes' upwards (step below)
    fg = _iou_sweep(np.where(below > 0, steps - below, -1), height, width, steps, True, False, truth, inclusive)
    holes = _iou_sweep(np.where(below < steps, below, -1), height, width, steps, False, True, truth, inclusive)
    return np.maximum(fg[::-1], holes)


def best_iou_curve(normalised: np.ndarray, truth: np.ndarray, thresholds: Sequence[float],
                   inclusive: bool = False) -> np.ndarray:
    """``[T]``: at each threshold (ascending), the best IoU of any box of ``cv2.findContours(normalised > t,
    RETR_TREE)`` with any row of ``truth`` [G, 4] (float64); ``normalised``: a min-max normalised [H, W] map (or
    wsolevaluation's 8-bit one as floats, with integer cuts). ``inclusive``: the boxes and IoU of the ``"wsol"``
    protocol (:func:`cams.boxacc.wsol_iou_matrix`, boxes clipped to W-1/H-1, ``truth`` inclusive); 0 where no
    pixel passes (the caller scores wsolevaluation's ``[0, 0, 0, 0]`` there)."""
    h = np.ascontiguousarray(normalised, dtype=np.float64)
    t = np.ascontiguousarray(thresholds, dtype=np.float64)
    if h.ndim != 2 or np.any(np.diff(t) < 0):
        raise ValueError("best_iou_curve needs a 2-D map and ascending thresholds")
    return _curve(h, t, np.ascontiguousarray(truth, dtype=np.float64).reshape(-1, 4), bool(inclusive))


def largest_component_boxes(heatmap: np.ndarray, fractions: Sequence[float],
                            at: Callable[[np.ndarray, float], Box | None]) -> list[Box | None]:
    """:func:`cams.metrics.heatmap_box` of ``heatmap`` (finite float64 [H, W]) at every fraction: the box of the
    largest 8-connected component of ``heatmap >= fraction * max``, None when empty (a maximum <= 0 too).
    Where two components tie for the largest area, that fraction goes to ``at`` (``heatmap_box``), whose
    component order decides."""
    h = np.ascontiguousarray(heatmap, dtype=np.float64)
    fractions = [float(f) for f in fractions]
    top = float(h.max()) if h.size else 0.0
    if top <= 0.0 or not fractions:
        return [None] * len(fractions)
    cuts = np.array([f * top for f in fractions], dtype=np.float64)
    order = np.argsort(cuts, kind="stable")  # the sweep takes the cuts ascending
    steps = len(cuts)
    reached = np.searchsorted(cuts[order], h.ravel(), side="right")  # cuts <= value: foreground at 0..reached-1
    boxes, areas, tied = _largest_sweep(np.where(reached > 0, steps - reached, -1), h.shape[0], h.shape[1], steps)
    out: list[Box | None] = [None] * steps
    for rank, index in enumerate(order):
        s = steps - 1 - rank  # the sweep's step for the rank-th smallest cut
        if tied[s]:
            out[index] = at(h, fractions[index])
        elif areas[s]:
            out[index] = tuple(float(v) for v in boxes[s])  # type: ignore[assignment]
    return out
