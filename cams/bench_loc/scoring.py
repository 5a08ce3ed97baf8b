"""Scoring one model for ``bench-loc``: CAMs per layer x method and the two reference heatmaps, accumulated into
table rows (pointing game, energy in box, box accuracy, deletion/insertion, accuracy)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cams import metrics as M
from cams.align import NO_OFFSET, fit_offset, layer_offsets, layer_strides, shift_heatmap
from cams.bench_loc.accum import RowScores
from cams.boxacc import DEFAULT_PROTOCOL, best_iou_curve, curve_from_boxes, threshold_boxes
from cams.bench_loc.data import Sample, Split


# Deletion/insertion: 2 + 2 x 15 x 10 = 302 forwards per image and model at the defaults (16 steps, 8 CAM rows + 2
# references), ~0.85 s per image and model on a quiet 2-core CPU: the plain run at n=500 took 80 s with 10 images
# and 131 s with 30 there (target: 180 s); --faith-n 100 (the earlier default) is the full-size figure.
DEFAULT_FAITH_N = 30
DEFAULT_FAITH_STEPS = 16
DEFAULT_ROAD_N = 0  # ROAD costs ~4 s per image and heatmap on the demo models (18 sparse solves)
DEFAULT_BATCH_SIZE = 16
FALLBACK_THRESHOLD = 0.5  # only when there is no validation image and no --threshold
GAUSSIAN = "centre Gaussian"
RANDOM = "uniform random"
BASELINE_LAYER = "-"


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
    offset: tuple[float, float] | None = None  # the heatmap alignment (dy, dx) px the row was scored with
    road_n: int = 0  # test images scored by ROAD
    depth: int | None = None  # 1-based block index of the layer (cams.layers.block_layers); None if not a block
    box_protocol: str = DEFAULT_PROTOCOL  # the protocol of the row's MaxBoxAccV2 columns (cams.boxacc)


def _norm_label(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


def _label_index(class_names: Sequence[str]) -> dict[str, int]:
    """Normalised class name (case, ``_``/``-``/spaces ignored) -> class id."""
    return {_norm_label(name): index for index, name in enumerate(class_names)}


def _label_ids(sample: Sample, table: dict[str, int]) -> set[int]:
    """The sample's ground-truth class ids: its ``class_ids`` where the data gives them, else its names looked up."""
    if sample.class_ids:
        return set(sample.class_ids)
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
    seed: int = 0  # the data's seed: the uniform-random reference heatmaps are drawn from it
    candidates: tuple[float, ...] = M.DEFAULT_THRESHOLDS
    target: str = "predicted"  # "predicted" (top-1) | "label" (ground-truth class)
    align: str = "model"  # "model" (recorded offsets) | "none" | "fit" (fitted on the validation split)
    road_n: int = DEFAULT_ROAD_N  # test images scored by ROAD (the first ones)
    box_protocol: str = DEFAULT_PROTOCOL  # MaxBoxAccV2: "wsol" (wsolevaluation's numbers) | "pfcam"
    box_step: float = 0.01  # MaxBoxAccV2's threshold step (wsolevaluation: 0.01 or 0.001)
    # the reference heatmaps' MaxBoxAccV2 curves, shared by the models of a run (the same maps and boxes)
    reference_curves: dict = field(default_factory=dict, repr=False, compare=False)


def _baseline_maps(kind: str, split: Split, start: int, stop: int, seed: int) -> np.ndarray:
    size = split.size
    if kind == GAUSSIAN:
        return np.broadcast_to(M.centre_gaussian((size, size)), (stop - start, size, size))
    return np.stack([M.uniform_random((size, size), seed=(int(seed) & 0xFFFFFFFF, split.stream, index))
                     for index in range(start, stop)])


def explain_methods_batch(model, split: Split, start: int, stop: int, opts: Options, methods: Sequence[str],
                          class_names, inputs: torch.Tensor | None = None
                          ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per method, (heatmaps [B, L, S, S] numpy, explained class [B], probs [B, C]) of images ``start:stop``,
    every layer and method from one forward and one gradient call (:func:`cams.multi.explain_methods`).

    ``opts.target == "predicted"``: each image's top-1 class. ``"label"``: each image's ground-truth class (the
    smallest id where it has several; an image without a usable label falls back to its top-1 class).
    """
    from cams.multi import explain_methods

    inputs = split.tensors(start, stop) if inputs is None else inputs
    align = "none" if opts.align == "fit" else opts.align  # fitted offsets are applied by the caller
    targets = None
    if opts.target == "label":
        table = _label_index(class_names)
        targets = [[min((class_id for class_id in _label_ids(split.samples[index], table)
                         if 0 <= class_id < len(class_names)), default=-1)] for index in range(start, stop)]
    results = explain_methods(model, inputs, list(opts.layers), methods, targets=targets, class_names=class_names,
                              batch_size=opts.batch_size, align=align)
    return {method: (result.heatmaps[:, 0].numpy(), result.targets[:, 0].numpy(), result.probs.numpy())
            for method, result in results.items()}


def _choose(maps: list[np.ndarray], split: Split, opts: Options) -> float:
    return M.choose_threshold(maps, [s.boxes for s in split.samples], opts.candidates)


def fit_offsets(val_maps: list[list[np.ndarray]], val: Split, strides: Sequence[int]) -> list[tuple[float, float]]:
    """Per layer, the offset (at most one cell) that brings the validation peaks closest to the objects' centres."""
    regions = [M.object_mask((val.size, val.size), box=s.boxes, mask=s.mask) for s in val.samples]
    offsets = []
    for maps, stride in zip(val_maps, strides):
        pairs = [(M.peak(m), region) for m, region in zip(maps, regions) if region.any()]
        pairs = [(point, region) for point, region in pairs if point is not None]
        offsets.append(fit_offset([p for p, _ in pairs], [r for _, r in pairs], max_shift=stride)
                       if pairs else NO_OFFSET)
    return offsets


def inference_copy(model, probe: torch.Tensor):
    """A copy of ``model`` with BatchNorm folded into the convolutions (``torch.fx``), for the deletion/insertion
    forwards, which are most of bench-loc's time: fewer passes over memory per forward, logits equal to ~1e-6.
    The model itself when it cannot be traced or the copy does not give its logits on ``probe`` (inputs)."""
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model)
        with torch.no_grad():
            same = torch.allclose(model(probe), fused(probe), rtol=1e-4, atol=1e-4)
    except Exception:  # noqa: BLE001 - any model fx cannot trace is simply run as it is
        return model
    return fused if same else model


def _calibrate(model, model_id: str, class_names, val: Split | None, opts: Options, recorded, strides,
               fallback: float, log: Callable[[str], None], step: Callable[[str], None]) -> dict[str, tuple]:
    """Per method, the box thresholds and heatmap offsets per layer, chosen on the validation split (all methods
    of a batch from one pass)."""
    if val is None or not len(val) or (opts.threshold is not None and opts.align != "fit"):
        return {method: ([fallback] * len(opts.layers), recorded) for method in opts.methods}
    val_maps = {method: [[] for _ in opts.layers] for method in opts.methods}
    for start in range(0, len(val), opts.batch_size):
        stop = min(len(val), start + opts.batch_size)
        for method, (maps, _, _) in explain_methods_batch(model, val, start, stop, opts, opts.methods,
                                                           class_names).items():
            for position in range(len(opts.layers)):
                val_maps[method][position].extend(maps[:, position])
        step(f"{model_id} validation {stop}/{len(val)}")
    out = {}
    for method, maps in val_maps.items():
        thresholds, offsets = [fallback] * len(opts.layers), recorded
        if opts.align == "fit":
            offsets = fit_offsets(maps, val, strides)
            maps = [[shift_heatmap(m, offsets[p]) for m in maps[p]] for p in range(len(opts.layers))]
            log(f"{model_id} {method}: fitted offsets " + ", ".join(
                f"{layer} ({dy:g}, {dx:g})" for layer, (dy, dx) in zip(opts.layers, offsets)))
        if opts.threshold is None:
            thresholds = [_choose(maps[position], val, opts) for position in range(len(opts.layers))]
        out[method] = (thresholds, offsets)
    return out


def _score(accs: list[RowScores], maps: np.ndarray, split: Split, start: int, thresholds: Sequence[float],
           curves: Sequence[Sequence[np.ndarray]] | None = None) -> None:
    """The per-image scores of one batch; maps [B, R, S, S], one accumulator per R (``curves[r][b]``: the
    MaxBoxAccV2 curves when known)."""
    for r, acc in enumerate(accs):
        for offset in range(maps.shape[0]):
            acc.add(maps[offset, r], split.samples[start + offset], thresholds[r],
                    None if curves is None else curves[r][offset])


def _reference_curves(kind: str, split: Split, start: int, stop: int, maps: np.ndarray, opts: Options
                      ) -> list[np.ndarray]:
    """MaxBoxAccV2 curves of a reference heatmap kind for images ``start:stop`` (maps [B, S, S]), from the run's
    cache: the Gaussian is one map per size (its contour boxes are traced once), the noise one map per
    (seed, split, image), and every model of the same input size sees the same images and boxes."""
    cache = opts.reference_curves
    protocol, step = opts.box_protocol, opts.box_step
    thresholds = RowScores(box_protocol=protocol, box_step=step).box_thresholds
    out = []
    for offset in range(stop - start):
        sample = split.samples[start + offset]
        if kind == GAUSSIAN:
            key = (kind, split.size, protocol, step)
            if key not in cache:
                cache[key] = threshold_boxes(maps[offset], thresholds, protocol)
            out.append(curve_from_boxes(*cache[key], sample.boxes, len(thresholds), protocol))
            continue
        key = (kind, split.size, protocol, step, int(opts.seed), split.stream, start + offset, sample.name,
               tuple(tuple(box) for box in sample.boxes))
        if key not in cache:
            cache[key] = best_iou_curve(maps[offset], sample.boxes, thresholds, protocol)
        out.append(cache[key])
    return out


def _by_target(scored: list[tuple[list[RowScores], np.ndarray, np.ndarray]], k: int):
    """The first ``k`` images' (row scores, maps [k, R, S, S], targets [k]) merged where the targets agree, so
    that one perturbation call covers every heatmap of the same classes (the intact image runs once)."""
    groups: dict[bytes, list[tuple[list[RowScores], np.ndarray, np.ndarray]]] = {}
    for accs, maps, targets in scored:
        groups.setdefault(np.asarray(targets[:k], dtype=np.int64).tobytes(), []).append((accs, maps, targets))
    for members in groups.values():
        yield ([acc for member in members for acc in member[0]],
               np.concatenate([member[1][:k] for member in members], axis=1), members[0][2][:k])


def _faith(model, inputs: torch.Tensor, scored: list[tuple[list[RowScores], np.ndarray, np.ndarray]], k: int,
           opts: Options) -> None:
    """Deletion/insertion of the first ``k`` images of a batch for every (row scores, maps [B, R, S, S],
    targets) in ``scored``."""
    for accs, maps, targets in _by_target(scored, k):
        result = M.deletion_insertion(model, inputs[:k], maps, targets, steps=opts.faith_steps,
                                      baseline=opts.faith_baseline, batch_size=opts.batch_size)
        for r, acc in enumerate(accs):
            acc.deletion.extend(result.deletion_auc[:, r].tolist())
            acc.insertion.extend(result.insertion_auc[:, r].tolist())


def _road(model, inputs: torch.Tensor, scored: list[tuple[list[RowScores], np.ndarray, np.ndarray]], k: int,
          opts: Options, first: int) -> None:
    """ROAD MoRF/LeRF of the first ``k`` images of a batch (test images ``first ..``) for every heatmap in
    ``scored``; the imputation noise is seeded by the data's seed and the image's position (reproducible)."""
    from cams.road import road

    for accs, maps, targets in _by_target(scored, k):
        for i in range(k):
            result = road(model, inputs[i:i + 1], maps[i:i + 1], targets[i:i + 1], batch_size=opts.batch_size,
                          seed=(int(opts.seed) * 1_000_003 + first + i) & 0xFFFFFFFF)
            for r, acc in enumerate(accs):
                acc.road_morf.append(float(result.morf_score[0, r]))
                acc.road_lerf.append(float(result.lerf_score[0, r]))


def evaluate_model(model, model_id: str, class_names: Sequence[str], val: Split | None, test: Split,
                   opts: Options, log: Callable[[str], None] = lambda _: None,
                   step: Callable[[str], None] = lambda _: None) -> list[Row]:
    """Rows for one model: every layer x method, then the two reference heatmaps.

    Thresholds (and fitted offsets) come from the validation split first; then the test split goes through
    batch by batch: every method's CAMs, the reference heatmaps, and one deletion/insertion pass for all.
    ``step(message)`` is called after each batch (all methods at once, validation then test): see
    :func:`steps`.
    """
    t0 = time.perf_counter()
    table = _label_index(class_names)
    preds = np.full(len(test), -1, dtype=np.int64)      # top-1 class (accuracy)
    explained = np.full(len(test), -1, dtype=np.int64)  # the class the CAMs explain (deletion/insertion target)
    faith_n = min(opts.faith_n, len(test))
    road_n = min(opts.road_n, len(test))
    fallback = opts.threshold if opts.threshold is not None else FALLBACK_THRESHOLD
    recorded = layer_offsets(model, opts.layers, "model" if opts.align == "model" else "none")
    # one cell per layer bounds the fitted offsets; the grid is the same for every method
    strides = layer_strides(model, opts.layers, (val.size, val.size)) if opts.align == "fit" and val else None
    calibration = _calibrate(model, model_id, class_names, val, opts, recorded, strides, fallback, log, step)
    kinds = (GAUSSIAN, RANDOM)
    ref_thresholds = [fallback] * len(kinds)
    if opts.threshold is None and val is not None and len(val):
        ref_thresholds = [_choose(list(_baseline_maps(kind, val, 0, len(val), opts.seed)), val, opts)
                          for kind in kinds]
    scores = lambda: RowScores(box_protocol=opts.box_protocol, box_step=opts.box_step)  # noqa: E731
    cam_accs = {method: [scores() for _ in opts.layers] for method in opts.methods}
    ref_accs = [scores() for _ in kinds]
    faith_model = inference_copy(model, test.tensors(0, min(2, len(test)))) if faith_n or road_n else model
    for start in range(0, len(test), opts.batch_size):
        stop = min(len(test), start + opts.batch_size)
        inputs = test.tensors(start, stop)
        scored: list[tuple[list[RowScores], np.ndarray, np.ndarray]] = []
        explained_batch = explain_methods_batch(model, test, start, stop, opts, opts.methods, class_names, inputs)
        for method in opts.methods:
            thresholds, offsets = calibration[method]
            maps, targets, probs = explained_batch[method]
            if opts.align == "fit":
                maps = np.stack([np.stack([shift_heatmap(maps[b, p], offsets[p]) for p in range(maps.shape[1])])
                                 for b in range(maps.shape[0])])
            preds[start:stop] = probs.argmax(axis=1)
            explained[start:stop] = targets
            _score(cam_accs[method], maps, test, start, thresholds)
            scored.append((cam_accs[method], maps, targets))
        maps = np.stack([_baseline_maps(kind, test, start, stop, opts.seed) for kind in kinds], axis=1)
        _score(ref_accs, maps, test, start, ref_thresholds,
               [_reference_curves(kind, test, start, stop, maps[:, r], opts) for r, kind in enumerate(kinds)])
        scored.append((ref_accs, maps, explained[start:stop].copy()))
        if start < faith_n:
            _faith(faith_model, inputs, scored, min(faith_n - start, stop - start), opts)
        if start < road_n:
            _road(faith_model, inputs, scored, min(road_n - start, stop - start), opts, start)
        step(f"{model_id} test {stop}/{len(test)}")
    accuracy = _accuracy(preds, test, table)
    rows: list[Row] = []
    for method in opts.methods:
        thresholds, offsets = calibration[method]
        for position, layer in enumerate(opts.layers):
            acc = cam_accs[method][position]
            rows.append(Row(model_id, layer, method, acc.values(accuracy), thresholds[position], acc.count,
                            len(acc.deletion), acc.flat, offset=offsets[position], road_n=len(acc.road_morf),
                            box_protocol=opts.box_protocol))
    for r, kind in enumerate(kinds):
        rows.append(Row(model_id, BASELINE_LAYER, kind, ref_accs[r].values(accuracy), ref_thresholds[r],
                        ref_accs[r].count, len(ref_accs[r].deletion), ref_accs[r].flat, kind="baseline",
                        road_n=len(ref_accs[r].road_morf), box_protocol=opts.box_protocol))
    log(f"{model_id}: {len(test)} test images, {len(opts.methods)} methods and the reference heatmaps, "
        f"{time.perf_counter() - t0:.0f} s")
    return rows


def steps(opts: Options, n_val: int, n_test: int) -> int:
    """How many times :func:`evaluate_model` calls ``step`` for splits of these sizes."""
    batches = lambda count: -(-count // opts.batch_size)  # noqa: E731
    calibrated = n_val and (opts.threshold is None or opts.align == "fit")
    return (batches(n_val) if calibrated else 0) + batches(n_test)


def _accuracy(preds: np.ndarray, split: Split, table: dict) -> float | None:
    hits = total = 0
    for pred, sample in zip(preds, split.samples):
        ids = _label_ids(sample, table)
        if not ids or pred < 0:
            continue
        total += 1
        hits += int(pred) in ids
    return hits / total if total else None
