"""The model-parameter randomisation sanity check (Adebayo et al., "Sanity checks for saliency maps",
NeurIPS 2018) for CAM heatmaps.

An explanation that describes what the network learned must change when the learned weights are destroyed.
The check re-initialises parts of the network on a *deep copy* of the model (the model itself is never touched)
and compares each image's heatmap of the trained model with its heatmap of the randomised one:

* **cascading**: the units (:func:`randomisation_units`: the head, then every block from the top down, then
  the stem) are re-initialised one more at each step; step ``k`` has the top ``k`` units random. Step 0
  recomputes the heatmaps of the unchanged copy (a check that the comparison itself gives 1).
* **independent**: each unit alone is re-initialised (the others keep their trained weights).

Every heatmap explains the class the *trained* model predicts for the image (top-1), so a randomised model is
asked about the same class. Heatmaps are compared drawn by the plain resize (``align="none"``; a drawing offset
would move both maps alike).

Comparisons, per image (both in :func:`spearman` / :func:`ssim`):

* **Spearman rank correlation** of the two maps' pixels (average ranks for ties). A flat map (every pixel
  equal, e.g. a Grad-CAM with nothing left after the ReLU) has no ranking: against a map with structure it
  scores 0, two flat maps score 1.
* **SSIM** (Wang et al., IEEE TIP 2004): Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range
  1 (heatmaps are in [0, 1]); the mean over the window positions that lie inside the map.

Re-initialisation (reproducible: each unit's weights come from a generator seeded by ``seed`` and the unit's
name, so a unit gets the same weights whatever the order or mode): convolutions He-normal (fan-out, ReLU gain,
as torchvision/timm ResNets), linear layers truncated-normal std 0.02 (timm's ViT init), biases 0, batch/layer
norms weight 1 and bias 0 with fresh running statistics, any other parameter truncated-normal std 0.02.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

MODES = ("cascading", "independent")
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
INIT_STD = 0.02

__all__ = ["MODES", "Unit", "Comparison", "SanityResult", "randomisation_units", "reinitialise", "spearman",
           "ssim", "fixed_target_heatmaps", "sanity_check"]


# --------------------------------------------------------------------------------------------- comparisons


def _pixels(x) -> np.ndarray:
    """Heatmaps ``[..., H, W]`` -> float64 ``[..., H * W]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"a heatmap is [H, W] (or a batch [..., H, W]); got shape {x.shape}")
    return x.reshape(*x.shape[:-2], -1)


def _flat_pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"need two heatmap batches of one shape; got {np.shape(a)} and {np.shape(b)}")
    return _pixels(a), _pixels(b)


def _centred_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks along the last axis (ties averaged), centred, and their norms."""
    from scipy.stats import rankdata

    ranks = rankdata(x, axis=-1)
    ranks -= ranks.mean(axis=-1, keepdims=True)
    return ranks, np.sqrt((ranks * ranks).sum(axis=-1))


def _rank_correlation(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    (rx, sx), (ry, sy) = a, b
    both = (sx > 0) & (sy > 0)
    rho = np.where(both, (rx * ry).sum(axis=-1) / np.where(both, sx * sy, 1.0), 0.0)
    return np.where((sx == 0) & (sy == 0), 1.0, np.clip(rho, -1.0, 1.0))


def spearman(a, b) -> np.ndarray | float:
    """Spearman rank correlation of heatmaps ``a`` and ``b`` (``[H, W]`` -> float, ``[..., H, W]`` -> array).

    Ranks with ties averaged (as ``scipy.stats.spearmanr``). A flat map against a map with structure scores 0;
    two flat maps score 1.
    """
    x, y = _flat_pairs(a, b)
    rho = _rank_correlation(_centred_ranks(x), _centred_ranks(y))
    return float(rho) if rho.ndim == 0 else rho


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return k / k.sum()


def ssim(a, b, data_range: float = 1.0, sigma: float = SSIM_SIGMA, window: int = SSIM_WINDOW) -> np.ndarray | float:
    """Mean SSIM of heatmaps ``a`` and ``b`` (``[H, W]`` -> float, ``[..., H, W]`` -> array); Wang et al.'s
    Gaussian-window SSIM over the window positions inside the map (the window shrinks to fit a smaller map)."""
    from scipy.ndimage import correlate1d

    x, y = (np.asarray(v, dtype=np.float64) for v in (a, b))
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"need two heatmap batches of one shape [..., H, W]; got {x.shape} and {y.shape}")
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2  # odd
    k, r = _gaussian_window(size, sigma), size // 2

    def blur(t: np.ndarray) -> np.ndarray:  # the window's weighted mean at every position inside the map
        t = correlate1d(correlate1d(t, k, axis=-1, mode="constant"), k, axis=-2, mode="constant")
        return t[..., r:t.shape[-2] - r, r:t.shape[-1] - r]

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = value.mean(axis=(-2, -1))
    return float(out) if out.ndim == 0 else out


# ------------------------------------------------------------------------------------------- randomisation


@dataclass(frozen=True)
class Unit:
    """What one randomisation step re-initialises: modules (dotted paths) and loose parameters (dotted names)."""

    label: str
    modules: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()


def randomisation_units(model: nn.Module) -> list[Unit]:
    """The units of a pfnet model from the output down: the head, every block top-down, the stem.

    ResNet: ``fc``, ``layer4.2`` .. ``layer1.0`` (16 blocks for R50), ``conv1``. ViT: ``head`` (final norm and
    classifier), ``blocks.11`` .. ``blocks.0``, ``patch_embed`` (with the position embedding). PiT: ``head``,
    each stage's blocks top-down with the pooling layer below the stage after it, ``patch_embed``.
    """
    from cams.layers import pfnet_family

    family = pfnet_family(model)
    if family is None:
        return _structural_units(model)
    if family == "resnet":
        blocks = []
        index = 1
        while isinstance(getattr(model, f"layer{index}", None), nn.Sequential):
            blocks += [f"layer{index}.{i}" for i in range(len(getattr(model, f"layer{index}")))]
            index += 1
        return [Unit("fc", ("fc",))] + [Unit(name, (name,)) for name in reversed(blocks)] + [Unit("conv1", ("conv1",))]
    head = Unit("head", ("norm", "head"))
    stem = Unit("patch_embed", ("patch_embed",), ("pos_embed",))
    if family == "vit":
        return [head] + [Unit(f"blocks.{i}", (f"blocks.{i}",)) for i in reversed(range(len(model.blocks)))] + [stem]
    units = [head]
    for stage in reversed(range(len(model.transformers))):
        if stage < len(model.pools):
            units.append(Unit(f"pools.{stage}", (f"pools.{stage}",)))
        blocks = model.transformers[stage].blocks
        units += [Unit(f"transformers.{stage}.blocks.{i}", (f"transformers.{stage}.blocks.{i}",))
                  for i in reversed(range(len(blocks)))]
    return units + [stem]


def _structural_units(model: nn.Module) -> list[Unit]:
    """Any other network (a timm model, the user's own), from the output down: its classifier (timm's
    ``pretrained_cfg["classifier"]``, else the last ``nn.Linear``), its blocks top-down (``cams.layers.block_layers``,
    from the model's own structure), and its stem (what comes before the first block)."""
    from cams.layers import block_layers

    names = dict(model.named_modules())
    blocks = block_layers(model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [name for name in ([classifier] if isinstance(classifier, str) else []) if name in names]
    if not heads:
        heads = [name for name, module in names.items() if isinstance(module, nn.Linear)][-1:]
    if blocks:  # the head is everything after the last block's top-level module (conv_head, norms, classifier)
        children = [name for name, _ in model.named_children()]
        last = blocks[-1].split(".")[0]
        after = children[children.index(last) + 1:] if last in children else []
        heads = after + [name for name in heads if name.split(".")[0] not in after]
    units = [Unit("head", tuple(heads))] if heads else []
    units += [Unit(name, (name,)) for name in reversed(blocks)]
    # The stem: the top-level modules registered before the one that holds the first block (conv + norm, or the
    # patch embedding with its loose position embedding and class token).
    first = blocks[0].split(".")[0] if blocks else None
    stem: list[str] = []
    for name, _ in model.named_children():
        if name == first:
            break
        stem.append(name)
    loose = tuple(name for name, _ in model.named_parameters(recurse=False))
    if stem or loose:
        units.append(Unit(stem[0] if stem else "stem", tuple(stem), loose))
    return units


def _unit_generator(unit: Unit, seed: int) -> torch.Generator:
    generator = torch.Generator()
    # torch's CPU generator keeps 32 bits of a seed: mix the two into one 32-bit value
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(unit.label.encode())]).generate_state(1)
    generator.manual_seed(int(state[0]))
    return generator


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def _reinitialise_module(module: nn.Module, generator: torch.Generator) -> None:
    for sub in module.modules():
        own = dict(sub.named_parameters(recurse=False))
        if isinstance(sub, _CONVS):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=INIT_STD, generator=generator)
        elif isinstance(sub, _NORMS):
            if getattr(sub, "weight", None) is not None:
                nn.init.ones_(sub.weight)
            if hasattr(sub, "reset_running_stats"):
                sub.reset_running_stats()
        else:
            for parameter in own.values():
                nn.init.trunc_normal_(parameter, std=INIT_STD, generator=generator)
            continue
        if getattr(sub, "bias", None) is not None:
            nn.init.zeros_(sub.bias)


@torch.no_grad()
def reinitialise(model: nn.Module, unit: Unit, seed: int = 0) -> None:
    """Re-initialise ``unit`` of ``model`` in place (use it on a copy), reproducibly from ``seed``."""
    generator = _unit_generator(unit, seed)
    for path in unit.modules:
        _reinitialise_module(model.get_submodule(path), generator)
    for name in unit.parameters:
        nn.init.trunc_normal_(model.get_parameter(name), std=INIT_STD, generator=generator)


def _unit_state(model: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    state = {}
    for path in unit.modules:
        state.update({f"{path}.{key}": value.clone() for key, value in model.get_submodule(path).state_dict().items()})
    for name in unit.parameters:
        state[name] = model.get_parameter(name).detach().clone()
    return state


def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # pragma: no cover - the keys come from the model itself
        raise RuntimeError(f"cannot restore {result.unexpected_keys}")


# ------------------------------------------------------------------------------------------------ the check


def fixed_target_heatmaps(model: nn.Module, images: torch.Tensor, layers: Sequence[str], method: str,
                          class_ids: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Heatmaps ``[N, L, H, W]`` of ``method`` explaining class ``class_ids[i]`` for image ``i`` (images that
    share a class are explained together), drawn by the plain resize."""
    from cams.engine import explain

    class_ids = np.asarray(class_ids, dtype=np.int64)
    out = np.empty((images.shape[0], len(layers), *images.shape[-2:]), dtype=np.float32)
    for class_id in np.unique(class_ids):
        index = np.nonzero(class_ids == class_id)[0]
        result = explain(model, images[torch.from_numpy(index)], list(layers), method=method,
                         targets=[int(class_id)], batch_size=batch_size, align="none")
        out[index] = result.heatmaps[:, 0].numpy()
    return out


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """The model's top-1 class per image."""
    device = next(model.parameters()).device
    out = [model(images[start:start + batch_size].to(device)).argmax(dim=1).cpu()
           for start in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy()


@dataclass
class Comparison:
    """Per-image similarity of the trained model's heatmaps and those of one randomised copy.

    ``mode``: "cascading" (``depth`` units from the top randomised, ``unit`` the one added last; depth 0 is the
    unchanged copy, ``unit`` "none"), "independent" (only ``unit``, the ``depth``-th from the top) or "reference"
    (``unit`` names a heatmap that knows nothing of the image, compared with the trained maps; depth -1).
    """

    mode: str
    depth: int
    unit: str
    method: str
    layer: str
    spearman: np.ndarray  # [N]
    ssim: np.ndarray      # [N]
    flat: int = 0         # flat heatmaps among the randomised model's


@dataclass
class SanityResult:
    units: list[Unit]
    classes: np.ndarray  # [N] the trained model's top-1 class per image, the class every heatmap explains
    comparisons: list[Comparison]


def _references(trained: np.ndarray, seed: int) -> list[tuple[str, np.ndarray]]:
    from cams import metrics as M

    n, height, width = trained.shape[0], trained.shape[-2], trained.shape[-1]
    gaussian = np.broadcast_to(M.centre_gaussian((height, width)), (n, height, width))
    noise = np.stack([M.uniform_random((height, width), seed=(int(seed) & 0xFFFFFFFF, 0x5A17, i)) for i in range(n)])
    return [("centre Gaussian", gaussian), ("uniform random", noise)]


def sanity_check(model: nn.Module, images: torch.Tensor, layers: Sequence[str], methods: Sequence[str],
                 modes: Sequence[str] = MODES, seed: int = 0, batch_size: int = 16,
                 units: Sequence[Unit] | None = None,
                 on_step: Callable[[str], None] = lambda _: None) -> SanityResult:
    """Cascading and/or independent randomisation of ``model``'s units, every method x layer compared with the
    trained heatmaps on ``images`` (a preprocessed batch). ``on_step`` is called after each model variant."""
    from cams import metrics as M

    bad = [mode for mode in modes if mode not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; expected some of {MODES}")
    units = list(units) if units is not None else randomisation_units(model)
    layers, methods = list(layers), list(methods)
    classes = predicted_classes(model, images, batch_size)
    trained = {method: fixed_target_heatmaps(model, images, layers, method, classes, batch_size)
               for method in methods}
    trained_ranks = {(method, position): _centred_ranks(_pixels(maps[:, position]))
                     for method, maps in trained.items() for position in range(len(layers))}
    comparisons: list[Comparison] = []

    def compare(variant: nn.Module, mode: str, depth: int, unit: str) -> None:
        for method in methods:
            maps = fixed_target_heatmaps(variant, images, layers, method, classes, batch_size)
            for position, layer in enumerate(layers):
                a, b = trained[method][:, position], maps[:, position]
                rho = _rank_correlation(trained_ranks[method, position], _centred_ranks(_pixels(b)))
                comparisons.append(Comparison(mode, depth, unit, method, layer, rho, ssim(a, b),
                                              sum(M.is_flat(m) for m in b)))
        on_step(f"{mode} {depth}/{len(units)}: {unit}")

    for method in methods:
        for position, layer in enumerate(layers):
            a = trained[method][:, position]
            for label, reference in _references(a, seed):
                comparisons.append(Comparison("reference", -1, label, method, layer, spearman(a, reference),
                                              ssim(a, reference)))
    if "cascading" in modes:
        variant = copy.deepcopy(model)
        compare(variant, "cascading", 0, "none")
        for depth, unit in enumerate(units, start=1):
            reinitialise(variant, unit, seed)
            compare(variant, "cascading", depth, unit.label)
        del variant
    if "independent" in modes:
        variant = copy.deepcopy(model)
        for depth, unit in enumerate(units, start=1):
            saved = _unit_state(variant, unit)
            reinitialise(variant, unit, seed)
            compare(variant, "independent", depth, unit.label)
            _restore(variant, saved)
        del variant
    return SanityResult(units, classes, comparisons)
