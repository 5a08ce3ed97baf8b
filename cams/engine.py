"""The CAM engine: heatmaps for many layers and targets from one forward pass and one ``torch.autograd.grad``.

How a call works (``explain``):

1. Forward hooks (registered for this call only, removed in ``finally``) record the output of every requested
   layer. They fire only for the thread that registered them, so one model can serve several threads.
2. The forward runs under ``torch.no_grad()``. For gradient methods the first requested layer's hook turns
   gradient recording on and hands the rest of the network a detached copy of its output that requires grad:
   nothing before the shallowest requested layer is recorded, no parameter or input gets a gradient, and the
   model's ``requires_grad`` flags, mode and hooks are never changed (the grad mode is thread-local and
   restored when the forward returns or raises).
3. One ``torch.autograd.grad`` call takes the gradients of the selected logits (summed over images) with
   respect to the recorded activations only; with several targets per image the one-hot ``grad_outputs`` are
   stacked and sent in the same call with ``is_grads_batched=True``. No parameter ``.grad`` is touched and no
   weight gradient is computed.
4. Per-method weighting (the maths of pytorch-grad-cam 1.5.x, done in torch), ReLU, per-map min-max,
   bilinear upsampling to the input size and a second min-max, exactly as ``BaseCAM`` does for one layer;
   where the model records an alignment offset for the layer (:mod:`cams.align`) the upsampled map is drawn
   moved by it (``align="none"`` keeps pytorch-grad-cam's drawing).

Score-CAM additionally runs the masked inputs (``batch_size`` at a time, under ``no_grad``; constant channels'
identical masked input once); Eigen-CAM, KPCA-CAM and CAM need no gradients at all. The methods with passes of
their own (``OWN_PASS_METHODS``: Ablation-CAM, FullGrad, Guided Grad-CAM, Finer-CAM, Shapley-CAM, SmoothGrad-CAM++)
are computed by :mod:`cams.methods` / :mod:`cams.ablation`, ``aug_smooth`` by :mod:`cams.smoothing`; docs/methods.md
says what each costs.

Long calls can report progress and be stopped: ``progress(done, total)`` is called after every batch of images
(for Score-CAM: after every chunk of masked inputs, counting channels); when it returns a true value ``explain`` raises
:class:`Cancelled` (hooks removed, the model untouched).

The model is used as it is: pass it in eval mode (``pfnet.load`` returns it so); ``explain`` neither switches
the mode nor changes anything else on it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cams.align import NO_OFFSET, Offset, layer_offsets, sampling_grid
from cams.any_model import class_names_of, numbered
from cams.cam_maths import (GRADCAMPP_EPS, XGRADCAM_EPS, MethodError, TargetError, check_inputs,  # noqa: F401
                            eigen_cam_maps, eigen_smoothed, explained_classes, fc_cam_maps, grad_cam_maps, gradients,
                            model_input, resolve_classes, target_count, target_plan)
from cams.layers import CamError, LayerError, Reshape, canonical, output_tensor, pfnet_family, resolve, to_grid
from cams.scorecam import SCORECAM_EPS, score_cam_maps  # noqa: F401  (SCORECAM_EPS: kept importable here)

from cams.catalogue import (EIGEN_METHODS, EIGEN_SMOOTH_METHODS, GRADIENT_METHODS, LAYERLESS_METHODS,  # noqa: F401
                            METHOD_NOTES, METHODS, OWN_PASS_METHODS, PRECISIONS, SCORED_METHODS)

# The constants pytorch-grad-cam uses (base_cam / utils.image / grad_cam_plusplus / xgrad_cam / score_cam).
NORM_EPS = 1e-7


class Cancelled(Exception):
    """``explain`` was stopped by its ``progress`` callback (returned a true value) before it finished."""


# progress(done, total) -> stop?; see explain()
Progress = Callable[[int, int], "bool | None"]


class Meter:
    """Counts work units (images; masked inputs for Score-CAM) and asks ``progress`` whether to go on."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def grow(self, units: int) -> None:
        self.total += units

    def add(self, units: int) -> None:
        self.done += units
        if self.progress is not None and self.progress(self.done, self.total):
            raise Cancelled(f"stopped after {self.done} of {self.total} steps")


@dataclass(frozen=True, eq=False)
class Explanation:
    """Heatmaps for every image x target x layer, in [0, 1], at the input's resolution (CPU tensors).

    ``heatmaps`` float32 ``[N, T, L, H, W]``; ``targets`` int64 ``[N, T]`` (class ids, per image);
    ``probs`` float32 ``[N, num_classes]``, the softmax of the forward pass the heatmaps come from.
    ``errors``: per image, why its result is not usable (its forward pass or heatmaps hold NaN or infinities), or
    None; an image with an error has no meaningful probabilities or heatmaps, and callers show the error instead.
    """

    heatmaps: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    layers: tuple[str, ...]
    method: str
    class_names: tuple[str, ...] | None = None
    #: Guided Grad-CAM only: the guided-backprop gradient of each target's score with respect to the input,
    #: float32 ``[N, T, 3, H, W]`` (pytorch-grad-cam's ``GuidedBackpropReLUModel`` output, for every image and target).
    guided: torch.Tensor | None = None
    #: How the heatmaps were computed beyond ``method``: {"aug_smooth", "eigen_smooth", "precision"} when set.
    options: tuple[tuple[str, object], ...] = ()
    raw: torch.Tensor | None = None  # with explain(keep_raw=True): the maps before min-max (:func:`unnormalised`)
    errors: tuple[str | None, ...] = ()

    @property
    def method_label(self) -> str:
        return METHODS[self.method]

    @property
    def num_images(self) -> int:
        return int(self.heatmaps.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.heatmaps.shape[1])

    def layer_index(self, layer: str | int) -> int:
        if isinstance(layer, int):
            if not -len(self.layers) <= layer < len(self.layers):
                raise IndexError(f"layer index {layer} out of range for {len(self.layers)} layers")
            return layer % len(self.layers)
        try:
            return self.layers.index(layer)
        except ValueError:
            raise LayerError(f"layer {layer!r} was not explained; explained layers: {', '.join(self.layers)}") from None

    def heatmap(self, image: int = 0, target: int = 0, layer: str | int = 0) -> np.ndarray:
        """One heatmap ``[H, W]`` float32 in [0, 1] (``target`` is the position in ``targets[image]``)."""
        return self.heatmaps[image, target, self.layer_index(layer)].numpy()

    def target_probs(self) -> torch.Tensor:
        """``[N, T]``: the probability of each explained target."""
        return self.probs.gather(1, self.targets)

    def target_name(self, image: int = 0, target: int = 0) -> str:
        class_id = int(self.targets[image, target])
        if self.class_names is not None and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return str(class_id)


# ------------------------------------------------------------------------------------------------ validation
def check_method(model: nn.Module, method: str, layers: Sequence[str]) -> None:
    if method not in METHODS:
        raise MethodError(f"unknown CAM method {method!r}; known methods: "
                          + ", ".join(f"{key} ({label})" for key, label in METHODS.items()))
    if method == "cam":
        fc = getattr(model, "fc", None)
        if pfnet_family(model) != "resnet" or not isinstance(fc, nn.Linear):
            raise MethodError(f"CAM needs a network that ends in global average pooling + fc (the ResNets); "
                              f"{type(model).__name__} does not")
        final = [name for name in (f"layer{index}" for index in range(1, 10)) if hasattr(model, name)][-1]
        for name in layers:
            if canonical(model, name) != final:
                raise MethodError(f"CAM applies only to the final feature map ({final!r}, the same tensor as "
                                  f"{final}.{len(getattr(model, final)) - 1!s}); not to {name!r}. Use a "
                                  f"gradient method (e.g. 'gradcam') for other layers")


# ------------------------------------------------------------------------------------------------ capture
class ForwardHooks:
    """Forward hooks on ``(module, key)`` pairs for one call: registered on enter (none left behind when one fails),
    removed on exit. A hook acts only while :attr:`active` and in the thread that made this object (:meth:`mine`),
    so a model shared with other threads is not touched by their passes. Subclasses give :meth:`_hook`."""

    def __init__(self, targets: list[tuple[nn.Module, Any]]):
        self.owner = threading.get_ident()
        self.targets = targets
        self.handles: list = []
        self.active = False

    def __enter__(self):
        try:
            for module, key in self.targets:
                self.handles.append(module.register_forward_hook(self._hook(key)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        self.active = False

    def mine(self) -> bool:
        """Whether a hook firing now should act: this object is active and this is its thread."""
        return self.active and threading.get_ident() == self.owner

    def _hook(self, key: Any) -> Callable:
        raise NotImplementedError


class Capture(ForwardHooks):
    """Forward hooks that record the requested layers' outputs of this thread's forward passes only."""

    def __init__(self, modules: dict[str, nn.Module]):
        groups: list[tuple[nn.Module, list[str]]] = []
        for name, module in modules.items():
            for held, names in groups:
                if held is module:
                    names.append(name)
                    break
            else:
                groups.append((module, [name]))
        super().__init__(groups)  # (module, the names it answers to)
        self.want_grad = False
        self.grad_started = False
        self.outputs: dict[str, torch.Tensor] = {}

    def close(self) -> None:
        super().close()
        self.outputs = {}

    def _hook(self, names: list[str]):
        def hook(module, inputs, output):
            if not self.mine():
                return None
            tensor = output_tensor(output)  # a tuple's first tensor (timm's PiT stages)
            if tensor is None:
                raise LayerError(f"layer {names[0]!r} does not output a tensor ({type(output).__name__})")
            if names[0] in self.outputs:
                raise LayerError(f"layer {names[0]!r} runs more than once per forward pass; cannot explain it")
            replaced = None
            if self.want_grad and not self.grad_started:
                # Shallowest requested layer: start recording here, on a leaf that aliases the output.
                self.grad_started = True
                torch.set_grad_enabled(True)
                tensor = replaced = tensor.detach().requires_grad_(True)
                if not isinstance(output, torch.Tensor):
                    replaced = type(output)([tensor, *output[1:]])
            for name in names:
                self.outputs[name] = tensor
            return replaced

        return hook

    def run(self, model: nn.Module, images: torch.Tensor, want_grad: bool, from_input: bool = False
            ) -> tuple[torch.Tensor, dict]:
        """One forward; ``from_input``: recording from the first operation (for gradients to the input: guided
        backprop, FullGrad), the layers' outputs kept as they are."""
        self.outputs = {}
        self.want_grad = want_grad and not from_input
        self.grad_started = False
        self.active = True
        try:
            with torch.no_grad():  # restores this thread's grad mode whatever the hooks did
                if from_input:
                    torch.set_grad_enabled(True)
                logits = model(images)
        finally:
            self.active = False
        outputs, self.outputs = self.outputs, {}
        missing = [name for _, names in self.targets for name in names if name not in outputs]
        if missing:
            raise LayerError(f"layers {missing} did not run in the forward pass")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise CamError(f"the model must return logits [N, num_classes]; got {getattr(logits, 'shape', logits)}")
        return logits, outputs


# ------------------------------------------------------------------------------------------------ maths
def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map ``(x - min) / (1e-7 + max(x - min))`` over the last two dims."""
    flat = maps.flatten(-2)
    flat = flat - flat.amin(dim=-1, keepdim=True)
    flat = flat / (NORM_EPS + flat.amax(dim=-1, keepdim=True))
    return flat.view(maps.shape)


def normalise(maps: torch.Tensor, size: tuple[int, int], offset: Offset = NO_OFFSET) -> torch.Tensor:
    """Raw maps ``[..., h, w]`` -> heatmaps ``[..., H, W]`` in [0, 1], as pytorch-grad-cam post-processes one layer:
    ReLU, min-max, bilinear resize (``cv2.resize`` INTER_LINEAR == align_corners=False), ReLU, min-max.
    A non-zero ``offset`` (dy, dx) draws the resized map moved by that many input pixels (:mod:`cams.align`),
    edges replicated."""
    lead = maps.shape[:-2]
    size = tuple(size)
    maps = _min_max(maps.float().clamp_min(0)).reshape(-1, 1, *maps.shape[-2:])
    if tuple(offset) != NO_OFFSET:
        grid = sampling_grid(size, offset).to(maps.device).expand(maps.shape[0], -1, -1, -1)
        maps = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return _min_max(maps.clamp_min_(0)).reshape(*lead, *size)


def unnormalised(maps: torch.Tensor, size: tuple[int, int], offset: Offset = NO_OFFSET) -> torch.Tensor:
    """:func:`normalise` without either min-max: ReLU, the same resize (and offset), in the method's own units, so
    maps compare across images and models. ``normalise(maps)`` is this map min-max normalised (to float
    rounding and the 1e-7 guard: min-max commutes with the linear resize)."""
    lead = maps.shape[:-2]
    size = tuple(size)
    maps = maps.float().clamp_min(0).reshape(-1, 1, *maps.shape[-2:])
    if tuple(offset) != NO_OFFSET:
        grid = sampling_grid(size, offset).to(maps.device).expand(maps.shape[0], -1, -1, -1)
        maps = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.clamp_min_(0).reshape(*lead, *size)


# ------------------------------------------------------------------------------------------------ entry point
def fallback_class_names(model: nn.Module, probs: list[torch.Tensor]) -> tuple[str, ...] | None:
    """"class N" names for a network pfnet did not build that does not say its classes (None for pfnet's)."""
    return None if pfnet_family(model) is not None or not probs else numbered(int(probs[0].shape[1]))


def checked_run(model: nn.Module, images: torch.Tensor, layers: Sequence[str] | str, method: str, targets,
                class_names: Sequence[str] | None, batch_size: int, align, progress: Progress | None):
    """An explain call's arguments checked before any work: the layer names as a list, their modules, their
    drawing offsets and the target plan ``(top_k, fixed_ids)``; raises the engine's errors for bad ones."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise LayerError("no layers requested")
    modules = {name: resolve(model, name) for name in layers}
    check_method(model, method, layers)
    offsets = layer_offsets(model, layers, align)
    plan = check_inputs(model, images, batch_size, targets, class_names)
    if progress is not None and not callable(progress):
        raise CamError(f"progress must be callable (done, total) -> stop?; got {type(progress).__name__}")
    return layers, modules, offsets, plan


class Results:
    """An explain call's outputs, filled batch by batch: heatmaps ``[N, T, L, H, W]`` (and the raw maps with
    ``keep_raw``), each image's class ids and probabilities; :meth:`explanation` makes the :class:`Explanation`."""

    def __init__(self, images: torch.Tensor, plan, n_layers: int, keep_raw: bool):
        """For the model inputs ``images`` ``[N, 3, H, W]`` and :func:`checked_run`'s target ``plan``."""
        self.count, self.n_targets = int(images.shape[0]), target_count(plan)
        self.size = (int(images.shape[-2]), int(images.shape[-1]))
        count, n_targets, size = self.count, self.n_targets, self.size
        self.heatmaps = torch.empty((count, n_targets, n_layers, *size), dtype=torch.float32)
        self.raw = torch.empty_like(self.heatmaps) if keep_raw else None
        self.ids = torch.empty((count, n_targets), dtype=torch.int64)
        self.probs: list[torch.Tensor] = []

    def add_batch(self, start: int, class_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """The batch of images from ``start``: its class ids ``[n, T]`` and logits ``[n, classes]``."""
        self.ids[start:start + class_ids.shape[0]] = class_ids.cpu()
        self.probs.append(torch.softmax(logits.detach().float(), dim=1).cpu())

    def put(self, start: int, position: int, maps: torch.Tensor, raw: torch.Tensor | None = None) -> None:
        """The heatmaps ``[T, n, H, W]`` of the layer at ``position`` for the batch from ``start`` (and, when kept,
        its raw maps, same shape)."""
        stop = start + maps.shape[1]
        self.heatmaps[start:stop, :, position] = maps.transpose(0, 1).cpu()
        if self.raw is not None and raw is not None:
            self.raw[start:stop, :, position] = raw.transpose(0, 1).cpu()

    def explanation(self, model: nn.Module, layers: Sequence[str], method: str, class_names: Sequence[str] | None,
                    options: tuple[tuple[str, object], ...], guided: torch.Tensor | None = None) -> Explanation:
        probs = torch.cat(self.probs)
        names = tuple(class_names) if class_names is not None else fallback_class_names(model, self.probs)
        return Explanation(heatmaps=self.heatmaps, targets=self.ids, probs=probs, layers=tuple(layers), method=method,
                           class_names=names, guided=guided, options=options, raw=self.raw,
                           errors=image_errors(probs, self.heatmaps))


def explain(model: nn.Module, images: torch.Tensor, layers: Sequence[str] | str, method: str = "gradcam",
            targets=None, class_names: Sequence[str] | None = None, batch_size: int = 32,
            align: str | Mapping[str, Sequence[float]] = "model", progress: Progress | None = None,
            aug_smooth: bool = False, eigen_smooth: bool = False, precision: str = "float32",
            reshape: Reshape = None, keep_raw: bool = False) -> Explanation:
    """Heatmaps of ``method`` for every image x target x layer.

    ``images``: a preprocessed batch ``[N, 3, H, W]`` (moved to the model's device if it is elsewhere).
    ``layers``: names from :func:`cams.layers.available_layers`. ``targets``: None (each image's top-1 class),
    an int k (each image's top-k), a list of class ids / names (names need ``class_names``), the same for
    every image, or class ids per image: a 2-D int tensor / array or a list of equal-length lists [N, T] (-1 in a
    row: that image's top class; e.g. each image's ground-truth label). ``batch_size``: images per forward pass,
    and masked inputs per forward pass for Score-CAM.
    ``align``: where each layer's cells are drawn (:mod:`cams.align`): "model" (the default) uses the offsets
    recorded for the model (``model.cam_offsets``, set by ``pfnet.load``; none for most models), "none" the
    plain resize, or a mapping layer -> (dy, dx) in input pixels.
    ``progress(done, total)``: called after each batch of images (units: images) or, for Score-CAM, after each
    chunk of masked inputs (units: channels, one masked input per image x layer channel; the total grows by each
    batch's channels once its forward pass shows them). Return a true value to stop: :class:`Cancelled`.
    ``aug_smooth``: pytorch-grad-cam's test-time augmentation (horizontal flip x brightness 0.9 / 1 / 1.1, the six
    maps un-flipped and averaged), the six copies of each image in the same forward and gradient call
    (:mod:`cams.smoothing`). ``eigen_smooth``: the first principal component of the weighted activations instead of
    their sum (pytorch-grad-cam's option; Eigen-CAM, Eigen-Grad-CAM and KPCA-CAM are projections already).
    ``precision``: "float32", or "bfloat16" for Score-CAM's and Ablation-CAM's extra forwards in bfloat16
    autocast (about 0.6-0.75 of their time on a CPU; logits move by ~0.5% of the largest), recorded in
    ``Explanation.options``.
    ``reshape``: how to read outputs whose grid cannot be derived (:data:`cams.layers.Reshape`); never needed for
    pfnet's networks, timm's CNNs, ViTs, Swin or PiT. ``class_names`` default, for a network pfnet did not build:
    :func:`cams.any_model.class_names_of` (ImageNet's for timm's ImageNet models, else "class N").
    ``keep_raw``: also keep each map before min-max normalisation (``Explanation.raw``, :func:`unnormalised`).
    """
    if class_names is None and pfnet_family(model) is None:
        class_names = class_names_of(model)
    if precision not in PRECISIONS:
        raise CamError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if aug_smooth:
        from cams.smoothing import aug_smooth_explain
        return aug_smooth_explain(model, images, layers, method, targets, class_names, batch_size, align, progress,
                                  eigen_smooth=eigen_smooth, precision=precision, reshape=reshape,
                                  keep_raw=keep_raw)
    if method in OWN_PASS_METHODS:
        from cams.methods import explain_own
        return explain_own(model, images, [layers] if isinstance(layers, str) else layers, method, targets,
                           class_names, batch_size, align, progress, eigen_smooth=eigen_smooth, precision=precision,
                           reshape=reshape, keep_raw=keep_raw)
    layers, modules, offsets, plan = checked_run(model, images, layers, method, targets, class_names, batch_size,
                                                 align, progress)
    top_k, fixed_ids = plan

    with torch.inference_mode(False):
        images = model_input(model, images)
        results = Results(images, plan, len(layers), keep_raw)
        size, count, n_targets = results.size, results.count, results.n_targets
        want_grad = method in GRADIENT_METHODS
        scored = method == "scorecam"  # counts channels, not images
        meter = Meter(progress, 0 if scored else count)
        with Capture(modules) as capture:
            for start in range(0, count, batch_size):
                batch = images[start:start + batch_size]
                logits, outputs = capture.run(model, batch, want_grad)
                class_ids = explained_classes(logits, top_k, fixed_ids, start)
                results.add_batch(start, class_ids, logits)
                acts = [outputs[name] for name in layers]
                grads = gradients(logits, class_ids, acts) if want_grad else None
                if scored:  # one masked input per channel of every layer, for each image
                    meter.grow(batch.shape[0] * sum(int(to_grid(model, name, act, size, reshape).shape[1])
                                                    for name, act in zip(layers, acts)))
                del logits, outputs
                for position, name in enumerate(layers):
                    act = to_grid(model, name, acts[position].detach(), size, reshape)
                    if want_grad:
                        grad = grads[position]
                        grad = to_grid(model, name, grad.flatten(0, 1), size, reshape).unflatten(0, grad.shape[:2])
                        raw = grad_cam_maps(method, act, grad, eigen_smooth)
                    elif method in EIGEN_METHODS:
                        raw = eigen_cam_maps(method, act, n_targets)
                    elif method == "cam":
                        raw = fc_cam_maps(model, act, class_ids)
                    else:
                        raw = score_cam_maps(model, batch, act, class_ids, batch_size, meter, eigen_smooth,
                                             precision)
                    results.put(start, position, normalise(raw, size, offsets[position]),  # [T, n, H, W]
                                unnormalised(raw, size, offsets[position]) if keep_raw else None)
                del acts, grads
                if not scored:
                    meter.add(batch.shape[0])
    return results.explanation(model, layers, method, class_names, run_options(method, eigen_smooth, precision))


def run_options(method: str, eigen_smooth: bool, precision: str, aug_smooth: bool = False
                ) -> tuple[tuple[str, object], ...]:
    """The options of a run that change ``method``'s maps (:attr:`Explanation.options`): the defaults are left out,
    and so are options the method does not use (eigen_smooth outside ``EIGEN_SMOOTH_METHODS``, bfloat16 outside
    ``SCORED_METHODS``), so the record says how the maps were made."""
    used = (("aug_smooth", aug_smooth), ("eigen_smooth", eigen_smooth and method in EIGEN_SMOOTH_METHODS),
            ("precision", precision if method in SCORED_METHODS else "float32"))
    return tuple((key, value) for key, value in used if value not in (False, "float32"))


def _not_finite(values: torch.Tensor) -> torch.Tensor:
    """Per row (first dim), whether any value is NaN or infinite: from its max and min, which NaN and the
    infinities reach (two reductions instead of an elementwise isfinite over the whole heatmap)."""
    flat = values.flatten(1)
    if flat.shape[1] == 0:
        return torch.zeros(flat.shape[0], dtype=torch.bool)
    return ~(flat.amax(dim=1).isfinite() & flat.amin(dim=1).isfinite())


def image_errors(probs: torch.Tensor, heatmaps: torch.Tensor) -> tuple[str | None, ...]:
    """Per image, why its result is not usable (NaN or infinite output or heatmap), or None: never returned
    silently (:attr:`Explanation.errors`)."""
    bad_output, bad_heatmap = _not_finite(probs), _not_finite(heatmaps)
    return tuple("the model's output for this image is NaN or infinite" if output
                 else "its heatmap is NaN or infinite" if heatmap else None
                 for output, heatmap in zip(bad_output.tolist(), bad_heatmap.tolist()))
