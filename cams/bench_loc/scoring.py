"""Scoring one model for ``bench-loc``: CAMs per layer x method and the two reference heatmaps, accumulated into
table rows (pointing game, energy in box, box accuracy, deletion/insertion, accuracy)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from cams import metrics as M
from cams.align import NO_OFFSET, fit_offset, layer_offsets, layer_strides, peak, shift_heatmap
from cams.bench_loc.data import Sample, Split


DEFAULT_FAITH_N = 100
DEFAULT_FAITH_STEPS = 16
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
    seed: int = 0  # the data's seed: the uniform-random reference heatmaps are drawn from it
    candidates: tuple[float, ...] = M.DEFAULT_THRESHOLDS
    target: str = "predicted"  # "predicted" (top-1) | "label" (ground-truth class)
    align: str = "model"  # "model" (recorded offsets) | "none" | "fit" (fitted on the validation split)


def _baseline_maps(kind: str, split: Split, start: int, stop: int, seed: int) -> np.ndarray:
    size = split.size
    if kind == GAUSSIAN:
        return np.broadcast_to(M.centre_gaussian((size, size)), (stop - start, size, size))
    return np.stack([M.uniform_random((size, size), seed=(int(seed) & 0xFFFFFFFF, split.stream, index))
                     for index in range(start, stop)])


def cam_batches(model, split: Split, opts: Options, method: str, class_names) -> Iterable:
    """(start, inputs, heatmaps [B, L, S, S] numpy, explained class [B], probs [B, C]) per batch, from one
    ``explain`` call covering every layer.

    ``opts.target == "predicted"``: each image's top-1 class. ``"label"``: each image's ground-truth class
    (the engine takes the same target list for every image, so all classes are explained at once and each
    image's label slot is kept; images without a usable label fall back to their top-1 class).
    """
    from cams.engine import explain

    table = _label_index(class_names)
    all_classes = list(range(len(class_names)))
    align = "none" if opts.align == "fit" else opts.align  # fitted offsets are applied by the caller
    for start in range(0, len(split), opts.batch_size):
        stop = min(len(split), start + opts.batch_size)
        inputs = split.tensors(start, stop)
        if opts.target == "label":
            result = explain(model, inputs, list(opts.layers), method=method, targets=all_classes,
                             class_names=class_names, batch_size=opts.batch_size, align=align)
            probs = result.probs.numpy()
            chosen = np.array([min(_label_ids(split.samples[start + i], table), default=int(probs[i].argmax()))
                               for i in range(stop - start)], dtype=np.int64)
            maps = result.heatmaps[torch.arange(stop - start), torch.from_numpy(chosen)].numpy()
            yield start, inputs, maps, chosen, probs
        else:
            result = explain(model, inputs, list(opts.layers), method=method, targets=None,
                             class_names=class_names, batch_size=opts.batch_size, align=align)
            yield (start, inputs, result.heatmaps[:, 0].numpy(), result.targets[:, 0].numpy(),
                   result.probs.numpy())


def _choose(maps: list[np.ndarray], split: Split, opts: Options) -> float:
    return M.choose_threshold(maps, [s.boxes for s in split.samples], opts.candidates)


def fit_offsets(val_maps: list[list[np.ndarray]], val: Split, strides: Sequence[int]) -> list[tuple[float, float]]:
    """Per layer, the offset (at most one cell) that brings the validation peaks closest to the objects' centres."""
    regions = [M.object_mask((val.size, val.size), box=s.boxes, mask=s.mask) for s in val.samples]
    offsets = []
    for maps, stride in zip(val_maps, strides):
        pairs = [(peak(m), region) for m, region in zip(maps, regions) if region.any()]
        pairs = [(point, region) for point, region in pairs if point is not None]
        offsets.append(fit_offset([p for p, _ in pairs], [r for _, r in pairs], max_shift=stride)
                       if pairs else NO_OFFSET)
    return offsets


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

    recorded = layer_offsets(model, opts.layers, "model" if opts.align == "model" else "none")
    # one cell per layer bounds the fitted offsets; the grid is the same for every method
    strides = layer_strides(model, opts.layers, (val.size, val.size)) if opts.align == "fit" and val else None
    for method in opts.methods:
        t0 = time.perf_counter()
        thresholds = [fallback] * len(opts.layers)
        offsets = recorded
        if val is not None and len(val) and (opts.threshold is None or opts.align == "fit"):
            val_maps: list[list[np.ndarray]] = [[] for _ in opts.layers]
            for _, _, maps, _, _ in cam_batches(model, val, opts, method, class_names):
                for position in range(len(opts.layers)):
                    val_maps[position].extend(maps[:, position])
            if opts.align == "fit":
                offsets = fit_offsets(val_maps, val, strides)
                val_maps = [[shift_heatmap(m, offsets[p]) for m in val_maps[p]] for p in range(len(opts.layers))]
                log(f"{model_id} {method}: fitted offsets " + ", ".join(
                    f"{layer} ({dy:g}, {dx:g})" for layer, (dy, dx) in zip(opts.layers, offsets)))
            if opts.threshold is None:
                thresholds = [_choose(val_maps[position], val, opts) for position in range(len(opts.layers))]
        accs = [_Acc() for _ in opts.layers]
        for start, inputs, maps, targets, probs in cam_batches(model, test, opts, method, class_names):
            if opts.align == "fit":
                maps = np.stack([np.stack([shift_heatmap(maps[b, p], offsets[p]) for p in range(maps.shape[1])])
                                 for b in range(maps.shape[0])])
            preds[start:start + len(targets)] = probs.argmax(axis=1)
            explained[start:start + len(targets)] = targets
            for position, acc in enumerate(accs):
                for offset in range(maps.shape[0]):
                    acc.add(maps[offset, position], test.samples[start + offset], thresholds[position])
            faith(accs, inputs, maps, targets, start)
        accuracy = _accuracy(preds, test, table)
        for position, layer in enumerate(opts.layers):
            rows.append(Row(model_id, layer, method, accs[position].values(accuracy), thresholds[position],
                            accs[position].count, len(accs[position].deletion), accs[position].flat,
                            offset=offsets[position]))
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
