"""Model cost: parameter count, multiply-accumulates (via ``torch.utils.flop_counter``) and latency.

MAC convention (the one of the official checkpoints' figures and the paper's "FLOPs" column): multiply-accumulates
of convolutions and of Linear / matrix-multiply ops (``mm``, ``addmm``, ``bmm``, ``baddbmm``), for one image.
The attention-map products inside ``scaled_dot_product_attention`` (q.k^T and attn.v) are *not* counted, nor are
element-wise ops, norms, pooling or activations. The models run attention through
``F.scaled_dot_product_attention``, so excluding those ops is exact on every device.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once; BatchNorm running statistics are buffers, not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the measurement (so BatchNorm statistics stay untouched), then each module's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad during the count, then each its own flag back: the counter's module tracker
    hooks tensors that require grad, and a parameter passed between modules inside a tuple (timm's PiT's class
    token) fails its hook even under no_grad."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _zero_image(model: nn.Module, input_size: tuple[int, int], batch_size: int = 1) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    height, width = input_size
    return torch.zeros(batch_size, 3, height, width, device=device, dtype=dtype)


def count_macs(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> int:
    """Multiply-accumulates of one ``input_size`` (H, W) image: counted FLOPs / 2, attention-map products excluded.

    Runs one no-grad forward of a zero image on the model's own device and dtype (no copy of the model).
    """
    image = _zero_image(model, input_size)
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), _frozen(model), torch.no_grad(), counter:
        model(image)
    flops = sum(count for op, count in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    return int(flops // 2)


def measure_latency_ms(model: nn.Module, input_size: tuple[int, int] = (224, 224), batch_size: int = 1,
                       warmup: int = 2, runs: int = 5) -> float:
    """Median wall-clock milliseconds of a no-grad forward of a ``batch_size`` x ``input_size`` zero batch."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    image = _zero_image(model, input_size, batch_size)
    def synchronize() -> None:
        if image.device.type == "cuda":
            torch.cuda.synchronize(image.device)

    times = []
    with _eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            model(image)
        synchronize()
        for _ in range(runs):
            start = time.perf_counter()
            model(image)
            synchronize()
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))
