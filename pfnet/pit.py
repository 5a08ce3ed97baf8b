"""PiT-max: a pooling-based vision transformer whose stages alternate attention / parameter-free eff layer.

Module names follow the official NAVER checkpoints (``patch_embed.conv``, ``pos_embed``,
``transformers.s.blocks.i``, ``pools.s.conv``, ``norm``, ``head``) so they load with ``strict=True``.
There is no class token: the head reads the average of the final tokens.

``transformers[s]`` takes and returns feature maps ``[N, C, h, w]``; its blocks (shared with :mod:`pfnet.vit`)
work on tokens ``[N, h*w, C]``. Between stages a strided channel-multiplying (grouped) 3x3 conv halves the grid.
Dropout, drop-path and the classifier interface are those of :mod:`pfnet.vit`; as in the official PiT code, block
``i`` of ``n`` (counted over all stages) drops paths with ``drop_path_rate * i / n``.
"""
from __future__ import annotations

from functools import partial
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import to_2tuple
from timm.models import register_model

from pfnet import registry

from pfnet.vit import (LN_EPS, MLP_RATIO, TOKEN_MODEL_OPTIONS, TokenClassifier, init_transformer_weights,
                       make_blocks)


class ConvPatchEmbed(nn.Module):
    """Overlapping patches: a ``patch_size`` conv with stride ``stride`` (no padding)."""

    def __init__(self, patch_size: int, stride: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Transformer(nn.Module):
    """One PiT stage: ``[N, C, h, w]`` -> tokens -> blocks (even attend, odd eff) -> ``[N, C, h, w]``."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = MLP_RATIO, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rates: list[float] | None = None):
        super().__init__()
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        grid = (height, width)
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class ConvPool(nn.Module):
    """Stride-2 3x3 conv with ``groups=c_in`` that halves the grid and multiplies the channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, groups=c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiTMax(TokenClassifier):
    """PiT without class token; per-stage blocks alternate attention / eff layer; GAP of normed tokens -> head."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int = 8,
                 base_dims: int = 48, heads: Sequence[int] = (3, 6, 12), depths: Sequence[int] = (2, 6, 4),
                 num_classes: int = 1000, mlp_ratio: float = MLP_RATIO, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if len(heads) != len(depths):
            raise ValueError("heads and depths must have one entry per stage")
        height, width = to_2tuple(img_size)
        if height < patch_size or width < patch_size:
            raise ValueError(f"img_size {img_size} is smaller than one {patch_size}px patch")
        drop_rate = registry.check_rate("drop_rate", drop_rate)
        attn_drop_rate = registry.check_rate("attn_drop_rate", attn_drop_rate)
        rates = registry.linear_rates(registry.check_rate("drop_path_rate", drop_path_rate), sum(depths), sum(depths))
        stage_rates = [rates[sum(depths[:stage]):sum(depths[:stage + 1])] for stage in range(len(depths))]
        dims = [base_dims * h for h in heads]
        self.patch_size = patch_size
        self.stride = stride
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.grid_size = ((height - patch_size) // stride + 1, (width - patch_size) // stride + 1)
        self.patch_embed = ConvPatchEmbed(patch_size, stride, dims[0], in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *self.grid_size))
        self.pos_drop = nn.Dropout(drop_rate)
        self.transformers = nn.ModuleList(
            Transformer(dim, depth, num_heads, mlp_ratio, drop_rate, attn_drop_rate, block_rates)
            for dim, depth, num_heads, block_rates in zip(dims, depths, heads, stage_rates))
        self.pools = nn.ModuleList(ConvPool(c_in, c_out) for c_in, c_out in zip(dims[:-1], dims[1:]))
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self._set_head(num_classes, global_pool)
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=grid, mode="bicubic", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[N, C, H, W]`` -> normed tokens of the last stage ``[N, h*w, num_features]``."""
        x = self.patch_embed(x)
        x = self.pos_drop(x + self._pos_embed((x.shape[-2], x.shape[-1])))
        for stage, transformer in enumerate(self.transformers):
            x = transformer(x)
            if stage < len(self.pools):
                x = self.pools[stage](x)
        return self.norm(x.flatten(2).transpose(1, 2))


PIT_SIZES = {
    "pit_ti_max": dict(patch_size=16, stride=8, base_dims=32, heads=(2, 4, 8), depths=(2, 6, 4)),
    "pit_s_max": dict(patch_size=16, stride=8, base_dims=48, heads=(3, 6, 12), depths=(2, 6, 4)),
    "pit_b_max": dict(patch_size=14, stride=7, base_dims=64, heads=(4, 8, 16), depths=(3, 6, 4)),
}


default_cfgs = registry.default_cfgs("pit", PIT_SIZES, first_conv="patch_embed.conv", classifier="head")


def _build(name: str, pretrained: bool, kwargs: dict) -> PiTMax:
    return registry.build(partial(PiTMax, **PIT_SIZES[name]), name, pretrained, kwargs, TOKEN_MODEL_OPTIONS)


@register_model
def pit_ti_max(pretrained: bool = False, **kwargs) -> PiTMax:
    """PiT-Ti-max (dims 64/128/256, depths 2/6/4)."""
    return _build("pit_ti_max", pretrained, kwargs)


@register_model
def pit_s_max(pretrained: bool = False, **kwargs) -> PiTMax:
    """PiT-S-max (dims 144/288/576, depths 2/6/4)."""
    return _build("pit_s_max", pretrained, kwargs)


@register_model
def pit_b_max(pretrained: bool = False, **kwargs) -> PiTMax:
    """PiT-B-max (patch 14 stride 7, dims 256/512/1024, depths 3/6/4)."""
    return _build("pit_b_max", pretrained, kwargs)
