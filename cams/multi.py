"""Several CAM methods from one pass per batch: one forward, one gradient call shared by every gradient method,
Eigen-CAM and CAM from the same activations (bench-loc explains four methods of each batch this way).

Each method's heatmaps equal what ``cams.explain`` gives for it alone (the same forward, gradients and maths,
:mod:`cams.cam_maths`), within float32 rounding (Grad-CAM++ amplifies it most: up to 3.5e-5 seen); Score-CAM,
which needs forwards of its own, is passed on to ``cams.explain``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cams.align import layer_offsets
from cams.any_model import class_names_of, numbered
from cams.cam_maths import (check_inputs, eigen_cam_maps, explained_classes, fc_cam_maps, grad_cam_maps, gradients,
                            model_input, target_count)
from cams.engine import (EIGEN_METHODS, GRADIENT_METHODS, Capture, Explanation, check_method, explain, image_errors,
                         normalise)
from cams.layers import LayerError, Reshape, pfnet_family, resolve, to_grid

SHARED = GRADIENT_METHODS | EIGEN_METHODS | {"cam"}


def explain_methods(model: torch.nn.Module, images: torch.Tensor, layers: Sequence[str], methods: Sequence[str],
                    targets=None, class_names: Sequence[str] | None = None, batch_size: int = 32,
                    align: str | Mapping[str, Sequence[float]] = "model", reshape: Reshape = None
                    ) -> dict[str, Explanation]:
    """``{method: Explanation}`` for every method, as ``cams.explain(model, images, layers, method, ...)`` would
    give each (arguments as there), from one forward and one ``torch.autograd.grad`` per batch."""
    layers, methods = list(layers), list(dict.fromkeys(methods))
    if class_names is None and pfnet_family(model) is None:
        class_names = class_names_of(model)
    if not layers:
        raise LayerError("no layers requested")
    shared = [method for method in methods if method in SHARED]
    results = {method: explain(model, images, layers, method, targets, class_names, batch_size, align,
                               reshape=reshape) for method in methods if method not in SHARED}
    if shared:
        results.update(_shared_pass(model, images, layers, shared, targets, class_names, batch_size, align, reshape))
    return {method: results[method] for method in methods}


def _shared_pass(model, images, layers, methods, targets, class_names, batch_size, align, reshape
                 ) -> dict[str, Explanation]:
    modules = {name: resolve(model, name) for name in layers}
    for method in methods:
        check_method(model, method, layers)
    offsets = layer_offsets(model, layers, align)
    top_k, fixed_ids = plan = check_inputs(model, images, batch_size, targets, class_names)
    want_grad = any(method in GRADIENT_METHODS for method in methods)
    with torch.inference_mode(False):
        images = model_input(model, images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        count = images.shape[0]
        n_targets = target_count(plan)
        heatmaps = {method: torch.empty((count, n_targets, len(layers), *size)) for method in methods}
        all_ids = torch.empty((count, n_targets), dtype=torch.int64)
        all_probs: list[torch.Tensor] = []
        with Capture(modules) as capture:
            for start in range(0, count, batch_size):
                batch = images[start:start + batch_size]
                stop = start + batch.shape[0]
                logits, outputs = capture.run(model, batch, want_grad)
                class_ids = explained_classes(logits, top_k, fixed_ids, start)
                all_ids[start:stop] = class_ids.cpu()
                all_probs.append(torch.softmax(logits.detach().float(), dim=1).cpu())
                acts = [outputs[name] for name in layers]
                grads = gradients(logits, class_ids, acts) if want_grad else None
                del logits, outputs
                for position, name in enumerate(layers):
                    act = to_grid(model, name, acts[position].detach(), size, reshape)
                    grad = None
                    if want_grad:
                        grad = grads[position]
                        grad = to_grid(model, name, grad.flatten(0, 1), size, reshape).unflatten(0, grad.shape[:2])
                    for method in methods:
                        if method in GRADIENT_METHODS:
                            raw = grad_cam_maps(method, act, grad)
                        elif method in EIGEN_METHODS:
                            raw = eigen_cam_maps(method, act, n_targets)
                        else:
                            raw = fc_cam_maps(model, act, class_ids)
                        maps = normalise(raw, size, offsets[position])  # [T, n, H, W]
                        heatmaps[method][start:stop, :, position] = maps.transpose(0, 1).cpu()
                del acts, grads
    probs = torch.cat(all_probs)
    names = tuple(class_names) if class_names is not None else (
        None if pfnet_family(model) is not None else numbered(int(probs.shape[1])))
    return {method: Explanation(heatmaps=heatmaps[method], targets=all_ids, probs=probs, layers=tuple(layers),
                                method=method, class_names=names, errors=image_errors(probs, heatmaps[method]))
            for method in methods}
