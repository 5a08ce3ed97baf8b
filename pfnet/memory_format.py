"""The memory format of a network's 4-D tensors: contiguous (NCHW) or channels_last (NHWC), chosen per device.

``pfnet.load`` applies :func:`preferred_format` unless told otherwise; ``cams.explain`` hands the input in the model's
format. The rule is measured, by ``benchmarks/bench_speed.py`` (round-robin medians, one torch thread, this
project's 2-core x86_64 CPU, see docs/performance.md): on the CPU, channels_last makes the ResNet family's forward
1.2-2.1x faster (NCHW max-pooling is slow, and oneDNN convolves NHWC without reordering), and leaves ViT/PiT as they
are (one convolution, then tokens). No GPU has been measured yet, so other devices stay contiguous until
``bench_speed.py --device cuda`` says otherwise.

The two formats round differently: maps move by less than 1e-3, except the rare ones where a ReLU gate or a max-pool
choice sits within rounding of its threshold (``tests/test_speed_paths.py``). pytorch-grad-cam run on the same model
agrees with ``cams.explain`` within 1e-4 in either format; ``memory_format="contiguous"`` gives the maps of a
plainly built model. ``PFCAM_MEMORY_FORMAT=contiguous|channels_last`` overrides the rule ("auto": the
rule).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from pfnet.errors import PfnetError

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (device type, zoo family) pairs measured faster in channels_last.
CHANNELS_LAST = frozenset({("cpu", "resnet")})
ENV = "PFCAM_MEMORY_FORMAT"


def check_format(name: str, origin: str = "memory_format") -> str:
    if name not in FORMATS:
        raise PfnetError(f"{origin} must be one of {', '.join(FORMATS)} or 'auto'; got {name!r}")
    return name


def preferred_format(family: str, device: torch.device | str) -> str:
    """The measured choice for a zoo family ("resnet", "vit", "pit") on ``device``; ``$PFCAM_MEMORY_FORMAT`` wins
    unless it is empty or "auto"."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen and chosen != "auto":
        return check_format(chosen, ENV)
    return "channels_last" if (torch.device(device).type, family) in CHANNELS_LAST else "contiguous"


def choose_format(name: str | None, family: str, device: torch.device | str) -> str:
    """``name`` checked, or the preferred format when it is None or "auto"."""
    return check_format(name) if name and name != "auto" else preferred_format(family, device)


def apply_format(model: nn.Module, name: str) -> nn.Module:
    """``model`` with its 4-D parameters and buffers in format ``name`` (in place, as ``nn.Module.to``)."""
    return model.to(memory_format=FORMATS[check_format(name)])


def _spatial_weight(model: nn.Module) -> torch.Tensor | None:
    """The first 4-D parameter with a spatial extent (a 1x1 kernel is contiguous in both formats)."""
    return next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1), None)


def format_of(model: nn.Module) -> str:
    """The format ``model``'s convolutions are in ("contiguous" when it has none)."""
    weight = _spatial_weight(model)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"
