"""pytorch-grad-cam's ``aug_smooth``: test-time augmentation, batched.

pytorch-grad-cam runs one whole CAM call per augmentation (ttach's ``HorizontalFlip()`` x ``Multiply([0.9, 1, 1.1])``:
six), each with its own forward and backward. Here the six copies of each image go into the same batch: one forward
and one gradient call (or one Score-CAM / Ablation-CAM pass) for all of them; each copy's heatmap is made as
pytorch-grad-cam makes it (its own min-max), flipped back where it was flipped, and the six are averaged (not
re-normalised, as pytorch-grad-cam leaves them). The targets are the un-augmented image's (pytorch-grad-cam's with
explicit targets; with ``targets=None`` it lets each augmented copy pick its own top class).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cams.cam_maths import check_inputs, explained_classes, model_input
from cams.engine import Explanation, Progress, image_errors

# ttach.Compose([HorizontalFlip(), Multiply(factors=[0.9, 1, 1.1])]) in its order: (flip, factor); Multiply puts
# its identity (1) first.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (1.0, 0.9, 1.1))


def augment(images: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` -> ``[N * 6, ...]``: each image's six copies, next to each other."""
    copies = []
    for flip, factor in AUGMENTATIONS:
        copy = images.flip(-1) if flip else images
        copies.append(copy * factor if factor != 1.0 else copy)
    return torch.stack(copies, dim=1).flatten(0, 1)


def aug_smooth_explain(model, images: torch.Tensor, layers: Sequence[str] | str, method: str, targets=None,
                       class_names: Sequence[str] | None = None, batch_size: int = 32,
                       align: str | Mapping[str, Sequence[float]] = "model", progress: Progress | None = None,
                       eigen_smooth: bool = False, precision: str = "float32", reshape=None,
                       keep_raw: bool = False) -> Explanation:
    """``cams.explain(..., aug_smooth=True)``: arguments as there; ``batch_size`` counts images (each image's six
    copies go through together)."""
    from cams.engine import SCORED_METHODS, explain

    top_k, fixed_ids = check_inputs(model, images, batch_size, targets, class_names)
    with torch.inference_mode(False), torch.no_grad():
        prepared = model_input(model, images)
        logits = torch.cat([model(prepared[start:start + batch_size]) for start in range(0, len(prepared),
                                                                                          batch_size)])
    class_ids = explained_classes(logits, top_k, fixed_ids).cpu()
    count = len(AUGMENTATIONS)
    inner_batch = batch_size if method in SCORED_METHODS else batch_size * count
    result = explain(model, augment(images), layers, method, class_ids.repeat_interleave(count, dim=0),
                     class_names, inner_batch, align, progress, eigen_smooth=eigen_smooth, precision=precision,
                     reshape=reshape, keep_raw=keep_raw)
    maps = result.heatmaps.unflatten(0, (images.shape[0], count))  # [N, 6, T, L, H, W]
    flipped = torch.tensor([flip for flip, _ in AUGMENTATIONS])
    maps = torch.where(flipped[None, :, None, None, None, None], maps.flip(-1), maps)
    raw = None
    if result.raw is not None:
        raw = result.raw.unflatten(0, (images.shape[0], count))
        raw = torch.where(flipped[None, :, None, None, None, None], raw.flip(-1), raw).mean(dim=1)
    guided = None
    if result.guided is not None:
        guided = result.guided.unflatten(0, (images.shape[0], count))
        guided = torch.where(flipped[None, :, None, None, None, None], guided.flip(-1), guided).mean(dim=1)
    heatmaps, probs = maps.mean(dim=1), torch.softmax(logits.float(), 1).cpu()
    return Explanation(heatmaps=heatmaps, targets=class_ids, probs=probs, layers=result.layers, method=result.method,
                       class_names=result.class_names, guided=guided, options=(("aug_smooth", True), *result.options),
                       raw=raw, errors=image_errors(probs, heatmaps))
