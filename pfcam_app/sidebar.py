"""The sidebar: models (weight status, download, checkpoint upload), method and its options, layers (in network
depth order), target, display. Everything it decides is returned as one :class:`~pfcam_app.core.Settings`."""
from __future__ import annotations

import hashlib

import streamlit as st

from cams.engine import EIGEN_METHODS, EIGEN_SMOOTH_METHODS, METHODS, SCORED_METHODS
from pfcam_app import core
from pfcam_app.core import STATUS_ICON, STATUS_LABEL, CamOptions, Settings, Slot
from pfcam_app.first_run import fetch_with_bar
from pfcam_app.network import network
from pfcam_app.uploads import accepted, upload_types
from pfnet import weights, zoo

IGNORES_TARGET = {method: ("KPCA-CAM draws the first kernel principal component" if method == "kpcacam" else
                           "Eigen-CAM draws the first principal component")
                   + " of the activations: the same map whatever the target class" for method in sorted(EIGEN_METHODS)}
LAYER_HELP = {
    "resnet": "One column per layer, in network depth order. `stem`: conv 7x7/2 + max-pool/2 output (1/4 "
              "resolution); `layerS.i`: output of block i+1 of stage S; `layerS.i.conv_block`: that block's spatial "
              "op (3x3 conv, 3x3 max-pool, or 2x2 avg-pool + 3x3 conv). Default: the last block of layer3 and "
              "layer4.",
    "vit": "One column per layer, in network depth order. `blocks.i`: output of block i+1 (even blocks attend, odd "
           "blocks max-pool). Default: the last two blocks.",
    "pit": "One column per layer, in network depth order. `transformers.s.blocks.i`: block i+1 of stage s+1. "
           "Default: the last block of the last two stages.",
}


ADDED_KEY = "_timm_models"  # session state: the timm models this session added (kept in the picker's options)
PENDING_KEY = "_add_models"  # session state: models to select on the next run (before the picker is drawn)
AUG_SMOOTH_HELP = ("Averages the maps of six augmented copies of each image (horizontal flip × brightness 0.9 / 1 / "
                   "1.1), each flipped back: smoother maps that sit better on the object. Costs about 6× the time.")
EIGEN_SMOOTH_HELP = ("Draws the first principal component of the weighted activations instead of their sum: less "
                     "noise (the sign is the SVD's, as in pytorch-grad-cam: a map can come out inverted). Costs an "
                     "SVD per map (small beside the network).")
BF16_HELP = ("Runs the extra forwards (Score-CAM's masked inputs, Ablation-CAM's ablated channels) in bfloat16 "
             "autocast: about 0.6-0.75 of the time on a CPU, logits within ~0.5% of the largest; the first forward "
             "and the maps stay float32.")
EIGEN_SMOOTH_IGNORED = {
    **dict.fromkeys(("eigengradcam", *sorted(EIGEN_METHODS)), "is a principal component already"),
    "cam": "takes its maps straight from the fc weights; the engine has no eigen_smooth for it",
    "fullgrad": "sums gradient maps, with no weighted activations to project",
    "smoothgradcampp": "averages noisy Grad-CAM++ maps of its own, with no weighted activations to project",
}
GENERIC_LAYER_HELP = ("One column per layer, in network depth order, found from the model's own structure (its "
                      "stem, stages and blocks). Default: the last stage.")


def short_name(model_id: str) -> str:
    return zoo.get(model_id).name.removesuffix(" (scenes)")


def add_models(model_ids: list[str]) -> None:
    """Select these models from the next run on (the picker's value can only be set before it is drawn)."""
    pending = st.session_state.setdefault(PENDING_KEY, [])
    pending.extend(model_id for model_id in model_ids if model_id not in pending)
    st.rerun()


def _apply_pending(defaults: tuple[str, ...]) -> list[str]:
    """The picker's options: the zoo, then the timm models this session added; pending additions selected."""
    added = st.session_state.setdefault(ADDED_KEY, [])
    pending = st.session_state.pop(PENDING_KEY, [])
    for model_id in pending:
        if model_id not in zoo.ZOO and model_id not in added:
            added.append(model_id)
    if pending:
        current = list(st.session_state.get("models", defaults))
        st.session_state["models"] = current + [model_id for model_id in pending if model_id not in current]
    return zoo.ids() + added


def timm_adder() -> None:
    """'Add a timm model': any name of timm's registry, checked there; weights as for the zoo's models."""
    from pfnet import timm_models

    with st.form("add_timm", clear_on_submit=False, border=False):
        name = st.text_input("Add a timm model", key="timm_name", placeholder="convnext_tiny.fb_in1k",
                             help="Any model of timm's registry as name or name.tag (e.g. deit_small_patch16_224."
                                  "fb_in1k). Its weights come from the Hugging Face Hub (or its cache, or a "
                                  "checkpoint you upload); classes and preprocessing from its pretrained_cfg.")
        submitted = st.form_submit_button("Add", icon=":material/add:")
    if submitted and name.strip():
        try:
            model_id = timm_models.canonical(zoo.TIMM_PREFIX + name.strip().removeprefix(zoo.TIMM_PREFIX))
        except Exception as exc:  # noqa: BLE001 - a name timm does not know: one line, no traceback
            st.error(core.plain(core.error_text(exc)), icon=":material/error:")
            return
        add_models([model_id])


def model_picker(defaults: tuple[str, ...]) -> list[Slot]:
    """Multi-select over the zoo and the added timm models (short names: the status is on each model's panel),
    the field that adds a timm model, then one panel per model."""
    options = _apply_pending(defaults)
    selected = st.multiselect("Models", options, default=core.widget_default("models", list(defaults)),
                              format_func=short_name, key="models",
                              help="Any model of the zoo (\"Demo\": the bundled models trained on shape scenes; "
                                   "EfficientNet-Lite0: an ImageNet network installed with pfcam), or a timm model "
                                   "added below. ImageNet models need their weights: bundled, installed, cached, "
                                   "downloaded here, or uploaded as a checkpoint file; each model's panel below "
                                   "says which.")
    timm_adder()
    return [_model_controls(model_id, selected) for model_id in selected]


def _upload_digest(upload) -> str:
    """sha256 of an uploaded checkpoint, computed once per upload (they can be up to 1 GB)."""
    known = st.session_state.setdefault("_ckpt_digests", {})
    key = f"{upload.file_id}:{upload.size}"
    if key not in known:
        known[key] = hashlib.sha256(upload.getvalue()).hexdigest()[:20]
    return known[key]


def _model_controls(model_id: str, selected: list[str] | None = None) -> Slot:
    entry = zoo.get(model_id)
    status = core.model_status(model_id)
    with st.expander(f"{entry.name} · {STATUS_LABEL.get(status, status)}", icon=STATUS_ICON.get(status)):
        path = weights.cached_path(model_id)
        if entry.baseline and entry.baseline not in (selected or []):
            base = zoo.get(entry.baseline)
            if st.button(f"Add its baseline {base.name}", key=f"baseline_{model_id}", icon=":material/compare:",
                         width="stretch", help=f"{entry.name} is derived from {base.name}: put them side by side."):
                add_models([entry.baseline])
        if status == "bundled":
            st.caption(f"Bundled with pfcam (`{path.name}`); works offline.")
        elif status == "installed":
            st.caption(f"Installed with pfcam (Python package `{entry.source.filename}`, `{path.name}`); works "
                       "offline.")
        elif status == "cached":
            st.caption(f"Cached at `{path}`.")
        elif status in ("downloadable", "failed"):
            if status == "failed":
                st.error(f"Download failed: {core.failed_downloads()[model_id]}", icon=":material/cloud_off:")
            st.caption(f"Not downloaded yet. Source: {entry.source.page}. Or save the file as `{path}`.")
            if st.button("Download" if status == "downloadable" else "Try again", key=f"download_{model_id}",
                         icon=":material/download:", width="stretch") and fetch_with_bar(model_id, st):
                st.rerun()
        else:
            state = network()
            why = "" if status == "missing" else f" ({state.reason}: {state.where})"
            st.caption(f"Not available offline{why}. Download it from {entry.source.page} and save it as `{path}`, "
                       "or upload the checkpoint below.")
        if entry.is_timm and st.toggle("Random weights", key=f"random_{model_id}",
                                       help="timm's random initialisation instead of trained weights: for trying "
                                            "the tool on an architecture, not for reading what it learned. Marked "
                                            "on every row and card."):
            return core.load_random(model_id)
        upload = st.file_uploader("Use a checkpoint file", type=upload_types("checkpoint"), key=f"ckpt_{model_id}",
                                  max_upload_size=core.CHECKPOINT_LIMIT_MB,
                                  help="A .pth/.pt/.safetensors state dict or training checkpoint; its architecture "
                                       "is detected from the keys and shapes.")
        upload = accepted(upload, "checkpoint")
        if upload is not None:
            slot = _uploaded_slot(model_id, upload)
            if slot is not None:
                return slot
    with st.spinner(f"Loading {entry.name}…"):
        return core.load_default(model_id)


def _uploaded_slot(model_id: str, upload) -> Slot | None:
    """The model with the uploaded weights, or None (after explaining why) to fall back to the default ones."""
    entry = zoo.get(model_id)
    if upload.size > core.CHECKPOINT_LIMIT_MB * 2**20:
        st.error(f"{core.plain(upload.name)} is {upload.size / 2**30:.2f} GB; checkpoints are limited to "
                 f"{core.CHECKPOINT_LIMIT_MB / 1024:.0f} GB.")
        return None
    digest = _upload_digest(upload)
    try:
        with st.spinner(f"Reading {core.plain(upload.name)}…"):
            state = core.read_upload(digest, upload.getvalue())
    except Exception as exc:  # noqa: BLE001
        st.error(core.plain(core.error_text(exc)), icon=":material/error:")
        return None
    fit = weights.detect_architecture(state)
    if fit is None:
        st.error(f"{core.plain(upload.name)} does not match any architecture in the zoo.", icon=":material/error:")
    elif model_id in fit.model_ids:
        st.success(f"Detected {fit}: fits {entry.name}.", icon=":material/check:")
    else:
        others = [zoo.get(other).name for other in fit.model_ids]
        advice = f" Select {' or '.join(others)} in the model list to use it." if others else ""
        st.error(f"Detected {fit}, which is not {entry.name} ({entry.arch}, {entry.num_classes} classes)."
                 + advice, icon=":material/error:")
    with st.spinner(f"Loading {core.plain(upload.name)} into {entry.name}…"):
        slot = core.load_uploaded(model_id, digest, state, upload.name)
    if slot.problem:
        if fit is not None and model_id in fit.model_ids:
            st.error(slot.problem, icon=":material/error:")
        else:
            st.caption(slot.problem)
        st.caption(f"{entry.name} keeps its default weights (if it has any).")
        return None
    return slot


# ------------------------------------------------------------------------------------------------------ layers

def _in_depth_order(key: str, order: list[str]) -> None:
    """Widget callback: the chosen layers re-sorted into network depth order, whatever the click order."""
    rank = {name: index for index, name in enumerate(order)}
    st.session_state[key] = sorted(st.session_state.get(key) or [], key=lambda name: rank.get(name, len(rank)))


def layer_pickers(ready: list[Slot]) -> dict[str, list[str]]:
    """One layer multi-select per model family on the page; each returns its layers in network depth order."""
    from pfcam_app.views import layer_choices

    chosen: dict[str, list[str]] = {}
    groups = {slot.entry.layer_group for slot in ready}
    for slot in ready:
        group = slot.entry.layer_group  # a pfnet family, or one model (any other network has its own names)
        if group in chosen:
            continue
        with core.guard(f"Layers of {slot.entry.name}"):
            names, labels, default = layer_choices(slot.model)
            key = f"layers_{group}"
            title = "Layers" if len(groups) == 1 else \
                f"Layers ({group} models)" if group in LAYER_HELP else f"Layers ({slot.entry.name})"
            picked = st.multiselect(title, names, default=core.widget_default(key, default), key=key,
                                    on_change=_in_depth_order, args=(key, names),
                                    help=LAYER_HELP.get(group, GENERIC_LAYER_HELP))
            rank = {name: index for index, name in enumerate(names)}
            chosen[group] = sorted(picked, key=lambda name: rank[name])
    return chosen


# ---------------------------------------------------------------------------------------------------- settings

def method_options(method: str) -> CamOptions:
    """The "Options" area under the method: the smoothing checkboxes and, for the methods with extra forwards,
    bfloat16. An option the method does not use is disabled and says why, and is off in what is returned (a
    ticked box kept from another method never reaches ``cams.explain``)."""
    st.markdown("**Options**")
    aug_smooth = st.checkbox("Augmentation smoothing (aug_smooth)", key="aug_smooth", help=AUG_SMOOTH_HELP)
    eigen_applies = method in EIGEN_SMOOTH_METHODS
    eigen_smooth = st.checkbox("Eigen smoothing (eigen_smooth)", key="eigen_smooth", disabled=not eigen_applies,
                               help=EIGEN_SMOOTH_HELP) and eigen_applies
    if not eigen_applies:
        reason = EIGEN_SMOOTH_IGNORED.get(method, "does not use it")
        st.caption(f"Eigen smoothing does not apply: {METHODS[method]} {reason}.")
    precision = "float32"
    if method in SCORED_METHODS and st.checkbox("bfloat16 for the masked forwards", key="bf16", help=BF16_HELP):
        precision = "bfloat16"
    if aug_smooth and method in SCORED_METHODS and core.device_name() == "cpu":
        st.caption(f":orange[Augmentation smoothing runs {METHODS[method]}'s forwards for six copies of each "
                   "image: about 6× its time.]")
    return CamOptions(aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, precision=precision)


def settings_sidebar(defaults: tuple[str, ...]) -> Settings:
    from cams import engine, render

    st.header("Models", anchor=False)
    slots = model_picker(defaults)
    ready = [slot for slot in slots if slot.model is not None]

    st.header("Explanation", anchor=False)
    method = st.selectbox("CAM method", list(engine.METHODS), format_func=lambda m: engine.METHODS[m], key="method",
                          help="What each method is · what it costs:\n\n" + "\n".join(
                              f"- **{label}**: {engine.METHOD_NOTES[key]}" for key, label in engine.METHODS.items()))
    st.caption(engine.METHOD_NOTES[method])
    if method == "cam":
        st.caption(":orange[CAM uses the fc weights, so it explains the final feature map only (layer4.2 on the "
                   "ResNets); other layers get an error message.]")
    if method in IGNORES_TARGET:
        st.caption(f":orange[{IGNORES_TARGET[method]}: the target below changes only the class named under "
                   "each cell.]")
    if method in engine.SCORED_METHODS and core.device_name() == "cpu":
        st.caption(f":orange[{engine.METHODS[method]} on a CPU can take minutes per image and model.]")
    options = method_options(method)
    layers_by_family = layer_pickers(ready)

    target_kind = st.radio("Target", ["Predicted class", "Top-k classes", "A class I pick"], key="target_kind")
    target: tuple = ("top", 1)
    if target_kind == "Top-k classes":
        target = ("top", st.slider("k", 2, 5, 3, key="top_k"))
    elif target_kind == "A class I pick":
        classes: list[str] = []
        for slot in slots:
            classes += [name for name in slot.entry.class_names() if name not in classes]
        picked = st.selectbox("Class (type to search)", classes, index=None, key="target_class",
                              placeholder="Type a class name…")
        if picked is None:
            st.caption("No class picked yet: explaining the predicted class.")
        else:
            target = ("class", picked)

    st.header("Display", anchor=False)
    colormap = st.selectbox("Colormap", list(render.COLORMAPS), key="colormap")
    opacity = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
    mode = st.radio("Preprocessing", ["full", "center"], key="mode", horizontal=True,
                    format_func={"full": "Whole image", "center": "Centre crop"}.get,
                    help="Whole image: squashed to the input size. Centre crop: the ImageNet evaluation crop; "
                         "the heatmap then covers only the cropped part.")
    align = "model" if st.toggle(
        "Align heatmaps to what each layer sees", value=True, key="align",
        help="A plain resize draws a stride-32 layer's heatmap up to half a cell down-right of what its cells "
             "look at. Models with a measured offset (the demo models) are drawn moved by it, every layer of the "
             "same stride alike (the model card lists them); off: the plain resize, as pytorch-grad-cam draws "
             "it.") else "none"
    every_model = st.toggle(
        "Every model on every image", value=False, key="every_model",
        help="Off: a demo scene is explained by the demo models and a bundled photo by the ImageNet models, each by "
             "the networks that know its kind of picture (uploads by every model). On: every model explains every "
             "image, to compare them on the same picture; a demo model on a photo then makes a forced guess among "
             "its 10 shapes, and the page says so.")
    with core.guard("Device"):
        st.caption(f"Device in use: **{core.device_name()}** (set `PFCAM_DEVICE` to change)")
    return Settings(slots, ready, method, layers_by_family, target, colormap, opacity, mode, align, options,
                    every_model)
