"""What pfnet's timm builders accept: timm's create_model passes options of its own that our modules do not take."""
from __future__ import annotations

from typing import Any


def builder_kwargs(pretrained: bool, kwargs: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The ``allowed`` keyword arguments of a timm builder call; refuse ``pretrained`` (weights go through
    ``pfnet.load``) and drop timm's own options (cache_dir, pretrained_cfg, ...)."""
    if pretrained:
        raise ValueError("use pfnet.load(model_id) for pretrained weights; timm's pretrained flag is not wired")
    return {key: value for key, value in kwargs.items() if key in allowed}
