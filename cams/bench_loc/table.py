"""bench-loc's table: plain text (what the command prints), Markdown and CSV, one row per model x layer x method."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from cams.bench_loc.accum import MAXBOX_KEYS, ROAD_KEYS
from cams.bench_loc.scoring import BASELINE_LAYER, Row
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
    header, body = _cells(rows)
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    numeric = [False] * 3 + [True] * len(KEYS)

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if num else cell.ljust(w)
                         for cell, w, num in zip(cells, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([caption, "", line(header), rule] + [line(cells) for cells in body]) + "\n"


def format_markdown(rows: Sequence[Row], caption: str) -> str:
    header, body = _cells(rows)
    out = [caption, "", "| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * 3 + ["---:"] * len(KEYS)) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(out) + "\n"


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


def read_csv(path: str | Path) -> list[Row]:
    """Rows back from a CSV that :func:`write_csv` wrote (e.g. to draw ``plot_depth`` again)."""
    number = lambda text: float(text) if text != "" else None  # noqa: E731
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            offset = (None if record["offset_dy"] == "" else (float(record["offset_dy"]), float(record["offset_dx"])))
            reference = record["layer"] == BASELINE_LAYER
            rows.append(Row(record["model"], record["layer"], record["method"],
                            {key: number(record.get(key, "")) for key in KEYS}, number(record["box_threshold"]),
                            int(record["n"]), int(record["faith_n"]), int(record["flat_heatmaps"]),
                            "baseline" if reference else "cam", offset, int(record.get("road_n") or 0),
                            int(record["depth"]) if record.get("depth") else None,
                            record.get("box_protocol") or "pfcam"))  # CSVs from before the column: pfcam's
    return rows
