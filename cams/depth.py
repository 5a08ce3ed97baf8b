"""Localization across depth: one model's heatmaps at every block (:func:`cams.layers.block_layers`) scored against
ground-truth boxes, one value per layer and metric, the curve the app's Measure panel draws (and what
``bench-loc --layers blocks`` can reuse).

Images are added one at a time (:meth:`DepthScores.add`, with every layer's heatmap of that image, all in the
network-input geometry of the boxes), so a run stopped part-way still scores what it saw. Per layer:

- ``pointing_game``: the share of images whose heatmap peak falls on the object (its mask when given, else a box,
  with :func:`cams.metrics.pointing_game`'s tolerance);
- ``energy_in_box``: the mean share of the heatmap's positive mass inside the boxes;
- ``maxboxacc_v2``: MaxBoxAccV2 over the images (:mod:`cams.boxacc`: the best threshold for the set), in
  ``protocol`` (wsolevaluation's, ``"wsol"``, by default).
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import numpy as np

from cams import boxacc
from cams import metrics as M

DEPTH_METRICS: dict[str, str] = {"pointing_game": "Pointing game", "energy_in_box": "Energy in box",
                                 "maxboxacc_v2": "MaxBoxAccV2"}

__all__ = ["DEPTH_METRICS", "DepthScores", "heatmap_region"]


def heatmap_region(boxes: M.Boxes, mask: np.ndarray | None, crop_box: Sequence[float], image_size: Sequence[int],
                   shape: Sequence[int]) -> tuple[list[M.Box], np.ndarray | None]:
    """Ground truth given on the original image (``boxes``, optional bool ``mask`` of ``image_size`` (w, h)) in a
    heatmap's geometry (``shape`` (h, w) over ``crop_box`` of the image): the boxes that stay in the crop, and the
    mask resized when the crop is the whole image (else None: the pointing game then aims at the boxes)."""
    import cv2

    height, width = int(shape[0]), int(shape[1])
    mapped = [box for box in (M.map_box(b, crop_box, (width, height)) for b in M.as_boxes(boxes)) if box is not None]
    region = None
    if mask is not None and tuple(round(v) for v in crop_box) == (0, 0, *(int(v) for v in image_size)):
        region = mask if mask.shape == (height, width) else cv2.resize(
            mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mapped, region


class DepthScores:
    """The depth curve of one model (and method): ``add`` images, read ``values()`` or ``rows()``."""

    def __init__(self, layers: Sequence[str], protocol: str = boxacc.DEFAULT_PROTOCOL) -> None:
        self.layers = list(layers)
        self.protocol = boxacc.check_protocol(protocol)
        self.hits: list[list[float]] = [[] for _ in self.layers]
        self.energy: list[list[float]] = [[] for _ in self.layers]
        self.curves = [boxacc.MaxBoxAccumulator(protocol=protocol) for _ in self.layers]

    @property
    def n(self) -> int:
        """Images scored so far."""
        return len(self.hits[0]) if self.layers else 0

    def add(self, heatmaps: Any, boxes: M.Boxes, mask: np.ndarray | None = None) -> None:
        """One image: ``heatmaps`` [L, H, W] (one per layer, in order), ``boxes`` in that geometry, ``mask`` an
        optional bool [H, W] object mask for the pointing game."""
        stack = np.asarray(heatmaps, dtype=np.float32)
        if stack.ndim != 3 or stack.shape[0] != len(self.layers):
            raise ValueError(f"heatmaps must be [{len(self.layers)}, H, W], got {stack.shape}")
        if not M.as_boxes(boxes):
            raise ValueError("an image needs at least one ground-truth box")
        use_mask = mask is not None and mask.shape == stack.shape[1:] and bool(mask.any())
        for index, heatmap in enumerate(stack):
            hit = M.pointing_game(heatmap, mask=mask) if use_mask else M.pointing_game(heatmap, box=boxes)
            self.hits[index].append(float(hit))
            self.energy[index].append(float(M.energy_in_box(heatmap, box=boxes)))
            self.curves[index].add(heatmap, boxes)

    def values(self) -> dict[str, list[float | None]]:
        """Metric -> one value per layer (None before any image)."""
        if not self.n:
            return {metric: [None] * len(self.layers) for metric in DEPTH_METRICS}
        return {"pointing_game": [float(np.mean(h)) for h in self.hits],
                "energy_in_box": [float(np.mean(e)) for e in self.energy],
                "maxboxacc_v2": [c.result().value for c in self.curves]}

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: ``depth`` (1 = the first block), ``layer``, each metric, ``n`` images."""
        values = self.values()
        return [{"depth": index + 1, "layer": layer, **{metric: values[metric][index] for metric in DEPTH_METRICS},
                 "n": self.n} for index, layer in enumerate(self.layers)]
