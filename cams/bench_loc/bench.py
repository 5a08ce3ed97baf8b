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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

import torch

from cams import metrics as M
from cams.align import ALIGN_MODES
# The data and the scoring live in cams/loc_data.py and cams/loc_scoring.py; re-exported here.
from cams.loc_data import (CSV_NAME, MAX_ANNOTATION_BYTES, TEST_SEED, TRAIN_SEED, Annotation, BenchError,  # noqa: F401
                           Sample, Split, data_splits, read_annotations, read_boxes_csv, read_voc, scene_split)
from cams.loc_scoring import (BASELINE_LAYER, DEFAULT_BATCH_SIZE, DEFAULT_FAITH_N, DEFAULT_FAITH_STEPS,  # noqa: F401
                              FALLBACK_THRESHOLD, GAUSSIAN, RANDOM, Options, Row, _cam_batches, evaluate_model)

DEFAULT_MODELS = ("demo_r50", "demo_r50_max", "demo_r50_hybrid")
DEFAULT_LAYERS = ("layer3", "layer4")
DEFAULT_METHODS = ("gradcam", "gradcampp", "layercam", "eigencam")
DEFAULT_N = 500
DEFAULT_VAL_N = 100

KEYS = ("accuracy", "pointing15", "pointing_strict", "energy", "box_accuracy", "deletion_auc", "insertion_auc")
HEADERS = {"accuracy": "accuracy", "pointing15": "pointing game (15 px)",
           "pointing_strict": "pointing game (strict)", "energy": "energy in box", "box_accuracy": "box accuracy",
           "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC"}
TARGETS = ("predicted", "label")
MAX_LABEL_CLASSES = 64  # --target label runs every class through the engine at once


class NothingEvaluated(BenchError):
    """Every model was skipped (e.g. no weights): exit status 1."""


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


CSV_FIELDS = ["model", "layer", "method", "method_label", *KEYS, "box_threshold", "n", "faith_n", "flat_heatmaps",
              "offset_dy", "offset_dx"]
ALIGN_CHOICES = (*ALIGN_MODES, "fit")


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for row in rows:
            writer.writerow([row.model, row.layer, row.method, _method_label(row.method)]
                            + ["" if row.values.get(key) is None else f"{row.values[key]:.6f}" for key in KEYS]
                            + ["" if row.threshold is None else f"{row.threshold:g}", row.n, row.faith_n, row.flat]
                            + (["", ""] if row.offset is None else [f"{row.offset[0]:g}", f"{row.offset[1]:g}"]))


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
              target: str = "predicted", align: str = "model",
              log: Callable[[str], None] = lambda _: None) -> BenchResult:
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
    if align not in ALIGN_CHOICES:
        raise BenchError(f"--align must be one of {', '.join(ALIGN_CHOICES)}")
    if align == "fit" and val_n < 1:
        raise BenchError("--align fit chooses the offsets on the validation split: --val-n must be at least 1")
    opts = Options(tuple(layers), tuple(methods), batch_size, faith_n, faith_steps, faith_baseline, threshold,
                   seed, target=target, align=align)
    need_val = threshold is None or align == "fit"

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
            val, test = data_splits(annotations, pre, n, val_n if need_val else 0, seed, problems, split_cache)
            if not len(test):
                raise BenchError(f"--data {data}: no usable test image")
        else:
            key = ("scenes", int(pre.input_size), pre.mean, pre.std)
            if key not in split_cache:
                t0 = time.perf_counter()
                val_split = (scene_split("validation", seed + 1, val_n, pre, 1)
                             if need_val and val_n else None)
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
    if opts.align == "none":
        parts.append("Heatmaps drawn by the plain bilinear resize (no alignment).")
    elif opts.align == "fit":
        where = val_text or "on the validation split"
        parts.append(f"Heatmaps drawn moved by an offset fitted per model x layer x method {where} "
                     "(peaks to object centres; offsets in the CSV).")
    else:
        aligned = sorted({row.model for row in rows if row.kind == "cam" and row.offset and any(row.offset)})
        parts.append("Heatmaps drawn with each model's recorded alignment offset (cams.align)"
                     + (f": {', '.join(aligned)}; the others unshifted." if aligned else "; none recorded."))
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
    parser.add_argument("--align", choices=ALIGN_CHOICES, default="model",
                        help="where heatmaps are drawn: each model's recorded alignment offset (default), the plain "
                             "resize (none), or an offset fitted per row on the validation split (fit)")
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
                           align=args.align, log=log)
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
