"""Localization and faithfulness metrics for CAM heatmaps.

Everything here works on heatmaps at the network input's resolution (``[H, W]`` float arrays, larger means
"more salient"; ``cams.explain`` gives them in [0, 1]) and on ground truth in the *same geometry*: for the
demo scenes that is the scene itself (rendered at the input size, preprocessing mode "full"); for a user's
own images, map each box with :func:`map_box` using the crop box that ``pfnet.preprocess.prepare`` returns.

Conventions
-----------
* A box is ``(x0, y0, x1, y1)`` in pixel units, half-open: pixel ``(x, y)`` (its centre at
  ``(x + 0.5, y + 0.5)``) belongs to the box when ``x0 <= x + 0.5 < x1`` and ``y0 <= y + 0.5 < y1``; for
  integer boxes that is ``x0 <= x < x1`` (the convention of ``pfdemo.scenes.Scene.box``).
* Where a function takes ``box`` it also accepts a list of boxes (several annotated objects of the image).
  The *any-object* rule applies: the object region is the union of the boxes (pointing game, energy), and a
  predicted box counts as correct when it matches any one of them (box accuracy).
* ``mask`` (bool ``[H, W]``), when given, is the object region and takes precedence over ``box`` for the
  pointing game and the energy; box accuracy always uses boxes.

Definitions chosen
------------------
* **Pointing game** (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016/IJCV 2018):
  a hit when the heatmap's maximum lies on the object or within ``tolerance`` pixels of it (Euclidean distance
  between pixel centres, inclusive: ``distance <= tolerance``). Zhang et al. use 15 px at 224 px; we scale
  it with the side: ``tolerance = 15 * min(H, W) / 224`` (:func:`pointing_tolerance`), so 7.5 px at 112 px
  and about 10.7 px at 160 px. The strict variant uses ``tolerance = 0`` (the maximum must be on the object).
  *Ties*: a hit when **any** pixel that attains the maximum is a hit (Quantus's ``PointingGame`` rule), which
  does not depend on the order pixels are scanned in: a map and its mirror images score the same. Maxima tie
  often on drawn CAMs (bilinear upsampling clamps the outer half cell, and a whole-pixel alignment shift
  replicates the edge, so a peak at the border becomes a plateau). A flat heatmap (max == min, e.g. all zeros)
  points nowhere and is always a **miss**, so a degenerate CAM can never score by luck (Quantus: a hit).
* **Energy in box** ("energy-based pointing game", Wang et al., Score-CAM 2020): the share of the heatmap's
  mass (negative values clipped to 0) that falls inside the object region; 0.0 for a heatmap with no mass.
* **Box accuracy** (the CAM weakly-supervised localization protocol): threshold the heatmap at
  ``fraction * max``, keep the largest 8-connected component (``cv2.connectedComponentsWithStats``; the first
  one on a tie), take its bounding box; a hit when IoU >= 0.5 with the object box. An all-zero heatmap has no
  component and is a miss. ``fraction`` is chosen with :func:`choose_threshold` on a validation split that is
  disjoint from the test split (highest box accuracy; the smallest such candidate on a tie).
* **Deletion / insertion** (Petsiuk et al., RISE, BMVC 2018): pixels are ranked by heatmap value (descending;
  equal values keep row-major order, a stable sort) and removed from the image (deletion) or inserted into a
  baseline image (insertion) in ``steps`` steps (step i: the ``round(i * P / steps)`` top pixels; RISE's step
  of ``s`` pixels moves ``min(i * s, P)``: the same counts for ``s = P / steps`` where ``steps`` divides P);
  the curve is the softmax probability of the target class
  after each step (``steps + 1`` points, fraction 0 to 1), computed with batched forward passes under
  ``torch.inference_mode``. The AUC is the trapezoid area over the fraction axis, i.e. normalised to [0, 1]. Lower is
  better for deletion, higher for insertion. Baselines: ``"blur"`` (Gaussian blur, sigma = 5 % of the side)
  or ``"mean"`` (every pixel set to the image's own per-channel mean), or a constant value / tensor.
* **Reference heatmaps**: :func:`centre_gaussian` (a centred isotropic Gaussian, sigma = a quarter of the
  shorter side, peak 1) and :func:`uniform_random` (seeded uniform noise in [0, 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import cv2
import numpy as np

Box = tuple[float, float, float, float]
Boxes = Box | Sequence[Box] | np.ndarray | None

#: Zhang et al.'s pointing-game tolerance, in pixels at a 224-pixel input.
POINTING_TOLERANCE_PX = 15.0
REFERENCE_SIDE = 224
#: Candidate thresholds (fractions of each heatmap's max) searched by :func:`choose_threshold` by default.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
BOX_IOU = 0.5
BLUR_SIGMA_FRACTION = 0.05
GAUSSIAN_SIGMA_FRACTION = 0.25
BASELINES = ("blur", "mean")

__all__ = [
    "Box", "POINTING_TOLERANCE_PX", "REFERENCE_SIDE", "DEFAULT_THRESHOLDS", "BASELINES",
    "pointing_tolerance", "as_boxes", "box_to_mask", "object_mask", "peak", "maxima", "is_flat",
    "pointing_game",
    "energy_in_box", "heatmap_box", "box_iou", "box_accuracy", "box_accuracy_curve", "choose_threshold",
    "map_box", "centre_gaussian", "uniform_random", "Faithfulness", "auc", "baseline_images",
    "perturbation_inputs", "deletion_insertion",
]


# --------------------------------------------------------------------------------------------- geometry


def _heatmap(heatmap) -> np.ndarray:
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap [H, W], got shape {h.shape}")
    if not np.isfinite(h).all():
        h = np.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
    return h


def pointing_tolerance(shape: Sequence[int], base: float = POINTING_TOLERANCE_PX,
                       reference: int = REFERENCE_SIDE) -> float:
    """Pointing-game tolerance for a heatmap of ``shape`` (..., H, W): ``base * min(H, W) / reference``."""
    height, width = int(shape[-2]), int(shape[-1])
    return float(base) * min(height, width) / float(reference)


def as_boxes(box: Boxes) -> list[Box]:
    """One box or a list of boxes -> a list of float 4-tuples (empty for None / an empty list)."""
    if box is None:
        return []
    arr = np.asarray(box, dtype=np.float64)
    if arr.size == 0:
        return []
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1); got an array of shape {arr.shape}")
    return [tuple(float(v) for v in row) for row in arr]  # type: ignore[misc]


def box_to_mask(box: Boxes, shape: Sequence[int]) -> np.ndarray:
    """Bool ``[H, W]`` mask of the pixels whose centres lie in the box (union over several boxes)."""
    height, width = int(shape[-2]), int(shape[-1])
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in as_boxes(box):
        # pixel i is in [a, b) when a <= i + 0.5 < b  <=>  ceil(a - 0.5) <= i < ceil(b - 0.5)
        c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), width)
        r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def object_mask(shape: Sequence[int], box: Boxes = None, mask: np.ndarray | None = None) -> np.ndarray:
    """The object region: ``mask`` when given, else the union of the boxes."""
    if mask is not None:
        region = np.asarray(mask, dtype=bool)
        if region.shape != tuple(int(s) for s in shape[-2:]):
            raise ValueError(f"mask shape {region.shape} does not match the heatmap's {tuple(shape[-2:])}")
        return region
    return box_to_mask(box, shape)


def map_box(box: Sequence[float], crop_box: Sequence[float], input_size: int | Sequence[int]) -> Box | None:
    """Map a box from original-image pixels to network-input pixels.

    ``crop_box`` is the ``(left, top, right, bottom)`` region of the original image that the input covers
    (``pfnet.preprocess.prepare(...).crop_box``) and ``input_size`` the input side (or ``(width, height)``).
    The result is clipped to the input; ``None`` when nothing of the box is left (e.g. outside a centre crop).
    """
    if isinstance(input_size, (int, np.integer)):
        out_w = out_h = float(input_size)
    else:
        out_w, out_h = (float(v) for v in input_size)
    left, top, right, bottom = (float(v) for v in crop_box)
    if right <= left or bottom <= top:
        raise ValueError(f"empty crop box {tuple(crop_box)}")
    sx, sy = out_w / (right - left), out_h / (bottom - top)
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = (min(max((x0 - left) * sx, 0.0), out_w), min(max((y0 - top) * sy, 0.0), out_h),
              min(max((x1 - left) * sx, 0.0), out_w), min(max((y1 - top) * sy, 0.0), out_h))
    if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
        return None
    return mapped


# --------------------------------------------------------------------------------------- pointing game


def peak(heatmap) -> tuple[int, int] | None:
    """``(y, x)`` of the heatmap's maximum; ties -> the first one in row-major order. None for a flat map
    (:func:`is_flat`: no peak to point with or to align)."""
    h = _heatmap(heatmap)
    if is_flat(h):
        return None
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    return int(y), int(x)


def is_flat(heatmap) -> bool:
    """True when the heatmap has no peak at all (max == min, e.g. an all-zero CAM)."""
    h = _heatmap(heatmap)
    return bool(h.size == 0 or h.max() <= h.min())


def maxima(heatmap) -> np.ndarray:
    """Bool ``[H, W]``: every pixel that equals the heatmap's maximum (the whole plateau when the maximum ties)."""
    h = _heatmap(heatmap)
    return h == h.max() if h.size else np.zeros(h.shape, dtype=bool)


def pointing_game(heatmap, box: Boxes = None, mask: np.ndarray | None = None,
                  tolerance: float | None = None) -> bool:
    """Zhang et al.'s pointing game: is the heatmap's maximum within ``tolerance`` px of the object?

    ``tolerance=None`` -> :func:`pointing_tolerance` (15 px at 224 px, scaled); ``tolerance=0`` -> strict
    (the maximum must be on the object). Ties: a hit when *any* maximal pixel is a hit (Quantus's
    ``PointingGame``), so the answer does not depend on scan order (a map and its mirror images score alike).
    A flat heatmap is a miss (Quantus would count it a hit: every pixel is maximal).
    """
    h = _heatmap(heatmap)
    region = object_mask(h.shape, box, mask)
    if not region.any() or is_flat(h):
        return False
    top = maxima(h)
    if (top & region).any():
        return True
    tol = pointing_tolerance(h.shape) if tolerance is None else float(tolerance)
    if tol <= 0:
        return False
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(~region)  # Euclidean distance of each pixel centre to the nearest object pixel
    return bool(np.min(distance[top]) ** 2 <= tol * tol + 1e-9)


# ------------------------------------------------------------------------------------------------ energy


def energy_in_box(heatmap, box: Boxes = None, mask: np.ndarray | None = None) -> float:
    """Share of the heatmap's (non-negative) mass inside the object region, in [0, 1]; 0.0 without mass."""
    h = np.clip(_heatmap(heatmap), 0.0, None)
    region = object_mask(h.shape, box, mask)
    total = float(h.sum())
    if total <= 0.0:
        return 0.0
    return float(h[region].sum() / total)


# ------------------------------------------------------------------------------------------ box accuracy


def heatmap_box(heatmap, fraction: float) -> Box | None:
    """Bounding box of the largest 8-connected component of ``heatmap >= fraction * max``; None if empty."""
    h = _heatmap(heatmap)
    top = float(h.max()) if h.size else 0.0
    if top <= 0.0:
        return None
    binary = (h >= float(fraction) * top).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y = int(stats[best, cv2.CC_STAT_LEFT]), int(stats[best, cv2.CC_STAT_TOP])
    w, hh = int(stats[best, cv2.CC_STAT_WIDTH]), int(stats[best, cv2.CC_STAT_HEIGHT])
    return (float(x), float(y), float(x + w), float(y + hh))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (continuous coordinates)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def box_accuracy(heatmap, box: Boxes, fraction: float, iou_threshold: float = BOX_IOU) -> bool:
    """True when the box of the thresholded heatmap's largest component has IoU >= 0.5 with any object box."""
    predicted = heatmap_box(heatmap, fraction)
    if predicted is None:
        return False
    return any(box_iou(predicted, gt) >= iou_threshold for gt in as_boxes(box))


def box_accuracy_curve(heatmaps, boxes: Sequence[Boxes], candidates: Sequence[float] = DEFAULT_THRESHOLDS,
                       iou_threshold: float = BOX_IOU) -> np.ndarray:
    """Mean box accuracy of ``heatmaps`` ([N, H, W] or a list) at each candidate fraction -> ``[len(candidates)]``."""
    heatmaps = list(heatmaps)
    if len(heatmaps) != len(boxes):
        raise ValueError(f"{len(heatmaps)} heatmaps but {len(boxes)} box entries")
    if not heatmaps:
        raise ValueError("no heatmaps to score")
    from cams.metrics_sweep import largest_component_boxes

    hits = np.zeros(len(candidates), dtype=np.float64)
    for heatmap, box in zip(heatmaps, boxes):  # every candidate's largest component from one sweep
        truth = as_boxes(box)
        for j, predicted in enumerate(largest_component_boxes(_heatmap(heatmap), candidates, heatmap_box)):
            hits[j] += predicted is not None and any(box_iou(predicted, gt) >= iou_threshold for gt in truth)
    return hits / len(heatmaps)


def choose_threshold(heatmaps, boxes: Sequence[Boxes], candidates: Sequence[float] = DEFAULT_THRESHOLDS,
                     iou_threshold: float = BOX_IOU) -> float:
    """The candidate fraction with the highest box accuracy on ``heatmaps`` (a validation split, which must be
    disjoint from the split you report on); the smallest such candidate on a tie."""
    candidates = [float(c) for c in candidates]
    if not candidates:
        raise ValueError("no candidate thresholds")
    curve = box_accuracy_curve(heatmaps, boxes, candidates, iou_threshold)
    return candidates[int(np.argmax(curve))]


# ------------------------------------------------------------------------------------ reference heatmaps


def centre_gaussian(shape: Sequence[int], sigma: float | None = None) -> np.ndarray:
    """Float32 ``[H, W]`` centred isotropic Gaussian with peak 1; ``sigma`` defaults to ``min(H, W) / 4``."""
    height, width = int(shape[-2]), int(shape[-1])
    sigma = GAUSSIAN_SIGMA_FRACTION * min(height, width) if sigma is None else float(sigma)
    ys = np.arange(height, dtype=np.float64) - (height - 1) / 2.0
    xs = np.arange(width, dtype=np.float64) - (width - 1) / 2.0
    g = np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2.0 * sigma * sigma))
    return (g / g.max()).astype(np.float32)


def uniform_random(shape: Sequence[int], seed: int | Sequence[int] = 0) -> np.ndarray:
    """Float32 uniform noise in [0, 1) of ``shape`` (e.g. ``(N, H, W)``), reproducible from ``seed`` (an int
    or a sequence of ints, e.g. ``(run_seed, image_index)``)."""
    rng = np.random.default_rng(int(seed) if isinstance(seed, (int, np.integer)) else [int(v) for v in seed])
    return rng.random(tuple(int(s) for s in shape), dtype=np.float32)


# ---------------------------------------------------------------------------------- deletion / insertion


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion curves: ``fractions`` [K+1]; ``deletion`` / ``insertion`` [N, K+1] (or
    [N, R, K+1]) probabilities of the target class; the AUCs drop the last axis."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> np.ndarray:
        return auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> np.ndarray:
        return auc(self.insertion, self.fractions)


def auc(curve, fractions=None) -> np.ndarray | float:
    """Trapezoid area under ``curve`` (last axis) over ``fractions`` (default: evenly spaced on [0, 1]),
    divided by the fraction range: a curve of values in [0, 1] gets an AUC in [0, 1]."""
    y = np.asarray(curve, dtype=np.float64)
    x = np.linspace(0.0, 1.0, y.shape[-1]) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if y.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    area = np.sum((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2.0, axis=-1) / (x[-1] - x[0])
    return float(area) if np.ndim(area) == 0 else area


def _gaussian_kernel(sigma: float):
    import torch

    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    return k / k.sum(), radius


def baseline_images(images, baseline: str | float = "blur", blur_sigma: float | None = None):
    """The substrate that deletion fills in / insertion starts from, for ``images`` [N, C, H, W] (a tensor).

    ``"blur"``: separable Gaussian blur (reflect padding), sigma ``blur_sigma`` or 5 % of the shorter side;
    ``"mean"``: each image's per-channel mean everywhere; a number: that constant (in input units);
    a tensor broadcastable to ``images``: used as is.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(baseline, torch.Tensor):
        return baseline.to(images.dtype).expand_as(images).clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if baseline == "blur":
        n, c, height, width = images.shape
        sigma = BLUR_SIGMA_FRACTION * min(height, width) if blur_sigma is None else float(blur_sigma)
        kernel, radius = _gaussian_kernel(sigma)
        kernel = kernel.to(images.device, images.dtype)
        x = images.reshape(n * c, 1, height, width)
        pad_x = min(radius, width - 1)
        pad_y = min(radius, height - 1)
        kx = kernel[radius - pad_x: radius + pad_x + 1] if pad_x < radius else kernel
        ky = kernel[radius - pad_y: radius + pad_y + 1] if pad_y < radius else kernel
        x = F.conv2d(F.pad(x, (pad_x, pad_x, 0, 0), mode="reflect"), (kx / kx.sum()).view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, pad_y, pad_y), mode="reflect"), (ky / ky.sum()).view(1, 1, -1, 1))
        return x.reshape(n, c, height, width)
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}, a number or a tensor")


def _step_masks(heatmap: np.ndarray, steps: int):
    """Bool [K+1, H, W]: step i marks the ``round(i * P / K)`` most salient pixels (stable order)."""
    import torch

    h = _heatmap(heatmap)
    pixels = h.size
    order = np.argsort(-h.ravel(), kind="stable")
    rank = np.empty(pixels, dtype=np.int64)
    rank[order] = np.arange(pixels)
    counts = np.round(np.arange(steps + 1) * pixels / steps).astype(np.int64)
    masks = rank[None, :] < counts[:, None]
    return torch.from_numpy(masks.reshape(steps + 1, *h.shape))


def perturbation_inputs(images, heatmaps, targets):
    """Checked inputs of a perturbation metric: ``(images [N, C, H, W] tensor, heatmaps float32 [N, R, H, W],
    targets int64 [N], single)``; ``single`` when ``heatmaps`` came as ``[N, H, W]`` (R = 1 added)."""
    import torch

    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    maps = np.asarray(heatmaps, dtype=np.float32)
    n, _, height, width = images.shape
    single = maps.ndim == 3
    if single:
        maps = maps[:, None]
    if maps.ndim != 4 or maps.shape[0] != n or maps.shape[2:] != (height, width):
        raise ValueError(f"heatmaps must be [N, H, W] or [N, R, H, W] with N, H, W = {(n, height, width)}, "
                         f"got {np.shape(heatmaps)}")
    target_ids = np.asarray(targets, dtype=np.int64).reshape(-1)
    if target_ids.shape[0] != n:
        raise ValueError(f"{target_ids.shape[0]} targets for {n} images")
    return images, maps, target_ids, single


def deletion_insertion(model, images, heatmaps, targets, steps: int = 16, baseline: str | float = "blur",
                       batch_size: int = 16, blur_sigma: float | None = None) -> Faithfulness:
    """Deletion and insertion curves of ``model`` for ``images`` [N, C, H, W] (network input, a tensor),
    ``heatmaps`` [N, H, W] (or [N, R, H, W]: R heatmaps per image, e.g. one per layer) and ``targets`` [N]
    class ids.

    Deletion: step i replaces the ``round(i * P / steps)`` most salient of the P pixels with the baseline
    (NumPy's round, half to even; the curve's ``fractions`` are those counts over P); insertion: step i pastes
    them into the baseline. RISE's ``CausalMetric`` takes a step size ``s`` in pixels instead: step i moves
    ``min(i * s, P)`` pixels over ``ceil(P / s)`` steps (the last one shorter); with ``s = P / steps`` the counts
    are the same wherever ``steps`` divides P (e.g. 16 steps on 224 x 224 or 160 x 160). A
    tensor ``baseline`` may be one image ``[1 or C, H, W]``-broadcastable or one per image ``[N, C, H, W]``.
    The score is the softmax probability of the target class. The two end points
    (the intact image and the baseline) are the same for every heatmap of an image and are run once. Forward
    passes are batched (``batch_size`` inputs at a time, across images) under ``torch.inference_mode``; the model is
    used as given (put it in eval mode first). Curves are [N, K+1] (or [N, R, K+1]).
    """
    import torch

    if steps < 1:
        raise ValueError("steps must be at least 1")
    images, maps, target_ids, single = perturbation_inputs(images, heatmaps, targets)
    n, _, height, width = images.shape
    per_image = maps.shape[1]
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = images.device
    images = images.to(device=device, dtype=torch.float32)
    points = steps + 1
    deletion = np.zeros((n, per_image, points), dtype=np.float64)
    insertion = np.zeros((n, per_image, points), dtype=np.float64)
    interior = steps - 1  # steps 1 .. K-1 of each curve
    variants_per_image = 2 + per_image * 2 * interior
    group = max(1, (4 * batch_size) // variants_per_image)  # images whose variants are built at once
    with torch.inference_mode():
        for start in range(0, n, group):
            stop = min(n, start + group)
            x = images[start:stop]
            per_image_base = isinstance(baseline, torch.Tensor) and baseline.ndim == 4 and baseline.shape[0] == n > 1
            base = baseline_images(x, baseline[start:stop].to(device) if per_image_base else baseline, blur_sigma)
            variants = []
            for i in range(stop - start):
                variants += [x[i:i + 1], base[i:i + 1]]
                for r in range(per_image):
                    masks = _step_masks(maps[start + i, r], steps)[1:steps].to(device).unsqueeze(1)
                    variants.append(torch.where(masks, base[i:i + 1], x[i:i + 1]))  # deletion
                    variants.append(torch.where(masks, x[i:i + 1], base[i:i + 1]))  # insertion
            batch = torch.cat(variants)
            probs = []
            for b in range(0, batch.shape[0], batch_size):
                probs.append(torch.softmax(model(batch[b:b + batch_size]).float(), dim=1).cpu())
            probs = torch.cat(probs).numpy()
            offset = 0
            for i in range(stop - start):
                t = int(target_ids[start + i])
                p_image, p_base = probs[offset, t], probs[offset + 1, t]
                offset += 2
                for r in range(per_image):
                    dele = probs[offset:offset + interior, t]
                    ins = probs[offset + interior:offset + 2 * interior, t]
                    offset += 2 * interior
                    deletion[start + i, r] = np.concatenate([[p_image], dele, [p_base]])
                    insertion[start + i, r] = np.concatenate([[p_base], ins, [p_image]])
    fractions = np.round(np.arange(points) * (height * width) / steps) / (height * width)
    if single:
        deletion, insertion = deletion[:, 0], insertion[:, 0]
    return Faithfulness(fractions=fractions, deletion=deletion, insertion=insertion)
