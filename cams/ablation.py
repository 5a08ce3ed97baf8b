"""Ablation-CAM as pytorch-grad-cam computes it, run from the layer onward.

pytorch-grad-cam's ``AblationCAM`` replaces the layer by an ``AblationLayer`` and runs the *whole* network once per
batch of ``batch_size`` channels (each copy of the image with one channel of the layer's output ablated), so the part
of the network before the layer is recomputed ``C / batch_size`` times for nothing. Here the network is traced once
per call (``torch.fx``, the layer kept whole), the part that does not depend on the layer's output is run once per
image, and each batch of ablated outputs runs only the nodes downstream of the layer: at R50's layer4 that is the
pooling and the classifier. Where the model cannot be traced (or a value before the layer is not per-image, e.g. a
shape read off the input), the ablated outputs go through the whole network as pytorch-grad-cam does.

The maths is pytorch-grad-cam's: a channel is ablated to 0 when the batch's minimum activation is 0, otherwise to
that minimum minus 1e7, re-read after each ablation (``AblationLayer.__call__``: the k-th copy of a batch gets
``min - k * 1e7``, so the result depends on ``batch_size`` as pytorch-grad-cam's does); the weights are
``(score - ablated score) / score``; token layers ablate their last dimension (``AblationLayerVit``). Channels that
are 0 everywhere under the 0 rule are not run: ablating them changes nothing and their weight multiplies zeros.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.fx
from torch import nn

from cams.cam_maths import eigen_smoothed
from cams.engine import Meter
from cams.scorecam import precise
from cams.layers import to_grid

ABLATION_VALUE = 1e7  # pytorch-grad-cam's AblationLayer


def ablation_values(minimum: torch.Tensor, count: int) -> torch.Tensor:
    """The values pytorch-grad-cam's ``AblationLayer`` writes into copies 0..count-1 of a batch whose minimum
    activation is ``minimum`` (float32 arithmetic, as it does it)."""
    if float(minimum) == 0:
        return torch.zeros(count, dtype=minimum.dtype, device=minimum.device)
    values, current = [], minimum.reshape(())
    for _ in range(count):
        current = current - ABLATION_VALUE
        values.append(current)
    return torch.stack(values)


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps ``leaf`` (and timm's untraceable modules) whole."""

    def __init__(self, leaf: nn.Module):
        functions, modules = (), ()
        try:  # timm's registry of functions / modules fx cannot trace through
            from timm.layers import get_notrace_functions, get_notrace_modules
            functions, modules = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except (ImportError, AttributeError):  # pragma: no cover
            pass
        super().__init__(autowrap_functions=functions)
        self.leaf, self.leaf_types = leaf, modules

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module is self.leaf or isinstance(module, self.leaf_types) or \
            super().is_leaf_module(module, qualified_name)


class Tail:
    """The network from one module onward: ``prepare(image)`` runs what does not depend on the module's output for
    one image; ``run(prepared, outputs)`` runs the rest for a batch of replacement outputs of that module -> logits.
    Holds no per-call state (threads may share one)."""

    def __init__(self, model: nn.Module, module: nn.Module):
        tracer = _Tracer(module)
        graph = tracer.trace(model)
        self.module = torch.fx.GraphModule(tracer.root, graph)
        leaves = [node for node in graph.nodes if node.op == "call_module"
                  and self.module.get_submodule(node.target) is module]
        if len(leaves) != 1:
            raise RuntimeError(f"the layer is called {len(leaves)} times in the traced graph")
        self.leaf = leaves[0]
        downstream, dependent = {self.leaf}, set()
        for node in graph.nodes:
            if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
            if any(arg in downstream for arg in node.all_input_nodes):
                downstream.add(node)
        self.order = [node for node in graph.nodes if node in downstream]
        self.boundary = [node for node in graph.nodes if node not in downstream
                         and any(user in downstream for user in node.users)]
        self.dependent = dependent

    def prepare(self, image: torch.Tensor) -> dict | None:
        """Runs the network up to the layer for ``image`` [1, ...] -> the values the rest needs; None when one of
        them is not per-image (then :meth:`run` cannot broadcast it, and the caller runs whole forwards)."""
        interpreter = torch.fx.Interpreter(self.module, garbage_collect_values=False)
        env: dict = {}
        for node in self.module.graph.nodes:
            if node in self.order and node is not self.leaf:
                continue
            if node.op == "placeholder":
                env[node] = image
                continue
            interpreter.env = env
            env[node] = interpreter.run_node(node)
        prepared = {self.leaf: env[self.leaf]}  # the layer's own output: a tuple keeps its other items
        for node in self.boundary:
            value = env[node]
            if node in self.dependent and not (isinstance(value, torch.Tensor) and value.dim() >= 1
                                               and value.shape[0] == 1):
                return None
            prepared[node] = value
        return prepared

    def run(self, prepared: dict, outputs: torch.Tensor) -> torch.Tensor:
        count = outputs.shape[0]
        interpreter = torch.fx.Interpreter(self.module)
        env = {node: value.expand(count, *value.shape[1:]) if node in self.dependent else value
               for node, value in prepared.items() if node is not self.leaf}
        interpreter.env = env
        for node in self.order:
            if node is self.leaf:
                env[node] = replaced(prepared[self.leaf], outputs)
            elif node.op == "output":
                return interpreter.run_node(node)
            else:
                env[node] = interpreter.run_node(node)
        raise RuntimeError("the traced graph has no output")


_TRACE_LOCK = threading.Lock()
_TAILS: weakref.WeakKeyDictionary[nn.Module, dict[int, Tail | None]] = weakref.WeakKeyDictionary()


def tail_for(model: nn.Module, module: nn.Module) -> Tail | None:
    """A :class:`Tail` of ``model`` after ``module``, or None where fx cannot trace the model; traced once per model
    and layer in a process (kept while the model lives).

    ``torch.fx`` patches ``nn.Module.__call__`` for every thread while it traces: a forward another thread runs in
    those milliseconds fails (fx's NameError). Tracing once per model and layer keeps that to the first
    Ablation-CAM call."""
    with _TRACE_LOCK:
        tails = _TAILS.setdefault(model, {})
        if id(module) not in tails:
            try:
                tails[id(module)] = Tail(model, module)
            except Exception:  # noqa: BLE001 (any tracing failure: run whole forwards instead)
                tails[id(module)] = None
        return tails[id(module)]


def _ablated(one: torch.Tensor, start: int, count: int, axis: int) -> torch.Tensor:
    """``count`` copies of the layer output ``one`` [1, ...], copy k with channel ``start + k`` (along ``axis``)
    set to pytorch-grad-cam's ablation value."""
    layout = torch.channels_last if one.dim() == 4 and one.is_contiguous(memory_format=torch.channels_last) \
        and not one.is_contiguous() else torch.contiguous_format
    copies = one.expand(count, *one.shape[1:]).clone(memory_format=layout)  # the model's memory format
    values = ablation_values(one.min(), count).to(copies.dtype)
    moved = copies.movedim(axis, 1)  # a view: writes land in copies
    index = torch.arange(count, device=copies.device)
    moved[index, start + index] = values.view(count, *([1] * (moved.dim() - 2)))
    return copies


def replaced(original, outputs: torch.Tensor):
    """``outputs`` in the place of a layer's ``original`` output: a tuple / list output (timm's PiT stages) keeps
    its other items, repeated to the batch."""
    if not isinstance(original, (tuple, list)):
        return outputs
    count = outputs.shape[0]
    rest = [item.expand(count, *item.shape[1:]) if isinstance(item, torch.Tensor) and item.dim() >= 1
            and item.shape[0] == 1 else item for item in original[1:]]
    return type(original)([outputs, *rest])


def _whole_forward_scores(model, module, image, outputs, precision):
    """Logits of ``image`` repeated, with ``module``'s output replaced by ``outputs`` (pytorch-grad-cam's way)."""
    def replace(mod, inputs, output):
        return replaced(output, outputs)

    handle = module.register_forward_hook(replace)
    try:
        return precise(model, image.expand(outputs.shape[0], *image.shape[1:]), precision)
    finally:
        handle.remove()


def channel_axis(output: torch.Tensor, grid: torch.Tensor) -> int:
    """The axis of a layer's raw ``output`` that holds the channels of its map ``grid`` ``[1, C, h, w]``: 1 for a map
    that is already NCHW, else the last (tokens, channels-last maps: ``AblationLayerVit``'s)."""
    if output.dim() == 4 and tuple(output.shape[1:]) == tuple(grid.shape[1:]):
        return 1
    return output.dim() - 1


def _checked(tail: Tail, image: torch.Tensor, one: torch.Tensor, logits: torch.Tensor) -> dict | None:
    """``tail.prepare(image)``, trusted only where the tail gives the model's own logits for the layer's own output
    (a traced graph can bake in what was dynamic); None otherwise."""
    try:
        prepared = tail.prepare(image)
        if prepared is None:
            return None
        again = tail.run(prepared, one).float()[0]
    except Exception:  # noqa: BLE001 (a graph that does not run again: whole forwards instead)
        return None
    expected = logits.detach().float()
    if not torch.allclose(again, expected, atol=1e-4 * max(1.0, float(expected.abs().max())), rtol=1e-4):
        return None
    return prepared


def ablation_batch(model, capture, modules, batch, layers, size, class_ids_of, batch_size: int, meter: Meter,
                   eigen_smooth: bool, precision: str, reshape=None):
    """Ablation-CAM for one batch of images: (logits, class ids, raw maps [T, n, h, w] per layer)."""
    logits, outputs = capture.run(model, batch, want_grad=False)
    class_ids = class_ids_of(logits)
    original = logits.detach().gather(1, class_ids).float()  # [n, T]
    raw_outputs = [outputs[name].detach() for name in layers]
    del outputs
    axes = [channel_axis(out, to_grid(model, name, out[:1], size, reshape)) for name, out in zip(layers, raw_outputs)]
    meter.grow(batch.shape[0] * sum(int(out.shape[axis]) for out, axis in zip(raw_outputs, axes)))
    raws = []
    with torch.no_grad():
        for name, out, axis in zip(layers, raw_outputs, axes):
            module = modules[name]
            channels = int(out.shape[axis])
            tail = tail_for(model, module)
            scores = original[:, :, None].repeat(1, 1, channels)  # [n, T, C]; skipped channels keep the score
            for index in range(batch.shape[0]):
                image, one = batch[index:index + 1], out[index:index + 1]
                ids = class_ids[index]
                prepared = _checked(tail, image, one, logits[index]) if tail is not None else None
                if prepared is None:
                    tail = None  # the whole network for this layer, as pytorch-grad-cam runs it
                dead = None
                if float(one.min()) == 0:
                    dead = (one.movedim(axis, 1).flatten(2) == 0).all(dim=2)[0]  # [C]
                for start in range(0, channels, batch_size):
                    count = min(batch_size, channels - start)
                    if dead is not None and bool(dead[start:start + count].all()):
                        meter.add(count)
                        continue
                    ablated = _ablated(one, start, count, axis)
                    if prepared is not None:
                        with torch.autocast(ablated.device.type, dtype=torch.bfloat16,
                                            enabled=precision == "bfloat16"):
                            result = tail.run(prepared, ablated).float()
                    else:
                        result = _whole_forward_scores(model, module, image, ablated, precision)
                    scores[index, :, start:start + count] = result[:, ids].t()
                    meter.add(count)
            weights = (original[:, :, None] - scores) / original[:, :, None]  # [n, T, C]
            grid = to_grid(model, name, out, size, reshape)
            if eigen_smooth:
                raws.append(eigen_smoothed(weights.transpose(0, 1)[..., None, None].to(grid.dtype) * grid))
            else:
                raws.append(torch.einsum("ntc,nchw->tnhw", weights.to(grid.dtype), grid))
    return logits.detach(), class_ids, raws
