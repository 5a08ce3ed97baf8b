"""``python -m cams bench-loc``: how well do the CAMs of each model x layer x method localize the object?

One table, one row per model x layer x method plus two reference rows per model (a centred Gaussian and
seeded uniform noise used as heatmaps on the same images), with the columns

    accuracy | pointing game (15 px) | pointing game (strict) | energy in box | box accuracy | deletion AUC |
    insertion AUC

(definitions in :mod:`cams.metrics`). Every number is a mean over images, in [0, 1].

Data
----
* Default: held-out ``pfnet.scenes`` rendered at each model's input size (preprocessing mode "full": the scene
  *is* the network input, so scene boxes and masks are already in heatmap geometry). The test split is stream
  ``--seed`` (default :data:`TEST_SEED`, the held-out stream of ``pfnet.train_demo``), indices ``0 .. n-1``; the
  box-accuracy threshold is chosen on a separate validation split, stream ``--seed + 1`` indices
  ``0 .. val_n-1``. Neither may be the training stream (``pfnet.scenes.TRAIN_SEED``).
* ``--data DIR``: a folder of the user's images with boxes, either ``DIR/boxes.csv`` (columns
  ``image,x0,y0,x1,y1[,label]``; ``image`` is a path relative to DIR; coordinates are original-image pixels,
  ``(x0, y0)`` the top-left and ``(x1, y1)`` the bottom-right corner, exclusive; several rows per image are
  several objects) or, for images the CSV does not list, a Pascal-VOC XML file with the image's stem
  (``<object><name/><bndbox><xmin/>..</bndbox></object>``; VOC corners are 1-based inclusive pixels, read as
  ``(xmin - 1, ymin - 1, xmax, ymax)``). Several objects: the *any-object* rule of :mod:`cams.metrics`
  (pointing game and energy on the union of the boxes; box accuracy: IoU >= 0.5 with any box). Images are read
  with :func:`cams.images.load_image`, preprocessed by each model's zoo entry in mode "full", and the boxes
  mapped into input geometry with :func:`cams.metrics.map_box`. Unreadable images or annotations are reported
  on stderr and skipped. The images are shuffled with ``--seed``; up to ``val_n`` of them (at most half) form
  the validation split for the threshold, up to ``n`` of the rest are the test split. Accuracy counts the
  images whose labels name one of the model's classes (a hit when the top-1 class is any of them).

Regions: the pointing game uses the object mask where there is one (scenes) and the boxes otherwise; "energy in
box" always uses the box(es); box accuracy compares boxes.

What is explained: by default each image's top-1 class (``cams.explain(targets=None)``), as in the CAM
"top-1 localization" protocol, so a misclassified image is scored on the CAM of the wrong class; with
``--target label`` the ground-truth class (Zhang et al.'s cued pointing game; all classes go through the
engine at once, so only for heads of at most 64 classes). Deletion/insertion follow the probability of the
explained class. One ``explain`` call per batch per method covers all layers. Deletion/insertion are costly and
run on the first ``--faith-n`` test images only; the table caption says so.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

import numpy as np
import torch

from cams import metrics as M

DEFAULT_MODELS = ("demo_r50", "demo_r50_max", "demo_r50_hybrid")
DEFAULT_LAYERS = ("layer3", "layer4")
DEFAULT_METHODS = ("gradcam", "gradcampp", "layercam", "eigencam")
DEFAULT_N = 500
DEFAULT_VAL_N = 100
DEFAULT_FAITH_N = 100
DEFAULT_FAITH_STEPS = 16
DEFAULT_BATCH_SIZE = 16
FALLBACK_THRESHOLD = 0.5  # only when there is no validation image and no --threshold
MAX_ANNOTATION_BYTES = 4 * 1024 * 1024
CSV_NAME = "boxes.csv"

KEYS = ("accuracy", "pointing15", "pointing_strict", "energy", "box_accuracy", "deletion_auc", "insertion_auc")
HEADERS = {"accuracy": "accuracy", "pointing15": "pointing game (15 px)",
           "pointing_strict": "pointing game (strict)", "energy": "energy in box", "box_accuracy": "box accuracy",
           "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC"}
TARGETS = ("predicted", "label")
MAX_LABEL_CLASSES = 64  # --target label runs every class through the engine at once
GAUSSIAN = "centre Gaussian"
RANDOM = "uniform random"
BASELINE_LAYER = "-"


def _scene_seeds() -> tuple[int, int]:
    from pfnet import scenes

    return int(getattr(scenes, "TRAIN_SEED", 0)), int(getattr(scenes, "TEST_SEED", 2022))


TRAIN_SEED, TEST_SEED = _scene_seeds()


class BenchError(Exception):
    """A problem that stops the benchmark before it starts (bad arguments, no usable data): exit status 2."""


class NothingEvaluated(BenchError):
    """Every model was skipped (e.g. no weights): exit status 1."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    name: str
    boxes: list[M.Box]               # network-input geometry
    mask: np.ndarray | None = None   # bool [S, S] in input geometry, or None
    labels: tuple[str, ...] = ()     # class names (may be empty: no accuracy for this image)


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


def scene_split(name: str, seed: int, n: int, preprocess, stream: int) -> Split:
    """``n`` scenes of stream ``seed`` at the entry's input size (mode "full": scene == input geometry)."""
    from pfnet.scenes import CLASS_NAMES, render_scene, to_tensor

    size = int(preprocess.input_size)
    scenes = [render_scene(seed, index, size) for index in range(n)]
    images = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    samples = [Sample(f"scene {seed}/{index}", [tuple(float(v) for v in scene.box)], scene.mask,
                      (CLASS_NAMES[scene.label],)) for index, scene in enumerate(scenes)]

    def tensors(start: int, stop: int) -> torch.Tensor:
        return to_tensor(images[start:stop], preprocess.mean, preprocess.std)

    return Split(name, samples, tensors, size, stream)


@dataclass
class Annotation:
    path: Path
    boxes: list[M.Box]  # original-image pixels, half-open
    labels: tuple[str, ...] = ()
    source: str = ""


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


def read_boxes_csv(folder: Path, problems: list[str]) -> dict[Path, Annotation]:
    """``folder/boxes.csv`` -> annotations by resolved image path (rows of one image are merged)."""
    path = folder / CSV_NAME
    out: dict[Path, Annotation] = {}
    try:
        text = _read_text(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read ({error}); CSV ignored")
        return out
    reader = csv.DictReader(text.splitlines())
    fields = [name.strip().lower() for name in (reader.fieldnames or [])]
    missing = [name for name in ("image", "x0", "y0", "x1", "y1") if name not in fields]
    if missing:
        problems.append(f"{path}: missing column(s) {', '.join(missing)} (need image,x0,y0,x1,y1[,label]); "
                        "CSV ignored")
        return out
    root = folder.resolve()
    for line, raw in enumerate(reader, start=2):
        row = {(key or "").strip().lower(): (value or "").strip() if isinstance(value, str) else ""
               for key, value in raw.items()}
        where = f"{path.name} line {line}"
        name = row.get("image", "")
        if not name:
            problems.append(f"{where}: no image name; skipped")
            continue
        image_path = (folder / name).resolve()
        if root not in image_path.parents:
            problems.append(f"{where}: image {name!r} is outside {folder}; skipped")
            continue
        box = _finite_box([row.get(key, "") for key in ("x0", "y0", "x1", "y1")], where, problems)
        if box is None:
            continue
        entry = out.setdefault(image_path, Annotation(image_path, [], (), f"{CSV_NAME}"))
        entry.boxes.append(box)
        label = row.get("label", "")
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
        samples = [Sample(a.path.name, prepared[a.path][1], None, a.labels) for a in items]
        stack = torch.stack([prepared[a.path][0] for a in items]) if items else torch.zeros(0, 3, size, size)
        return Split(name, samples, lambda start, stop: stack[start:stop], size, stream)

    result = (make("validation", val_items, 1) if val_items else None, make("test", test_items, 0))
    cache[preprocess] = result
    return result


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Row:
    model: str
    layer: str
    method: str
    values: dict[str, float | None]
    threshold: float | None = None
    n: int = 0
    faith_n: int = 0
    flat: int = 0  # heatmaps with no peak (scored as misses)
    kind: str = "cam"  # "cam" | "baseline"


@dataclass
class _Acc:
    """Running sums of one row's per-image scores."""

    pointing15: float = 0.0
    pointing_strict: float = 0.0
    energy: float = 0.0
    box_accuracy: float = 0.0
    count: int = 0
    flat: int = 0
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)

    def add(self, heatmap: np.ndarray, sample: Sample, threshold: float) -> None:
        region = dict(box=sample.boxes, mask=sample.mask)  # pointing game: the mask where there is one
        self.pointing15 += M.pointing_game(heatmap, **region)
        self.pointing_strict += M.pointing_game(heatmap, tolerance=0, **region)
        self.energy += M.energy_in_box(heatmap, box=sample.boxes)  # energy in *box*, as the column says
        self.box_accuracy += M.box_accuracy(heatmap, sample.boxes, threshold)
        self.flat += M.is_flat(heatmap)
        self.count += 1

    def values(self, accuracy: float | None) -> dict[str, float | None]:
        c = max(self.count, 1)
        return {
            "accuracy": accuracy,
            "pointing15": self.pointing15 / c if self.count else None,
            "pointing_strict": self.pointing_strict / c if self.count else None,
            "energy": self.energy / c if self.count else None,
            "box_accuracy": self.box_accuracy / c if self.count else None,
            "deletion_auc": float(np.mean(self.deletion)) if self.deletion else None,
            "insertion_auc": float(np.mean(self.insertion)) if self.insertion else None,
        }


def _norm_label(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


def _label_index(class_names: Sequence[str]) -> dict[str, int]:
    """Normalised class name (case, ``_``/``-``/spaces ignored) -> class id."""
    return {_norm_label(name): index for index, name in enumerate(class_names)}


def _label_ids(sample: Sample, table: dict[str, int]) -> set[int]:
    return {table[_norm_label(label)] for label in sample.labels if _norm_label(label) in table}


@dataclass
class Options:
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    batch_size: int = DEFAULT_BATCH_SIZE
    faith_n: int = DEFAULT_FAITH_N
    faith_steps: int = DEFAULT_FAITH_STEPS
    faith_baseline: str = "blur"
    threshold: float | None = None  # fixed box threshold (skips the validation choice)
    seed: int = TEST_SEED
    candidates: tuple[float, ...] = M.DEFAULT_THRESHOLDS
    target: str = "predicted"  # "predicted" (top-1) | "label" (ground-truth class)


def _baseline_maps(kind: str, split: Split, start: int, stop: int, seed: int) -> np.ndarray:
    size = split.size
    if kind == GAUSSIAN:
        return np.broadcast_to(M.centre_gaussian((size, size)), (stop - start, size, size))
    return np.stack([M.uniform_random((size, size), seed=(int(seed) & 0xFFFFFFFF, split.stream, index))
                     for index in range(start, stop)])


def _cam_batches(model, split: Split, opts: Options, method: str, class_names) -> Iterable:
    """(start, inputs, heatmaps [B, L, S, S] numpy, explained class [B], probs [B, C]) per batch, from one
    ``explain`` call covering every layer.

    ``opts.target == "predicted"``: each image's top-1 class. ``"label"``: each image's ground-truth class
    (the engine takes the same target list for every image, so all classes are explained at once and each
    image's label slot is kept; images without a usable label fall back to their top-1 class).
    """
    from cams.engine import explain

    table = _label_index(class_names)
    all_classes = list(range(len(class_names)))
    for start in range(0, len(split), opts.batch_size):
        stop = min(len(split), start + opts.batch_size)
        inputs = split.tensors(start, stop)
        if opts.target == "label":
            result = explain(model, inputs, list(opts.layers), method=method, targets=all_classes,
                             class_names=class_names, batch_size=opts.batch_size)
            probs = result.probs.numpy()
            chosen = np.array([min(_label_ids(split.samples[start + i], table), default=int(probs[i].argmax()))
                               for i in range(stop - start)], dtype=np.int64)
            maps = result.heatmaps[torch.arange(stop - start), torch.from_numpy(chosen)].numpy()
            yield start, inputs, maps, chosen, probs
        else:
            result = explain(model, inputs, list(opts.layers), method=method, targets=None,
                             class_names=class_names, batch_size=opts.batch_size)
            yield (start, inputs, result.heatmaps[:, 0].numpy(), result.targets[:, 0].numpy(),
                   result.probs.numpy())


def _choose(maps: list[np.ndarray], split: Split, opts: Options) -> float:
    return M.choose_threshold(maps, [s.boxes for s in split.samples], opts.candidates)


def evaluate_model(model, model_id: str, class_names: Sequence[str], val: Split | None, test: Split,
                   opts: Options, log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """Rows for one model: every layer x method, then the two reference heatmaps."""
    table = _label_index(class_names)
    preds = np.full(len(test), -1, dtype=np.int64)      # top-1 class (accuracy)
    explained = np.full(len(test), -1, dtype=np.int64)  # the class the CAMs explain (deletion/insertion target)
    faith_n = min(opts.faith_n, len(test))
    rows: list[Row] = []
    fallback = opts.threshold if opts.threshold is not None else FALLBACK_THRESHOLD

    def faith(accs: list[_Acc], inputs: torch.Tensor, maps: np.ndarray, targets: np.ndarray, start: int) -> None:
        """Deletion/insertion for the images of this batch inside the faith subset; maps [B, R, H, W]."""
        k = max(0, min(faith_n - start, inputs.shape[0]))
        if k == 0:
            return
        result = M.deletion_insertion(model, inputs[:k], maps[:k], targets[:k], steps=opts.faith_steps,
                                      baseline=opts.faith_baseline, batch_size=opts.batch_size)
        deletion, insertion = result.deletion_auc, result.insertion_auc  # [k, R]
        for r, acc in enumerate(accs):
            acc.deletion.extend(deletion[:, r].tolist())
            acc.insertion.extend(insertion[:, r].tolist())

    for method in opts.methods:
        t0 = time.perf_counter()
        thresholds = [fallback] * len(opts.layers)
        if opts.threshold is None and val is not None and len(val):
            val_maps: list[list[np.ndarray]] = [[] for _ in opts.layers]
            for _, _, maps, _, _ in _cam_batches(model, val, opts, method, class_names):
                for position in range(len(opts.layers)):
                    val_maps[position].extend(maps[:, position])
            thresholds = [_choose(val_maps[position], val, opts) for position in range(len(opts.layers))]
        accs = [_Acc() for _ in opts.layers]
        for start, inputs, maps, targets, probs in _cam_batches(model, test, opts, method, class_names):
            preds[start:start + len(targets)] = probs.argmax(axis=1)
            explained[start:start + len(targets)] = targets
            for position, acc in enumerate(accs):
                for offset in range(maps.shape[0]):
                    acc.add(maps[offset, position], test.samples[start + offset], thresholds[position])
            faith(accs, inputs, maps, targets, start)
        accuracy = _accuracy(preds, test, table)
        for position, layer in enumerate(opts.layers):
            rows.append(Row(model_id, layer, method, accs[position].values(accuracy), thresholds[position],
                            accs[position].count, len(accs[position].deletion), accs[position].flat))
        log(f"{model_id} {method}: {len(test)} images, {time.perf_counter() - t0:.0f} s")

    t0 = time.perf_counter()
    accuracy = _accuracy(preds, test, table)
    kinds = (GAUSSIAN, RANDOM)
    thresholds = [fallback] * len(kinds)
    if opts.threshold is None and val is not None and len(val):
        thresholds = [_choose(list(_baseline_maps(kind, val, 0, len(val), opts.seed)), val, opts) for kind in kinds]
    accs = [_Acc() for _ in kinds]
    for start in range(0, len(test), opts.batch_size):
        stop = min(len(test), start + opts.batch_size)
        maps = np.stack([_baseline_maps(kind, test, start, stop, opts.seed) for kind in kinds], axis=1)
        for r, acc in enumerate(accs):
            for offset in range(stop - start):
                acc.add(maps[offset, r], test.samples[start + offset], thresholds[r])
        if start < faith_n:
            faith(accs, test.tensors(start, stop), maps, explained[start:stop], start)
    for r, kind in enumerate(kinds):
        rows.append(Row(model_id, BASELINE_LAYER, kind, accs[r].values(accuracy), thresholds[r], accs[r].count,
                        len(accs[r].deletion), accs[r].flat, kind="baseline"))
    log(f"{model_id} reference heatmaps: {time.perf_counter() - t0:.0f} s")
    return rows


def _accuracy(preds: np.ndarray, split: Split, table: dict) -> float | None:
    hits = total = 0
    for pred, sample in zip(preds, split.samples):
        ids = _label_ids(sample, table)
        if not ids or pred < 0:
            continue
        total += 1
        hits += int(pred) in ids
    return hits / total if total else None


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _method_label(method: str) -> str:
    try:
        from cams.engine import METHODS
    except ImportError:  # pragma: no cover
        return method
    return METHODS.get(method, method)


def _cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "layer", "method"] + [HEADERS[key] for key in KEYS]
    body = [[row.model, row.layer, _method_label(row.method)] + [_fmt(row.values.get(key)) for key in KEYS]
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


CSV_FIELDS = ["model", "layer", "method", "method_label", *KEYS, "box_threshold", "n", "faith_n", "flat_heatmaps"]


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for row in rows:
            writer.writerow([row.model, row.layer, row.method, _method_label(row.method)]
                            + ["" if row.values.get(key) is None else f"{row.values[key]:.6f}" for key in KEYS]
                            + ["" if row.threshold is None else f"{row.threshold:g}", row.n, row.faith_n, row.flat])


# ------------------------------------------------------------------------------------------------ driver


def load_model(model_id: str, device: str | None = None):
    """The zoo model with its weights, in eval mode (a hook tests replace)."""
    from pfnet.weights import load

    return load(model_id, device=device)


@dataclass
class BenchResult:
    rows: list[Row]
    caption: str
    skipped: list[str]
    problems: list[str]


def run_bench(models: Sequence[str], layers: Sequence[str], methods: Sequence[str], n: int = DEFAULT_N,
              val_n: int = DEFAULT_VAL_N, faith_n: int = DEFAULT_FAITH_N, faith_steps: int = DEFAULT_FAITH_STEPS,
              faith_baseline: str = "blur", seed: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              threshold: float | None = None, data: str | Path | None = None, device: str | None = None,
              target: str = "predicted", log: Callable[[str], None] = lambda _: None) -> BenchResult:
    """Evaluate every model (models whose weights are missing are skipped, with the reason in ``skipped``)."""
    from cams.engine import METHODS
    from cams.layers import LayerError, layer_names
    from pfnet import zoo
    from pfnet.errors import PfnetError

    seed = TEST_SEED if seed is None else int(seed)
    models, layers, methods = list(models), list(layers), list(methods)
    if not models or not layers or not methods:
        raise BenchError("need at least one model, one layer and one method")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    for model_id in models:
        zoo.get(model_id)  # UnknownModelError names the known ids
    if n < 1:
        raise BenchError("--n must be at least 1")
    if val_n < 0 or faith_n < 0 or faith_steps < 1 or batch_size < 1:
        raise BenchError("--val-n and --faith-n must be >= 0, --faith-steps and --batch-size >= 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BenchError("--threshold is a fraction of the heatmap maximum, in [0, 1]")
    if data is None and (seed & 0xFFFFFFFF) in {TRAIN_SEED & 0xFFFFFFFF, (TRAIN_SEED - 1) & 0xFFFFFFFF}:
        raise BenchError(f"--seed {seed}: the test stream ({seed}) and validation stream ({seed + 1}) must differ "
                         f"from the training stream ({TRAIN_SEED})")
    if target not in TARGETS:
        raise BenchError(f"--target must be one of {', '.join(TARGETS)}")
    opts = Options(tuple(layers), tuple(methods), batch_size, faith_n, faith_steps, faith_baseline, threshold,
                   seed, target=target)

    problems: list[str] = []
    annotations = read_annotations(data, problems) if data is not None else None
    if annotations is not None and not annotations:
        raise BenchError(f"--data {data}: no image with usable boxes" +
                         (f" ({len(problems)} problem(s) reported)" if problems else ""))
    rows: list[Row] = []
    skipped: list[str] = []
    split_cache: dict = {}
    used: dict[str, object] = {}
    for model_id in models:
        entry = zoo.get(model_id)
        if annotations is None and entry.classes != "scenes":
            message = (f"{model_id}: an {entry.classes} model has no scene classes to localize; "
                       "give it your own images with --data DIR")
            skipped.append(message)
            log(f"skipping {message}")
            continue
        try:
            model = load_model(model_id, device)
        except PfnetError as error:
            skipped.append(f"{model_id}: {error}")
            log(f"skipping {model_id}: {error}")
            continue
        try:
            names = set(layer_names(model))
        except LayerError as error:
            skipped.append(f"{model_id}: {error}")
            continue
        bad = [layer for layer in layers if layer not in names]
        if bad:
            message = f"{model_id}: no layer(s) {', '.join(bad)} (valid: {', '.join(sorted(names))})"
            skipped.append(message)
            log(f"skipping {message}")
            continue
        if target == "label" and entry.num_classes > MAX_LABEL_CLASSES:
            message = (f"{model_id}: --target label explains every class at once; {entry.num_classes} classes "
                       f"is too many (at most {MAX_LABEL_CLASSES}); use --target predicted")
            skipped.append(message)
            log(f"skipping {message}")
            continue
        if entry.family == "resnet":
            # Same numbers (checked to ~1e-5 on the heatmaps), about 1.5-2x faster convolutions on CPU.
            model = model.to(memory_format=torch.channels_last)
        pre = entry.preprocess
        if annotations is not None:
            val, test = data_splits(annotations, pre, n, 0 if threshold is not None else val_n, seed, problems,
                                    split_cache)
            if not len(test):
                raise BenchError(f"--data {data}: no usable test image")
        else:
            key = ("scenes", int(pre.input_size), pre.mean, pre.std)
            if key not in split_cache:
                t0 = time.perf_counter()
                val_split = (scene_split("validation", seed + 1, val_n, pre, 1)
                             if threshold is None and val_n else None)
                split_cache[key] = (val_split, scene_split("test", seed, n, pre, 0))
                log(f"rendered {n + (val_n if val_split else 0)} scenes at {pre.input_size} px "
                    f"in {time.perf_counter() - t0:.0f} s")
            val, test = split_cache[key]
        log(f"{model_id}: {len(test)} test images, {len(val) if val else 0} validation images")
        rows.extend(evaluate_model(model, model_id, entry.class_names(), val, test, opts, log))
        used[model_id] = (val, test, pre)
        del model
    if not rows:
        raise NothingEvaluated("no model could be evaluated:\n  " + "\n  ".join(skipped))
    caption = _caption(used, opts, data, skipped, rows)
    return BenchResult(rows, caption, skipped, problems)


def _caption(used: dict, opts: Options, data, skipped: list[str], rows: list[Row]) -> str:
    val, test, pre = next(iter(used.values()))
    sizes = sorted({int(p.input_size) for _, _, p in used.values()})
    size_text = "/".join(str(s) for s in sizes)
    tolerance = "/".join(f"{M.pointing_tolerance((s, s)):.1f}" for s in sizes)
    n_test = len(test)
    faith = min(opts.faith_n, n_test)
    if data is None:
        source = (f"{n_test} held-out pfnet.scenes (stream {opts.seed}, indices 0-{n_test - 1}; training uses "
                  f"stream {TRAIN_SEED}) at {size_text} px, mode full")
        val_text = (f"on {len(val)} validation scenes (stream {opts.seed + 1})" if val is not None else "")
    else:
        source = f"{n_test} test images of {data} (mode full, boxes mapped to {size_text} px input)"
        val_text = f"on {len(val)} validation images of the same folder (disjoint)" if val is not None else ""
    if opts.threshold is not None:
        thr = f"threshold fixed at {opts.threshold:g} x max"
    elif val_text:
        thr = f"threshold (fraction of max) chosen per row {val_text}"
    else:
        thr = f"threshold fixed at {FALLBACK_THRESHOLD:g} x max (no validation images)"
    flat = sum(row.flat for row in rows if row.kind == "cam")
    parts = [
        f"Localization of the CAM of each image's "
        f"{'top-1 (predicted)' if opts.target == 'predicted' else 'ground-truth'} class: {source}.",
        f"Pointing game: heatmap max within 15 px at 224 px (= {tolerance} px here) of the object "
        f"{'mask' if data is None else 'box(es)'}; strict: on it (first argmax; flat maps miss). "
        f"Energy: share of heatmap mass inside the box(es).",
        f"Box accuracy: IoU >= 0.5 of the largest component's box, {thr}.",
        f"Deletion/insertion AUC (lower/higher is better): first {faith} of the {n_test} test images only, "
        f"{opts.faith_steps} steps, {opts.faith_baseline} baseline, probability of the explained class.",
        f"Reference rows ({GAUSSIAN}, {RANDOM}) use those heatmaps on the same images; accuracy is the model's "
        f"top-1 on the test images.",
    ]
    if flat:
        parts.append(f"{flat} CAM heatmap(s) were flat (no peak) and count as misses.")
    if skipped:
        parts.append("Skipped: " + "; ".join(s.split(":")[0] for s in skipped) + " (see stderr).")
    return " ".join(parts)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_bench_loc_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench-loc`` on an ``argparse`` subparsers object (``python -m cams bench-loc``)."""
    parser = subparsers.add_parser(
        "bench-loc", help="localization benchmark: pointing game, energy, box accuracy, deletion/insertion",
        description="Score CAM localization per model x layer x method on held-out pfnet scenes (or --data DIR), "
                    "with a centred-Gaussian and a uniform-random reference; prints one table.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated zoo ids")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated layer names")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated CAM method ids")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="test images (default %(default)s)")
    parser.add_argument("--val-n", type=int, default=DEFAULT_VAL_N,
                        help="validation images for the box-accuracy threshold (default %(default)s)")
    parser.add_argument("--faith-n", type=int, default=DEFAULT_FAITH_N,
                        help="test images for deletion/insertion (default %(default)s)")
    parser.add_argument("--faith-steps", type=int, default=DEFAULT_FAITH_STEPS,
                        help="deletion/insertion steps (default %(default)s)")
    parser.add_argument("--faith-baseline", choices=M.BASELINES, default="blur",
                        help="what deleted pixels become / insertion starts from (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="fixed box threshold (fraction of the max) instead of choosing it on validation")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"test scene stream (default {TEST_SEED}; validation uses seed + 1); with --data: "
                             "the shuffle seed")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default %(default)s")
    parser.add_argument("--csv", metavar="PATH", default=None, help="also write the table as CSV")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="also write the table as Markdown")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"your own images with {CSV_NAME} (image,x0,y0,x1,y1[,label]) or VOC .xml per image")
    parser.add_argument("--target", choices=TARGETS, default="predicted",
                        help="class to explain: each image's top-1 class (default) or its ground-truth label "
                             f"(models with at most {MAX_LABEL_CLASSES} classes)")
    parser.add_argument("--device", default=None, help="torch device (default: PFCAM_DEVICE or auto)")
    parser.set_defaults(handler=main_bench_loc)
    return parser


def main_bench_loc(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``bench-loc`` from parsed arguments; prints the table; returns the exit status."""
    from pfnet.errors import UnknownModelError

    out = out or sys.stdout
    err = err or sys.stderr

    def log(message: str) -> None:
        print(f"[bench-loc] {message}", file=err, flush=True)

    t0 = time.perf_counter()
    try:
        result = run_bench(_csv_list(args.models), _csv_list(args.layers), _csv_list(args.methods), n=args.n,
                           val_n=args.val_n, faith_n=args.faith_n, faith_steps=args.faith_steps,
                           faith_baseline=args.faith_baseline, seed=args.seed, batch_size=args.batch_size,
                           threshold=args.threshold, data=args.data, device=args.device, target=args.target,
                           log=log)
    except (BenchError, UnknownModelError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"bench-loc: error: {message}", file=err)
        return 1 if isinstance(error, NothingEvaluated) else 2
    for problem in result.problems:
        print(f"bench-loc: skipped: {problem}", file=err)
    for message in result.skipped:
        print(f"bench-loc: model skipped: {message}", file=err)
    out.write(format_table(result.rows, result.caption))
    out.flush()
    if args.csv:
        write_csv(result.rows, args.csv)
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(result.rows, result.caption), encoding="utf-8")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
