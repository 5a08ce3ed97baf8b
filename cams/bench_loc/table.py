"""bench-loc's table: plain text (what the command prints), Markdown and CSV, one row per model x layer x method."""
from __future__ import annotations

import csv
from pathlib import Path
from collections.abc import Sequence

from cams import tables
from cams.bench_loc.accum import MAXBOX_KEYS, ROAD_KEYS
from cams.bench_loc.scoring import Row
from cams.engine import METHODS

KEYS = ("accuracy", "pointing15", "pointing_strict", "energy", "box_accuracy", *MAXBOX_KEYS, "deletion_auc",
        "insertion_auc", *ROAD_KEYS)
HEADERS = {"accuracy": "accuracy", "pointing15": "pointing game (15 px)",
           "pointing_strict": "pointing game (strict)", "energy": "energy in box", "box_accuracy": "box accuracy",
           "maxboxacc_v2": "MaxBoxAccV2", "box_acc_iou30": "BoxAcc IoU.3", "box_acc_iou50": "BoxAcc IoU.5",
           "box_acc_iou70": "BoxAcc IoU.7", "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC",
           "road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF", "road_combined": "ROAD combined"}
CSV_FIELDS = ["model", "layer", "method", "method_label", *KEYS, "box_threshold", "n", "faith_n", "road_n",
              "flat_heatmaps", "offset_dy", "offset_dx", "depth", "box_protocol"]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def method_label(method: str) -> str:
    """The method's display name (reference rows are named by their kind)."""
    return METHODS.get(method, method)


def _cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "layer", "method"] + [HEADERS[key] for key in KEYS]
    body = [[row.model, row.layer, method_label(row.method)] + [_fmt(row.values.get(key)) for key in KEYS]
            for row in rows]
    return header, body


def format_table(rows: Sequence[Row], caption: str) -> str:
    """The plain-text table (what the command prints), caption first."""
    return tables.format_text(caption, *_cells(rows))


def format_markdown(rows: Sequence[Row], caption: str) -> str:
    return tables.format_markdown(caption, *_cells(rows))


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for row in rows:
            writer.writerow([row.model, row.layer, row.method, method_label(row.method)]
                            + ["" if row.values.get(key) is None else f"{row.values[key]:.6f}" for key in KEYS]
                            + ["" if row.threshold is None else f"{row.threshold:g}", row.n, row.faith_n, row.road_n,
                               row.flat]
                            + (["", ""] if row.offset is None else [f"{row.offset[0]:g}", f"{row.offset[1]:g}"])
                            + ["" if row.depth is None else row.depth, row.box_protocol])
