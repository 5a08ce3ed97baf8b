"""Scoring a demo model on held-out scenes, as its card records it: accuracy, the heatmap alignment fitted on the
validation stream, and the Grad-CAM pointing game of the ground-truth class, aligned and unaligned."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from cams.align import fit_offset, layer_strides
from cams.engine import explain
from cams.metrics import is_flat, peak, pointing_game as hit, pointing_tolerance
from pfdemo.scenes import TEST_SEED, scene_batch


@torch.no_grad()
def accuracy(net: torch.nn.Module, size: int, n: int = 1000, seed: int = TEST_SEED, batch: int = 100) -> float:
    net.eval()
    correct = 0
    for lo in range(0, n, batch):
        x, y, _ = scene_batch(seed, range(lo, min(lo + batch, n)), size)
        correct += int((net(x).argmax(1) == y).sum())
    return correct / n


EVAL_LAYERS = ("layer4", "layer3")
CALIBRATION_SEED = TEST_SEED + 1  # bench-loc's validation stream: the alignment is chosen there, never on the test
CALIBRATION_N = 300
#: The offset is a property of the layer, not of the method: it is fitted from the peaks of each of these and
#: recorded only where they agree (every fit within AGREEMENT_PX of the median, per axis).
FIT_METHODS = ("gradcam", "gradcampp", "layercam")
AGREEMENT_PX = 2.0


def label_maps(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, layers: Sequence[str],
               method: str = "gradcam", align: str | dict = "none") -> np.ndarray:
    """Heatmaps [N, L, H, W] of each image's ground-truth class (``cams.explain`` with each label as its image's
    target)."""
    result = explain(net, x, list(layers), method=method, targets=labels.view(-1, 1), align=align)
    return result.heatmaps[:, 0].numpy()


def fit_alignment(net: torch.nn.Module, size: int, layers: Sequence[str] = EVAL_LAYERS, n: int = CALIBRATION_N,
                  seed: int = CALIBRATION_SEED, batch: int = 50) -> dict[str, dict]:
    """Per layer: the offset (dy, dx) fitted (``cams.align.fit_offset``) from the unaligned peaks of each of
    :data:`FIT_METHODS` on ``n`` scenes of the validation stream, and ``offset``, their per-axis median when
    all agree within :data:`AGREEMENT_PX`, else None (the layer is drawn unshifted)."""
    peaks = {method: {layer: [] for layer in layers} for method in FIT_METHODS}
    masks = []
    net.eval()
    for lo in range(0, n, batch):
        x, y, scenes = scene_batch(seed, range(lo, min(lo + batch, n)), size)
        masks += [sc.mask for sc in scenes]
        for method in FIT_METHODS:
            maps = label_maps(net, x, y, layers, method)
            for position, layer in enumerate(layers):
                peaks[method][layer] += [peak(m) for m in maps[:, position]]
    report = {}
    for layer, stride in zip(layers, layer_strides(net, layers, (size, size))):  # search at most one cell
        fits = {method: fit_offset(peaks[method][layer], masks, max_shift=stride) for method in FIT_METHODS}
        values = np.array(list(fits.values()))
        median = np.median(values, axis=0)
        agree = bool(np.all(np.abs(values - median) <= AGREEMENT_PX))
        report[layer] = {"fits": {m: list(v) for m, v in fits.items()},
                         "offset": [float(v) for v in median] if agree else None}
    return report


def pointing_game(net: torch.nn.Module, size: int, n: int = 500, seed: int = TEST_SEED, layer: str = "layer4",
                  offset: tuple[float, float] | None = None, batch: int = 50) -> dict:
    """Pointing game with the ground-truth class: hit if a maximal pixel (any, on a plateau:
    :func:`cams.metrics.pointing_game`) is within 15*S/224 px of the mask (and
    strict: inside it); a flat map is a miss. Also the centred (peak = image centre) and uniform-random
    (expected) baselines. ``offset``: the heatmap alignment (None: unaligned)."""
    tol = pointing_tolerance((size, size))
    hits = strict = centre = centre_strict = flat = 0
    rand = rand_strict = 0.0
    net.eval()
    for lo in range(0, n, batch):
        x, y, scenes = scene_batch(seed, range(lo, min(lo + batch, n)), size)
        align = {layer: offset} if offset is not None else "none"
        for heatmap, sc in zip(label_maps(net, x, y, [layer], "gradcam", align)[:, 0], scenes):
            dist = cv2.distanceTransform((~sc.mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            flat += is_flat(heatmap)
            hits += hit(heatmap, mask=sc.mask)
            strict += hit(heatmap, mask=sc.mask, tolerance=0)
            cr = cc = size // 2
            centre += int(dist[cr, cc] <= tol)
            centre_strict += bool(sc.mask[cr, cc])
            rand += float((dist <= tol).mean())
            rand_strict += float(sc.mask.mean())
    result = {"layer": layer, "n": n, "tolerance_px": round(tol, 2),
              "hit_15px": round(hits / n, 4), "hit_strict": round(strict / n, 4), "flat_maps": flat,
              "centre_baseline_15px": round(centre / n, 4), "centre_baseline_strict": round(centre_strict / n, 4),
              "random_baseline_15px": round(rand / n, 4), "random_baseline_strict": round(rand_strict / n, 4)}
    if offset is not None:
        result["offset"] = [float(offset[0]), float(offset[1])]
    return result


def localization(net: torch.nn.Module, size: int) -> dict:
    """The card's localization figures: the fitted offsets, and per layer the Grad-CAM pointing game drawn with
    the recorded offset and unaligned."""
    fits = fit_alignment(net, size)
    offsets = {layer: fit["offset"] for layer, fit in fits.items() if fit["offset"] is not None}
    report = {"cam_offsets": offsets, "cam_offset_fits": {layer: fit["fits"] for layer, fit in fits.items()}}
    return {**report, **pointing_figures(net, size, offsets)}


def pointing_figures(net: torch.nn.Module, size: int, offsets: dict) -> dict:
    """The card's pointing-game entries: per layer of :data:`EVAL_LAYERS`, drawn with its recorded offset (where
    ``offsets`` has one) and unaligned."""
    report = {}
    for layer in EVAL_LAYERS:
        suffix = "" if layer == "layer4" else f"_{layer}"
        unaligned = pointing_game(net, size, layer=layer)
        report[f"pointing_game{suffix}_unaligned"] = unaligned
        report[f"pointing_game{suffix}"] = (pointing_game(net, size, layer=layer, offset=tuple(offsets[layer]))
                                            if layer in offsets else unaligned)
    return report


