"""``pfcam.explain``: CAMs in one call, from a model name or module and image files, pictures, arrays or tensors.

The three lines::

    import pfcam
    result = pfcam.explain("demo_r50_hybrid", "assets/examples/coffee.jpg", layers=["layer3", "layer4"])
    result.save("out")  # or result.overlay(), result.show()

It is the one path of data (docs/ARCHITECTURE.md) with every step filled in: the model from ``pfnet.load`` (zoo id
or ``timm:<name>``) or the caller's module, the images decoded (``cams.images.load_image``) and preprocessed with
the model's own preprocessing (``pfnet.preprocess.prepare_batch``: tensor and crop box), then ``cams.explain``,
the core, unchanged: the heatmaps are exactly its heatmaps for that batch. ``top_k=`` and ``classes=`` say which
classes are explained (``cams.explain``'s ``targets`` means both, by type).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

import cams
from cams.export import InputItem
from cams.images import ImageError, load_image
from pfcam.result import Result
from pfnet import zoo
from pfnet.errors import UnknownModelError
from pfnet.preprocess import MODES, Preprocess, from_pretrained_cfg, prepare_batch
from pfnet.weights import load

__all__ = ["explain", "to_images", "load_model"]

#: What ``images`` may be: one of these, or a list / tuple of them (a 4-D array or tensor is a batch).
ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
SINGLE = (str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor)


def explain(model: str | nn.Module, images: ImageLike | Sequence[ImageLike], layers: str | Sequence[str] | None = None,
            method: str = "gradcam", top_k: int = 1, classes: int | str | Sequence[Any] | None = None, *,
            class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None, mode: str = "full",
            align: str | Mapping[str, Sequence[float]] = "model", batch_size: int = 32,
            device: str | torch.device | None = None, name: str | None = None, aug_smooth: bool = False,
            eigen_smooth: bool = False, precision: str = "float32") -> Result:
    """Explain ``images`` with ``model``: heatmaps for every image x class x layer, ready to draw or save.

    Args:
        model: a zoo id (``"demo_r50_hybrid"``, ``"r50_hybrid"``: ``pfnet.zoo.ids()``), a ``"timm:<name>"``
            string (both loaded by ``pfnet.load``, weights included), or an ``nn.Module`` in eval mode.
        images: a path, the bytes of an image file, a PIL image, an HxW / HxWx3 array (uint8, or float in
            [0, 1]), a [3, H, W] tensor (uint8, or float in [0, 1]: pixels, not a normalised batch), or a list of
            them; a 4-D array [N, H, W, 3] or tensor [N, 3, H, W] is N images.
        layers: a layer name or a list (``cams.available_layers(model)``); None: ``cams.default_layers(model)``.
        method: one of ``cams.METHODS`` (``"gradcam"``, ``"gradcampp"``, ``"layercam"``, ...).
        top_k: explain each image's ``top_k`` most probable classes (1: its predicted class).
        classes: instead of the top-k, these classes for every image: a class id or name, a list of them, or one
            list of ids per image. Names need the model's class names (zoo models have them).
        class_names: the model's class names (default: the zoo entry's; ImageNet's for a 1000-class module).
        preprocess: how images become network inputs (default: the zoo entry's, else the model's timm
            ``pretrained_cfg``, else ImageNet's 224 px).
        mode: ``"full"`` (the whole image squashed to the input size) or ``"center"`` (ImageNet's centre crop).
        align: where each layer's heatmap is drawn (``cams.explain``'s: "model", "none" or layer -> (dy, dx)).
        batch_size: images per forward pass (``cams.explain``'s).
        device: where a model loaded by name runs (default: ``pfnet.select_device()``); a module stays where it is.
        name: what saved folders call the model (default: its id, or the module's class name).
        aug_smooth: pytorch-grad-cam's test-time augmentation (``cams.explain``'s; about 6x the time).
        eigen_smooth: the first principal component of the weighted activations instead of their sum.
        precision: ``"bfloat16"`` runs Score-CAM's / Ablation-CAM's masked forwards in bf16 autocast;
            ``result.explanation.options`` records the options used.

    Returns:
        A :class:`pfcam.Result`: ``.heatmaps`` [N, T, L, S, S], ``.overlay()``, ``.show()``, ``.save(folder)``.

    Raises:
        ValueError: bad arguments (``cams.CamError`` for layers, methods and classes is one).
        cams.images.ImageError: an image file that cannot be read. ``pfnet`` errors: a model that cannot be loaded.

    Example:
        >>> result = pfcam.explain("demo_r50_hybrid", ["a.jpg", "b.png"], top_k=2)
        >>> result.heatmap(image=1, target=0, layer="layer4").shape
        (128, 128)
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive int; got {top_k!r}")
    if classes is not None and top_k != 1:
        raise ValueError("give top_k (the predicted classes) or classes (chosen ones), not both")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    network, label, model_preprocess, model_names = load_model(model, device)
    if network.training:
        warnings.warn("the model is in training mode: its forward may change it (BatchNorm statistics); "
                      "call model.eval() first", stacklevel=2)
    preprocess = preprocess or model_preprocess
    if not isinstance(preprocess, Preprocess):
        raise ValueError(f"preprocess must be a pfnet.preprocess.Preprocess; got {type(preprocess).__name__}")
    names = list(class_names) if class_names is not None else model_names
    pictures, items = to_images(images)
    layers = cams.default_layers(network) if layers is None else layers
    tensor, boxes = prepare_batch(pictures, preprocess, mode)
    targets = int(top_k) if classes is None else _class_list(classes)
    explanation = cams.explain(network, tensor, layers, method, targets=targets, class_names=names,
                               batch_size=batch_size, align=align, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth,
                               precision=precision)
    return Result(explanation, tuple(pictures), tuple(boxes), tuple(items), name or label,
                  top_k=int(top_k), chosen=classes is not None)


def _class_list(classes: Any) -> list:
    """``classes`` as ``cams.explain``'s list form: one id or name -> [it]; a list or an [N, T] table as given."""
    if isinstance(classes, (str, int, np.integer)) and not isinstance(classes, bool):
        return [classes]
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        return classes.tolist() if classes.ndim == 1 else classes
    if isinstance(classes, (list, tuple)) and classes:
        return list(classes)
    raise ValueError(f"classes must be a class id or name, a non-empty list of them, or one list per image; "
                     f"got {classes!r}")


# ------------------------------------------------------------------------------------------------------ models
def load_model(model: str | nn.Module, device: str | torch.device | None = None
               ) -> tuple[nn.Module, str, Preprocess, list[str] | None]:
    """``(network, its name, its preprocessing, its class names or None)`` for a zoo id, a ``timm:`` name or a
    module."""
    if isinstance(model, str):
        if not model.strip():
            raise ValueError("model is an empty string; give a zoo id (pfnet.zoo.ids()) or 'timm:<name>'")
        network = load(model, device=device)
        try:
            entry = zoo.get(model)
        except UnknownModelError:  # a timm: name: its pretrained_cfg says how to preprocess
            entry = None
        if entry is not None:
            return network, model, entry.preprocess, entry.class_names()
        return network, model, from_pretrained_cfg(getattr(network, "pretrained_cfg", None)), _default_names(network)
    if isinstance(model, nn.Module):
        return (model, type(model).__name__, from_pretrained_cfg(getattr(model, "pretrained_cfg", None)),
                _default_names(model))
    raise ValueError(f"model must be a zoo id, 'timm:<name>' or an nn.Module; got {type(model).__name__}")


def _default_names(network: nn.Module) -> list[str] | None:
    """ImageNet's class names for a 1000-class network (timm's ``num_classes``), else None (ids only)."""
    return list(zoo.imagenet_classes()) if getattr(network, "num_classes", None) == 1000 else None


# ------------------------------------------------------------------------------------------------------ images
def to_images(images: ImageLike | Sequence[ImageLike]) -> tuple[list[Image.Image], list[InputItem]]:
    """Each image as an RGB picture and the export's name for it (:class:`cams.export.InputItem`: a file keeps
    the name ``pfcam export`` gives it; a picture, array or tensor is named by a hash of its pixels)."""
    if isinstance(images, SINGLE):
        many = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        given = list(images) if many else [images]
    elif isinstance(images, (list, tuple)):
        given = list(images)
    else:
        raise ValueError(f"images must be a path, bytes, a PIL image, an array, a tensor or a list of them; "
                         f"got {type(images).__name__}")
    if not given:
        raise ValueError("no images given")
    pictures, items = [], []
    for index, image in enumerate(given):
        picture, item = _one_image(image, index)
        pictures.append(picture)
        items.append(item)
    return pictures, items


def _one_image(image: Any, index: int) -> tuple[Image.Image, InputItem]:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return load_image(path), InputItem(str(path), str(path.resolve()), path.stem, path)
    if isinstance(image, bytes):
        picture = load_image(image, name=f"image {index}")
        return picture, InputItem(f"image {index}", f"bytes:{hashlib.sha256(image).hexdigest()}", f"image{index}")
    if isinstance(image, Image.Image):
        picture = image if image.mode == "RGB" else image.convert("RGB")
        stem = Path(getattr(image, "filename", "") or f"image{index}").stem
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        picture, stem = Image.fromarray(_pixels(image, index), "RGB"), f"image{index}"
    else:
        raise ValueError(f"image {index}: a {type(image).__name__} is not an image (a path, bytes, a PIL image, "
                         "an array or a tensor)")
    if min(picture.size) < 1:
        raise ImageError(f"image {index}", "empty image")
    digest = hashlib.sha256(f"{picture.size}".encode() + picture.tobytes()).hexdigest()
    return picture, InputItem(f"image {index}", f"pixels:{digest}", stem)


def _pixels(image: np.ndarray | torch.Tensor, index: int) -> np.ndarray:
    """An array (HxW, HxWxC) or tensor (CxH x W) of pixels as HxWx3 uint8."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image {index}: a tensor image must be [3, H, W] or [1, H, W]; got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image {index}: an array image must be HxW or HxWx3; got shape {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"image {index}: float pixels must be in [0, 1] (values from {array.min():.3g} to "
                             f"{array.max():.3g}: a normalised batch? pass it to cams.explain instead)")
        array = np.round(array * 255).astype(np.uint8)
    else:
        raise ValueError(f"image {index}: pixels must be uint8 or float in [0, 1]; got {array.dtype}")
    return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array)
