"""``run_bench``: every model x layer x method scored on the caller's data (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any
from collections.abc import Callable, Sequence

import torch

from cams import metrics as M
from cams.align import ALIGN_MODES
from cams.bench_loc.data import BenchError, DataSource
from cams.boxacc import DEFAULT_PROTOCOL, PROTOCOL_LABELS, PROTOCOLS, STEPS
from cams.bench_loc.scoring import (DEFAULT_BATCH_SIZE, DEFAULT_FAITH_N, DEFAULT_FAITH_STEPS, DEFAULT_ROAD_N,
                                    FALLBACK_THRESHOLD, GAUSSIAN, RANDOM, Options, Row, evaluate_model, steps)
from cams.progress import Progress
from cams.ray_runtime import RayOptions, check_engine

DEFAULT_MODELS = ("demo_r50", "demo_r50_max", "demo_r50_hybrid")
DEFAULT_LAYERS = ("layer3", "layer4")
DEFAULT_METHODS = ("gradcam", "gradcampp", "layercam", "eigencam_fixed")
DEFAULT_N = 500
DEFAULT_VAL_N = 100
TARGETS = ("predicted", "label")
ALIGN_CHOICES = (*ALIGN_MODES, "fit")


class NothingEvaluated(BenchError):
    """Every model was skipped (e.g. no weights): exit status 1."""


def load_model(model_id: str, device: str | None = None):
    """The zoo model with its weights, in eval mode (a hook tests replace)."""
    from pfnet.weights import load

    return load(model_id, device=device)


def layer_depths(model) -> dict[str, int]:
    """Layer name -> 1-based block index (:func:`cams.layers.block_layers`), for the blocks and every name that
    gives the same tensor as one (``layer3`` is ``layer3.5`` on R50: depth 13)."""
    from cams.layers import block_layers, canonical, layer_names

    by_tensor = {canonical(model, block): index for index, block in enumerate(block_layers(model), start=1)}
    return {name: by_tensor[canonical(model, name)] for name in layer_names(model)
            if canonical(model, name) in by_tensor}


@dataclass
class BenchResult:
    rows: list[Row]
    caption: str
    skipped: list[str]
    problems: list[str]


def run_bench(models: Sequence[str], layers: Sequence[str], methods: Sequence[str], data: DataSource,
              n: int = DEFAULT_N, val_n: int = DEFAULT_VAL_N, faith_n: int = DEFAULT_FAITH_N,
              faith_steps: int = DEFAULT_FAITH_STEPS, faith_baseline: str = "blur",
              batch_size: int = DEFAULT_BATCH_SIZE, threshold: float | None = None, device: str | None = None,
              target: str = "predicted", align: str = "model",
              log: Callable[[str], None] = lambda _: None, road_n: int = DEFAULT_ROAD_N,
              progress: Progress | None = None, engine: str = "local",
              ray_options: RayOptions | None = None, box_protocol: str = DEFAULT_PROTOCOL,
              box_step: float = 0.01) -> BenchResult:
    """Evaluate every model on ``data``'s splits (up to ``n`` test and ``val_n`` validation images per model);
    models whose weights are missing are skipped, with the reason in ``skipped``. ``progress``
    (:class:`cams.progress.Progress`): one step per batch (its ``total`` is set here and corrected as each
    model's splits are known; local engine). ``engine="ray"`` scores the models on a Ray cluster
    (``ray_options``; :mod:`cams.bench_loc.ray_bench`): the same rows. ``box_protocol`` / ``box_step``:
    MaxBoxAccV2's protocol and threshold step (:mod:`cams.boxacc`; ``"wsol"``, wsolevaluation's numbers, by
    default)."""
    from cams.engine import METHODS
    from cams.layers import LayerError, default_layers, expand_layers, layer_names, pfnet_family
    from pfnet import zoo
    from pfnet.errors import PfnetError

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
    if val_n < 0 or faith_n < 0 or road_n < 0 or faith_steps < 1 or batch_size < 1:
        raise BenchError("--val-n, --faith-n and --road-n must be >= 0, --faith-steps and --batch-size >= 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BenchError("--threshold is a fraction of the heatmap maximum, in [0, 1]")
    if target not in TARGETS:
        raise BenchError(f"--target must be one of {', '.join(TARGETS)}")
    if align not in ALIGN_CHOICES:
        raise BenchError(f"--align must be one of {', '.join(ALIGN_CHOICES)}")
    if align == "fit" and val_n < 1:
        raise BenchError("--align fit chooses the offsets on the validation split: --val-n must be at least 1")
    check_engine(engine, BenchError)
    if box_protocol not in PROTOCOLS or box_step not in STEPS:
        raise BenchError(f"--box-protocol must be one of {', '.join(PROTOCOLS)} and --box-step one of "
                         f"{', '.join(map(str, STEPS))}")
    opts = Options(tuple(layers), tuple(methods), batch_size, faith_n, faith_steps, faith_baseline, threshold,
                   data.seed, target=target, align=align, road_n=road_n, box_protocol=box_protocol,
                   box_step=box_step)
    need_val = threshold is None or align == "fit"
    planned = steps(opts, val_n if need_val else 0, n)  # per model, until its splits are known
    step = progress.step if progress is not None else (lambda _: None)

    rows: list[Row] = []
    skipped: list[str] = []
    used: dict[str, object] = {}
    on_ray: list[tuple[str, Any, Any, Options]] = []  # (model id, model, zoo entry, its options) with engine="ray"
    for index, model_id in enumerate(models):
        if progress is not None:  # what is done, plus the plan for this model and the ones after it
            progress.total = progress.count + planned * (len(models) - index)
        entry = zoo.get(model_id)
        reason = data.skip_reason(entry)
        if reason:
            message = f"{model_id}: {reason}"
            skipped.append(message)
            log(f"skipping {message}")
            continue
        try:
            model = load_model(model_id, "cpu" if engine == "ray" else device)  # Ray: the actors' devices
        except PfnetError as error:
            skipped.append(f"{model_id}: {error}")
            log(f"skipping {model_id}: {error}")
            continue
        try:
            names = set(layer_names(model))
            wanted = layers
            if tuple(layers) == DEFAULT_LAYERS and pfnet_family(model) is None:
                wanted = default_layers(model)  # another network (timm, EfficientNet): its own last stages
            model_layers = expand_layers(model, wanted)
        except LayerError as error:
            skipped.append(f"{model_id}: {error}")
            continue
        bad = [layer for layer in model_layers if layer not in names]
        if bad:
            message = f"{model_id}: no layer(s) {', '.join(bad)} (valid: {', '.join(sorted(names))})"
            skipped.append(message)
            log(f"skipping {message}")
            continue
        if entry.family == "resnet":
            # Same numbers (checked to ~1e-5 on the heatmaps), about 1.5-2x faster convolutions on CPU.
            model = model.to(memory_format=torch.channels_last)
        if engine == "ray":
            on_ray.append((model_id, model, entry, replace(opts, layers=tuple(model_layers))))
            continue
        pre = entry.preprocess
        val, test = data.splits(pre, n, val_n if need_val else 0, log)
        log(f"{model_id}: {len(test)} test images, {len(val) if val else 0} validation images")
        if progress is not None:
            progress.total += steps(opts, len(val) if val else 0, len(test)) - planned
        model_rows = evaluate_model(model, model_id, entry.class_names(), val, test,
                                    replace(opts, layers=tuple(model_layers)), log, step)
        depth = layer_depths(model)
        for row in model_rows:
            row.depth = depth.get(row.layer)
        rows.extend(model_rows)
        used[model_id] = (val, test, pre)
        del model
    if on_ray:
        from cams.bench_loc.ray_bench import evaluate_on_ray

        rows, used = evaluate_on_ray(on_ray, data, n, val_n if need_val else 0, ray_options or RayOptions(), log)
        depths = {model_id: layer_depths(model) for model_id, model, _, _ in on_ray}
        for row in rows:
            row.depth = depths[row.model].get(row.layer)
    if not rows:
        raise NothingEvaluated("no model could be evaluated:\n  " + "\n  ".join(skipped))
    caption = _caption(used, opts, data, skipped, rows)
    return BenchResult(rows, caption, skipped, data.problems)


def _caption(used: dict, opts: Options, data: DataSource, skipped: list[str], rows: list[Row]) -> str:
    val, test, pre = next(iter(used.values()))
    sizes = sorted({int(p.input_size) for _, _, p in used.values()})
    size_text = "/".join(str(s) for s in sizes)
    tolerance = "/".join(f"{M.pointing_tolerance((s, s)):.1f}" for s in sizes)
    n_test = len(test)
    faith = min(opts.faith_n, n_test)
    source, val_text = data.describe(n_test, len(val) if val is not None else None, size_text)
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
        f"{data.region}; strict: on it (a hit when any maximal pixel is; flat maps miss). "
        f"Energy: share of heatmap mass inside the box(es).",
        f"Box accuracy: IoU >= 0.5 of the largest component's box, {thr}.",
        f"MaxBoxAccV2 (Choe et al. 2020), {PROTOCOL_LABELS[opts.box_protocol]} ({opts.box_protocol}"
        + ("" if opts.box_protocol == "pfcam" else ": 8-bit cut, inclusive boxes")
        + f"): boxes of every contour, the best threshold of a {opts.box_step:g} sweep over these "
        "test images per row, BoxAcc at IoU 0.3/0.5/0.7 and their mean.",
        f"Deletion/insertion AUC (lower/higher is better): first {faith} of the {n_test} test images only, "
        f"{opts.faith_steps} steps, {opts.faith_baseline} baseline, probability of the explained class.",
        _road_text(min(opts.road_n, n_test), n_test),
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




def _road_text(road_n: int, n_test: int) -> str:
    if not road_n:
        return "ROAD: not run (--road-n 0; about 4 s per image and heatmap on the demo models)."
    return (f"ROAD (Rong et al. 2022; MoRF lower, LeRF and combined = (LeRF - MoRF)/2 higher is better): first "
            f"{road_n} of the {n_test} test images only, noisy linear imputation, 10-90 % of the pixels removed by "
            f"pytorch-grad-cam's percentile rule (its numbers), probability of the explained class.")
