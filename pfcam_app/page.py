"""pfcam · Grad-CAM workbench for "Learning Features with Parameter-Free Layers" (ICLR 2022).

Run: ``streamlit run app.py`` or ``pfcam app`` (the page behind the server's upload limits); ``streamlit run
pfcam_app/page.py`` runs the page alone, without them (Streamlit runs it as ``__main__``). Compare
where R50, R50-max, R50-hybrid (and the ViT/PiT variants) look, layer by layer. A thin door onto pfnet and cams:
models come from ``pfnet.weights``, heatmaps from ``cams.explain``, overlays from ``cams.render``, exports from
``cams.export.run_export`` (the same files as ``pfcam export``).
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
# ones, pfnet.profile / pfdemo.scenes / cams.metrics / cams.export, fail only the panel that needs them.)
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

    from cams.images import IMAGE_EXTENSIONS
    from pfcam_app import core, first_run, network, views
    from pfcam_app.exporting import export_panel
    from pfcam_app.sidebar import settings_sidebar

    network.start_check()  # at most HUB_TIMEOUT seconds, once per process, while the page draws
    first_run.apply_switch()
    st.title("pfcam · Grad-CAM workbench", anchor=False)
    st.caption("Where do ResNet-50 and its parameter-free variants look? Grad-CAM and friends, layer by layer, for the "
               "models of *Learning Features with Parameter-Free Layers* (Han et al., ICLR 2022).")

    # ------------------------------------------------------------------------------------------- first screen
    demo_mode = first_run.demo_mode()
    if demo_mode:
        first_run.banner(network.network())

    # ----------------------------------------------------------------------------------------------------- sidebar
    with st.sidebar:
        settings = settings_sidebar(first_run.default_models(demo_mode))

    for slot in settings.slots:
        if slot.problem:
            st.warning(f"**{slot.entry.name}** is not available: {slot.problem}", icon=":material/warning:")
    if not settings.slots:
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
        example_col.caption("Demo scenes are unavailable (`pfdemo.scenes` failed to load).")
    examples = example_col.multiselect(
        "…or pick examples", scenes + photos if demo_mode else photos + scenes, key="examples",
        default=core.widget_default("examples", first_run.default_examples(demo_mode)),
        placeholder="Demo scenes and photographs",
        help="Demo scenes come with a ground-truth box (pointing game, energy in box) and suit the demo models; "
             "photographs (public-domain/CC0 pictures from scikit-image's sample data) suit the ImageNet models.")

    sources: list[core.Source] = [core.from_upload(upload) for upload in uploads or []]
    sources += [core.scene_source(name) if name in scenes else core.photo_source(name) for name in examples]
    core.keep_decoded({source.digest for source in sources})

    # ----------------------------------------------------------------------------------------------------- results
    runnable = settings.runnable
    if settings.ready and not runnable:
        st.warning("Pick at least one layer in the sidebar.", icon=":material/layers:")
    if sources and runnable:
        st.header("Heatmaps", anchor=False)
        views.heatmaps_header(settings)
        stopped, stop_button = views.stop_control(sources, settings)
        summary = st.empty()
        totals: dict[str, float] = {}
        for source in sources:
            with core.guard(f"Explaining {source.name}"):
                for model_id, seconds in views.render_image(source, settings, stopped).items():
                    totals[model_id] = totals.get(model_id, 0.0) + seconds
        if stop_button is not None and not stopped:
            stop_button.empty()  # nothing left to stop
        summary.caption("Time per model this run: " + " · ".join(
            f"**{slot.entry.name}** {totals.get(slot.id, 0.0):.2f} s" for slot in runnable)
            + (" (stopped work not counted)" if stopped else " (0 s: everything came from the cache)"))
    elif not sources:
        st.info("Upload images or pick examples to see the heatmaps.", icon=":material/image:")

    # ----------------------------------------------------------------------------------------------------- measure
    if sources and settings.ready:
        with core.guard("Measure"):
            from pfcam_app.measure import measure_panel

            measure_panel(sources, settings)
        with core.guard("Sanity check"):
            from pfcam_app.sanity import sanity_panel

            sanity_panel(sources, settings)

    # ------------------------------------------------------------------------------------------------- model cards
    if settings.ready:
        st.header("Model cards", anchor=False)
        for slot in settings.ready:
            views.model_card(slot, core.device_name())

    # ------------------------------------------------------------------------------------------------------ export
    if sources and runnable:
        export_panel(sources, settings)

if __name__ == "__main__":
    main()
