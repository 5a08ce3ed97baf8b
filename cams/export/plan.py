"""What an export computes, decided before any image is read: per model the layers, top-k, class names and
heatmap alignment (:class:`ModelPlan`), and the run's settings (:class:`ExportPlan`), which also say, from an
image's earlier record, whether the image still needs a model. A plan holds no state of a run: an executor
(:class:`cams.export.executor.ExportExecutor`) carries it out, batch by batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from cams.align import ALIGN_MODES, layer_offsets
from cams.engine import EIGEN_SMOOTH_METHODS, METHODS, PRECISIONS, SCORED_METHODS, resolve_classes, run_options
from cams.export.encode import DEFAULT_FORMAT, FORMATS, overlay_suffix
from cams.export.files import ExportError, entry_key, usable_entry
from cams.export.inputs import safe_name, short_hash
from cams.layers import LayerError, default_layers, layer_names, pfnet_family
from cams.render import COLORMAPS
from pfnet.preprocess import MODES
from pfnet.weights import state_digest

GRID_CELL = 224

#: layers: None (each model's defaults), a list for every model, or a dict keyed by model id or family.
LayerChoice = Sequence[str] | Mapping[str, Sequence[str]] | str | None


def target_names(topk: int, classes: Sequence[int] = ()) -> list[str]:
    """What the files and the manifest call each target: "class<id>" per fixed class, else "top1".."top<k>"."""
    if classes:
        return [f"class{int(class_id)}" for class_id in classes]
    return [f"top{rank}" for rank in range(1, topk + 1)]

RAW_KEYS = ("raw_heatmap", "raw_min", "raw_max")  # a manifest.json row's raw-map fields (with raw_maps only)
RAW_NPY = ("float32 [S, S]: the layer's map before min-max normalisation (ReLU, resized and aligned as the heatmap), "
           "in the method's own units, comparable across images and models; the row's raw_min / raw_max are its "
           "range, and heatmap = (raw - raw_min) / (raw_max - raw_min) (0 where raw_max == raw_min)")


@dataclass
class ModelPlan:
    """One model's part of an export."""

    id: str
    folder: str  # its sub-folder in every image folder (unique among the run's models)
    label: str
    network: Any  # the eval-mode nn.Module
    entry: Any  # its zoo entry (preprocess, class_names(), name)
    layers: list[str]
    class_names: list[str] | None
    topk: int
    align: str = "model"  # cams.explain's align: "model" (the model's recorded offsets) or "none"
    cam_offsets: dict[str, list[float]] = field(default_factory=dict)  # the non-zero offsets explain draws with
    weights: str = ""  # pfnet.weights.state_digest of the network: outputs of other weights are stale
    classes: tuple[int, ...] = ()  # fixed target classes (ids); empty: the top-k predicted classes
    label_ids: Mapping[str, int] | None = None  # image key -> its own class (--labels); None: not a labelled run

    @property
    def input_size(self) -> int:
        return int(self.entry.preprocess.input_size)

    @property
    def targets(self) -> list[str]:
        """Each result's target, in the engine's order: "top1".."top<k>", "class<id>" per fixed class, or "label"
        (each image's own class)."""
        return ["label"] if self.label_ids is not None else target_names(self.topk, self.classes)

    @property
    def chosen_classes(self) -> bool:
        """Whether the classes are given (fixed or per image) rather than the model's top-k."""
        return bool(self.classes) or self.label_ids is not None

    def explains(self, key: str) -> bool:
        """Whether the image ``key`` gets results from this model (in a labelled run: a label it knows)."""
        return self.label_ids is None or key in self.label_ids

    def engine_targets(self, keys: Sequence[str]) -> int | list[int] | list[list[int]]:
        """``cams.explain``'s ``targets`` for the images ``keys``: their labels, the fixed class ids, or k."""
        if self.label_ids is not None:
            return [[self.label_ids[key]] for key in keys]
        return list(self.classes) if self.classes else self.topk


@dataclass(frozen=True)
class ExportPlan:
    """The settings of one export and its models' plans."""

    models: tuple[ModelPlan, ...]
    method: str = "gradcam"
    topk: int = 1
    batch_size: int = 8
    mode: str = "full"
    colormap: str = "jet"
    opacity: float = 0.5
    overwrite: bool = False
    align: str = "model"
    cell_size: int = GRID_CELL
    overlay_format: str = DEFAULT_FORMAT  # "png" | "jpeg" | "webp" (cams.export.encode.FORMATS)
    overlays: bool = True  # False: heatmaps (.npy) and records only; no overlays, no grids
    target: tuple[str, ...] = ()  # the classes asked for, as given (ids or names); empty: the predicted top-k
    labelled: bool = False  # each image's own class (--labels)
    raw_maps: bool = False  # also each map before min-max (<stem>.raw.npy) with its scale in the manifest
    precision: str = "float32"  # "bfloat16": Score-CAM's / Ablation-CAM's extra forwards in bf16 autocast
    aug_smooth: bool = False  # cams.explain's test-time augmentation: six augmented copies per image averaged
    eigen_smooth: bool = False  # cams.explain's first principal component of the weighted activations

    @property
    def explain_options(self) -> dict[str, Any]:
        """``cams.explain``'s keyword arguments for how this plan's maps are computed beyond the method."""
        return {"aug_smooth": self.aug_smooth, "eigen_smooth": self.eigen_smooth, "precision": self.precision}

    @property
    def run_options(self) -> dict[str, Any]:
        """The options an explanation of this plan records (``Explanation.options`` as a dict; defaults left
        out): an explanation made with other options is not this plan's."""
        return dict(run_options(self.method, self.eigen_smooth, self.precision, self.aug_smooth))

    def outputs(self, model: ModelPlan) -> list[tuple[str, str]]:
        """The (layer, target) results every image gets from ``model`` (targets: :attr:`ModelPlan.targets`)."""
        return [(layer, target) for layer in model.layers for target in model.targets]

    @property
    def targets(self) -> list[str]:
        """Every model's targets, in order, each once: one grid per target."""
        return list(dict.fromkeys(target for model in self.models for target in model.targets))

    @property
    def record_name(self) -> str:
        """The per-image, per-model record of what was computed (``<image>/<model>/<record_name>``)."""
        return f"results__{safe_name(self.method)}.json"

    def needs(self, root: Path, record: Mapping[str, Any] | None, model: ModelPlan) -> bool:
        """Whether an image whose earlier record for ``model`` is ``record`` (None: none) must be explained."""
        entries = (record or {}).get("entries", {})
        return self.overwrite or not all(self.usable(root, entries.get(entry_key(layer, target)))
                                         for layer, target in self.outputs(model))

    def usable(self, root: Path, entry: Any) -> bool:
        """Whether an earlier entry has every file this plan writes: the heatmap, and with overlays an overlay in
        this plan's format (an overlay in another format is redone, not reused)."""
        if not isinstance(entry, dict):
            return False
        if self.raw_maps and not usable_entry(root, {**entry, "overlay": entry.get("raw_heatmap")}):
            return False  # the raw map is this run's concern too
        if not self.overlays:  # the overlay is not this run's concern: check the heatmap in its place
            return usable_entry(root, {**entry, "overlay": entry.get("heatmap")})
        overlay = entry.get("overlay")
        return (usable_entry(root, entry) and isinstance(overlay, str)
                and overlay.lower().endswith(overlay_suffix(self.overlay_format)))

    def same_settings(self, earlier: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> bool:
        """Whether outputs recorded with ``earlier`` settings are what this plan would write (``settings``); a
        heatmaps-only run ignores how the overlays were drawn."""
        if not isinstance(earlier, Mapping):
            return False
        if self.overlays:
            return dict(earlier) == dict(settings)
        drawing = ("overlay_format", "colormap", "opacity")
        return ({k: v for k, v in earlier.items() if k not in drawing}
                == {k: v for k, v in settings.items() if k not in drawing})

    def record_settings(self, model: ModelPlan) -> dict[str, Any]:
        """What ``model``'s outputs are drawn with; outputs kept from a run with other settings are "stale"."""
        settings = {"mode": self.mode, "colormap": self.colormap, "opacity": round(float(self.opacity), 4),
                    "input_size": model.input_size, "overlay_format": self.overlay_format if self.overlays else None,
                    "weights": model.weights}
        if model.cam_offsets:  # outputs drawn with another alignment are kept, flagged stale
            settings["cam_offsets"] = model.cam_offsets
        if self.precision != "float32":  # bf16 maps are not float32 maps (absent for float32: older records match)
            settings["precision"] = self.precision
        for option in ("aug_smooth", "eigen_smooth"):  # other maps than the plain ones; absent when off, as above
            if getattr(self, option):
                settings[option] = True
        return settings

    def manifest_settings(self) -> dict[str, Any]:
        """``manifest.json["settings"]``, before the caller's extra settings."""
        return {"models": {m.id: {"name": m.label, "layers": m.layers, "input_size": m.input_size, "topk": m.topk,
                                  "classes": list(m.classes), "cam_offsets": m.cam_offsets, "weights": m.weights,
                                  "weights_origin": getattr(m.network, "weights_origin", None)}
                           for m in self.models},
                "method": self.method, "precision": self.precision, "aug_smooth": self.aug_smooth,
                "eigen_smooth": self.eigen_smooth, "topk": self.topk,
                "target": "label" if self.labelled else list(self.target) or "predicted",
                "batch_size": self.batch_size, "mode": self.mode,
                "colormap": self.colormap, "align": self.align, "opacity": float(self.opacity),
                "overwrite": bool(self.overwrite), "overlays": bool(self.overlays),
                "overlay_format": self.overlay_format if self.overlays else None,
                "heatmap_npy": "float32 [S, S] in [0, 1] at the network input resolution S, covering crop_box "
                               "(left, top, right, bottom) of the original image in its pixels",
                **({"raw_maps": True, "raw_npy": RAW_NPY} if self.raw_maps else {})}


def validate_settings(method: str, topk: int, batch_size: int, mode: str, colormap: str, opacity: float,
                      align: str, overlay_format: str = DEFAULT_FORMAT, target: Sequence[str] = (),
                      labelled: bool = False) -> None:
    """Raise ``ExportError`` for a setting no export can run with."""
    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ExportError(f"topk must be a positive integer, got {topk!r}")
    if target and topk != 1:
        raise ExportError("choose either top-k (the predicted classes) or target classes, not both")
    if labelled and (target or topk != 1):
        raise ExportError("labels give each image its own class: leave out top-k and target classes")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mode not in MODES:
        raise ExportError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if colormap not in COLORMAPS:
        raise ExportError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ExportError(f"opacity must be between 0 and 1, got {opacity}")
    if align not in ALIGN_MODES:
        raise ExportError(f"align must be one of {', '.join(ALIGN_MODES)}; got {align!r}")
    if overlay_format not in FORMATS:
        raise ExportError(f"unknown overlay format {overlay_format!r}; expected one of {', '.join(FORMATS)}")


def _requested_layers(layers: LayerChoice, model_id: str, family: str | None) -> Sequence[str] | None:
    if layers is None or isinstance(layers, str):
        return None if layers is None else [name.strip() for name in layers.split(",") if name.strip()]
    if isinstance(layers, Mapping):  # keyed by model id or by family ("resnet", "vit", "pit")
        chosen = layers.get(model_id, layers.get(family) if family else None)
        return None if chosen is None else list(chosen)
    return list(layers)


def target_list(target: str | int | Sequence[str | int] | None) -> tuple[str, ...]:
    """The classes asked for, as given: None, "" or "predicted" -> () (the predicted top-k); a comma-separated
    string or a sequence of ids and names -> each one, stripped, in order, once (names match without regard to
    case: the first spelling is kept)."""
    if target is None:
        return ()
    items = target.split(",") if isinstance(target, str) else [str(item) for item in target]
    items = [item.strip() for item in items if item.strip()]
    if [item.lower() for item in items] in ([], ["predicted"]):
        return ()
    unique: dict[str, str] = {}
    for item in items:
        unique.setdefault(item.lower(), item)
    return tuple(unique.values())


def label_ids_for(labels: Mapping[str, str], class_names: Sequence[str] | None, count: int | None
                  ) -> tuple[dict[str, int], list[str]]:
    """Image key -> class id of each label the model has, and the labels it has not (each once)."""
    known: dict[str, int | None] = {}
    for label in set(labels.values()):
        ids, _ = resolve_classes([label], class_names, count)
        known[label] = ids[0] if ids else None
    return ({key: known[label] for key, label in labels.items() if known[label] is not None},
            sorted(label for label, class_id in known.items() if class_id is None))


def plan_models(models: Mapping[str, tuple[Any, Any]], layers: LayerChoice, topk: int,
                warn: Callable[[str], None], align: str = "model", target: Sequence[str] = (),
                labels: Mapping[str, str] | None = None) -> list[ModelPlan]:
    """One plan per usable model (id -> (eval-mode model, zoo entry)); what is left out is said through ``warn``:
    layers a model lacks, models with none of the requested layers, a top-k beyond a model's classes, target
    classes or labels a model does not have (a model with none of them is skipped)."""
    plans: list[ModelPlan] = []
    folders: set[str] = set()
    for model_id, pair in models.items():
        network, entry = pair
        label = getattr(entry, "name", None) or model_id
        if getattr(network, "weights_origin", None) == "random":  # asked for explicitly; never silent
            label = f"{label} (random weights)"
        try:
            family = pfnet_family(network)  # None for any other network: layers keyed by model id
            valid = layer_names(network)
            wanted = _requested_layers(layers, model_id, family)
            wanted = list(default_layers(network)) if wanted is None else wanted
        except LayerError as exc:
            warn(f"{model_id}: skipped ({exc})")
            continue
        chosen: list[str] = []
        for name in wanted:
            if name not in valid:
                shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
                warn(f"{model_id}: has no layer {name!r}; skipped for this model (valid layers: {shown})")
            elif name not in chosen:
                chosen.append(name)
        if not chosen:
            warn(f"{model_id}: none of the requested layers exists; model skipped")
            continue
        try:
            class_names = list(entry.class_names())
        except Exception:  # noqa: BLE001 - names are a nicety; ids still work
            class_names = None
        classes = getattr(network, "num_classes", None) or (len(class_names) if class_names else None)
        k = topk
        if isinstance(classes, int) and k > classes:
            warn(f"{model_id}: top-{topk} asked of a model with {classes} classes; using top-{classes}")
            k = classes
        fixed: list[int] = []
        if target:
            fixed, problems = resolve_classes(target, class_names, classes if isinstance(classes, int) else None)
            for problem in problems:
                warn(f"{model_id}: {problem}; that target is skipped for this model")
            if not fixed:
                warn(f"{model_id}: none of the target classes exists; model skipped")
                continue
        label_ids: dict[str, int] | None = None
        if labels is not None:
            label_ids, unknown = label_ids_for(labels, class_names, classes if isinstance(classes, int) else None)
            if unknown:
                shown = ", ".join(repr(label) for label in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
                warn(f"{model_id}: {len(unknown)} label(s) are not among its classes ({shown}: an unknown name, an "
                     f"id out of range or a name several classes share); their images get no result from it")
            if not label_ids:
                warn(f"{model_id}: none of the labels is one of its classes; model skipped")
                continue
        folder = safe_name(model_id, 64, "model")
        if folder in folders:
            folder = f"{folder}-{short_hash(model_id)}"
        folders.add(folder)
        offsets = {layer: list(offset) for layer, offset in zip(chosen, layer_offsets(network, chosen, align))
                   if any(offset)}
        plans.append(ModelPlan(model_id, folder, str(label), network, entry, chosen, class_names, k, align, offsets,
                               state_digest(network), tuple(fixed), label_ids))
    return plans


def plan_export(models: Mapping[str, tuple[Any, Any]], layers: LayerChoice = None, method: str = "gradcam",
                topk: int = 1, batch_size: int = 8, mode: str = "full", colormap: str = "jet", opacity: float = 0.5,
                overwrite: bool = False, align: str = "model", cell_size: int = GRID_CELL,
                warn: Callable[[str], None] = lambda _: None, overlay_format: str = DEFAULT_FORMAT,
                overlays: bool = True, target: str | Sequence[str | int] | None = None,
                labels: Mapping[str, str] | None = None, raw_maps: bool = False,
                precision: str = "float32", aug_smooth: bool = False, eigen_smooth: bool = False) -> ExportPlan:
    """Validate the settings (``ExportError``) and plan every model (see :func:`plan_models`). ``target``: None or
    "predicted" (each image's top-``topk`` classes), or class ids / names (see :func:`target_list`). ``labels``:
    image key (:func:`cams.export.labels.image_key`) -> its class id or name, explained instead.
    ``precision``, ``aug_smooth``, ``eigen_smooth``: ``cams.explain``'s options; ``eigen_smooth`` with a method it
    does not change (not in ``EIGEN_SMOOTH_METHODS``) and bfloat16 with a method without extra forwards (not in
    ``SCORED_METHODS``) are dropped, with a warning, so the records say what was computed."""
    classes = target_list(target)
    validate_settings(method, topk, batch_size, mode, colormap, opacity, align, overlay_format, classes,
                      labels is not None)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    for name, value in (("aug_smooth", aug_smooth), ("eigen_smooth", eigen_smooth)):
        if not isinstance(value, bool):
            raise ExportError(f"{name} must be True or False, got {value!r}")
    if eigen_smooth and method not in EIGEN_SMOOTH_METHODS:
        warn(f"eigen_smooth does not change {METHODS[method]}'s maps (it applies to "
             f"{', '.join(sorted(EIGEN_SMOOTH_METHODS))}); ignored")
        eigen_smooth = False
    if precision != "float32" and method not in SCORED_METHODS:
        warn(f"precision {precision} changes only the extra forwards of "
             f"{', '.join(METHODS[name] for name in sorted(SCORED_METHODS))}; {METHODS[method]} runs in float32")
        precision = "float32"
    return ExportPlan(tuple(plan_models(models, layers, topk, warn, align, classes, labels)), method, topk,
                      batch_size, mode, colormap, float(opacity), overwrite, align, cell_size, overlay_format,
                      bool(overlays), classes, labels is not None, bool(raw_maps), precision, aug_smooth,
                      eigen_smooth)
