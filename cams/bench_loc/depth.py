"""Localization of given images across a model's depth, for callers with their own images and boxes (the app's
"Measure" panel): :func:`score_images` runs bench-loc's scoring on one batch and returns the table's rows."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from cams import metrics as M
from cams.boxacc import DEFAULT_PROTOCOL
from cams.bench_loc.bench import layer_depths
from cams.bench_loc.data import Sample, Split
from cams.bench_loc.scoring import DEFAULT_BATCH_SIZE, Options, Row, evaluate_model
from cams.layers import BLOCKS, expand_layers


def score_images(model: torch.nn.Module, images: torch.Tensor, boxes: Sequence[M.Boxes],
                 layers: Sequence[str] = (BLOCKS,), methods: Sequence[str] = ("gradcam",),
                 class_names: Sequence[str] | None = None, masks: Sequence[np.ndarray | None] | None = None,
                 labels: Sequence[Sequence[str]] | None = None, name: str = "model", threshold: float = 0.5,
                 faith_n: int = 0, road_n: int = 0, faith_steps: int = 16, batch_size: int = DEFAULT_BATCH_SIZE,
                 seed: int = 0, log: Callable[[str], None] = lambda _: None, box_protocol: str = DEFAULT_PROTOCOL
                 ) -> list[Row]:
    """bench-loc's rows for ``images`` (a preprocessed batch ``[N, 3, S, S]``, square, as ``pfnet.preprocess``
    gives in mode "full") with ``boxes`` (per image, one box ``(x0, y0, x1, y1)`` or a list of them, in input
    pixels): one row per layer x method (``layers`` may contain ``"blocks"``: every block, shallow to deep; each
    row's ``depth`` is its 1-based block index), then the centred-Gaussian and uniform-random reference rows.

    ``row.values`` holds the columns of :data:`cams.bench_loc.KEYS` (None where not computed). Box accuracy uses
    the fixed ``threshold`` (there is no validation split); MaxBoxAccV2 picks its own over these images, in
    ``box_protocol`` (:mod:`cams.boxacc`; wsolevaluation's by default).
    ``masks`` (object masks, bool ``[S, S]``, or None per image) make the pointing game aim at the object
    instead of its box; ``labels`` (class names per image) give the accuracy column. Deletion/insertion and ROAD
    run on the first ``faith_n`` / ``road_n`` images (costly: ~4 s per image and heatmap for ROAD). The model
    is used as given, in eval mode.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError("images must be a square preprocessed batch [N, 3, S, S]")
    count, size = int(images.shape[0]), int(images.shape[-1])
    if len(boxes) != count:
        raise ValueError(f"{len(boxes)} box lists for {count} images")
    if class_names is None:
        class_names = [str(index) for index in range(int(getattr(model, "num_classes", 0) or 0))]
    samples = [Sample(f"image {index}", M.as_boxes(boxes[index]),
                      None if masks is None else masks[index],
                      tuple(labels[index]) if labels is not None else ())
               for index in range(count)]
    split = Split("images", samples, lambda start, stop: images[start:stop], size)
    opts = Options(tuple(expand_layers(model, list(layers))), tuple(methods), batch_size, faith_n, faith_steps,
                   threshold=threshold, seed=seed, road_n=road_n, box_protocol=box_protocol)
    rows = evaluate_model(model, name, class_names, None, split, opts, log)
    depth = layer_depths(model)
    for row in rows:
        row.depth = depth.get(row.layer)
    return rows
