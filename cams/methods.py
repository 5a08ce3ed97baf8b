"""The CAM methods with passes of their own (``cams.explain`` hands them here): what each needs beyond the one
forward and one gradient call of the other methods, and how close each gets to that limit.

- **Guided Grad-CAM** (``guidedgradcam``): one forward recorded from the input and two backward calls through it:
  Grad-CAM's gradients, and the guided-backprop gradient to the input (ReLU backward passes only positive gradients,
  as pytorch-grad-cam's ``GuidedBackpropReLUModel``). The ReLUs are guided by tensor hooks that forward hooks put on
  their outputs for this call and this thread only: the model's modules are never replaced (pytorch-grad-cam's
  replacement leaves new, not-in-place ``ReLU`` modules behind). Limit: a forward and two backwards; reached.
- **FullGrad** (``fullgrad``): one forward recorded from the input, one backward per target that yields the input
  gradient and, through tensor hooks, the gradient at every ``Conv2d`` / ``BatchNorm2d`` with a bias (pytorch-grad-cam
  picks those exact types). Its per-channel normalisation and resize are done at each layer's resolution and summed
  before one resize (bilinear resizing is linear). Limit: a forward and a backward; reached. The map is the same for
  every requested layer.
- **Finer-CAM** (``finercam``): Grad-CAM of pytorch-grad-cam's ``FinerWeightedTarget`` (the target's logit against
  the 3 classes whose logits are nearest, weighted by their probabilities). Its gradient with respect to the logits
  is taken first (a few numbers), then one gradient call through the network: the other methods' limit.
- **Shapley-CAM** (``shapleycam``): weights ``mean(grad - hvp / 2)`` with the Hessian-vector product of each layer;
  one gradient call that keeps its graph, then one more per layer (the HVP of one layer cannot share a call with
  another's: their cross terms would mix in).
- **SmoothGrad-CAM++** (``smoothgradcampp``, torch-cam's): the ``num_samples`` noisy copies of each image (the same
  draws as torch-cam's, from torch's generator) go through the network as one batch with one gradient call.
- **Ablation-CAM** (``ablationcam``): :mod:`cams.ablation`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cams.align import NO_OFFSET
from cams.cam_maths import explained_classes, grad_cam_maps, gradients, grads_for, model_input, one_hot
from cams.engine import (NORM_EPS, Capture, Explanation, ForwardHooks, Meter, Progress, Results, checked_run, normalise,
                         run_options, unnormalised)
from cams.layers import to_grid

# pytorch-grad-cam's FinerCAM defaults (finer_cam.DEFAULT_COMPARISON_CATEGORIES, alpha) and FinerWeightedTarget's eps.
FINER_COMPARISONS = (1, 2, 3)
FINER_ALPHA = 1.0
FINER_EPS = 1e-9
# torch-cam's SmoothGradCAMpp defaults (num_samples, std) and the eps of its alpha.
SMOOTHGRADCAMPP_SAMPLES = 4
SMOOTHGRADCAMPP_STD = 0.3
SMOOTHGRADCAMPP_EPS = 1e-8


class _TensorHooks(ForwardHooks):
    """Forward hooks on ``modules`` (this call, this thread) that put ``on_output(index, output)`` on each output
    that requires grad."""

    def __init__(self, modules: list[nn.Module], on_output):
        super().__init__([(module, index) for index, module in enumerate(modules)])
        self.on_output = on_output

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if self.mine() and isinstance(output, torch.Tensor) and output.requires_grad:
                self.on_output(index, output)
        return hook


# ------------------------------------------------------------------------------------------------ per-batch maths
def _guided_batch(model, capture, batch, layers, size, class_ids_of, eigen_smooth, reshape=None):
    """Guided Grad-CAM: (logits, class ids, per-layer Grad-CAM raw maps, guided gradient [T, n, 3, H, W])."""
    state = {"guided": False}

    def guide(grad: torch.Tensor):
        return grad.clamp_min(0) if state["guided"] else None

    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    leaf = batch.detach().requires_grad_(True)
    with _TensorHooks(relus, lambda index, output: output.register_hook(guide)) as hooks:
        hooks.active = True
        logits, outputs = capture.run(model, leaf, want_grad=False, from_input=True)
        hooks.active = False
    class_ids = class_ids_of(logits)
    acts = [outputs[name] for name in layers]
    state["guided"] = True
    guided = grads_for(logits, one_hot(logits, class_ids), [leaf], retain_graph=True)[0]
    state["guided"] = False
    grads = gradients(logits, class_ids, acts)
    raws = []
    for position, name in enumerate(layers):
        act = to_grid(model, name, acts[position].detach(), size, reshape)
        grad = grads[position]
        grad = to_grid(model, name, grad.flatten(0, 1), size, reshape).unflatten(0, grad.shape[:2])
        raws.append(grad_cam_maps("gradcam", act, grad, eigen_smooth))
    return logits.detach(), class_ids, raws, guided.detach()


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """FullGrad's layers: every ``Conv2d`` and ``BatchNorm2d`` with a bias (those exact types, as pytorch-grad-cam)."""
    return [module for module in model.modules()
            if type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None]


def _bias(layer: nn.Module) -> torch.Tensor:
    """The bias FullGrad multiplies a layer's gradient by (a BatchNorm's: ``b - mean * w / sqrt(var + eps)``)."""
    if isinstance(layer, nn.BatchNorm2d):
        weight = layer.weight if layer.weight is not None else torch.ones_like(layer.running_mean)
        return (layer.bias - layer.running_mean * weight / torch.sqrt(layer.running_var + layer.eps)).detach()
    return layer.bias.detach()


def _min_max_maps(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` min-max of every map over its last two dims."""
    flat = maps.flatten(-2)
    flat = flat - flat.amin(dim=-1, keepdim=True)
    return (flat / (NORM_EPS + flat.amax(dim=-1, keepdim=True))).view(maps.shape)


def _fullgrad_batch(model, capture, batch, size, class_ids_of):
    """FullGrad: (logits, class ids, raw map [T, n, H, W] at the input's size)."""
    layers = bias_layers(model)
    store: dict[int, torch.Tensor] = {}

    def keep(index: int, output: torch.Tensor) -> None:
        output.register_hook(lambda grad, index=index: store.__setitem__(index, grad))

    leaf = batch.detach().requires_grad_(True)
    with _TensorHooks(layers, keep) as hooks:
        hooks.active = True
        logits, _ = capture.run(model, leaf, want_grad=False, from_input=True)
        hooks.active = False
    class_ids = class_ids_of(logits)
    count = class_ids.shape[1]
    biases = [_bias(layer)[None, :, None, None] for layer in layers]
    maps = []
    for target in range(count):
        store.clear()
        score = logits.gather(1, class_ids[:, target:target + 1]).sum()
        (input_grad,) = torch.autograd.grad(score, [leaf], retain_graph=target < count - 1)
        total = _min_max_maps((input_grad * leaf.detach()).abs()).sum(dim=1)  # [n, H, W]
        for index, bias in enumerate(biases):
            if index not in store:
                continue
            layer_map = _min_max_maps((bias * store[index]).abs()).sum(dim=1, keepdim=True)
            if tuple(layer_map.shape[-2:]) != tuple(size):
                layer_map = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)
            total = total + layer_map[:, 0]
        maps.append(total)
    return logits.detach(), class_ids, torch.stack(maps)


def finer_targets(logits: torch.Tensor, class_ids: torch.Tensor, comparisons: Sequence[int] = FINER_COMPARISONS,
                  alpha: float = FINER_ALPHA) -> torch.Tensor:
    """d(FinerWeightedTarget score)/d(logits) ``[T, n, K]`` for each image's targets: the target's logit against the
    classes at positions ``comparisons`` of the logits sorted by their distance to it, weighted by their softmax
    probabilities (pytorch-grad-cam's ``FinerCAM`` with ``target_idx`` each target)."""
    logits = logits.detach().float()
    classes = logits.shape[1]
    positions = [position for position in comparisons if position < classes]
    cotangents = []
    for target in range(class_ids.shape[1]):
        main = class_ids[:, target]
        distance = (logits - logits.gather(1, main[:, None])).abs()
        distance = distance.scatter(1, main[:, None], -1.0)  # the target itself sorts first, as its distance is 0
        order = distance.argsort(dim=1, stable=True)
        compared = order[:, positions]
        variable = logits.clone().requires_grad_(True)
        with torch.enable_grad():
            probs = torch.softmax(variable, dim=-1)
            main_logit = variable.gather(1, main[:, None])
            weights = probs.gather(1, compared)
            score = ((weights * (main_logit - alpha * variable.gather(1, compared))).sum(dim=1)
                     / (weights.sum(dim=1) + FINER_EPS))
            (cotangent,) = torch.autograd.grad(score.sum(), variable)
        cotangents.append(cotangent)
    return torch.stack(cotangents)


def _finer_batch(model, capture, batch, layers, size, class_ids_of, eigen_smooth, reshape=None):
    logits, outputs = capture.run(model, batch, want_grad=True)
    class_ids = class_ids_of(logits)
    acts = [outputs[name] for name in layers]
    grads = grads_for(logits, finer_targets(logits, class_ids).to(logits.dtype), acts)
    raws = []
    for name, act, grad in zip(layers, acts, grads):
        grid = to_grid(model, name, act.detach(), size, reshape)
        grad = to_grid(model, name, grad.flatten(0, 1), size, reshape).unflatten(0, grad.shape[:2])
        raws.append(grad_cam_maps("gradcam", grid, grad, eigen_smooth))
    return logits.detach(), class_ids, raws


def _shapley_batch(model, capture, batch, layers, size, class_ids_of, eigen_smooth, reshape=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no second derivative
        logits, outputs = capture.run(model, batch, want_grad=True)
    class_ids = class_ids_of(logits)
    acts = [outputs[name] for name in layers]
    count = class_ids.shape[1]
    raws = [[] for _ in layers]
    for target in range(count):
        score = logits.gather(1, class_ids[:, target:target + 1]).sum()
        unique = list({id(act): act for act in acts}.values())
        first = torch.autograd.grad(score, unique, create_graph=True, allow_unused=True)
        by_id = dict(zip((id(act) for act in unique), first))
        for position, (name, act) in enumerate(zip(layers, acts)):
            grad = by_id[id(act)]
            if grad is None:
                grad = hvp = torch.zeros_like(act)
            else:
                (hvp,) = torch.autograd.grad(grad, act, grad_outputs=act.detach(), retain_graph=True,
                                             allow_unused=True)
                hvp = torch.zeros_like(act) if hvp is None else hvp
            weight = to_grid(model, name, (grad - 0.5 * hvp).detach(), size, reshape)
            grid = to_grid(model, name, act.detach(), size, reshape)
            weights = weight.mean(dim=(2, 3))
            if eigen_smooth:
                from cams.cam_maths import eigen_smoothed
                raws[position].append(eigen_smoothed((weights[..., None, None] * grid).unsqueeze(0))[0])
            else:
                raws[position].append(torch.einsum("nc,nchw->nhw", weights, grid))
    return logits.detach(), class_ids, [torch.stack(maps) for maps in raws]


def _smooth_batch(model, capture, batch, layers, size, class_ids_of, samples, std, reshape=None):
    """SmoothGrad-CAM++ as torch-cam computes it: alpha from the mean squared and cubed gradients of the noisy
    copies and the clean activations; the weights from alpha and the *last* noisy copy's gradient, applied to the
    last noisy copy's activations (torch-cam's hooks hold those when its maps are made)."""
    logits, outputs = capture.run(model, batch, want_grad=False)
    class_ids = class_ids_of(logits)
    clean = [outputs[name].detach() for name in layers]
    del outputs
    noise = torch.distributions.normal.Normal(0, std)
    noisy = torch.cat([batch + noise.sample(batch.size()).to(device=batch.device) for _ in range(samples)])
    noisy_logits, noisy_outputs = capture.run(model, noisy, want_grad=True)
    repeated = class_ids.repeat(samples, 1)
    acts = [noisy_outputs[name] for name in layers]
    grads = gradients(noisy_logits, repeated, acts)  # [T, S * n, ...]
    n = batch.shape[0]
    raws = []
    for position, name in enumerate(layers):
        grad = grads[position]
        grid_grad = to_grid(model, name, grad.flatten(0, 1), size, reshape).unflatten(0, grad.shape[:2])
        grid_grad = grid_grad.unflatten(1, (samples, n))  # [T, S, n, C, h, w]
        grad_2 = grid_grad.pow(2).mean(dim=1)
        grad_3 = grid_grad.pow(3).mean(dim=1)
        init = to_grid(model, name, clean[position], size, reshape)
        alpha = grad_2 / (2 * grad_2 + (grad_3 * init).flatten(3).sum(-1)[..., None, None] + SMOOTHGRADCAMPP_EPS)
        weights = (alpha * grid_grad[:, -1].clamp_min(0)).flatten(3).sum(-1)  # [T, n, C]
        last = to_grid(model, name, acts[position].detach()[-n:], size, reshape)
        raws.append(torch.nansum(weights[..., None, None] * last, dim=2))
    return logits.detach(), class_ids, raws


# ------------------------------------------------------------------------------------------------ entry point
def explain_own(model: nn.Module, images: torch.Tensor, layers: Sequence[str], method: str, targets=None,
                class_names: Sequence[str] | None = None, batch_size: int = 32,
                align: str | Mapping[str, Sequence[float]] = "model", progress: Progress | None = None,
                eigen_smooth: bool = False, precision: str = "float32", reshape=None,
                keep_raw: bool = False) -> Explanation:
    """``cams.explain`` for the methods of :data:`cams.engine.OWN_PASS_METHODS` (arguments as there)."""
    layers, modules, offsets, plan = checked_run(model, images, layers, method, targets, class_names, batch_size,
                                                 align, progress)
    top_k, fixed_ids = plan
    with torch.inference_mode(False):
        images = model_input(model, images)
        results = Results(images, plan, len(layers), keep_raw)
        size, count, n_targets = results.size, results.count, results.n_targets
        guided_all = torch.empty((count, n_targets, 3, *size)) if method == "guidedgradcam" else None
        ablation = method == "ablationcam"
        meter = Meter(progress, 0 if ablation else count)
        with Capture(modules) as capture:
            for start in range(0, count, batch_size):
                batch = images[start:start + batch_size]
                stop = start + batch.shape[0]

                def class_ids_of(logits, start=start):
                    return explained_classes(logits, top_k, fixed_ids, start)

                shared_map = None
                if method == "guidedgradcam":
                    logits, class_ids, raws, guided = _guided_batch(model, capture, batch, layers, size,
                                                                    class_ids_of, eigen_smooth, reshape)
                elif method == "fullgrad":
                    logits, class_ids, shared_map = _fullgrad_batch(model, capture, batch, size, class_ids_of)
                    raws = [shared_map] * len(layers)
                elif method == "finercam":
                    logits, class_ids, raws = _finer_batch(model, capture, batch, layers, size, class_ids_of,
                                                           eigen_smooth, reshape)
                elif method == "shapleycam":
                    logits, class_ids, raws = _shapley_batch(model, capture, batch, layers, size, class_ids_of,
                                                             eigen_smooth, reshape)
                elif method == "smoothgradcampp":
                    logits, class_ids, raws = _smooth_batch(model, capture, batch, layers, size, class_ids_of,
                                                            SMOOTHGRADCAMPP_SAMPLES, SMOOTHGRADCAMPP_STD, reshape)
                else:
                    from cams.ablation import ablation_batch
                    logits, class_ids, raws = ablation_batch(model, capture, modules, batch, layers, size,
                                                             class_ids_of, batch_size, meter, eigen_smooth,
                                                             precision, reshape)
                results.add_batch(start, class_ids, logits)
                for position, raw in enumerate(raws):
                    offset = NO_OFFSET if shared_map is not None else offsets[position]
                    maps = normalise(raw.detach(), size, offset)  # [T, n, H, W]
                    unscaled = unnormalised(raw.detach(), size, offset) if keep_raw else None
                    if method == "guidedgradcam":
                        if unscaled is not None:
                            unscaled = (unscaled[:, :, None] * guided).abs().amax(dim=2)
                        maps = _min_max_maps((maps[:, :, None] * guided).abs().amax(dim=2))  # one min-max
                    results.put(start, position, maps, unscaled)
                if guided_all is not None:
                    guided_all[start:stop] = guided.transpose(0, 1).float().cpu()
                if not ablation:
                    meter.add(batch.shape[0])
    return results.explanation(model, layers, method, class_names, run_options(method, eigen_smooth, precision),
                               guided_all)
