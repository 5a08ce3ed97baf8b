"""One probe forward at load: weights whose every value is finite can still make NaN (a weight of 1e38, a head at
float32's max, a convolution scaled by 1e30, a BatchNorm ``running_var`` at or below zero). ``probe`` runs the
model once on a fixed input and refuses such weights with a :class:`~pfnet.errors.CheckpointError` naming the
first module whose output is not finite, before any heatmap is drawn from them.

The verdict is cached per weights digest (:func:`pfnet.weights.state_digest`), so a model loaded again (another
session, another device) is not probed again."""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from pfnet.errors import CheckpointError

PROBE_SEED = 2022
# An output this large is refused like a non-finite one: its square (a norm, a variance, a gradient's product)
# overflows float32. Trained networks stay many orders of magnitude below it; weights scaled by 1e30 do not.
SQUARE_OVERFLOW = float(torch.finfo(torch.float32).max) ** 0.5  # about 1.8e19
_VERDICTS: dict[str, str | None] = {}  # weights digest -> why the weights are refused, or None: they passed
_LOCK = threading.Lock()
_MAX_VERDICTS = 256


def probe_input(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed probe input: one image of normalised noise ``[1, 3, size, size]`` (the same on every call)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn((1, 3, size, size), generator=generator).to(device)


def negative_variance(model: nn.Module) -> str | None:
    """The first BatchNorm (in module order) whose ``running_var`` holds a value below zero, or None."""
    for name, module in model.named_modules():
        running_var = getattr(module, "running_var", None)  # BatchNorm's buffer (None when not tracked)
        if (isinstance(running_var, torch.Tensor) and running_var.is_floating_point()
                and bool((running_var.detach() < 0).any())):
            return name or type(module).__name__
    return None


def unusable(output: torch.Tensor) -> bool:
    """Whether a module's output holds NaN, an infinity or a value whose square overflows float32."""
    return not bool((output.detach().float().abs() <= SQUARE_OVERFLOW).all())  # NaN compares false


def first_non_finite(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(logits, the first module in execution order whose output is :func:`unusable`, or None) for one forward."""
    found: list[str] = []
    handles = []

    def watch(name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if found or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            if unusable(output):
                found.append(name)
        return hook

    for name, module in model.named_modules():
        if name:  # the model itself: its output is the logits, checked below
            handles.append(module.register_forward_hook(watch(name)))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, (found[0] if found else None)


def refusal(model: nn.Module, size: int, device: torch.device | str) -> str | None:
    """Why the model's weights are refused (a negative BatchNorm variance, or non-finite logits on the probe
    input, naming the first module whose output is not finite), or None when they pass."""
    bad_norm = negative_variance(model)
    if bad_norm is not None:
        return (f"BatchNorm {bad_norm} has a negative running_var (a variance cannot be below zero); refused: "
                "the model would give NaN")
    logits, first = first_non_finite(model, probe_input(size, device))
    if first is None and (not isinstance(logits, torch.Tensor) or not unusable(logits)):
        return None
    where = f"; the first module whose output is not finite is {first}" if first else ""
    return (f"the weights give NaN, infinite or overflowing values (beyond {SQUARE_OVERFLOW:.1e}) on a probe "
            f"input{where}: finite but pathological weights (e.g. far too large, or a zero variance); refused, "
            "as every heatmap and probability would be NaN")


def probe(model: nn.Module, size: int, digest: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`CheckpointError` when ``model`` (in eval mode, on ``device``) is refused by :func:`refusal`;
    ``digest`` identifies its weights, and the verdict is kept per digest."""
    with _LOCK:
        known = digest in _VERDICTS
        reason = _VERDICTS.get(digest)
    if not known:
        reason = refusal(model, size, device)
        with _LOCK:
            if len(_VERDICTS) >= _MAX_VERDICTS:
                _VERDICTS.pop(next(iter(_VERDICTS)))
            _VERDICTS[digest] = reason
    if reason is not None:
        raise CheckpointError(reason)
