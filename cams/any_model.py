"""Layers of any ``nn.Module`` pfnet did not build (a timm or torchvision model, a user's own network): where its
stem, stages and blocks are, and how their outputs become maps ``[N, C, h, w]``.

The layers come from the model's own structure, never from a list of known families:

- timm models say where each stage is and at what stride (``model.feature_info``: module path and reduction). The
  container that holds most of those modules is the trunk; its children in order are the stages (all of them:
  timm lists only the last stage of each stride), or the blocks where they hold no blocks of their own (ViT).
- Other models are walked: the shallowest module with two or more children that hold blocks (torchvision ResNet's
  ``layer1`` .. ``layer4``, a ``stages`` list of stage modules) gives the stages; a list of blocks alone (a
  ``nn.Sequential`` of blocks, a transformer's ``encoder.layers``) gives blocks without stages.
- A block is a child with parameters and children of its own (a leaf ``Conv2d`` is not a block, nor is an op group:
  a ``nn.Sequential`` of leaf layers such as torchvision's ``Conv2dNormActivation``); a stage holds blocks and
  nothing else: it is a list of them, or has one such list among its children (timm's ``ConvNeXtStage.blocks``).
  A list that mixes op groups with a block (an MBConv's conv groups around its squeeze-excitation) is the inside of
  one block, so torchvision's EfficientNet has seven stages of MBConv blocks and MobileNetV2 blocks without stages.
- The stem is the module just before the trunk (one with parameters, or a pooling layer: torchvision ResNet's
  ``maxpool``), or timm's first feature module when it lies outside the trunk (ResNet's ``act1``).
- A head convolution between the last stage and the pooling (EfficientNet's ``conv_head`` -> ``bn2``, torchvision's
  ``features[-1]``) makes the map the classifier pools: its output is the final feature map, listed after the last
  stage and the deepest default. Grad-CAM there needs no backward through the head's convolution.

Outputs become maps from their shape and the input size: ``[N, C, h, w]`` as they are; channels-last
``[N, h, w, C]`` (Swin) where only that reading is a grid of the input, or the model says ``output_fmt ==
"NHWC"``; tokens ``[N, p + h*w, C]`` with ``p`` prefix tokens (``num_prefix_tokens``, else the ``cls_token`` /
``dist_token`` / ``reg_token`` the model holds) on the patch embedding's grid for this input (``dynamic_feat_size``),
else the ``h x w`` grid of the input's aspect ratio that has that many cells (PiT's stages, Swin, any input size).
Everything here is plain data; :mod:`cams.layers` turns it into ``LayerSpec`` and errors.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

_LISTS = (nn.Sequential, nn.ModuleList)
_SKIPPED = (nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_PREFIX_TOKENS = ("cls_token", "class_token", "dist_token", "reg_token")
# Largest ratio between the rows' and the columns' input pixels per cell for a shape to read as a grid.
_ASPECT = 1.5


@dataclass(frozen=True)
class Part:
    """One layer of the outline: dotted module path, ``kind`` ("stem" | "stage" | "block"), a label, the layer
    whose output is the very same tensor (a ``nn.Sequential`` stage's last block -> the stage), its stage."""

    name: str
    kind: str
    label: str
    same_as: str | None = None
    stage: str | None = None


@dataclass(frozen=True)
class Outline:
    """A model's layers in depth order, the defaults (the last two stages, or blocks), timm's reductions and the
    final feature map after a head convolution (None when the last stage is what gets pooled)."""

    parts: tuple[Part, ...]
    defaults: tuple[str, ...]
    reductions: dict
    head: str | None = None


# model -> (its modules' ids, outline): the walk is done once per model, again when a module is replaced.
_outlines: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Outline]] = weakref.WeakKeyDictionary()


def outline(model: nn.Module) -> Outline:
    """The stem, stages and blocks of ``model``, in network depth order (see the module docstring)."""
    key = tuple(map(id, model.modules()))
    held = _outlines.get(model)
    if held is not None and held[0] == key:
        return held[1]
    found = _outline(model)
    _outlines[model] = (key, found)
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_op_group(module: nn.Module) -> bool:
    """A ``nn.Sequential`` of leaf layers: a conv -> norm -> activation group (torchvision's ``Conv2dNormActivation``),
    one operation rather than a block."""
    return (isinstance(module, nn.Sequential) and next(module.children(), None) is not None
            and all(next(child.children(), None) is None for child in module.children()))


def _is_block(module: nn.Module) -> bool:
    """A child with parameters and children of its own that is not an op group."""
    if next(module.children(), None) is None or next(module.parameters(), None) is None:
        return False
    return not _is_op_group(module)


def _blocks_of(path: str, module: nn.Module) -> list[str] | None:
    """The blocks a stage holds: its own block children (a list), or those of the one list among its children."""
    if isinstance(module, _LISTS):
        blocks = [_join(path, name) for name, child in module.named_children() if _is_block(child)]
        return blocks or None
    lists = [(name, child) for name, child in module.named_children()
             if isinstance(child, _LISTS) and any(_is_block(grand) for grand in child.children())]
    if len(lists) == 1:
        return _blocks_of(_join(path, lists[0][0]), lists[0][1])
    return None


def _is_stage(path: str, module: nn.Module) -> bool:
    """Whether ``module`` holds a list of blocks and nothing but blocks in it: a list that mixes op groups with a
    block (an MBConv's ``block``: conv groups around a squeeze-excitation) is the inside of one block."""
    blocks = _blocks_of(path, module)
    if blocks is None:
        return False
    inside = blocks[0].rpartition(".")[0][len(path):].lstrip(".")  # the list's path below ``module``
    holder = module.get_submodule(inside) if inside else module
    return not any(_is_op_group(child) for child in holder.children())


def _outline(model: nn.Module) -> Outline:
    modules = dict(model.named_modules())
    info = _feature_info(model, modules)
    if info:
        stage_paths, stems, reductions = _trunk_from_info(info, modules)
    else:
        stage_paths, stems, reductions = _trunk_from_walk(model), [], {}
    if not stage_paths:
        return _fallback(model)
    stem = stems[-1] if stems else _stem_before(model, stage_paths[0])
    staged = [(path, _blocks_of(path, modules[path]) if _is_stage(path, modules[path]) else None)
              for path in stage_paths]
    parts: list[Part] = []
    if stem is not None:
        parts.append(Part(stem, "stem", f"{stem} · stem output{_scale(reductions.get(stem))}"))
    if all(blocks is None for _, blocks in staged):  # blocks without stages (ViT)
        for index, (path, _) in enumerate(staged):
            parts.append(Part(path, "block", f"{path} · block {index + 1}{_scale(reductions.get(path))}"))
        names = [path for path, _ in staged]
    else:
        for index, (path, blocks) in enumerate(staged):
            blocks = blocks or []
            plain = bool(blocks) and isinstance(modules[path], _LISTS) and blocks[-1] == _join(
                path, _last_child(modules[path]))  # a list's output is its last child's: the same tensor
            last = f" (= {blocks[-1]})" if plain else ""
            parts.append(Part(path, "stage", f"{path} · stage {index + 1} output{_scale(reductions.get(path))}{last}"))
            for number, block in enumerate(blocks):
                parts.append(Part(block, "block", f"{block} · stage {index + 1} block {number + 1}",
                                  same_as=path if plain and number == len(blocks) - 1 else None, stage=path))
        names = [path for path, _ in staged]
    head = _head_map(model, stage_paths[-1])
    if head is not None:
        parts.append(Part(head, "stage", f"{head} · final feature map (head convolution output, what the classifier "
                                         f"pools){_scale(reductions.get(stage_paths[-1]))}"))
        names.append(head)
    blocks = [part for part in parts if part.kind == "block"]
    if _token_head(model) and blocks:  # the last block's patch tokens do not reach the logits: never a default
        dead = {blocks[-1].name, blocks[-1].stage}  # and its stage's output, those same tokens (PiT)
        parts = [Part(part.name, part.kind, f"{part.label} · {_DEAD}", part.same_as, part.stage)
                 if part.name in dead else part for part in parts]
        if names[-1] == blocks[-1].stage and len(blocks) > 1:
            names.append(blocks[-2].name)  # the last stage's block before its last
        names = [name for name in names if name not in dead]
    return Outline(tuple(parts), tuple(names[-2:]), reductions, head)


_DEAD = "class-token head: its patch tokens get no gradient"


def _token_head(model: nn.Module) -> bool:
    """Whether the classifier reads only the prefix tokens (DeiT, PiT: ``global_pool == "token"``): then the
    last block's patch tokens get no gradient, and Grad-CAM there is flat."""
    return prefix_tokens(model) > 0 and getattr(model, "global_pool", "token") == "token"


def _last_child(module: nn.Module) -> str:
    return list(module.named_children())[-1][0]


def _scale(reduction) -> str:
    return f", 1/{reduction} resolution" if isinstance(reduction, int) and reduction > 1 else ""


def _feature_info(model: nn.Module, modules: dict) -> list[tuple[str, int | None]]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and all(isinstance(item, dict) and "module" in item for item in info):
        return [(item["module"], item.get("reduction")) for item in info if item["module"] in modules]
    return []


def _trunk_from_info(info, modules):
    """timm: the container that holds most feature modules is the trunk (stages, or ViT's blocks)."""
    parents = Counter(path.rpartition(".")[0] for path, _ in info)
    top = max(parents.values())
    trunk = [parent for parent in parents if parents[parent] == top][-1]
    inside = [path for path, _ in info if path.rpartition(".")[0] == trunk]
    container = modules[trunk]
    if trunk and isinstance(container, _LISTS):
        stage_paths = [_join(trunk, name) for name, _ in container.named_children()]
    else:  # the trunk is the model (timm's ResNet): its feature modules that hold blocks; ``act1`` is the stem
        stage_paths = [path for path in inside if _blocks_of(path, modules[path]) is not None] or inside
    first = next((index for index, (path, _) in enumerate(info) if path in stage_paths), 0)
    stems = [path for path, _ in info[:first]]
    listed = dict(info)
    reductions: dict[str, int] = {path: value for path, value in info if isinstance(value, int)}
    following = None
    for path in reversed(stage_paths):  # timm lists the last stage of each stride: the others share the next one's
        following = listed.get(path, following)
        if following is not None:
            reductions.setdefault(path, following)
    return stage_paths, stems, reductions


def _trunk_from_walk(model: nn.Module) -> list[str] | None:
    """The stages of the shallowest module with two or more stage children, else the blocks of the first list of
    blocks (blocks without stages); None when neither exists. A module with one stage child that is a list of
    stages (a ``stages`` list) counts those stages; a module with two or more stage children keeps them as they are
    (torchvision EfficientNet's ``features.1`` .. ``features.7``, whose MBConv blocks hold lists of their own)."""
    first_list = None
    for path, module in model.named_modules():
        stages: list[str] = []
        expanded_stages: list[str] = []
        for name, child in module.named_children():
            child_path = _join(path, name)
            if not _is_stage(child_path, child):
                continue
            stages.append(child_path)
            inner = _blocks_of(child_path, child) or []
            children = dict(child.named_children())
            expanded = [block for block in inner if block.rpartition(".")[0] == child_path
                        and _is_stage(block, children[block.rpartition(".")[2]])]
            expanded_stages += expanded if expanded and len(expanded) == len(inner) else [child_path]
        if len(stages) >= 2:
            return stages
        if len(expanded_stages) >= 2:
            return expanded_stages
        if first_list is None and isinstance(module, _LISTS) and _blocks_of(path, module):
            first_list = _blocks_of(path, module)
    return first_list


def _head_map(model: nn.Module, last_stage: str) -> str | None:
    """The module whose output is the final feature map when a head convolution follows the last stage before any
    pooling or classifier (EfficientNet, MobileNetV2): the last module of that conv -> norm -> activation run.
    None when the last stage's output is what gets pooled (ResNet, ConvNeXt, ViT; MobileNetV3's head conv comes
    after the pooling)."""
    run: list[str] = []
    path = last_stage
    while path:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        names = [child for child, _ in parent.named_children()]
        for sibling in names[names.index(name) + 1:]:
            module = getattr(parent, sibling)
            if _ends_trunk(module):
                return _head_end(model, run)
            if not isinstance(module, _SKIPPED):
                run.append(_join(parent_path, sibling))
        path = parent_path
    return _head_end(model, run)


_ENDS_TRUNK = (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _ends_trunk(module: nn.Module) -> bool:
    """A pooling, flattening or classifier module (or one holding such): the spatial maps end there."""
    return any(isinstance(item, _ENDS_TRUNK) or type(item).__name__ == "SelectAdaptivePool2d"
               for item in module.modules())


def _head_end(model: nn.Module, run: list[str]) -> str | None:
    """The run's last module when the run starts with a convolution (a head), else None."""
    if not run or not any(isinstance(item, nn.Conv2d) for item in model.get_submodule(run[0]).modules()):
        return None
    return run[-1]


def _stem_before(model: nn.Module, first_stage: str) -> str | None:
    """The module just before the trunk, at the level where the first stage's ancestors branch off."""
    parts = first_stage.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent_path = ".".join(parts[:depth])
        parent = model.get_submodule(parent_path) if parent_path else model
        names = [name for name, _ in parent.named_children()]
        position = names.index(parts[depth])
        for name in reversed(names[:position]):
            child = getattr(parent, name)
            if isinstance(child, _POOLS) or (not isinstance(child, _SKIPPED)
                                             and next(child.parameters(), None) is not None):
                return _join(parent_path, name)
    return None


def _fallback(model: nn.Module) -> Outline:
    """No blocks anywhere (a plain stack of layers, e.g. VGG's ``features``): every convolution, as an op."""
    convs = [path for path, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    parts = tuple(Part(path, "op", f"{path} · convolution {index + 1}") for index, path in enumerate(convs))
    return Outline(parts, tuple(convs[-1:]), {})


# ------------------------------------------------------------------------------------------------ maps
def prefix_tokens(model: nn.Module) -> int:
    """How many tokens come before the patch tokens: ``num_prefix_tokens``, else the model's class /
    distillation / register tokens (``[1, k, C]`` each)."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    total = 0
    for name in _PREFIX_TOKENS:
        token = getattr(model, name, None)
        if isinstance(token, torch.Tensor) and token.dim() == 3:
            total += int(token.shape[1])
    return total


def patch_grid(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    feat = getattr(embed, "dynamic_feat_size", None)
    if callable(feat):
        try:
            height, width = feat(tuple(input_hw))
            return int(height), int(width)
        except (TypeError, ValueError, AttributeError):
            return None
    return None


def _fits(height: int, width: int, input_hw: tuple[int, int]) -> float | None:
    """How far ``height x width`` cells are from an even grid of the input (0: equal strides); None: not a grid."""
    if height < 1 or width < 1 or height > input_hw[0] or width > input_hw[1]:
        return None
    ratio = abs(math.log((input_hw[0] / height) / (input_hw[1] / width)))
    return ratio if ratio <= math.log(_ASPECT) else None


def grid_for(model: nn.Module, count: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of ``count`` patch tokens for an input of ``input_hw``: the patch embedding's, else the
    grid with that many cells closest to the input's aspect ratio; None when none is close."""
    patches = patch_grid(model, input_hw)
    if patches is not None and patches[0] * patches[1] == count:
        return patches
    if count < 1:
        return None
    stride = math.sqrt(input_hw[0] * input_hw[1] / count)
    best = None
    guess = input_hw[0] / stride
    for height in {max(1, math.floor(guess) + step) for step in (-1, 0, 1, 2)}:
        if count % height:
            continue
        score = _fits(height, count // height, input_hw)
        if score is not None and (best is None or score < best[0]):
            best = (score, (height, count // height))
    return best[1] if best else None


def layout(model: nn.Module, shape: tuple[int, ...], input_hw: tuple[int, int]):
    """How to read an output of ``shape`` as a map: ``("nchw",)``, ``("nhwc",)``, ``("tokens", prefix, h, w)``,
    or None when no reading fits."""
    if len(shape) == 4:
        nchw = _fits(shape[2], shape[3], input_hw) is not None
        nhwc = _fits(shape[1], shape[2], input_hw) is not None
        if nhwc and (not nchw or getattr(model, "output_fmt", None) == "NHWC"):
            return ("nhwc",)
        return ("nchw",)
    if len(shape) == 3:
        tokens = int(shape[1])
        for prefix in dict.fromkeys((prefix_tokens(model), 0)):
            grid = grid_for(model, tokens - prefix, input_hw) if tokens > prefix else None
            if grid is not None:
                return ("tokens", prefix, *grid)
    return None


def as_map(how, activation: torch.Tensor) -> torch.Tensor:
    """``activation`` read as :func:`layout` said: ``[N, C, h, w]``."""
    if how[0] == "nchw":
        return activation
    if how[0] == "nhwc":
        return activation.permute(0, 3, 1, 2)
    _, prefix, height, width = how
    tokens = activation[:, prefix:] if prefix else activation
    return tokens.transpose(1, 2).reshape(activation.shape[0], activation.shape[2], height, width)


# ------------------------------------------------------------------------------------------------ class names
def class_names_of(model: nn.Module) -> list[str] | None:
    """The model's class names: ImageNet's (timm's ``ImageNetInfo``) when its ``pretrained_cfg`` says it was
    trained on an ImageNet subset of that many classes, else ``"class N"`` for its ``num_classes``; None when the
    model does not say how many classes it has."""
    count = getattr(model, "num_classes", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return None
    try:
        from timm.data import infer_imagenet_subset

        subset = infer_imagenet_subset(model)
    except (ImportError, AttributeError, KeyError, ValueError):
        subset = None
    names = _imagenet_names(subset) if subset else None
    return list(names if names is not None and len(names) == count else numbered(count))


@functools.lru_cache(maxsize=8)
def _imagenet_names(subset: str) -> tuple[str, ...] | None:
    """timm's names of an ImageNet subset's classes (read from timm's files: ~0.1 s, so once per subset)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(subset)
        return tuple(info.index_to_description(index) for index in range(info.num_classes()))
    except (ImportError, AttributeError, KeyError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=8)
def numbered(count: int) -> tuple[str, ...]:
    """``("class 0", ..., "class count-1")``: the names of classes nobody named (made once per count: explain
    asks for them on every call)."""
    return tuple(f"class {index}" for index in range(count))
