"""Heatmap alignment: where a layer's cells really look, in input pixels.

Upsampling a ``h x w`` map to the input (``cv2.resize``, or ``F.interpolate`` with ``align_corners=False``, as
pytorch-grad-cam does) puts cell ``i`` at ``S*i + (S-1)/2`` for a stride-``S`` layer. In a ResNet every stride-2
step (the 7x7 stem, the 3x3 max-pool, the strided 3x3 convs or max-pools) centres output ``i`` on input ``2i``,
so the cells of ``layer4`` are centred at ``32*i``: the plain resize draws the heatmap ``(S-1)/2`` = 15.5 px
down and right of what the layer saw. Learned 3x3 convolutions can absorb part of that shift, parameter-free
max-pools cannot, so the size of the shift depends on the model and its weights.

The alignment is therefore measured, not assumed: :func:`fit_offset` takes the unaligned heatmap peaks of a
validation split with object masks and finds the translation ``(dy, dx)`` that brings them closest to the
objects' centres. Zoo entries record it per layer (``ZooEntry.cam_offsets``; the demo card for the bundled
models), ``pfnet.load`` attaches it to the model as ``model.cam_offsets``, and ``cams.explain`` draws every
heatmap of that layer shifted by it (``align="model"``, the default; ``align="none"`` gives the plain resize).

Layers of the same stride share a recorded offset. Every layer after a network's last stride-2 step sits on the
same grid of cells centred at ``S*i``, so what misplaces one layer's drawing misplaces the others': with
``align="model"`` a layer without an offset of its own takes the one recorded for a layer of its stride
(``layer4`` -> ``layer4.0``, ``layer4.1``, their spatial ops), so that same-stride columns side by side are drawn
alike. Where the recorded offsets of one stride disagree, the unrecorded layers of that stride are drawn
unshifted. An explicit mapping (``align={layer: (dy, dx)}``) is applied exactly as given.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cams.layers import CamError, canonical

Offset = tuple[float, float]
NO_OFFSET: Offset = (0.0, 0.0)
ALIGN_MODES = ("model", "none")


class AlignError(CamError):
    """An alignment argument that cannot be used."""


def _check_offset(layer: str, value) -> Offset:
    try:
        dy, dx = (float(v) for v in value)
    except (TypeError, ValueError):
        raise AlignError(f"offset for {layer!r} must be a pair (dy, dx) of numbers; got {value!r}") from None
    if not (np.isfinite(dy) and np.isfinite(dx)):
        raise AlignError(f"offset for {layer!r} must be finite; got {value!r}")
    return dy, dx


def layer_offsets(model, layers: Sequence[str], align: str | Mapping[str, Sequence[float]] = "model"
                  ) -> list[Offset]:
    """The ``(dy, dx)`` shift, in input pixels, for each of ``layers``.

    ``align``: "model" (the model's recorded ``cam_offsets``, each shared by the layers of its stride: see the
    module docstring; none for other layers), "none", or a mapping layer -> (dy, dx) (those layers only).
    Layer names may be aliases (``layer4`` and ``layer4.2`` are the same tensor on a ResNet); a mapping that
    names a layer the model does not have is refused (``LayerError``).
    """
    if isinstance(align, str):
        if align not in ALIGN_MODES:
            raise AlignError(f"align must be one of {ALIGN_MODES} or a mapping layer -> (dy, dx); got {align!r}")
        if align == "none":
            return [NO_OFFSET] * len(layers)
        table = getattr(model, "cam_offsets", None)
        table = table if isinstance(table, Mapping) else {}
    elif isinstance(align, Mapping):
        table = align
    else:
        raise AlignError(f"align must be one of {ALIGN_MODES} or a mapping layer -> (dy, dx); "
                         f"got {type(align).__name__} {align!r}")
    by_layer = {canonical(model, str(key)): _check_offset(str(key), value) for key, value in table.items()}
    shared = _stride_offsets(model, by_layer) if isinstance(align, str) and by_layer else {}
    return [by_layer[name] if name in by_layer else ((shared and shared.get(layer_stride(model, name))) or NO_OFFSET)
            for name in (canonical(model, layer) for layer in layers)]


def _stride_offsets(model, by_layer: Mapping[str, Offset]) -> dict[int, Offset | None]:
    shared: dict[int, Offset | None] = {}
    for name, offset in by_layer.items():
        stride = layer_stride(model, name)
        shared[stride] = offset if shared.get(stride, offset) == offset else None
    return shared


def stride_offsets(model) -> dict[int, Offset | None]:
    """Stride -> the offset that ``align="model"`` draws the layers of that stride with (None where the model's
    recorded offsets for that stride disagree: its unrecorded layers are drawn unshifted)."""
    table = getattr(model, "cam_offsets", None)
    table = table if isinstance(table, Mapping) else {}
    return _stride_offsets(model, {canonical(model, str(key)): _check_offset(str(key), value)
                                   for key, value in table.items()})


def _module_stride(module) -> int:
    """The product of the strides of the convolutions and pools in ``module`` (one path: no parallel branch)."""
    from torch import nn

    total = 1
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = sub.stride
            total *= stride if isinstance(stride, int) else int(stride[0])
    return total


def layer_stride(model, name: str) -> int:
    """Input pixels per cell of layer ``name``, from the network's structure (no forward pass): the stem and
    every stride-2 spatial op before the layer on a ResNet, the patch size on a ViT, the patch embedding and
    the pools before the stage on a PiT. Any other network: timm's reduction for the stage (a block: its
    stage's), else measured by :func:`layer_strides` at the model's input size (224 where it names none)."""
    from cams.layers import layer_spec, pfnet_family

    spec = layer_spec(model, name)  # refuses unknown names
    family = pfnet_family(model)
    if family is None:
        return _any_stride(model, spec.name)
    if family == "vit":
        return _module_stride(model.patch_embed)
    if family == "pit":
        stage = int(spec.name.split(".")[1])
        stride = _module_stride(model.patch_embed)
        for index in range(stage):
            stride *= _module_stride(model.pools[index])
        return stride
    stride = _module_stride(model.conv1) * _module_stride(model.maxpool)
    if spec.kind == "stem":
        return stride
    parts = spec.name.split(".")
    last_stage, last_block = int(parts[0].removeprefix("layer")), (int(parts[1]) if len(parts) > 1 else None)
    for stage_index in range(1, last_stage + 1):
        for block_index, block in enumerate(getattr(model, f"layer{stage_index}")):
            if stage_index == last_stage and last_block is not None and block_index > last_block:
                break
            stride *= _module_stride(block.conv_block)
    return stride


def _any_stride(model, name: str) -> int:
    from cams.any_model import outline

    found = outline(model)
    stage = next((part.stage for part in found.parts if part.name == name), None)
    reduction = found.reductions.get(name, found.reductions.get(stage))
    if isinstance(reduction, int):
        return reduction
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return layer_strides(model, [name], (int(size[-2]), int(size[-1])))[0]


def layer_strides(model, layers: Sequence[str], input_hw: tuple[int, int]) -> list[int]:
    """Input pixels per cell (rows) of each layer at this input size, from one forward pass of a blank image:
    the largest offset worth searching is one cell."""
    import torch

    from cams.layers import output_tensor, resolve, to_grid

    heights: dict[str, int] = {}
    handles = [resolve(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: heights.__setitem__(
            name, int(to_grid(model, name, output_tensor(output), input_hw).shape[-2])))
        for name in layers]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_hw, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [max(1, round(input_hw[0] / heights[name])) for name in layers]


def sampling_grid(size: tuple[int, int], offset: Offset):
    """A ``grid_sample`` grid ``[1, H, W, 2]`` (align_corners=False) that draws a map moved by ``offset``.

    Output pixel ``p`` takes the plain upsampled value at ``p - offset``; with ``offset`` (0, 0) it is exactly
    bilinear ``F.interpolate(align_corners=False)``.
    """
    import torch

    height, width = size
    dy, dx = offset
    ys = (torch.arange(height, dtype=torch.float32) - dy + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) - dx + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)[None]


def _nonempty(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise AlignError("an object mask must be a non-empty 2-D array")
    return mask


def fit_offset(peaks: Sequence[tuple[int, int] | None], regions: Sequence[np.ndarray], max_shift: int) -> Offset:
    """The integer translation (|dy|, |dx| <= ``max_shift``) that minimises the mean distance from the moved
    peaks to the centres (centroids) of their objects.

    ``peaks``: the unaligned heatmap maximum of each image (None for flat maps: skipped); ``regions``: each
    image's object mask (bool, heatmap geometry). A moved peak is clipped to the image, as the maximum of a
    map drawn moved with border replication is. Centres rather than "anywhere on the object": a peak inside
    a large object says little about how far the drawing is off, and the centre of the region of equally good
    shifts is what a centroid cost picks. Ties go to the smallest shift.
    """
    if len(peaks) != len(regions):
        raise AlignError(f"{len(peaks)} peaks for {len(regions)} regions")
    if max_shift < 0:
        raise AlignError("max_shift must be >= 0")
    shifts = np.arange(-max_shift, max_shift + 1)
    total = np.zeros((len(shifts), len(shifts)))
    used = 0
    for point, region in zip(peaks, regions):
        region = _nonempty(region)
        if point is None:
            continue
        height, width = region.shape
        ys, xs = np.nonzero(region)
        rows = np.clip(point[0] + shifts, 0, height - 1) - ys.mean()
        cols = np.clip(point[1] + shifts, 0, width - 1) - xs.mean()
        total += np.hypot(rows[:, None], cols[None, :])
        used += 1
    if not used:
        raise AlignError("no heatmap with a peak to fit an offset to")
    cost = total / used
    # ties: the smallest shift (cost rounded so that float noise does not decide)
    magnitude = np.abs(shifts)[:, None] + np.abs(shifts)[None, :]
    order = np.lexsort((magnitude.ravel(), np.round(cost.ravel(), 9)))
    r, c = np.unravel_index(order[0], cost.shape)
    return float(shifts[r]), float(shifts[c])


def shift_heatmap(heatmap: np.ndarray, offset: Offset) -> np.ndarray:
    """A 2-D heatmap in [0, 1] drawn moved by a whole-pixel ``offset``, edges replicated, min-max again: for a
    heatmap from ``cams.explain(align="none")`` this is exactly what ``align={layer: offset}`` draws."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise AlignError(f"expected a 2-D heatmap [H, W]; got shape {heatmap.shape}")
    dy, dx = _check_offset("heatmap", offset)
    if dy != round(dy) or dx != round(dx):
        raise AlignError(f"shift_heatmap moves by whole pixels; got {offset!r} (use cams.explain(align=...) for "
                         "fractional offsets)")
    dy, dx = int(dy), int(dx)
    if (dy, dx) == (0, 0):
        return heatmap
    height, width = heatmap.shape
    rows = np.clip(np.arange(height) - dy, 0, height - 1)
    cols = np.clip(np.arange(width) - dx, 0, width - 1)
    moved = heatmap[rows[:, None], cols[None, :]]
    low, high = float(moved.min()), float(moved.max())
    return (moved - low) / (high - low) if high > low else np.zeros_like(moved)
