"""Which zoo architecture a state dict fits (from its keys and shapes), and checking one against a zoo entry
before loading, with one clear error saying what does not fit: keys, shapes, then values (floating-point weights
must be floating point and finite; nothing may be bool or complex)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from pfnet import zoo
from pfnet.checkpoint import normalize_state_dict
from pfnet.errors import CheckpointError, PfnetError


@dataclass(frozen=True)
class Fit:
    """A zoo architecture a checkpoint fits: timm name, head size, width, and the zoo entries built that way."""

    arch: str
    num_classes: int
    width_mult: float | None
    model_ids: tuple[str, ...]
    name: str

    def __str__(self) -> str:
        return f"{self.name} ({self.num_classes} classes)"


@dataclass(frozen=True)
class _Layout:
    shapes: dict[str, tuple[int, ...]]
    head: frozenset[str]  # keys whose first dimension is the number of classes
    floating: frozenset[str]  # keys the model holds in floating point (the rest: integer counters such as BN's)


def _kwargs_key(kwargs: Mapping[str, Any]) -> tuple:
    return tuple(sorted(kwargs.items()))


@lru_cache(maxsize=64)
def _layout(arch: str, kwargs_key: tuple) -> _Layout | None:
    """Key -> shape of ``arch`` built on the meta device (no memory, no init cost); None if it cannot be built."""
    import timm

    import pfnet  # noqa: F401  (registers the architectures)

    kwargs = dict(kwargs_key)
    if not timm.is_model(arch):
        return None
    try:
        with torch.device("meta"):
            a = timm.create_model(arch, num_classes=7, **kwargs).state_dict()
            b = timm.create_model(arch, num_classes=11, **kwargs).state_dict()
    except Exception:  # noqa: BLE001 - an architecture still being written should not break loading
        return None
    shapes = {k: tuple(v.shape) for k, v in a.items()}
    head = frozenset(k for k, v in b.items() if k in shapes and tuple(v.shape) != shapes[k])
    return _Layout(shapes, head, frozenset(k for k, v in a.items() if v.is_floating_point()))


def _arch_kwargs(entry: zoo.ZooEntry) -> dict[str, Any]:
    return dict(entry.arch_kwargs)


def _candidates(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def add(arch: str, kwargs: dict[str, Any]) -> None:
        if (arch, kwargs) not in seen:
            seen.append((arch, kwargs))

    for entry in zoo.ZOO.values():
        add(entry.arch, _arch_kwargs(entry))
    # ResNets of any width: the first bottleneck's reduction conv says the width multiplier.
    probe = state.get("layer1.0.reduction_block.0.weight")
    if probe is not None and probe.ndim == 4:
        width = probe.shape[0] / 64
        for entry in list(zoo.ZOO.values()):
            if entry.family == "resnet":
                add(entry.arch, {**_arch_kwargs(entry), "width_mult": width})
    return seen


def _compare(state: Mapping[str, torch.Tensor], layout: _Layout, num_classes: int | None = None):
    """(missing, unexpected, mis-shaped, num_classes found) of ``state`` against ``layout``."""
    optional = {k for k in layout.shapes if k.endswith("num_batches_tracked")}
    missing = [k for k in layout.shapes if k not in state and k not in optional]
    unexpected = [k for k in state if k not in layout.shapes]
    misshaped = []
    classes: set[int] = set()
    for key, want in layout.shapes.items():
        if key not in state:
            continue
        got = tuple(state[key].shape)
        if key in layout.head:
            if len(got) == len(want) and got[1:] == want[1:] and len(got) > 0:
                classes.add(got[0])
                if num_classes is not None and got[0] != num_classes:
                    misshaped.append((key, got, (num_classes, *want[1:])))
                continue
            misshaped.append((key, got, (num_classes if num_classes is not None else "C", *want[1:])))
        elif got != want:
            misshaped.append((key, got, want))
    found = classes.pop() if len(classes) == 1 else None
    return missing, unexpected, misshaped, found


def _fit_name(arch: str, kwargs: dict[str, Any], num_classes: int) -> tuple[tuple[str, ...], str]:
    same_build = [e for e in zoo.ZOO.values() if e.arch == arch and _arch_kwargs(e) == kwargs]
    exact = [e for e in same_build if _classes_of(e) == num_classes]
    ids = tuple(e.id for e in exact)
    if exact:
        return ids, exact[0].name
    width = kwargs.get("width_mult")
    base = next((e.name for e in zoo.ZOO.values() if e.arch == arch and not _arch_kwargs(e)), None) or arch
    if width is not None and width != 1.0 and not same_build:
        base = f"{base} (width x{width:g})"
    elif same_build:
        base = same_build[0].name
    return ids, f"{base} with {num_classes} classes"


def _classes_of(entry: zoo.ZooEntry) -> int | None:
    try:
        return entry.num_classes
    except Exception:  # noqa: BLE001 - a class list that cannot be read just matches nothing
        return None


def detect_architecture(state_dict: Mapping[str, Any]) -> Fit | None:
    """Which zoo architecture (+ head size + width) a state dict fits exactly, from its keys and shapes."""
    try:
        state = normalize_state_dict(state_dict)
    except CheckpointError:
        return None
    for arch, kwargs in _candidates(state):
        layout = _layout(arch, _kwargs_key(kwargs))
        if layout is None:
            continue
        missing, unexpected, misshaped, classes = _compare(state, layout)
        if missing or unexpected or misshaped or (layout.head and classes is None):
            continue
        ids, name = _fit_name(arch, kwargs, classes or 0)
        return Fit(arch, classes or 0, _width(arch, kwargs), ids, name)
    return None


def _width(arch: str, kwargs: Mapping[str, Any]) -> float | None:
    """The width multiplier of a build (1.0 for a ResNet without one; None where the family has none)."""
    family = next((e.family for e in zoo.ZOO.values() if e.arch == arch), None)
    return float(kwargs.get("width_mult", 1.0)) if family == "resnet" else kwargs.get("width_mult")


def _listing(label: str, items: list, limit: int = 5) -> str:
    shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
    return f"{label} ({len(items)}): {shown}"


def _shape(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _mismatch_error(entry: zoo.ZooEntry, state: Mapping[str, torch.Tensor], missing, unexpected,
                    misshaped, found_classes: int | None) -> CheckpointError:
    fit = detect_architecture(state)
    parts: list[str] = []
    entry_width = _width(entry.arch, _arch_kwargs(entry))
    if fit is not None and fit.arch == entry.arch and fit.width_mult == entry_width \
            and fit.num_classes != entry.num_classes:
        what = "ImageNet-1k classes" if entry.classes == "imagenet" else f"{entry.classes} classes"
        others = [zoo.ZOO[i].name for i in fit.model_ids if i in zoo.ZOO]
        hint = f" (the zoo's {', '.join(others)} has that head)" if others else ""
        parts.append(f"this checkpoint has a {fit.num_classes}-class head{hint}, but {entry.name} predicts "
                     f"{entry.num_classes} {what}; pick a checkpoint trained on those classes")
    elif fit is not None:
        parts.append(f"this checkpoint fits {fit.name}, not {entry.name}")
    else:
        parts.append(f"this checkpoint does not fit {entry.name} (nor any other model in the zoo)")
    details = []
    if missing:
        details.append(_listing("missing keys", list(missing)))
    if unexpected:
        details.append(_listing("unexpected keys", list(unexpected)))
    if misshaped:
        details.append(_listing("mis-shaped keys", [f"{k} {_shape(got)} vs {_shape(want)} in the model"
                                                    for k, got, want in misshaped], limit=3))
    return CheckpointError("; ".join(parts) + (". " + "; ".join(details) if details else ""))


def prepare_for(entry: zoo.ZooEntry, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check ``state`` against the entry's layout (one clear error), fill BN counters, match dtypes."""
    layout = _layout(entry.arch, _kwargs_key(_arch_kwargs(entry)))
    if layout is None:
        raise PfnetError(f"{entry.name}'s architecture {entry.arch!r} is not available in this installation")
    missing, unexpected, misshaped, classes = _compare(state, layout, entry.num_classes)
    if missing or unexpected or misshaped:
        raise _mismatch_error(entry, state, missing, unexpected, misshaped, classes)
    _check_values(entry, state, layout)
    out = dict(state)
    for key, shape in layout.shapes.items():
        if key not in out and key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.long)  # torchvision's v1 checkpoints predate the counter
    return out


_FINITE_CHUNK = 1 << 22  # elements checked at a time: the check's own memory stays small for any tensor


def _finite(part: torch.Tensor) -> torch.Tensor:
    # torch has no isfinite for some 8-bit floats (float8_e4m3fn): those are checked in float32
    return torch.isfinite(part if part.element_size() > 1 else part.float())


def _check_values(entry: zoo.ZooEntry, state: Mapping[str, torch.Tensor], layout: _Layout) -> None:
    """Refuse the first tensor (in the model's order) the model cannot use as it is: bool or complex anywhere,
    integers where the model holds floating point (integer counters may stay integer), NaN or infinity."""
    for key in layout.shapes:
        value = state.get(key)
        if value is None:
            continue
        floating = key in layout.floating
        if value.dtype == torch.bool or value.is_complex() or (floating and not value.is_floating_point()):
            need = "floating-point" if floating else "integer"
            raise CheckpointError(f"the checkpoint's {key} holds {str(value.dtype).replace('torch.', '')} values, "
                                  f"but {entry.name} needs {need} values there; refused (a quantised or "
                                  "wrongly converted checkpoint?)")
        if value.is_floating_point() and not value.is_meta:
            parts = value.reshape(-1).split(_FINITE_CHUNK)
            if not all(bool(_finite(part).all()) for part in parts):
                bad = sum(int((~_finite(part)).sum()) for part in parts)
                raise CheckpointError(f"the checkpoint's {key} holds {bad:,} NaN or infinite value(s) (of "
                                      f"{value.numel():,}); refused: {entry.name} would give NaN heatmaps and "
                                      "probabilities")


def matching_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reference = model.state_dict()
    out = {}
    for key, value in state.items():
        target = reference[key]
        if value.is_floating_point() and target.is_floating_point() and value.dtype != target.dtype:
            value = value.to(target.dtype)  # fp16/bf16 checkpoints: upcast to the model's dtype
        out[key] = value
    return out
