"""ViT-max: a ViT/16 whose odd-indexed blocks swap self-attention for a parameter-free max-pool "eff layer".

Module names follow the official NAVER checkpoints (``patch_embed.proj``, ``pos_embed``, ``blocks.i.norm1``,
``blocks.i.attn.qkv``, ``blocks.i.attn.proj``, ``blocks.i.norm2``, ``blocks.i.mlp.fc1/fc2``, ``norm``, ``head``)
so they load with ``strict=True``. There is no class token: the head reads the average of the final tokens.

The token mixers, the block and the classifier head are shared with :mod:`pfnet.pit`. Blocks work on tokens
``[N, h*w, C]`` and are told the token grid ``(h, w)`` by their caller, so non-square inputs work.

Regularisation is placed as in the official code (timm's/DeiT's ViT): ``drop_rate`` drops after the position
embedding, after each token mixer's projection and inside the MLP; ``attn_drop_rate`` drops attention weights;
``drop_path_rate`` is a stochastic depth on both residual branches of every block, rising linearly from 0.
Submodules are registered in the official order (``norm1``, ``attn``, ``mlp``, ``drop_path``, ``norm2``), so
parameters come in the official checkpoint's order and optimizer states carry over.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.models import register_model

from pfnet import registry

LN_EPS = 1e-6
MLP_RATIO = 4.0

Grid = tuple[int, int]


def _grid_for(tokens: int, grid: Grid | None) -> Grid:
    """The token grid: the one given, else a square one (only for callers that run a block on its own)."""
    if grid is not None:
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"grid {tuple(grid)} does not hold {tokens} tokens")
        return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens are not a square grid; pass grid=(h, w)")
    return side, side


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (timm layout: one ``qkv`` Linear with bias, then ``proj``)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)  # its rate drops attention weights inside the fused kernel
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class EffLayer(nn.Module):
    """Parameter-free token mixing: expand x3, GELU, 3x3 max-pool on the token grid, GELU, project back.

    Kept under the attribute name ``attn`` (with ``qkv``/``proj`` Linears) to match the official key layout.
    """

    def __init__(self, dim: int, num_heads: int | None = None, proj_drop: float = 0.0):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.act = nn.GELU()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.proj = nn.Linear(dim * 3, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        height, width = _grid_for(tokens, grid)
        y = self.act(self.qkv(x))  # [N, T, 3C]
        y = y.transpose(1, 2).reshape(batch, -1, height, width)
        y = self.pool(y).flatten(2).transpose(1, 2)
        return self.proj_drop(self.proj(self.act(y)))


class Block(nn.Module):
    """Pre-norm transformer block; ``eff=True`` puts an :class:`EffLayer` where the attention would be.

    One ``drop_path`` serves both residual branches, as in the official code.
    """

    def __init__(self, dim: int, num_heads: int, eff: bool, mlp_ratio: float = MLP_RATIO, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.eff = eff
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EffLayer(dim, proj_drop=drop) if eff else Attention(dim, num_heads, attn_drop, drop)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = registry.drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = MLP_RATIO, drop_rate: float = 0.0,
                attn_drop_rate: float = 0.0, drop_path_rates: list[float] | None = None) -> nn.ModuleList:
    """Even-indexed blocks attend, odd-indexed blocks use the eff layer; block ``i`` drops paths with
    ``drop_path_rates[i]`` (none by default)."""
    rates = drop_path_rates or [0.0] * depth
    if len(rates) != depth:
        raise ValueError(f"{len(rates)} drop-path rates for {depth} blocks")
    return nn.ModuleList(Block(dim, num_heads, eff=index % 2 == 1, mlp_ratio=mlp_ratio, drop=drop_rate,
                               attn_drop=attn_drop_rate, drop_path=rates[index]) for index in range(depth))


def init_transformer_weights(module: nn.Module) -> None:
    """timm-style init: truncated-normal Linears (std 0.02), zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [N, C, h, w]


class TokenClassifier(nn.Module):
    """The timm classifier interface of the token models (ViT-max, PiT-max): ``forward_features`` gives normed
    tokens ``[N, T, num_features]``; the head pools them (``global_pool``) and applies ``head``."""

    POOL_TYPES = ("avg", "max", "avgmax")
    num_features: int

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        self.num_classes = registry.check_classes(num_classes)
        self.global_pool = registry.check_global_pool(global_pool, self.POOL_TYPES, num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (the official choice)."""
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (randomly initialised) ``head`` for ``num_classes`` (0: none); pooling kept unless given."""
        placement = registry.module_device_dtype(self)
        self._set_head(num_classes, self.global_pool if global_pool is None else global_pool)
        self.head.to(**placement).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens (``global_pool``; ``''`` keeps them) and, unless ``pre_logits``, apply ``head``."""
        if self.global_pool == "avg":
            x = tokens.mean(dim=1)
        elif self.global_pool == "max":
            x = tokens.amax(dim=1)
        elif self.global_pool == "avgmax":
            x = 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))
        else:
            x = tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ViTMax(TokenClassifier):
    """ViT without class token; blocks alternate attention / eff layer; GAP of the normed tokens -> ``head``."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = MLP_RATIO,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        height, width = _pair(img_size)
        if height < patch_size or width < patch_size:
            raise ValueError(f"img_size {img_size} is smaller than one {patch_size}px patch")
        drop_rate = registry.check_rate("drop_rate", drop_rate)
        attn_drop_rate = registry.check_rate("attn_drop_rate", attn_drop_rate)
        drop_path_rate = registry.check_rate("drop_path_rate", drop_path_rate)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_features = embed_dim
        self.grid_size = (height // patch_size, width // patch_size)
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # The official stochastic-depth rule: torch.linspace(0, drop_path_rate, depth).
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                                  registry.linear_rates(drop_path_rate, depth, depth - 1))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self._set_head(num_classes, global_pool)
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _pos_embed(self, grid: Grid) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        pos = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[N, C, H, W]`` -> normed tokens ``[N, (H//p)*(W//p), num_features]``."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = self.pos_drop(x.flatten(2).transpose(1, 2) + self._pos_embed(grid))
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)


VIT_SIZES = {
    "vit_ti_max": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_s_max": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_b_max": dict(embed_dim=768, depth=12, num_heads=12),
}
# What the token models take besides registry.COMMON_OPTIONS (the official builders take these too).
TOKEN_MODEL_OPTIONS = {"img_size", "attn_drop_rate"}
default_cfgs = registry.default_cfgs("vit", VIT_SIZES, first_conv="patch_embed.proj", classifier="head")


def _build(name: str, pretrained: bool, kwargs: dict) -> ViTMax:
    return registry.build(partial(ViTMax, **VIT_SIZES[name]), name, pretrained, kwargs, TOKEN_MODEL_OPTIONS)


@register_model
def vit_ti_max(pretrained: bool = False, **kwargs) -> ViTMax:
    """ViT-Ti-max (dim 192, 12 blocks, 3 heads)."""
    return _build("vit_ti_max", pretrained, kwargs)


@register_model
def vit_s_max(pretrained: bool = False, **kwargs) -> ViTMax:
    """ViT-S-max (dim 384, 12 blocks, 6 heads)."""
    return _build("vit_s_max", pretrained, kwargs)


@register_model
def vit_b_max(pretrained: bool = False, **kwargs) -> ViTMax:
    """ViT-B-max (dim 768, 12 blocks, 12 heads)."""
    return _build("vit_b_max", pretrained, kwargs)
