"""Each image's own class for an export (``--labels FILE``): a CSV with ``image`` and ``label`` columns (other
columns are ignored, so bench-loc's ``boxes.csv`` serves as it is). ``image`` is a path relative to the CSV's
folder, or absolute; ``label`` a class id or a class name, resolved per model (:mod:`cams.export.plan`)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from collections.abc import Mapping

from cams.export.files import ExportError
from cams.images import path_problem, printable

MAX_LABELS_BYTES = 64 * 2**20  # ImageNet val's 50,000 rows take ~3 MB
MAX_PROBLEMS = 20


def image_key(path: str | os.PathLike) -> str:
    """How an image is looked up: its resolved absolute path (the export's input key for a file)."""
    return str(Path(path).expanduser().resolve())


def read_labels(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """(image key -> label, problems with rows). An image with several rows keeps its first label. Raises
    ``ExportError`` for a file that cannot be used at all."""
    source = Path(path)
    if source.exists() and not source.is_file():  # a folder, a FIFO or a device: never read
        raise ExportError(f"labels file {source} is not a regular file")
    try:
        with open(source, "rb") as handle:
            data = handle.read(MAX_LABELS_BYTES + 1)
    except OSError as exc:
        raise ExportError(f"labels file {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_LABELS_BYTES:
        raise ExportError(f"labels file {source} is larger than {MAX_LABELS_BYTES // 2**20} MB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ExportError(f"labels file {source} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip().lower() for name in reader.fieldnames or []]
    if "image" not in columns or "label" not in columns:
        raise ExportError(f"labels file {source} needs a header with 'image' and 'label' columns; "
                          f"found {', '.join(columns) or 'none'}")
    reader.fieldnames = columns
    folder = source.parent
    labels: dict[str, str] = {}
    problems: list[str] = []
    try:
        for row in reader:
            image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
            if not image or not label:
                problems.append(f"line {reader.line_num}: no {'image' if not image else 'label'}")
                continue
            reason = path_problem(image)
            if reason is not None:  # a NUL byte: Path.resolve would raise ValueError
                problems.append(f"line {reader.line_num}: image '{printable(image)}' {reason}; row skipped")
                continue
            try:
                key = image_key(folder / image)
            except (OSError, RuntimeError, ValueError):  # RuntimeError: a symbolic link loop (Python < 3.13)
                problems.append(f"line {reader.line_num}: {printable(image)} cannot be resolved")
                continue
            earlier = labels.setdefault(key, label)
            if earlier.lower() != label.lower():
                problems.append(f"line {reader.line_num}: {printable(image)} has several labels; the first "
                                f"({printable(earlier)}) is used")
    except csv.Error as exc:
        raise ExportError(f"labels file {source}, line {reader.line_num}: {exc}") from None
    if not labels:
        raise ExportError(f"labels file {source} gives no image a label")
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more rows like these"]
    return labels, [f"labels file {source.name}: {problem}" for problem in problems]


def label_table(labels: str | os.PathLike | Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """``run_export``'s ``labels`` (a labels file, or image path -> label) as (image key -> label, problems)."""
    if isinstance(labels, Mapping):
        table: dict[str, str] = {}
        problems: list[str] = []
        for image, label in labels.items():
            reason = path_problem(os.fspath(image))
            if reason is not None:
                problems.append(f"labels: image '{printable(os.fspath(image))}' {reason}; skipped")
                continue
            table[image_key(image)] = str(label).strip()
        return table, problems
    return read_labels(labels)
