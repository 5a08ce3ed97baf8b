"""Image -> network input, and the region of the original image that the input covers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("full", "center")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Preprocess:
    """How a zoo entry expects its input: square side, ImageNet-style resize, normalisation."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size


def from_pretrained_cfg(cfg: Mapping[str, Any] | None) -> Preprocess:
    """The preprocessing a timm model's ``pretrained_cfg`` describes (input size, crop_pct, mean, std,
    interpolation); ImageNet's defaults for what it leaves out (None: all of them)."""
    cfg = dict(cfg or {})
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation")
    return Preprocess(size, round(size / crop_pct), tuple(cfg.get("mean") or IMAGENET_MEAN),
                      tuple(cfg.get("std") or IMAGENET_STD),
                      interpolation if interpolation in _RESAMPLE else "bilinear")


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor  # [3, S, S], normalised
    crop_box: Box  # (left, top, right, bottom) of the original image, in its pixels


def crop_box_for(size: tuple[int, int], preprocess: Preprocess, mode: str = "full") -> Box:
    """The part of an image of ``size`` (w, h) that ``prepare`` feeds to the network."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
    width, height = size
    if mode == "full":
        return (0.0, 0.0, float(width), float(height))
    # Centre crop of side crop_pct * shorter side (what resize-then-crop keeps).
    side = min(width, height) * preprocess.crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def prepare(image: Image.Image, preprocess: Preprocess, mode: str = "full") -> Prepared:
    """Resize (``full``: the whole image squashed to SxS; ``center``: ImageNet eval crop) and normalise."""
    image = image.convert("RGB")
    box = crop_box_for(image.size, preprocess, mode)
    side = preprocess.input_size
    resample = _RESAMPLE.get(preprocess.interpolation, Image.Resampling.BILINEAR)
    resized = image.resize((side, side), resample=resample, box=box, reducing_gap=None)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    tensor = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())
    return Prepared(tensor, box)


def prepare_batch(images: list[Image.Image], preprocess: Preprocess,
                  mode: str = "full") -> tuple[torch.Tensor, list[Box]]:
    """Stack ``prepare`` over images: a [N, 3, S, S] batch and each image's crop box."""
    prepared = [prepare(image, preprocess, mode) for image in images]
    return torch.stack([item.tensor for item in prepared]), [item.crop_box for item in prepared]
