"""ROAD: RemOve And Debias (Rong et al., "A consistent and efficient evaluation strategy for attribution methods",
ICML 2022), the faithfulness metric of pytorch-grad-cam (``pytorch_grad_cam.metrics.road``).

A share ``f`` of the pixels is removed in the heatmap's order, most relevant first (MoRF) or least relevant first
(LeRF), and filled in by **noisy linear imputation**: each removed pixel becomes the weighted mean of its eight
neighbours (weights 1/6 for the four edge neighbours, 1/12 for the diagonal ones: pytorch-grad-cam's
``neighbors_weights``, imported from it), solved as one sparse linear system per image and mask, plus Gaussian
noise of standard deviation ``noise`` (0.01 in input units, as pytorch-grad-cam). Imputation leaves no hard edge
that tells the model where pixels were removed, which deletion with a blur or a constant does. The score is the
explained class's softmax probability (``score="probability"``; pytorch-grad-cam's
``ClassifierOutputSoftmaxTarget``) or its logit (``"logit"``; ``ClassifierOutputTarget``).

Curves: ``morf[..., j]`` / ``lerf[..., j]`` is the score after removing ``fractions[j]`` of the pixels. Summaries,
averaged over the fractions: ``morf_score`` (lower means more faithful), ``lerf_score`` (higher means more
faithful), ``combined = (lerf_score - morf_score) / 2`` (pytorch-grad-cam's ``ROADCombined``). pytorch-grad-cam's
``ROADMostRelevantFirstAverage`` / ``ROADLeastRelevantFirstAverage`` report ``morf_score - original`` /
``lerf_score - original``.

Which pixels go (``removal``):

* ``"percentile"`` (default): pytorch-grad-cam's rule as it is (``RemoveMostRelevantFirst`` /
  ``RemoveLeastRelevantFirst``, op for op), so the default reproduces pytorch-grad-cam's ROAD numbers
  (``tests/test_road.py`` checks against its ROAD classes): MoRF at ``f`` keeps the pixels below the
  ``100 (1 - f)``-th percentile of the heatmap and removes the rest; LeRF does the same on ``1 - heatmap``. On a
  CAM, whose ReLU leaves many pixels at exactly 0, a threshold on a tie removes every tied pixel: up to all of
  them (MoRF; a 4 x 4 map with first row 0.4, 0.3, 0.2, 0.1 and twelve zeros loses all 16 pixels at f = 0.5) or
  far more than ``f`` (LeRF).
* ``"rank"`` (pfcam's variant): exactly ``H*W - ceil((1 - f) * (H*W - 1))`` pixels, the top (MoRF) or bottom
  (LeRF) of the heatmap's ranking, equal values in row-major order (a stable sort): the count the percentile
  threshold removes from a map *without* ties (the 4 x 4 map above: 8 pixels), so every fraction means that
  share of the pixels. It differs from pytorch-grad-cam wherever values tie (layer-3 CAMs of the demo models:
  MoRF up to 0.035 apart).

An image whose every pixel is removed has nothing to impute from; it becomes 0 (the dataset mean, in normalised
input units) plus the noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch

from cams.metrics import perturbation_inputs

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
ORDERS = ("morf", "lerf")
REMOVALS = ("rank", "percentile")
SCORES = ("probability", "logit")
NOISE = 0.01

__all__ = ["DEFAULT_FRACTIONS", "ORDERS", "REMOVALS", "SCORES", "NOISE", "Road", "removal_masks",
           "imputation_system", "impute", "road"]


def _neighbour_weights() -> list[tuple[tuple[int, int], float]]:
    from pytorch_grad_cam.metrics.road import neighbors_weights

    return list(neighbors_weights)


def removal_masks(heatmap, fractions: Sequence[float], order: str, removal: str = "percentile") -> np.ndarray:
    """Bool ``[P, H, W]``: the pixels removed at each fraction (True = imputed)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {REMOVALS}; got {removal!r}")
    h = np.asarray(heatmap)
    if h.ndim != 2:
        raise ValueError(f"expected a heatmap [H, W], got shape {h.shape}")
    fractions = [float(f) for f in fractions]
    if any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must lie strictly between 0 and 1; got {fractions}")
    n = h.size
    masks = np.zeros((len(fractions), *h.shape), dtype=bool)
    if removal == "percentile":  # pytorch-grad-cam's RemoveMostRelevantFirst / RemoveLeastRelevantFirst, op for op
        values = torch.from_numpy(np.ascontiguousarray(h))
        values = values if order == "morf" else 1 - values
        for j, f in enumerate(fractions):
            threshold = np.percentile(values.numpy(), round(100.0 * (1.0 - f), 9))
            masks[j] = ~(values < threshold).numpy()
        return masks
    ranking = np.argsort(-h.ravel() if order == "morf" else h.ravel(), kind="stable")
    flat = masks.reshape(len(fractions), n)
    for j, f in enumerate(fractions):
        kept = math.ceil(round((1.0 - f) * (n - 1), 9))
        flat[j, ranking[:n - kept]] = True
    return masks


def imputation_system(removed: np.ndarray, image: np.ndarray):
    """The sparse system ``A x = b`` of linear imputation (pytorch-grad-cam's ``setup_sparse_system``, built at
    once instead of entry by entry): ``removed`` bool ``[H, W]``, ``image`` ``[C, H, W]`` -> ``(A [k, k] CSC,
    b [k, C], flat indices of the k removed pixels, row-major)``."""
    from scipy.sparse import coo_matrix

    height, width = removed.shape
    flat = image.reshape(image.shape[0], -1)
    missing = np.flatnonzero(removed.ravel())
    k = missing.size
    variable = np.full(height * width, -1, dtype=np.int64)
    variable[missing] = np.arange(k)
    rows, cols = missing // width, missing % width
    total = np.ones(k)
    b = np.zeros((k, image.shape[0]))
    entries_i, entries_j, entries_w = [np.arange(k)], [np.arange(k)], []
    for (dy, dx), weight in _neighbour_weights():
        r, c = rows + dy, cols + dx
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        total[~inside] -= weight
        neighbour = (r * width + c)[inside]
        equation = np.flatnonzero(inside)
        unknown = variable[neighbour] >= 0
        entries_i.append(equation[unknown])
        entries_j.append(variable[neighbour[unknown]])
        entries_w.append(np.full(int(unknown.sum()), weight))
        np.subtract.at(b, equation[~unknown], weight * flat[:, neighbour[~unknown]].T)
    values = np.concatenate([-total] + entries_w)
    a = coo_matrix((values, (np.concatenate(entries_i), np.concatenate(entries_j))), shape=(k, k)).tocsc()
    return a, b, missing


def impute(image: torch.Tensor, removed: np.ndarray, noise: float = NOISE,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``image`` ``[C, H, W]`` with the ``removed`` pixels filled by noisy linear imputation (a new tensor)."""
    from scipy.sparse.linalg import spsolve

    source = image.detach().cpu().to(torch.float32)
    out = source.clone().reshape(source.shape[0], -1)
    removed = np.asarray(removed, dtype=bool)
    if not removed.any():
        return out.reshape(source.shape)
    if removed.all():
        values = torch.zeros((source.shape[0], removed.size))
        missing = np.arange(removed.size)
    else:
        a, b, missing = imputation_system(removed, source.numpy().astype(np.float64))
        solution = spsolve(a, b, permc_spec="MMD_AT_PLUS_A").reshape(missing.size, -1)
        values = torch.from_numpy(solution.T).to(torch.float32)
    if noise:
        values = values + noise * torch.randn(values.shape, generator=generator)
    out[:, torch.from_numpy(missing)] = values
    return out.reshape(source.shape)


@dataclass
class Road:
    """ROAD curves: ``morf`` / ``lerf`` ``[N, P]`` (or ``[N, R, P]``), ``original`` ``[N]`` (the intact image's
    score), ``fractions`` ``[P]`` (share of pixels removed)."""

    fractions: np.ndarray
    original: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray

    @property
    def morf_score(self) -> np.ndarray:
        """Mean score over the fractions, most relevant removed first: lower is more faithful."""
        return self.morf.mean(axis=-1)

    @property
    def lerf_score(self) -> np.ndarray:
        """Mean score over the fractions, least relevant removed first: higher is more faithful."""
        return self.lerf.mean(axis=-1)

    @property
    def combined(self) -> np.ndarray:
        """``(lerf_score - morf_score) / 2``, pytorch-grad-cam's ``ROADCombined``: higher is more faithful."""
        return (self.lerf_score - self.morf_score) / 2.0


def _scores(model, batch: torch.Tensor, targets: np.ndarray, score: str, device) -> np.ndarray:
    logits = model(batch.to(device)).float()
    values = torch.softmax(logits, dim=1) if score == "probability" else logits
    return values[torch.arange(len(targets)), torch.from_numpy(targets).to(device)].cpu().numpy()


def road(model, images, heatmaps, targets, fractions: Sequence[float] = DEFAULT_FRACTIONS,
         removal: str = "percentile", score: str = "probability", noise: float = NOISE, seed: int = 0,
         batch_size: int = 16) -> Road:
    """ROAD curves of ``model`` for ``images`` ``[N, C, H, W]`` (network input), ``heatmaps`` ``[N, H, W]`` (or
    ``[N, R, H, W]``: R heatmaps per image) and ``targets`` ``[N]`` class ids.

    Imputations run on the CPU (one sparse solve per image, heatmap, order and fraction; the noise comes from a
    generator seeded by ``seed``, drawn in that order, so results do not depend on ``batch_size``); the imputed
    inputs go through the model ``batch_size`` at a time, across images, under ``torch.no_grad``. The model is
    used as given (put it in eval mode first).
    """
    if removal not in REMOVALS or score not in SCORES:
        raise ValueError(f"removal must be one of {REMOVALS} and score one of {SCORES}")
    images, maps, targets, single = perturbation_inputs(images, heatmaps, targets)
    n = images.shape[0]
    fractions = np.asarray([float(f) for f in fractions])
    per_image, points = maps.shape[1], len(fractions)
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = images.device
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFF)
    curves = np.zeros((n, per_image, len(ORDERS), points), dtype=np.float64)
    original = np.zeros(n, dtype=np.float64)
    pending: list[tuple[torch.Tensor, tuple[int, int, int, int]]] = []

    def flush() -> None:
        batch = torch.stack([tensor for tensor, _ in pending])
        where = [slot for _, slot in pending]
        values = _scores(model, batch, targets[[slot[0] for slot in where]], score, device)
        for value, (i, r, o, j) in zip(values, where):
            curves[i, r, o, j] = value
        pending.clear()

    with torch.no_grad():
        for start in range(0, n, batch_size):
            original[start:start + batch_size] = _scores(model, images[start:start + batch_size],
                                                         targets[start:start + batch_size], score, device)
        for i in range(n):
            for r in range(per_image):
                for o, order in enumerate(ORDERS):
                    for j, removed in enumerate(removal_masks(maps[i, r], fractions, order, removal)):
                        pending.append((impute(images[i], removed, noise, generator), (i, r, o, j)))
                        if len(pending) == batch_size:
                            flush()
        if pending:
            flush()
    if single:
        curves = curves[:, 0]
    return Road(fractions=fractions, original=original, morf=curves[..., 0, :], lerf=curves[..., 1, :])
