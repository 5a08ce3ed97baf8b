"""ResNet-50 with parameter-free spatial operations (R50, R50-max, R50-hybrid).

Module names follow the official NAVER checkpoints (``conv1``, ``layerN.i.reduction_block``,
``conv_block``, ``expansion_block``, ``downsample``, ``fc``) so they load with ``strict=True``.
The timm side follows timm's own ResNet: ``drop_rate`` is dropout before ``fc``, ``drop_path_rate`` a stochastic
depth rising linearly over the blocks, ``global_pool`` / ``num_classes=0`` / ``features_only`` as in timm.
"""
from __future__ import annotations

from functools import partial
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import register_model
from torch import nn

from pfnet import registry

STAGE_DEPTHS = (3, 4, 6, 3)
STEM_WIDTH = 64
EXPANSION = 4


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the official ``ConvBN``/``ConvBNReLU`` units."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_spatial(width: int, stride: int) -> nn.Module:
    """R50: a 3x3 convolution carries the stride."""
    return conv_bn(width, width, 3, stride)


def max_spatial(width: int, stride: int) -> nn.Module:
    """R50-max: a parameter-free 3x3 max-pool replaces every 3x3 convolution."""
    return nn.MaxPool2d(kernel_size=3, stride=stride, padding=1)


def hybrid_spatial(width: int, stride: int) -> nn.Module:
    """R50-hybrid (eff-bottleneck): downsampling blocks keep a conv after a 2x2 avg-pool; others max-pool."""
    if stride == 2:
        return nn.Sequential(nn.AvgPool2d(kernel_size=2, stride=2), conv_bn(width, width, 3, 1))
    return nn.MaxPool2d(kernel_size=3, stride=stride, padding=1)


class Bottleneck(nn.Module):
    """1x1 reduce -> spatial op -> 1x1 expand, plus the (projected) identity, then ReLU."""

    def __init__(self, cin: int, width: int, stride: int, spatial: Callable[[int, int], nn.Module],
                 drop_path_rate: float = 0.0):
        super().__init__()
        cout = width * EXPANSION
        self.reduction_block = conv_bn(cin, width, 1)
        self.conv_block = spatial(width, stride)
        self.expansion_block = conv_bn(width, cout, 1, relu=False)
        self.downsample = conv_bn(cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else None
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = registry.drop_path_or_identity(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop_path(self.expansion_block(self.conv_block(self.reduction_block(x))))
        identity = x if self.downsample is None else self.downsample(x)
        # Out-of-place add: CAM hooks may hold a reference to the expansion output.
        return self.relu(out + identity)


class PFResNet(nn.Module):
    """ResNet-50 v1.5 skeleton whose bottleneck spatial op is chosen by ``variant``."""

    SPATIAL_OPS = {"conv": conv_spatial, "max": max_spatial, "hybrid": hybrid_spatial}
    POOL_TYPES = ("avg", "max", "avgmax", "catavgmax")

    def __init__(self, variant: str = "conv", num_classes: int = 1000, width_mult: float = 1.0,
                 depths: tuple[int, ...] = STAGE_DEPTHS, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if variant not in self.SPATIAL_OPS:
            raise ValueError(f"unknown ResNet variant {variant!r}; expected one of {sorted(self.SPATIAL_OPS)}")
        if width_mult <= 0:
            raise ValueError("width_mult must be positive")
        spatial = self.SPATIAL_OPS[variant]
        self.variant = variant
        self.width_mult = width_mult
        self.num_classes = registry.check_classes(num_classes)
        self.in_chans = in_chans
        self.drop_rate = registry.check_rate("drop_rate", drop_rate)
        block_rates = iter(registry.linear_rates(registry.check_rate("drop_path_rate", drop_path_rate),
                                                 sum(depths), sum(depths) - 1))
        # The official code keeps the stem at 64 channels whatever the width multiplier.
        self.conv1 = conv_bn(in_chans, STEM_WIDTH, 7, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=STEM_WIDTH, reduction=2, module="conv1")]
        cin = STEM_WIDTH
        for index, depth in enumerate(depths):
            width = int(64 * 2 ** index * width_mult)
            blocks = []
            for block_index in range(depth):
                stride = 2 if (index > 0 and block_index == 0) else 1
                blocks.append(Bottleneck(cin, width, stride, spatial, next(block_rates)))
                cin = width * EXPANSION
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=cin, reduction=4 * 2 ** index, module=f"layer{index + 1}"))
        self.num_features = cin
        self.global_pool, self.fc = self._classifier(self.num_classes, global_pool)
        self._init_weights()

    def _classifier(self, num_classes: int, global_pool: str) -> tuple[nn.Module, nn.Module]:
        registry.check_global_pool(global_pool, self.POOL_TYPES, num_classes)
        return create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (randomly initialised) ``fc`` for ``num_classes`` (0: none); pooling kept unless given."""
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        placement = registry.module_device_dtype(self)
        self.num_classes = registry.check_classes(num_classes)
        self.global_pool, self.fc = self._classifier(self.num_classes, pool)
        for module in (self.global_pool, self.fc):
            module.to(**placement).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[N, C, H, W]`` -> layer4's map ``[N, num_features, H/32, W/32]``."""
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout (``drop_rate``, training only), ``fc``; ``pre_logits=True`` stops before ``fc``."""
        x = self.global_pool(features)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


ARCHS = {"resnet50_pf": "conv", "resnet50_max": "max", "resnet50_hybrid": "hybrid"}
default_cfgs = registry.default_cfgs("resnet", ARCHS, first_conv="conv1.0", classifier="fc")


def _build(name: str, pretrained: bool, kwargs: dict) -> PFResNet:
    return registry.build(partial(PFResNet, ARCHS[name]), name, pretrained, kwargs,
                          accepted={"width_mult", "depths"}, feature_cfg={})


@register_model
def resnet50_pf(pretrained: bool = False, **kwargs) -> PFResNet:
    """Plain ResNet-50 in the PF key layout (named so it never shadows timm's ``resnet50``)."""
    return _build("resnet50_pf", pretrained, kwargs)


@register_model
def resnet50_max(pretrained: bool = False, **kwargs) -> PFResNet:
    """R50-max: every bottleneck's 3x3 conv replaced by a 3x3 max-pool."""
    return _build("resnet50_max", pretrained, kwargs)


@register_model
def resnet50_hybrid(pretrained: bool = False, **kwargs) -> PFResNet:
    """R50-hybrid: eff-bottlenecks (max-pool; avg-pool + conv where the block downsamples)."""
    return _build("resnet50_hybrid", pretrained, kwargs)
