"""Score-CAM's masked forwards (:func:`cams.explain` with ``method="scorecam"``), and the no-grad forward in the
precision asked for that Score-CAM and Ablation-CAM share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cams.cam_maths import eigen_smoothed

SCORECAM_EPS = 1e-8  # pytorch-grad-cam's score_cam


def precise(model: nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """``model(images)`` under no_grad, in bfloat16 autocast when ``precision`` is "bfloat16" (the logits float32)."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        return model(images).float()


def score_cam_maps(model: nn.Module, images: torch.Tensor, acts: torch.Tensor, class_ids: torch.Tensor,
                    batch_size: int, meter, eigen_smooth: bool = False, precision: str = "float32"
                    ) -> torch.Tensor:
    """Score-CAM as pytorch-grad-cam computes it: each channel, upsampled (align_corners=True) and min-max
    scaled, masks the input; the target logits of the masked inputs, softmaxed over channels, weight the maps.

    A constant channel's mask is 0 everywhere: all such channels mask the input to the same zero image, which is
    run once per image (22 of 512 channels at the demo R50's layer4); the masked inputs go in the model's memory
    format, and in bfloat16 autocast when ``precision`` says so."""
    size = images.shape[-2:]
    count, channels = acts.shape[0], acts.shape[1]
    scores = torch.empty((count, class_ids.shape[1], channels), dtype=torch.float32, device=acts.device)
    with torch.no_grad():
        for index in range(count):
            constant_score = None
            for start in range(0, channels, batch_size):
                chunk = acts[index, start:start + batch_size].unsqueeze(1)
                masks = F.interpolate(chunk, size=size, mode="bilinear", align_corners=True)
                flat = masks.flatten(1)
                low = flat.min(dim=1).values[:, None, None, None]
                high = flat.max(dim=1).values[:, None, None, None]
                masks = (masks - low) / (high - low + SCORECAM_EPS)
                varying = (high - low).flatten() != 0
                if constant_score is None and not bool(varying.all()):
                    varying[int((~varying).nonzero()[0])] = True  # the first constant channel is run, once
                run = varying.nonzero().squeeze(1)
                ids = class_ids[index]
                out = scores[index, :, start:start + chunk.shape[0]]
                if run.numel():
                    masked = (images[index:index + 1] * masks[run]).contiguous(memory_format=_format_of(images))
                    out[:, run] = precise(model, masked, precision)[:, ids].t()
                if run.numel() < chunk.shape[0]:
                    if constant_score is None:
                        first = int((~((high - low).flatten() != 0)).nonzero()[0])
                        constant_score = out[:, first].clone()
                    skipped = ((high - low).flatten() == 0).nonzero().squeeze(1)
                    out[:, skipped] = constant_score[:, None]
                meter.add(chunk.shape[0])
    weights = torch.softmax(scores, dim=-1)  # [n, T, C]
    if eigen_smooth:
        return eigen_smoothed(weights.transpose(0, 1)[..., None, None].to(acts.dtype) * acts)
    return torch.einsum("ntc,nchw->tnhw", weights.to(acts.dtype), acts)


def _format_of(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous() else torch.contiguous_format
