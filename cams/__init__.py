"""pfcam's CAM workbench: explainable layers of the pfnet models and the one-pass CAM engine.

``cams.explain(model, images, layers, method, targets, class_names, batch_size, align) -> Explanation``; the other
modules (``cams.images``, ``cams.render``, ``cams.export``, ``cams.metrics``) are imported on their own.
"""
from cams.any_model import class_names_of
from cams.engine import (GRADIENT_METHODS, METHOD_NOTES, METHODS, Cancelled, Explanation, MethodError, TargetError,
                         explain,
                         normalise, resolve_classes)
from cams.layers import (
    CamError,
    LayerError,
    LayerSpec,
    Reshape,
    BLOCKS,
    available_layers,
    block_layers,
    canonical,
    default_layer,
    default_layers,
    expand_layers,
    family_of,
    layer_names,
    layer_spec,
    output_tensor,
    pfnet_family,
    resolve,
    to_grid,
    token_grid,
)

__all__ = [
    "explain", "Explanation", "METHODS", "METHOD_NOTES", "GRADIENT_METHODS", "normalise", "Cancelled",
    "resolve_classes",
    "CamError", "LayerError", "MethodError", "TargetError",
    "LayerSpec", "available_layers", "BLOCKS", "block_layers", "expand_layers", "layer_names", "layer_spec",
    "canonical", "default_layer", "default_layers",
    "family_of", "pfnet_family", "output_tensor", "resolve", "to_grid", "token_grid", "Reshape", "class_names_of",
]
