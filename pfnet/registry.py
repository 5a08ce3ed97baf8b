"""How pfnet's architectures meet timm: their ``pretrained_cfg`` and construction through ``build_model_with_cfg``.

Every builder refuses what it cannot honour (an unknown keyword, ``pretrained=True``) with a clear error instead of
dropping it, so a training script never silently trains something other than what it asked for.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Iterable

from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from pfnet import zoo

PAPER = dict(paper_ids="arXiv:2202.02777", paper_name="Learning Features with Parameter-Free Layers",
             origin_url="https://github.com/naver-ai/PfLayer", license="apache-2.0")
# create_model hands these to every builder; they configure timm itself, not the network.
TIMM_OPTIONS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Keyword arguments every timm-native builder honours (timm's own models take them too).
COMMON_OPTIONS = frozenset({"num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate",
                            "device", "dtype"})
FEATURE_OPTIONS = frozenset({"features_only", "out_indices", "feature_cls"})


def default_cfgs(family: zoo.Family, names: Iterable[str], first_conv: str, classifier: str) -> dict:
    """timm's ``default_cfgs`` for a module's architectures: the zoo's preprocessing plus where the stem and the
    classifier are (``register_model`` reads them from the module's ``default_cfgs``)."""
    return generate_default_cfgs({name: {**zoo.timm_cfg(name, family), **PAPER, "first_conv": first_conv,
                                         "classifier": classifier} for name in names})


def build(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, kwargs: dict[str, Any],
          accepted: Iterable[str], feature_cfg: dict[str, Any] | None = None) -> nn.Module:
    """Build ``variant`` as ``model_cls(**kwargs)`` with timm's ``build_model_with_cfg`` (its pretrained_cfg;
    ``features_only`` when ``feature_cfg`` is given); ``kwargs`` may hold :data:`COMMON_OPTIONS` and the model's
    own ``accepted`` options, nothing else."""
    if pretrained:
        raise ValueError(f"{variant}: timm's pretrained=True is not wired; "
                         f"load the official weights with pfnet.load(zoo_id)")
    options = {key: kwargs.pop(key) for key in TIMM_OPTIONS if key in kwargs}
    allowed = COMMON_OPTIONS | set(accepted) | (FEATURE_OPTIONS if feature_cfg is not None else set())
    if "features_only" in kwargs and not kwargs["features_only"]:
        del kwargs["features_only"]  # asking for the plain model is always fine
    if kwargs.get("features_only") and feature_cfg is None:
        raise TypeError(f"{variant} does not support features_only=True (only the ResNets do); "
                        f"model.forward_features(x) gives its final tokens")
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{variant} does not accept {', '.join(unknown)}; "
                        f"it accepts {', '.join(sorted(allowed))}")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = build_model_with_cfg(model_cls, variant, pretrained=False, feature_cfg=feature_cfg,
                                 pretrained_cfg=options.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=options.get("pretrained_cfg_overlay"), **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def check_rate(name: str, value: float) -> float:
    """A dropout / drop-path probability, refused outside [0, 1)."""
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_global_pool(pool: str, choices: Iterable[str], num_classes: int) -> str:
    """A pooling type the model implements; ``''`` (no pooling) only without a classifier (``num_classes=0``)."""
    choices = tuple(choices)
    if pool in choices or (pool == "" and num_classes == 0):
        return pool
    raise ValueError(f"global_pool {pool!r} is not supported; choose one of {', '.join(choices)} "
                     f"('' only with num_classes=0)")


def check_classes(num_classes: int) -> int:
    if int(num_classes) < 0:
        raise ValueError(f"num_classes must be >= 0 (0: no classifier, pooled features), got {num_classes}")
    return int(num_classes)


def linear_rates(rate: float, count: int, denominator: int) -> list[float]:
    """Stochastic-depth schedule: block ``i`` of ``count`` drops with ``rate * i / denominator``."""
    return [rate * index / denominator if denominator else 0.0 for index in range(count)]


def module_device_dtype(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of a module's parameters (for a replacement head)."""
    tensor = next(module.parameters(), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def drop_path_or_identity(rate: float) -> nn.Module:
    """timm's DropPath, or nothing at rate 0 (as the official code and timm build it)."""
    return DropPath(rate) if rate > 0 else nn.Identity()
