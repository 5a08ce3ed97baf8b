"""Which layers of a model can be explained, what to call them, and how to read their output as a map.

pfnet's own networks (below) have catalogues of their own; any other ``nn.Module`` (a timm or torchvision model, a
user's network) gets its stem, stages and blocks from its structure (:mod:`cams.any_model`), named by dotted
module path, and any other module path of it is accepted too.

Layer names are dotted module paths (``"layer3.5"``, ``"blocks.11"``, ``"transformers.2.blocks.0"``) plus one
alias, ``"stem"``. Every name's *activation* is the output of that module in the model's forward pass.

ResNets (:class:`pfnet.resnet.PFResNet`):

- ``"stem"``: the output of the stem max-pool (conv 7x7/2 + BN + ReLU, then 3x3 max-pool/2), i.e. the input of
  ``layer1``, at 1/4 of the input resolution. (The 1/2-resolution conv output is not offered.)
- ``"layer1"`` .. ``"layer4"``: stage outputs. A stage's output **is** its last block's output, the very same
  tensor: ``"layer4"`` and ``"layer4.2"`` (``"layer3"`` and ``"layer3.5"``, ...) always give identical maps.
  :attr:`LayerSpec.same_as` says so for the block name.
- ``"layerS.i"``: every bottleneck block's output (after the residual add and ReLU).
- ``"layerS.i.conv_block"``: the block's spatial op, inside the block: a 3x3 conv (R50), a 3x3 max-pool
  (R50-max; R50-hybrid blocks that keep the resolution), or a 2x2 avg-pool + 3x3 conv (R50-hybrid blocks that
  downsample). Its output has the block's width (1/4 of the block output's channels).

ViT-max (:class:`pfnet.vit.ViTMax`): ``"blocks.0"`` .. ``"blocks.11"``, block outputs, tokens ``[N, h*w, C]`` on
an ``(H // patch, W // patch)`` grid. Even blocks attend, odd blocks use the parameter-free max-pool layer.

PiT-max (:class:`pfnet.pit.PiTMax`): stage outputs ``"transformers.s"`` (``[N, C, h, w]``) and their blocks
``"transformers.s.blocks.i"`` (tokens on the stage's grid). A stage output holds the same values as its last
block's tokens (reshaped to a map), so the two give identical heatmaps.
"""
from __future__ import annotations

import functools
import importlib
import weakref
from dataclasses import dataclass
from typing import Literal
from collections.abc import Callable, Mapping

import torch
from torch import nn

from cams import any_model

Family = Literal["resnet", "vit", "pit"]
Kind = Literal["stem", "stage", "block", "op"]

STEM = "stem"
#: What ``reshape=`` takes (:func:`to_grid`, ``cams.explain``): a callable output -> ``[N, C, h, w]``, a token grid
#: ``(h, w)`` (prefix tokens: those before the last ``h*w``), or a mapping layer -> either (other layers: derived).
Reshape = Callable[[torch.Tensor], torch.Tensor] | tuple[int, int] | Mapping[str, object] | None


class CamError(ValueError):
    """Base class for every error the CAM engine raises on purpose (bad layer, method or target)."""


class LayerError(CamError):
    """A layer name that this model does not have (the message lists the valid ones)."""


@dataclass(frozen=True)
class LayerSpec:
    """One explainable layer: its ``name`` (what :func:`cams.explain` takes), a human ``label``, its ``kind``.

    ``same_as`` names another layer whose activation is the very same tensor (``"layer4.2"`` -> ``"layer4"``),
    so a UI can avoid offering both as if they differed.
    """

    name: str
    label: str
    kind: Kind
    same_as: str | None = None


@functools.cache
def _optional_class(module: str, name: str) -> type | None:
    """``module.name``, or None when it cannot be imported (looked up once: explain asks on every call)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def pfnet_family(model: nn.Module) -> Family | None:
    """``"resnet"``, ``"vit"`` or ``"pit"`` for pfnet's networks; None for any other (explained from its structure)."""
    from pfnet.resnet import PFResNet

    if isinstance(model, PFResNet):
        return "resnet"
    vit_cls = _optional_class("pfnet.vit", "ViTMax")
    if vit_cls is not None and isinstance(model, vit_cls):
        return "vit"
    pit_cls = _optional_class("pfnet.pit", "PiTMax")
    if pit_cls is not None and isinstance(model, pit_cls):
        return "pit"
    return None


def family_of(model: nn.Module) -> Family:
    """``"resnet"``, ``"vit"`` or ``"pit"``; :class:`LayerError` for any other network (which
    :func:`available_layers` still lists: see :func:`pfnet_family`)."""
    family = pfnet_family(model)
    if family is None:
        raise LayerError(f"{type(model).__name__} is not a pfnet ResNet, ViT-max or PiT-max")
    return family


# ---------------------------------------------------------------------------------------------------------- ResNet
def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    stages = []
    index = 1
    while isinstance(getattr(model, f"layer{index}", None), nn.Sequential):
        stages.append((f"layer{index}", getattr(model, f"layer{index}")))
        index += 1
    return stages


# A block's spatial-op label, by op module: every layer lookup lists the layers, and walking each block's modules
# again for its label cost ~0.5 ms per image in ``explain`` (a replaced op is another module: a new label).
_op_labels: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _spatial_op_label(op: nn.Module) -> str:
    label = _op_labels.get(op)
    if label is None:
        label = _op_labels[op] = _describe_spatial_op(op)
    return label


def _describe_spatial_op(op: nn.Module) -> str:
    def describe(module: nn.Module) -> str | None:
        if isinstance(module, nn.MaxPool2d):
            return f"{_k(module.kernel_size)} max-pool" + ("/2" if _k1(module.stride) == 2 else "")
        if isinstance(module, nn.AvgPool2d):
            return f"{_k(module.kernel_size)} avg-pool" + ("/2" if _k1(module.stride) == 2 else "")
        if isinstance(module, nn.Conv2d):
            return f"{_k(module.kernel_size)} conv" + ("/2" if _k1(module.stride) == 2 else "")
        return None

    own = describe(op)
    if own is not None:
        return own
    parts = [text for text in (describe(sub) for sub in op.modules()) if text is not None]
    return " + ".join(parts) if parts else type(op).__name__


def _k(size) -> str:
    size = (size, size) if isinstance(size, int) else tuple(size)
    return f"{size[0]}x{size[1]}"


def _k1(stride) -> int:
    return stride if isinstance(stride, int) else int(stride[0])


def _resnet_layers(model: nn.Module) -> list[LayerSpec]:
    specs = [LayerSpec(STEM, "stem · conv 7x7/2 + max-pool/2 output (input of layer1, 1/4 resolution)", "stem")]
    for stage_name, stage in _resnet_stages(model):
        last = len(stage) - 1
        specs.append(LayerSpec(stage_name, f"{stage_name} · stage output (= {stage_name}.{last})", "stage"))
        for index, block in enumerate(stage):
            name = f"{stage_name}.{index}"
            op = _spatial_op_label(block.conv_block)
            specs.append(LayerSpec(name, f"{name} · block {index + 1} output ({op})", "block",
                                   same_as=stage_name if index == last else None))
            specs.append(LayerSpec(f"{name}.conv_block", f"{name}.conv_block · spatial op: {op}", "op"))
    return specs


# ------------------------------------------------------------------------------------------------------ ViT, PiT
def _vit_block_label(index: int, block: nn.Module) -> str:
    mixer = "max-pool" if getattr(block, "eff", False) else "attention"
    return f"block {index + 1} · {mixer}"


def _vit_layers(model: nn.Module) -> list[LayerSpec]:
    return [LayerSpec(f"blocks.{index}", _vit_block_label(index, block), "block")
            for index, block in enumerate(model.blocks)]


def _pit_layers(model: nn.Module) -> list[LayerSpec]:
    specs = []
    for stage_index, stage in enumerate(model.transformers):
        blocks = list(stage.blocks)
        specs.append(LayerSpec(f"transformers.{stage_index}",
                               f"stage {stage_index + 1} output (as a map; = its block {len(blocks)})", "stage"))
        for index, block in enumerate(blocks):
            specs.append(LayerSpec(f"transformers.{stage_index}.blocks.{index}",
                                   f"stage {stage_index + 1} · {_vit_block_label(index, block)}", "block",
                                   same_as=f"transformers.{stage_index}" if index == len(blocks) - 1 else None))
    return specs


# ------------------------------------------------------------------------------------------------------ public API
def available_layers(model: nn.Module) -> list[LayerSpec]:
    """The layers :func:`cams.explain` offers for ``model``, shallow to deep within each group.

    Any other network than pfnet's: its stem, stages and their blocks in network depth order (timm's
    ``feature_info`` where present, else a walk of its modules: :mod:`cams.any_model`), named by dotted module
    path (``"layer4"``, ``"stages.3"``, ``"blocks.11"``); ``explain`` accepts its other module paths too.
    """
    family = pfnet_family(model)
    if family is None:
        return [LayerSpec(part.name, part.label, part.kind, part.same_as)  # type: ignore[arg-type]
                for part in any_model.outline(model).parts]
    if family == "resnet":
        return _resnet_layers(model)
    if family == "vit":
        return _vit_layers(model)
    return _pit_layers(model)


def layer_names(model: nn.Module) -> list[str]:
    return [spec.name for spec in available_layers(model)]


def default_layer(model: nn.Module) -> str:
    """The canonical single layer to explain: the last block of the last stage.

    ResNet: ``"layer4"`` (identical to ``"layer4.2"``); ViT: the last block; PiT: the last stage's output.
    """
    return default_layers(model)[-1]


def default_layers(model: nn.Module) -> list[str]:
    """The layers an app shows by default, deepest last.

    ResNet: ``["layer3", "layer4"]``, the last blocks of the two deepest stages (same tensors as ``"layer3.5"``
    and ``"layer4.2"``). ViT: ``["blocks.10", "blocks.11"]``, the last attention and the last max-pool block.
    PiT: the outputs of its last two stages. Any other network: its last two stages (the blocks of a network
    without stages: its last two blocks; a plain stack of layers: its last convolution).
    """
    family = pfnet_family(model)
    if family is None:
        return list(any_model.outline(model).defaults)
    if family == "resnet":
        return [name for name, _ in _resnet_stages(model)][-2:]
    if family == "vit":
        return [f"blocks.{index}" for index in range(len(model.blocks))][-2:]
    return [f"transformers.{index}" for index in range(len(model.transformers))][-2:]


BLOCKS = "blocks"  # what ``--layers blocks`` and the app's depth curves mean: every block, shallow to deep


def block_layers(model: nn.Module) -> list[str]:
    """Every block output in forward order: the axis of a localization-by-depth curve.

    ResNet: ``layer1.0`` .. ``layer4.2`` (16 blocks for R50); ViT: ``blocks.0`` .. ``blocks.11``; PiT: every
    ``transformers.s.blocks.i``. The block names, not their stage aliases, so each depth appears once.
    """
    return [spec.name for spec in available_layers(model) if spec.kind == "block"]


def expand_layers(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` with :data:`BLOCKS` replaced by :func:`block_layers` (order kept, duplicates dropped)."""
    out: list[str] = []
    for name in names:
        for item in (block_layers(model) if name == BLOCKS else [name]):
            if item not in out:
                out.append(item)
    return out


def layer_spec(model: nn.Module, name: str) -> LayerSpec:
    for candidate in available_layers(model):
        if candidate.name == name:
            return candidate
    if pfnet_family(model) is None and _submodule(model, name) is not None:
        return LayerSpec(name, f"{name} · {type(_submodule(model, name)).__name__} output", "op")
    raise _unknown(model, name)


def _submodule(model: nn.Module, name: object) -> nn.Module | None:
    if not isinstance(name, str) or not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _unknown(model: nn.Module, name: object) -> LayerError:
    names = layer_names(model)
    shown = ", ".join(names) if len(names) <= 60 else ", ".join(names[:60]) + f", ... ({len(names)} in all)"
    more = "" if pfnet_family(model) is not None else " (or the dotted path of any of its modules)"
    return LayerError(f"unknown layer {name!r} for {type(model).__name__}; valid layers{more}: {shown}")


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module whose forward output is layer ``name``'s activation."""
    if pfnet_family(model) is None:
        module = _submodule(model, name)
        if module is None:
            raise _unknown(model, name)
        return module
    if not isinstance(name, str) or name not in set(layer_names(model)):
        raise _unknown(model, name)
    if name == STEM:
        return model.maxpool
    return model.get_submodule(name)


def canonical(model: nn.Module, name: str) -> str:
    """``name`` or, where another layer gives the same tensor under a shorter name, that name."""
    return layer_spec(model, name).same_as or name


def _conv_out(size: int, conv: nn.Module, dim: int) -> int:
    kernel = conv.kernel_size[dim] if not isinstance(conv.kernel_size, int) else conv.kernel_size
    stride = conv.stride[dim] if not isinstance(conv.stride, int) else conv.stride
    padding = conv.padding[dim] if not isinstance(conv.padding, (int, str)) else conv.padding
    dilation = conv.dilation[dim] if not isinstance(conv.dilation, int) else conv.dilation
    if isinstance(padding, str):  # "same" / "valid"
        return size if padding == "same" else (size - dilation * (kernel - 1) - 1) // stride + 1
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def token_grid(model: nn.Module, name: str, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` token grid that layer ``name`` works on for an input of ``input_hw`` pixels (ViT/PiT; any
    other network: its patch embedding's grid, where it has one; :func:`to_grid` reads other grids from the
    output's shape)."""
    family = pfnet_family(model)
    height, width = int(input_hw[0]), int(input_hw[1])
    if family is None:
        grid = any_model.patch_grid(model, (height, width))
        if grid is None:
            raise LayerError(f"{type(model).__name__} has no patch embedding to give layer {name!r} a token grid; "
                             "its outputs' grids come from their shapes (to_grid)")
        return grid
    if family == "vit":
        patch = model.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return height // patch[0], width // patch[1]
    if family == "pit":
        stage = int(name.split(".")[1])
        convs = [model.patch_embed.conv] + [model.pools[index].conv for index in range(stage)]
        for conv in convs:
            height, width = _conv_out(height, conv, 0), _conv_out(width, conv, 1)
        return height, width
    raise LayerError(f"{type(model).__name__} layers are already maps; they have no token grid")


def output_tensor(output):
    """A layer's output tensor: the output itself, or the first item of a tuple / list output (timm's PiT
    stages return ``(map, class tokens)``); None when there is no tensor to explain."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def to_grid(model: nn.Module, name: str, activation: torch.Tensor, input_hw: tuple[int, int],
            reshape: Reshape = None) -> torch.Tensor:
    """Layer ``name``'s activation (or its gradient) as a map ``[N, C, h, w]``.

    ResNet layers and PiT stage outputs are maps already (returned as they are); ViT and PiT block outputs are
    tokens ``[N, h*w, C]`` (row-major grid, no class token), reshaped on the grid the input size implies.
    Any other network's outputs are read from their shape (:func:`cams.any_model.layout`): maps, channels-last
    maps (Swin), tokens after prefix tokens (ViT, DeiT, EVA, BEiT, PiT). ``reshape`` (:data:`Reshape`) says it
    for outputs whose grid cannot be derived; where none is given and none can be derived: :class:`LayerError`.
    """
    if isinstance(reshape, Mapping):
        reshape = reshape.get(name)
    if reshape is not None:
        return _reshaped(name, activation, reshape)
    if pfnet_family(model) is None:
        how = any_model.layout(model, tuple(activation.shape), input_hw)
        if how is None:
            raise LayerError(
                f"layer {name!r} of {type(model).__name__} gives an output of shape {tuple(activation.shape)}, which "
                f"is not a map on a {input_hw[0]}x{input_hw[1]} input ([N, C, h, w], [N, h, w, C], or tokens "
                f"[N, prefix + h*w, C] on a grid of the input's shape); say how to read it: "
                f"cams.explain(..., reshape={{{name!r}: (h, w)}}) for tokens on an h x w grid (the last h*w tokens), "
                f"or reshape=a callable that turns the output into [N, C, h, w]")
        return any_model.as_map(how, activation)
    if activation.dim() == 4:
        return activation
    if activation.dim() != 3:
        raise LayerError(f"layer {name!r} gave a {activation.dim()}-d output {tuple(activation.shape)}; "
                         "expected a map [N, C, h, w] or tokens [N, h*w, C]")
    height, width = token_grid(model, name, input_hw)
    batch, tokens, channels = activation.shape
    if tokens != height * width:
        raise LayerError(f"layer {name!r} has {tokens} tokens, but a {input_hw[0]}x{input_hw[1]} input gives a "
                         f"{height}x{width} grid")
    return activation.transpose(1, 2).reshape(batch, channels, height, width)


def _reshaped(name: str, activation: torch.Tensor, reshape) -> torch.Tensor:
    if callable(reshape):
        result = reshape(activation)
        if not isinstance(result, torch.Tensor) or result.dim() != 4:
            raise LayerError(f"reshape for layer {name!r} must return a map [N, C, h, w]; got "
                             f"{tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__}")
        return result
    try:
        height, width = (int(value) for value in reshape)
    except (TypeError, ValueError):
        raise LayerError(f"reshape for layer {name!r} must be a callable or a grid (h, w); got {reshape!r}") from None
    if activation.dim() != 3 or not 0 < height * width <= activation.shape[1]:
        raise LayerError(f"layer {name!r} gives {tuple(activation.shape)}: not tokens [N, prefix + h*w, C] for the "
                         f"grid {height}x{width}")
    prefix = int(activation.shape[1]) - height * width
    return any_model.as_map(("tokens", prefix, height, width), activation)
