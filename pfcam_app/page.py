"""pfcam · Grad-CAM workbench for "Learning Features with Parameter-Free Layers" (ICLR 2022).

Run: ``streamlit run app.py`` or ``streamlit run pfcam_app/page.py`` (Streamlit runs it as ``__main__``). Compare
where R50, R50-max, R50-hybrid (and the ViT/PiT variants) look, layer by layer. A thin door onto pfnet and cams:
models come from ``pfnet.weights``, heatmaps from ``cams.explain``, overlays from ``cams.render``, exports from
``cams.export.run_export`` (the same files as ``python -m cams export``).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (`streamlit run pfcam_app/page.py`): make the project importable
    _ROOT = str(Path(__file__).resolve().parent.parent)
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

# The pieces the app cannot work without; a missing one is reported plainly instead of a traceback. (The optional
# ones, pfnet.profile / pfnet.scenes / cams.metrics / cams.export, fail only the panel that needs them.)
PIECES = ("pfnet.weights", "cams.images", "cams.layers", "cams.engine", "cams.render")


def main() -> None:
    st.set_page_config(page_title="pfcam · Grad-CAM workbench", page_icon=":material/blur_on:", layout="wide")

    missing = []
    for name in PIECES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            missing.append(f"`{name}` ({type(exc).__name__}: {exc})")
    if missing:
        st.error("pfcam is not fully installed; missing pieces: " + ", ".join(missing), icon=":material/build:")
        st.stop()

    from cams import engine, render
    from cams.images import IMAGE_EXTENSIONS
    from pfcam_app import core, views
    from pfcam_app.exporting import export_panel
    from pfcam_app.sidebar import model_picker
    from pfnet import weights

    st.title("pfcam · Grad-CAM workbench", anchor=False)
    st.caption("Where do ResNet-50 and its parameter-free variants look? Grad-CAM and friends, layer by layer, for the "
               "models of *Learning Features with Parameter-Free Layers* (Han et al., ICLR 2022).")

    # ---------------------------------------------------------------------------------------------- offline default
    imagenet_status = {m: weights.weight_status(m) for m in core.IMAGENET_DEFAULT}
    demo_mode = any(status == "missing" for status in imagenet_status.values())
    if demo_mode:
        why = "downloads are switched off (PFCAM_OFFLINE=1)" if weights.offline() else "they are not cached"
        st.info(f"**Offline demo.** The ImageNet weights for R50 and R50-hybrid are not available here ({why}), so "
                "pfcam starts with its bundled demo models (ResNet-50 / R50-hybrid at width 0.25, trained on "
                "synthetic shape scenes; R50-max too). Pick a demo scene below to see each heatmap scored against the "
                f"ground-truth box. To use ImageNet models, place their checkpoints in `{weights.cache_dir()}` "
                "(each model's panel in the sidebar says which file), or upload a checkpoint in the sidebar.",
                icon=":material/wifi_off:")

    # ----------------------------------------------------------------------------------------------------- sidebar
    with st.sidebar:
        st.header("Models", anchor=False)
        slots = model_picker(core.DEMO_DEFAULT if demo_mode else core.IMAGENET_DEFAULT)
        ready = [slot for slot in slots if slot.model is not None]

        st.header("Explanation", anchor=False)
        method = st.selectbox("CAM method", list(engine.METHODS), format_func=lambda m: engine.METHODS[m],
                              key="method",
                              help="Gradient methods need one forward and one backward pass per image; "
                                   "Score-CAM runs a forward pass per activation channel (slow on a CPU).")
        if method == "cam":
            st.caption(":orange[CAM uses the fc weights, so it explains the final feature map only (layer4.2 on the "
                       "ResNets); other layers get an error message.]")
        if method == "scorecam" and core.device_name() == "cpu":
            st.caption(":orange[Score-CAM on a CPU can take minutes per image and model.]")
        layers_by_family: dict[str, list[str]] = {}
        for slot in ready:
            family = slot.entry.family
            if family in layers_by_family:
                continue
            with core.guard(f"Layers of {slot.entry.name}"):
                names, labels, default = views.layer_choices(slot.model)
                title = "Layers" if len({s.entry.family for s in ready}) == 1 else f"Layers ({family} models)"
                layers_by_family[family] = st.multiselect(
                    title, names, default=default, format_func=lambda n, labels=labels: labels.get(n, n),
                    key=f"layers_{family}", help="One column per layer. Default: the last block of layer3 and layer4.")

        target_kind = st.radio("Target", ["Predicted class", "Top-k classes", "A class I pick"], key="target_kind",
                               horizontal=False)
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
                 "look at. Models with a measured offset (the demo models) are drawn moved by it; off: the plain "
                 "resize, as pytorch-grad-cam draws it.") else "none"
        with core.guard("Device"):
            st.caption(f"Device in use: **{core.device_name()}** (set `PFCAM_DEVICE` to change)")

    for slot in slots:
        if slot.problem:
            st.warning(f"**{slot.entry.name}** is not available: {slot.problem}", icon=":material/warning:")
    if not slots:
        st.info("Pick at least one model in the sidebar.", icon=":material/arrow_back:")

    # ------------------------------------------------------------------------------------------------------ images
    st.header("Images", anchor=False)
    upload_col, example_col = st.columns([3, 2], gap="large")
    uploads = upload_col.file_uploader(
        "Upload images", type=sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS), accept_multiple_files=True,
        key="uploads", max_upload_size=core.IMAGE_LIMIT_MB,
        help=f"JPEG, PNG, WEBP, BMP or TIFF, up to {core.IMAGE_LIMIT_MB} MB each.")
    scenes, photos = core.scene_options(), core.example_photos()
    if not scenes:
        example_col.caption("Demo scenes are unavailable (`pfnet.scenes` failed to load).")
    examples = example_col.multiselect(
        "…or pick examples", scenes + photos if demo_mode else photos + scenes, key="examples",
        placeholder="Demo scenes and photographs",
        help="Demo scenes come with a ground-truth box (pointing game, energy in box); photographs are "
             "public-domain/CC0 pictures from scikit-image's sample data.")

    sources: list[core.Source] = [core.from_upload(upload) for upload in uploads or []]
    sources += [core.scene_source(name) if name in scenes else core.photo_source(name) for name in examples]

    # ----------------------------------------------------------------------------------------------------- results
    runnable = [slot for slot in ready if layers_by_family.get(slot.entry.family)]
    if ready and not runnable:
        st.warning("Pick at least one layer in the sidebar.", icon=":material/layers:")
    if sources and runnable:
        st.header("Heatmaps", anchor=False)
        summary = st.empty()
        totals: dict[str, float] = {}
        for source in sources:
            with core.guard(f"Explaining {source.name}"):
                spent = views.render_image(source, runnable, layers_by_family, method, target, mode, colormap, opacity,
                                           align)
                for model_id, seconds in spent.items():
                    totals[model_id] = totals.get(model_id, 0.0) + seconds
        summary.caption("Time per model this run: " + " · ".join(
            f"**{slot.entry.name}** {totals.get(slot.id, 0.0):.2f} s" for slot in runnable)
            + " (0 s: everything came from the cache)")
    elif not sources:
        st.info("Upload images or pick examples to see the heatmaps.", icon=":material/image:")

    # ------------------------------------------------------------------------------------------------- model cards
    if ready:
        st.header("Model cards", anchor=False)
        for slot in ready:
            views.model_card(slot, core.device_name())

    # ------------------------------------------------------------------------------------------------------ export
    if sources and runnable:
        export_panel(sources, runnable, layers_by_family, method, target, mode, colormap, opacity, align)


if __name__ == "__main__":
    main()
