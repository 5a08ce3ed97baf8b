"""One bench-loc row's running scores: per-image metrics added batch by batch, summarised into the table's values.

Columns (all in [0, 1] except ``road_combined``, in [-0.5, 0.5]):

* ``pointing15``, ``pointing_strict``, ``energy``, ``box_accuracy``: means over the test images
  (:mod:`cams.metrics`; box accuracy at the row's validation threshold).
* ``maxboxacc_v2`` and ``box_acc_iou30/50/70``: MaxBoxAccV2 (:mod:`cams.boxacc`): every contour's box, the best
  threshold of a 0.01 (or 0.001) sweep over the whole test set, per IoU level, and their mean, in the row's
  ``box_protocol`` (``"wsol"``: wsolevaluation's numbers, the default; ``"pfcam"``: pfcam's own).
* ``deletion_auc``, ``insertion_auc``: means over the first ``faith_n`` test images.
* ``road_morf``, ``road_lerf``, ``road_combined``: ROAD (:mod:`cams.road`, noisy linear imputation,
  pytorch-grad-cam's percentile removal,
  probability of the explained class, 10..90 % removed) over the first ``road_n`` test images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cams import metrics as M
from cams.boxacc import DEFAULT_PROTOCOL, IOU_LEVELS, best_iou_curve, max_box_acc, thresholds_for

MAXBOX_KEYS = ("maxboxacc_v2",) + tuple(f"box_acc_iou{round(100 * level)}" for level in IOU_LEVELS)
ROAD_KEYS = ("road_morf", "road_lerf", "road_combined")


@dataclass
class RowScores:
    """Running sums of one row's per-image scores."""

    pointing15: float = 0.0
    pointing_strict: float = 0.0
    energy: float = 0.0
    box_accuracy: float = 0.0
    count: int = 0
    flat: int = 0
    curves: list[np.ndarray] = field(default_factory=list)  # MaxBoxAccV2: best IoU per threshold, per image
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    road_morf: list[float] = field(default_factory=list)
    road_lerf: list[float] = field(default_factory=list)
    box_protocol: str = DEFAULT_PROTOCOL  # MaxBoxAccV2's protocol (cams.boxacc.PROTOCOLS)
    box_step: float = 0.01  # its threshold step

    @property
    def box_thresholds(self) -> tuple[float, ...]:
        return thresholds_for(self.box_protocol, self.box_step)

    def add(self, heatmap: np.ndarray, sample, threshold: float, curve: np.ndarray | None = None) -> None:
        """One image's scores; ``curve``: its MaxBoxAccV2 curve when the caller already has it (cached)."""
        region = dict(box=sample.boxes, mask=sample.mask)  # pointing game: the mask where there is one
        self.pointing15 += M.pointing_game(heatmap, **region)
        self.pointing_strict += M.pointing_game(heatmap, tolerance=0, **region)
        self.energy += M.energy_in_box(heatmap, box=sample.boxes)  # energy in *box*, as the column says
        self.box_accuracy += M.box_accuracy(heatmap, sample.boxes, threshold)
        self.curves.append(best_iou_curve(heatmap, sample.boxes, self.box_thresholds, self.box_protocol)
                           if curve is None else curve)
        self.flat += M.is_flat(heatmap)
        self.count += 1

    def values(self, accuracy: float | None) -> dict[str, float | None]:
        c = max(self.count, 1)
        mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
        out: dict[str, float | None] = {
            "accuracy": accuracy,
            "pointing15": self.pointing15 / c if self.count else None,
            "pointing_strict": self.pointing_strict / c if self.count else None,
            "energy": self.energy / c if self.count else None,
            "box_accuracy": self.box_accuracy / c if self.count else None,
        }
        boxes = max_box_acc(np.stack(self.curves), self.box_thresholds, IOU_LEVELS) if self.curves else None
        out[MAXBOX_KEYS[0]] = boxes.value if boxes else None
        for key, level in zip(MAXBOX_KEYS[1:], IOU_LEVELS):
            out[key] = boxes.box_acc[float(level)] if boxes else None
        out["deletion_auc"] = mean(self.deletion)
        out["insertion_auc"] = mean(self.insertion)
        morf, lerf = mean(self.road_morf), mean(self.road_lerf)
        out["road_morf"], out["road_lerf"] = morf, lerf
        out["road_combined"] = None if morf is None else (lerf - morf) / 2.0
        return out
