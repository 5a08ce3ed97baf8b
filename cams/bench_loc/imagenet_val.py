"""ILSVRC2012 validation boxes as users have them, for the localization benchmark.

Two formats of the same 50,000 images' boxes:

* **Per-image XML** (the devkit's ``ILSVRC2012_bbox_val_v3.tgz``, unpacked to ``val/ILSVRC2012_val_00000001.xml``
  ...; Kaggle's ``ILSVRC/Annotations/CLS-LOC/val/``): Pascal-VOC files whose ``<object><name>`` is a synset.
* **``LOC_val_solution.csv``** (Kaggle's ImageNet Object Localization Challenge): ``ImageId,PredictionString``
  with ``PredictionString = "synset x0 y0 x1 y1 synset x0 y0 x1 y1 ..."``.

Both hold the VOC numbers (1-based, inclusive corners), read as ``(xmin - 1, ymin - 1, xmax, ymax)`` in the
half-open pixel boxes of :mod:`cams.metrics`, as bench-loc reads any VOC file. Class ids follow the **sorted
synset order** (``n01440764`` is 0), the order of torchvision's and timm's ImageNet heads, not the devkit's
``ILSVRC2012_ID``; the 1,000 synsets ship in ``cams/bench_loc/imagenet_synsets.txt``.

Images are found by file stem (``ILSVRC2012_val_00000001.JPEG``), anywhere below the image folder: flat, as
the devkit's ``ILSVRC2012_img_val.tar`` unpacks, or in one folder per synset, as ``valprep.sh`` sorts them.
:func:`read_imagenet_val` finds the layout under one folder; problems (unreadable files, unknown synsets, boxes
without an image) are appended to ``problems`` and the rest goes on. The result mirrors
``cams.bench_loc.data.read_annotations``: annotations in path order with ``path``, ``boxes`` (original-image pixels),
``labels`` and ``source``, plus ``class_ids``.
"""
from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

Box = tuple[float, float, float, float]

SOLUTION_CSV = "LOC_val_solution.csv"
SYNSET_FILE = Path(__file__).resolve().parent / "imagenet_synsets.txt"
KAGGLE_IMAGES = Path("ILSVRC", "Data", "CLS-LOC", "val")
KAGGLE_XML = Path("ILSVRC", "Annotations", "CLS-LOC", "val")
MAX_CSV_BYTES = 64 * 1024 * 1024

__all__ = ["SOLUTION_CSV", "ImageNetAnnotation", "synsets", "class_id", "index_images", "read_loc_solution",
           "read_devkit_xml", "find_layout", "read_imagenet_val"]


@lru_cache(maxsize=1)
def synsets() -> tuple[str, ...]:
    """The 1,000 ILSVRC2012 synsets, sorted: position = class id."""
    names = tuple(line.strip() for line in SYNSET_FILE.read_text(encoding="ascii").splitlines() if line.strip())
    if len(names) != 1000 or list(names) != sorted(names) or len(set(names)) != 1000:
        raise RuntimeError(f"{SYNSET_FILE} is damaged: need 1,000 distinct sorted synsets")
    return names


@lru_cache(maxsize=1)
def _synset_index() -> dict[str, int]:
    return {name: index for index, name in enumerate(synsets())}


def class_id(synset: str) -> int | None:
    """Class id of a synset in the sorted order; None for a name that is not one of the 1,000."""
    return _synset_index().get(synset.strip())


@dataclass
class ImageNetAnnotation:
    path: Path
    boxes: list[Box]                 # original-image pixels, half-open
    labels: tuple[str, ...] = ()     # class names (``class_names`` given) or synsets
    source: str = ""
    class_ids: tuple[int, ...] = ()  # sorted-synset class ids of the objects, first seen first


def index_images(folder: str | Path, problems: list[str]) -> dict[str, Path]:
    """Image file stem -> path, for every image below ``folder`` (the first in path order on a repeated stem)."""
    from cams.images import IMAGE_EXTENSIONS

    found: dict[str, Path] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in found:
            problems.append(f"{path}: another image named {path.stem} is at {found[path.stem]}; kept that one")
            continue
        found[path.stem] = path
    return found


def _voc_box(values: Sequence[str], where: str, problems: list[str]) -> Box | None:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in values)
    except ValueError:
        problems.append(f"{where}: box {tuple(values)} is not numeric; skipped")
        return None
    box = (xmin - 1.0, ymin - 1.0, xmax, ymax)
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        problems.append(f"{where}: box {tuple(values)} is empty or not finite; skipped")
        return None
    return box


def _labelled(path: Path, boxes: list[Box], names: Sequence[str], source: str,
              class_names: Sequence[str] | None, where: str, problems: list[str]) -> ImageNetAnnotation | None:
    ids: list[int] = []
    for name in names:
        index = class_id(name)
        if index is None:
            problems.append(f"{where}: {name!r} is not an ILSVRC2012 synset; its label is ignored")
        elif index not in ids:
            ids.append(index)
    if not boxes:
        problems.append(f"{where}: no usable box; skipped")
        return None
    labels = tuple(class_names[i] for i in ids) if class_names is not None else tuple(synsets()[i] for i in ids)
    return ImageNetAnnotation(path, boxes, labels, source, tuple(ids))


def read_loc_solution(csv_path: str | Path, images: dict[str, Path], problems: list[str],
                      class_names: Sequence[str] | None = None) -> list[ImageNetAnnotation]:
    """``LOC_val_solution.csv`` -> annotations of the images found in ``images`` (:func:`index_images`)."""
    csv_path = Path(csv_path)
    try:
        size = csv_path.stat().st_size
        if size > MAX_CSV_BYTES:
            raise ValueError(f"too large ({size:,} bytes; limit {MAX_CSV_BYTES:,})")
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        problems.append(f"{csv_path}: cannot read ({error})")
        return []
    reader = csv.reader(text.splitlines())
    header = [cell.strip() for cell in next(reader, [])]
    if header[:2] != ["ImageId", "PredictionString"]:
        problems.append(f"{csv_path}: expected the header 'ImageId,PredictionString', found {','.join(header)!r}")
        return []
    out: list[ImageNetAnnotation] = []
    missing = 0
    for line, row in enumerate(reader, start=2):
        where = f"{csv_path.name} line {line}"
        if len(row) < 2 or not row[0].strip():
            problems.append(f"{where}: expected ImageId,PredictionString; skipped")
            continue
        image_id, fields = row[0].strip(), row[1].split()
        if len(fields) % 5:
            problems.append(f"{where}: {len(fields)} values; a box is 'synset x0 y0 x1 y1'; skipped")
            continue
        if image_id not in images:
            missing += 1
            continue
        boxes, names = [], []
        for start in range(0, len(fields), 5):
            box = _voc_box(fields[start + 1:start + 5], where, problems)
            if box is not None:
                boxes.append(box)
                names.append(fields[start])
        annotation = _labelled(images[image_id], boxes, names, SOLUTION_CSV, class_names, where, problems)
        if annotation is not None:
            out.append(annotation)
    if missing:
        problems.append(f"{csv_path.name}: {missing} listed image(s) not found; skipped")
    return sorted(out, key=lambda a: a.path)


def read_devkit_xml(xml_folder: str | Path, images: dict[str, Path], problems: list[str],
                    class_names: Sequence[str] | None = None) -> list[ImageNetAnnotation]:
    """Every ``*.xml`` of ``xml_folder`` whose image is in ``images`` -> annotations (XML without an image are
    counted in one problem line)."""
    from cams.bench_loc.data import read_voc

    out: list[ImageNetAnnotation] = []
    missing = 0
    for xml in sorted(p for p in Path(xml_folder).iterdir() if p.suffix.lower() == ".xml" and p.is_file()):
        if xml.stem not in images:
            missing += 1
            continue
        parsed = read_voc(xml, problems)
        if parsed is None:
            continue
        boxes, names = parsed
        annotation = _labelled(images[xml.stem], boxes, names, xml.name, class_names, xml.name, problems)
        if annotation is not None:
            out.append(annotation)
    if missing:
        problems.append(f"{xml_folder}: {missing} XML file(s) without an image; skipped")
    return sorted(out, key=lambda a: a.path)


def _looks_like_ilsvrc(xml: Path) -> bool:
    try:
        root = ET.fromstring(xml.read_bytes()[:65536])
    except (OSError, ET.ParseError):
        return False
    return ((root.findtext("filename") or "").startswith("ILSVRC2012_val_")
            or "ILSVRC" in (root.findtext("source/database") or ""))


def find_layout(root: str | Path) -> tuple[str, Path, Path] | None:
    """``(kind, annotations, image folder)`` for ILSVRC2012 val boxes under ``root``; ``kind`` is ``"csv"``
    (``LOC_val_solution.csv``) or ``"xml"`` (per-image devkit XML); None when ``root`` holds neither."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv", root, root.parent / KAGGLE_IMAGES if (root.parent / KAGGLE_IMAGES).is_dir() else root.parent
    if not root.is_dir():
        return None
    images = root / KAGGLE_IMAGES if (root / KAGGLE_IMAGES).is_dir() else root
    if (root / SOLUTION_CSV).is_file():
        return "csv", root / SOLUTION_CSV, images
    for folder in (root / KAGGLE_XML, root / "val", root):
        first = next((p for p in sorted(folder.glob("*.xml")) if p.is_file()), None) if folder.is_dir() else None
        if first is not None and _looks_like_ilsvrc(first):
            return "xml", folder, images
    return None


def read_imagenet_val(root: str | Path, problems: list[str],
                      class_names: Sequence[str] | None = None) -> list[ImageNetAnnotation] | None:
    """The ILSVRC2012 val annotations under ``root`` (see :func:`find_layout`); None when it holds neither
    format. ``class_names`` (the model's 1,000 names in class-id order) become the labels; else synsets."""
    layout = find_layout(root)
    if layout is None:
        return None
    kind, annotations, image_folder = layout
    images = index_images(image_folder, problems)
    if kind == "csv":
        return read_loc_solution(annotations, images, problems, class_names)
    return read_devkit_xml(annotations, images, problems, class_names)
