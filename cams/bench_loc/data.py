"""The images ``bench-loc`` scores, as validation and test splits in network-input geometry. The caller chooses
where they come from (a :class:`DataSource`): :class:`FolderData` is the user's folder with ``boxes.csv`` /
Pascal-VOC XML boxes; the demo scenes (``pfdemo.bench.SceneData``) are the command line's default."""
from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cams import metrics as M


MAX_ANNOTATION_BYTES = 4 * 1024 * 1024
CSV_NAME = "boxes.csv"
DEFAULT_SEED = 2022  # a folder's shuffle seed when none is given


class BenchError(Exception):
    """A problem that stops the benchmark before it starts (bad arguments, no usable data): exit status 2."""


@dataclass
class Sample:
    name: str
    boxes: list[M.Box]               # network-input geometry
    mask: np.ndarray | None = None   # bool [S, S] in input geometry, or None
    labels: tuple[str, ...] = ()     # class names (may be empty: no accuracy for this image)
    class_ids: tuple[int, ...] = ()  # class ids when the data names classes by id (ImageNet): they win over labels


@dataclass
class Split:
    """Images in network-input geometry: ``tensors(start, stop)`` gives the normalised batch."""

    name: str
    samples: list[Sample]
    tensors: Callable[[int, int], torch.Tensor]
    size: int
    stream: int = 0  # distinguishes the random-baseline noise of different splits

    def __len__(self) -> int:
        return len(self.samples)


class DataSource(Protocol):
    """Where bench-loc's images come from. ``run_bench`` asks it for each model's splits."""

    seed: int            # the source's seed; it also seeds the uniform-random reference heatmaps
    region: str          # what the pointing game aims at, for the caption: "mask" or "box(es)"
    problems: list[str]  # unusable inputs met so far (reported, then skipped)

    def skip_reason(self, entry: Any) -> str | None:
        """Why the zoo entry's model cannot be scored on these images, or None."""

    def splits(self, preprocess: Any, n: int, val_n: int, log: Callable[[str], None]) -> tuple[Split | None, Split]:
        """(validation or None, test) at the preprocessing's input size; the same images for every model."""

    def describe(self, n_test: int, n_val: int | None, sizes: str) -> tuple[str, str]:
        """For the caption: what the test images are, and where the validation images come from ("" if none)."""


@dataclass(frozen=True)
class DefaultData:
    """The data the command line uses without ``--data``, chosen by whoever registers the command."""

    make: Callable[[int | None], DataSource]  # --seed (None: the source's default) -> the source
    description: str  # what the images are, for --help
    seed_help: str    # what --seed means for them


@dataclass
class Annotation:
    path: Path
    boxes: list[M.Box]  # original-image pixels, half-open
    labels: tuple[str, ...] = ()
    source: str = ""
    class_ids: tuple[int, ...] = ()


def _finite_box(values: Sequence[str | float], where: str, problems: list[str]) -> M.Box | None:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        problems.append(f"{where}: box {tuple(values)} is not numeric; skipped")
        return None
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        problems.append(f"{where}: box {box} is empty or not finite (need x0 < x1, y0 < y1); skipped")
        return None
    return box  # type: ignore[return-value]


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise ValueError(f"too large ({size:,} bytes; limit {MAX_ANNOTATION_BYTES:,})")
    return path.read_text(encoding="utf-8-sig")


def parse_boxes_csv(text: str, source: str, problems: list[str]) -> list[tuple[str, str, M.Box, str]]:
    """The usable rows of a boxes CSV (``image,x0,y0,x1,y1[,label]``, header first, any column order) as
    ``(where, image name, box, label)``; ``where`` is ``"SOURCE line N"``. Unusable rows (no name, a box that is
    not numeric, empty or not finite) and missing columns are reported in ``problems``; it never raises."""
    reader = csv.DictReader(text.splitlines())
    try:
        fields = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    except csv.Error as error:
        problems.append(f"{source}: not a CSV file ({error}); CSV ignored")
        return []
    missing = [name for name in ("image", "x0", "y0", "x1", "y1") if name not in fields]
    if missing:
        problems.append(f"{source}: missing column(s) {', '.join(missing)} (need image,x0,y0,x1,y1[,label]); "
                        "CSV ignored")
        return []
    rows = []
    try:
        for line, raw in enumerate(reader, start=2):
            row = {(key or "").strip().lower(): (value or "").strip() if isinstance(value, str) else ""
                   for key, value in raw.items()}
            where = f"{source} line {line}"
            name = row.get("image", "")
            if not name:
                problems.append(f"{where}: no image name; skipped")
                continue
            box = _finite_box([row.get(key, "") for key in ("x0", "y0", "x1", "y1")], where, problems)
            if box is not None:
                rows.append((where, name, box, row.get("label", "")))
    except csv.Error as error:
        problems.append(f"{source}: not a CSV file past line {reader.line_num} ({error}); the rest ignored")
    return rows


def read_boxes_csv(folder: Path, problems: list[str]) -> dict[Path, Annotation]:
    """``folder/boxes.csv`` -> annotations by resolved image path (rows of one image are merged)."""
    path = folder / CSV_NAME
    out: dict[Path, Annotation] = {}
    try:
        text = _read_text(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read ({error}); CSV ignored")
        return out
    from cams.images import path_problem, printable

    root = folder.resolve()
    for where, name, box, label in parse_boxes_csv(text, path.name, problems):
        reason = path_problem(name)
        if reason is not None:  # a NUL byte: Path.resolve would raise ValueError
            problems.append(f"{where}: image '{printable(name)}' {reason}; skipped")
            continue
        try:
            image_path = (folder / name).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # too long a name, a link loop
            problems.append(f"{where}: image '{printable(name)}' cannot be resolved ({error}); skipped")
            continue
        if root not in image_path.parents:
            problems.append(f"{where}: image '{printable(name)}' is outside {folder}; skipped")
            continue
        entry = out.setdefault(image_path, Annotation(image_path, [], (), f"{CSV_NAME}"))
        entry.boxes.append(box)
        if label and label not in entry.labels:
            entry.labels = entry.labels + (label,)
    return out


def read_voc(path: Path, problems: list[str]) -> tuple[list[M.Box], tuple[str, ...]] | None:
    """Boxes (as ``(xmin - 1, ymin - 1, xmax, ymax)``) and names of a Pascal-VOC annotation; None if unusable."""
    try:
        root = ET.fromstring(_read_text(path))
    except (OSError, ValueError, UnicodeDecodeError, ET.ParseError) as error:
        problems.append(f"{path}: not a readable VOC XML file ({error}); skipped")
        return None
    boxes: list[M.Box] = []
    labels: list[str] = []
    for index, obj in enumerate(root.iter("object")):
        bnd = obj.find("bndbox")
        where = f"{path.name} object {index + 1}"
        if bnd is None:
            problems.append(f"{where}: no <bndbox>; skipped")
            continue
        values = [(bnd.findtext(key) or "").strip() for key in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(v) for v in values)
        except ValueError:
            problems.append(f"{where}: bndbox {tuple(values)} is not numeric; skipped")
            continue
        box = _finite_box((xmin - 1.0, ymin - 1.0, xmax, ymax), where, problems)
        if box is None:
            continue
        boxes.append(box)
        name = (obj.findtext("name") or "").strip()
        if name and name not in labels:
            labels.append(name)
    return boxes, tuple(labels)


def read_annotations(folder: str | Path, problems: list[str]) -> list[Annotation]:
    """Every image of ``folder`` (not recursive; ``boxes.csv`` rows may name images in subfolders) that has at
    least one usable box, in path order. Problems are appended to ``problems``."""
    from cams.images import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise BenchError(f"--data {folder}: not a folder")
    by_path = read_boxes_csv(folder, problems) if (folder / CSV_NAME).is_file() else {}
    for path in list(by_path):
        if not path.is_file():
            problems.append(f"{CSV_NAME}: image {path.relative_to(folder.resolve())} does not exist; skipped")
            del by_path[path]
    images = sorted(p.resolve() for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in images:
        if path in by_path:
            continue
        xml = path.with_suffix(".xml")
        if not xml.is_file():
            xml = next((p for p in path.parent.glob(path.stem + ".*") if p.suffix.lower() == ".xml"), xml)
        if not xml.is_file():
            problems.append(f"{path.name}: no boxes ({CSV_NAME} does not list it, no {path.stem}.xml); skipped")
            continue
        parsed = read_voc(xml, problems)
        if parsed is None:
            continue
        boxes, labels = parsed
        by_path[path] = Annotation(path, boxes, labels, xml.name)
    out = []
    for path in sorted(by_path):
        annotation = by_path[path]
        if not annotation.boxes:
            problems.append(f"{path.name}: no usable box in {annotation.source}; skipped")
            continue
        out.append(annotation)
    return out


def data_splits(annotations: list[Annotation], preprocess, n: int, val_n: int, seed: int,
                problems: list[str], cache: dict) -> tuple[Split | None, Split]:
    """(validation, test) splits of the user's folder for one preprocessing (cached per preprocessing).

    The same images go to the same split for every model: the split is decided on the usable images (those
    that load) with a permutation seeded by ``seed``.
    """
    from cams.images import ImageError, load_image
    from pfnet.preprocess import prepare

    if preprocess in cache:
        return cache[preprocess]
    usable = cache.setdefault("_usable", None)
    prepared: dict[Path, tuple[torch.Tensor, list[M.Box]]] = {}
    candidates = usable if usable is not None else annotations
    kept = []
    for annotation in candidates:
        try:
            image = load_image(annotation.path)
        except (ImageError, OSError) as error:
            problems.append(f"unreadable image, skipped: {error}")
            continue
        width, height = image.size
        item = prepare(image, preprocess, mode="full")
        boxes = []
        for box in annotation.boxes:
            clipped = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height)))
            mapped = M.map_box(clipped, item.crop_box, preprocess.input_size)
            if mapped is None:
                problems.append(f"{annotation.path.name}: box {box} lies outside the image "
                                f"({width}x{height}); ignored")
                continue
            boxes.append(mapped)
        if not boxes:
            problems.append(f"{annotation.path.name}: no box inside the image; skipped")
            continue
        prepared[annotation.path] = (item.tensor, boxes)
        kept.append(annotation)
    if usable is None:
        cache["_usable"] = kept
        order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xDA7A]).permutation(len(kept))
        shuffled = [kept[i] for i in order]
        n_val = min(val_n, len(shuffled) // 2)
        cache["_order"] = (shuffled[:n_val], shuffled[n_val:n_val + n])
    val_items, test_items = cache["_order"]
    size = int(preprocess.input_size)

    def make(name: str, items: list[Annotation], stream: int) -> Split:
        items = [a for a in items if a.path in prepared]
        samples = [Sample(a.path.name, prepared[a.path][1], None, a.labels, tuple(getattr(a, "class_ids", ())))
                   for a in items]
        stack = torch.stack([prepared[a.path][0] for a in items]) if items else torch.zeros(0, 3, size, size)
        return Split(name, samples, lambda start, stop: stack[start:stop], size, stream)

    result = (make("validation", val_items, 1) if val_items else None, make("test", test_items, 0))
    cache[preprocess] = result
    return result


class FolderData:
    """A folder of the user's images with boxes (``--data DIR``), shuffled with ``seed`` into validation and test
    splits (:func:`data_splits`).

    ILSVRC2012 val is recognised first (``LOC_val_solution.csv`` or the devkit's per-image XML:
    :mod:`cams.bench_loc.imagenet_val`): its images carry class ids (sorted-synset order), accuracy compares ids
    (ImageNet repeats names: two classes are called "crane"), only 1,000-class ImageNet models are scored, and of
    the 50,000 images only a seeded sample of ``val_n + n`` (and a few spare for unreadable files) is decoded.
    Otherwise the generic ``boxes.csv`` / Pascal-VOC reader (:func:`read_annotations`)."""

    region = "box(es)"
    SPARE = 1.05  # extra ImageNet images decoded in case some are unreadable

    def __init__(self, folder: str | Path, seed: int | None = None):
        from cams.bench_loc.imagenet_val import find_layout, read_imagenet_val

        self.name = str(folder)
        self.seed = DEFAULT_SEED if seed is None else int(seed)
        self.problems: list[str] = []
        layout = find_layout(folder)
        self.imagenet = layout[0] if layout else None  # "csv" | "xml" | None
        if self.imagenet:
            self.annotations = read_imagenet_val(folder, self.problems) or []
        else:
            self.annotations = read_annotations(folder, self.problems)
        if not self.annotations:
            raise BenchError(f"--data {folder}: no image with usable boxes" +
                             (f" ({len(self.problems)} problem(s) reported)" if self.problems else ""))
        self.total = len(self.annotations)
        self._cache: dict = {}

    def skip_reason(self, entry: Any) -> str | None:
        if self.imagenet and (entry.classes != "imagenet" or entry.num_classes != 1000):
            return "ILSVRC2012 val needs a 1,000-class ImageNet model"
        return None

    def splits(self, preprocess: Any, n: int, val_n: int, log: Callable[[str], None]) -> tuple[Split | None, Split]:
        annotations = self.annotations
        wanted = math.ceil((n + val_n) * self.SPARE) + 2
        if self.imagenet and len(annotations) > wanted:
            if "_sample" not in self._cache:  # the same sample for every model
                order = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, 0x1A6E]).permutation(len(annotations))
                self._cache["_sample"] = [annotations[i] for i in sorted(order[:wanted])]
            annotations = self._cache["_sample"]
        val, test = data_splits(annotations, preprocess, n, val_n, self.seed, self.problems, self._cache)
        if not len(test):
            raise BenchError(f"--data {self.name}: no usable test image")
        return val, test

    def describe(self, n_test: int, n_val: int | None, sizes: str) -> tuple[str, str]:
        what = (f"ILSVRC2012 val ({'LOC_val_solution.csv' if self.imagenet == 'csv' else 'devkit XML'}, "
                f"{self.total} annotated images, a sample drawn with seed {self.seed}), class ids in sorted-synset "
                f"order" if self.imagenet else "")
        source = f"{what}: " if what else ""
        return (f"{n_test} test images of {self.name} ({source}mode full, boxes mapped to {sizes} px input)",
                f"on {n_val} validation images of the same folder (disjoint)" if n_val is not None else "")
