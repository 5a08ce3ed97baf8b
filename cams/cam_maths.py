"""The per-batch maths of the CAM engine (:mod:`cams.engine`), shared by ``cams.explain`` and
:func:`cams.multi.explain_methods`: checking inputs and targets, choosing the explained classes, one gradient call
for many targets, and each method's weighting (the maths of pytorch-grad-cam 1.5.x, done in torch)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import torch
from torch import nn

from cams.eigen import first_component_projection, fixed_sign_projection, kernel_projection
from cams.layers import CamError
from pfnet.memory_format import FORMATS, format_of

# The constants pytorch-grad-cam uses (grad_cam_plusplus / xgrad_cam).
GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7


class MethodError(CamError):
    """An unknown method, or a method that does not apply to the requested layer or model."""


class TargetError(CamError):
    """Targets that cannot be used (bad k, unknown class id or name)."""


#: What :func:`target_plan` returns: (k, None) for each image's top-k; (None, ids) for the same classes for every
#: image; (None, an int64 tensor [N, T]) for classes per image (-1: that image's top class).
TargetPlan = tuple[int | None, list[int] | torch.Tensor | None]


def _per_image(targets) -> torch.Tensor | None:
    """``targets`` as an int64 [N, T] tensor when it gives classes per image (a 2-D tensor or array, or a list of
    lists / tuples), else None."""
    if isinstance(targets, (torch.Tensor, np.ndarray)):
        if targets.ndim != 2:
            return None
        table = torch.as_tensor(targets)
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(row, (list, tuple)) for row in targets):
        if len({len(row) for row in targets}) != 1 or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for row in targets for v in row):
            raise TargetError("per-image targets must be rows of class ids, all of one length")
        table = torch.tensor(targets, dtype=torch.int64)
    else:
        return None
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TargetError(f"per-image targets must be integer class ids; got {table.dtype}")
    if table.shape[1] < 1:
        raise TargetError("per-image targets need at least one class per image")
    return table.to(torch.int64).cpu()


def target_plan(targets, class_names, num_classes: int | None) -> TargetPlan:
    """Checks ``targets`` (see :func:`cams.explain`); returns the plan (:data:`TargetPlan`)."""
    if targets is None:
        return 1, None
    if isinstance(targets, bool):
        raise TargetError("targets must be None, an int k (top-k), a list of class ids / names, or class ids per "
                          "image [N, T]")
    per_image = _per_image(targets)
    if per_image is not None:
        if num_classes is not None:
            bad = sorted({int(v) for v in per_image.flatten().tolist() if not -1 <= v < num_classes})
            if bad:
                raise TargetError(f"class ids {bad[:10]} are out of range for {num_classes} classes")
        elif bool((per_image < -1).any()):
            raise TargetError("per-image class ids must be >= 0 (or -1: the image's top class)")
        return None, per_image
    if isinstance(targets, (int, np.integer)):
        k = int(targets)
        if k < 1 or (num_classes is not None and k > num_classes):
            raise TargetError(f"top-k needs 1 <= k <= {num_classes or 'num_classes'}; got {k}")
        return k, None
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, torch.Tensor):
        targets = targets.flatten().tolist()
    ids: list[int] = []
    for item in targets:
        if isinstance(item, str):
            if class_names is None:
                raise TargetError(f"target {item!r} is a class name; pass class_names to look it up")
            try:
                ids.append(list(class_names).index(item))
            except ValueError:
                raise TargetError(f"unknown class name {item!r}") from None
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            ids.append(int(item))
        else:
            raise TargetError(f"a target must be a class id or name; got {item!r}")
    if not ids:
        raise TargetError("targets is an empty list")
    if num_classes is not None:
        bad = [class_id for class_id in ids if not 0 <= class_id < num_classes]
        if bad:
            raise TargetError(f"class ids {bad} are out of range for {num_classes} classes")
    return None, ids


def resolve_classes(target: Sequence[str], class_names: Sequence[str] | None, count: int | None
                    ) -> tuple[list[int], list[str]]:
    """A model's class ids for ``target`` (ids as digits, or names matched without regard to case), each once, and
    why the others cannot be used (unknown, out of range, a name several classes share). Never raises."""
    ids: list[int] = []
    problems: list[str] = []
    lowered = [name.lower() for name in class_names or ()]
    for item in target:
        if item.isdigit():
            class_id = int(item)
            if count is not None and class_id >= count:
                problems.append(f"class id {class_id} is out of range (it has {count} classes)")
                continue
        else:
            matches = [index for index, name in enumerate(lowered) if name == item.lower()]
            if len(matches) != 1:
                problems.append(f"has no class named {item!r}" if not matches else
                                f"{len(matches)} classes are named {item!r} (ids {', '.join(map(str, matches))}); "
                                "give the id")
                continue
            class_id = matches[0]
        if class_id not in ids:
            ids.append(class_id)
    return ids, problems


def check_inputs(model: nn.Module, images, batch_size, targets, class_names) -> TargetPlan:
    """Refuses unusable ``images`` / ``batch_size`` / ``targets``; returns the target plan (:func:`target_plan`)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise CamError(f"images must be a float tensor [N, 3, H, W]; got "
                       f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CamError(f"batch_size must be a positive int; got {batch_size!r}")
    num_classes = getattr(model, "num_classes", None)
    plan = target_plan(targets, class_names, num_classes if isinstance(num_classes, int) else None)
    if isinstance(plan[1], torch.Tensor) and plan[1].shape[0] != images.shape[0]:
        raise TargetError(f"per-image targets have {plan[1].shape[0]} rows for {images.shape[0]} images")
    return plan


def target_count(plan: TargetPlan) -> int:
    """How many targets each image gets."""
    top_k, fixed_ids = plan
    if top_k is not None:
        return top_k
    return int(fixed_ids.shape[1]) if isinstance(fixed_ids, torch.Tensor) else len(fixed_ids)


def model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` on the model's device, out of inference mode, in the memory format of its convolutions."""
    parameter = next(model.parameters(), None)
    if parameter is not None and images.device != parameter.device:
        images = images.to(parameter.device)
    if images.is_inference():
        images = images.clone()
    return images.contiguous(memory_format=FORMATS[format_of(model)])


def explained_classes(logits: torch.Tensor, top_k: int | None, fixed_ids: list[int] | torch.Tensor | None,
                      start: int = 0) -> torch.Tensor:
    """``[n, T]`` class ids of the batch of images ``start:start + n``: each image's top-k, the fixed ids for
    every image, or each image's own row (-1: its top class)."""
    classes = logits.shape[1]
    if top_k is not None and top_k > classes:
        raise TargetError(f"top-{top_k} asked of a model with {classes} classes")
    if isinstance(fixed_ids, torch.Tensor):
        rows = fixed_ids[start:start + logits.shape[0]].to(logits.device)
        if rows.numel() and int(rows.max()) >= classes:
            raise TargetError(f"class ids up to {int(rows.max())} are out of range for {classes} classes")
        top = logits.detach().argmax(dim=1, keepdim=True).expand_as(rows)
        return torch.where(rows < 0, top, rows).contiguous()
    if fixed_ids is not None and max(fixed_ids) >= classes:
        raise TargetError(f"class ids {fixed_ids} are out of range for {classes} classes")
    if top_k is not None:
        return logits.detach().topk(top_k, dim=1).indices
    return torch.tensor(fixed_ids, dtype=torch.int64, device=logits.device).expand(logits.shape[0], -1).contiguous()


def one_hot(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """``[T, n, K]``: for each target t, 1 at each image's class ``class_ids[:, t]``."""
    hot = torch.zeros((class_ids.shape[1], *logits.shape), dtype=logits.dtype, device=logits.device)
    return hot.scatter_(2, class_ids.t().unsqueeze(2), 1.0)


def grads_for(outputs: torch.Tensor, grad_outputs: torch.Tensor, inputs: list[torch.Tensor],
              retain_graph: bool = False) -> list[torch.Tensor]:
    """One ``torch.autograd.grad`` of ``outputs`` with one cotangent per target (``grad_outputs`` ``[T, *outputs]``)
    -> ``[T, *input.shape]`` per input (zeros where an input does not reach the outputs). An input listed twice (two
    layer names for one tensor) is differentiated once."""
    unique = list({id(tensor): tensor for tensor in inputs}.values())
    count = grad_outputs.shape[0]
    if count == 1:
        grads = torch.autograd.grad(outputs, unique, grad_outputs=grad_outputs[0], retain_graph=retain_graph,
                                    allow_unused=True)
        grads = [None if grad is None else grad.unsqueeze(0) for grad in grads]
    else:
        grads = torch.autograd.grad(outputs, unique, grad_outputs=grad_outputs, retain_graph=retain_graph,
                                    is_grads_batched=True, allow_unused=True)
    found = {id(tensor): grad for tensor, grad in zip(unique, grads)}
    return [torch.zeros((count, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
            if found[id(tensor)] is None else found[id(tensor)] for tensor in inputs]


def gradients(logits: torch.Tensor, class_ids: torch.Tensor, activations: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(sum_i logits[i, class_ids[i, t]]) / d(activation) for every t: ``[T, *activation.shape]`` each."""
    return grads_for(logits, one_hot(logits, class_ids), activations)


def eigen_smoothed(weighted: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``eigen_smooth``: weighted activations ``[T, n, C, h, w]`` -> their first principal
    component ``[T, n, h, w]`` (``get_2d_projection``, sign included), all T x n maps in one batched projection."""
    return first_component_projection(weighted.flatten(0, 1)).unflatten(0, weighted.shape[:2])


def grad_cam_maps(method: str, acts: torch.Tensor, grads: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """acts ``[n, C, h, w]``, grads ``[T, n, C, h, w]`` -> raw maps ``[T, n, h, w]`` (before ReLU).
    ``eigen_smooth``: the first principal component of the weighted activations instead of their channel sum."""
    if method == "eigengradcam":  # get_2d_projection(grads * activations), whatever eigen_smooth says
        return eigen_smoothed(grads * acts)
    if method == "hirescam":
        weighted = grads * acts
    elif method == "gradcamelementwise":
        weighted = (grads * acts).clamp_min(0)
    elif method == "layercam":
        weighted = grads.clamp_min(0) * acts
    else:
        weights = channel_weights(method, acts, grads)
        if not eigen_smooth:
            return torch.einsum("tnc,nchw->tnhw", weights, acts)
        weighted = weights[..., None, None] * acts
    return eigen_smoothed(weighted) if eigen_smooth else weighted.sum(dim=2)


def channel_weights(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The per-channel weights ``[T, n, C]`` of Grad-CAM, XGrad-CAM and Grad-CAM++."""
    if method == "gradcam":
        return grads.mean(dim=(3, 4))
    sum_acts = acts.sum(dim=(2, 3))[:, :, None, None]
    if method == "xgradcam":
        return (grads * acts / (sum_acts + XGRADCAM_EPS)).sum(dim=(3, 4))
    if method == "gradcampp":
        grads2 = grads * grads
        grads3 = grads2 * grads
        alpha = grads2 / (2 * grads2 + sum_acts * grads3 + GRADCAMPP_EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (grads.clamp_min(0) * alpha).sum(dim=(3, 4))
    raise MethodError(f"{method!r} is not a gradient method")


def eigen_cam_maps(method: str, acts: torch.Tensor, count: int) -> torch.Tensor:
    """"eigencam": pytorch-grad-cam's projection and sign; "eigencam_fixed": the sign fixed by the activations;
    "kpcacam": the first kernel principal component (pytorch-grad-cam's KPCA-CAM, sigmoid kernel).
    Raw maps ``[count, n, h, w]`` (one per target: the same), on acts' device."""
    if method == "kpcacam":
        maps = kernel_projection(acts)
    else:
        maps = fixed_sign_projection(acts) if method == "eigencam_fixed" else first_component_projection(acts)
    return maps.unsqueeze(0).expand(count, *maps.shape)


def fc_cam_maps(model: nn.Module, acts: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    weights = model.fc.weight.detach()[class_ids]  # [n, T, C]
    return torch.einsum("ntc,nchw->tnhw", weights.to(acts.dtype), acts)
