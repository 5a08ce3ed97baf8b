"""The first screen: which models the page opens with, why, and the one button that fetches the ImageNet pair.

Without the ImageNet weights of R50 and R50-hybrid in the cache the page opens on the bundled demo models with a
demo scene selected, beside EfficientNet-Lite0 (a real ImageNet network installed with pfcam) on the bundled photos,
so heatmaps with real classes are on screen before any click. With network, one button downloads both
(a progress bar each) and switches the page to them; a failed download keeps its reason in the model's status.
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from pfcam_app import core
from pfcam_app.network import Network
from pfnet import weights, zoo

SWITCH_KEY = "_switch_to_imagenet"  # session state: set after a download, read before the widgets are drawn


def demo_mode() -> bool:
    """True while the ImageNet pair is not usable here (not cached): the page opens on the demo models."""
    return any(core.model_status(model_id) not in core.READY for model_id in core.IMAGENET_DEFAULT)


def photo_models() -> list[str]:
    """The ImageNet networks that work here without a download (installed with pfcam): the offline photo models."""
    return [model_id for model_id in core.PHOTO_DEFAULT if core.model_status(model_id) in core.READY]


def default_models(demo: bool) -> tuple[str, ...]:
    """The models the page opens with: the ImageNet pair, or offline the demo pair beside the photo models."""
    return tuple(core.DEMO_DEFAULT) + tuple(photo_models()) if demo else tuple(core.IMAGENET_DEFAULT)


def default_examples(demo: bool) -> list[str]:
    """What the examples picker starts with: a demo scene for the demo models (and, when a photo model works
    offline, the first photos for it), a photo for ImageNet models."""
    photos = core.example_photos()
    if demo:
        scenes = core.scene_options()
        shown = core.FIRST_PHOTOS if photo_models() else ()
        return scenes[core.DEMO_SCENE:core.DEMO_SCENE + 1] + [name for name in shown if name in photos]
    return [name for name in photos if name == core.FIRST_PHOTO]


def apply_switch() -> None:
    """After the ImageNet pair was downloaded: select it (and a photo instead of the first-screen scene).
    Runs before the widgets are drawn, which is when Streamlit lets the page set their values."""
    if not st.session_state.pop(SWITCH_KEY, False):
        return
    st.session_state["models"] = list(core.IMAGENET_DEFAULT)
    if st.session_state.get("examples", default_examples(True)) == default_examples(True):
        st.session_state["examples"] = default_examples(False)


def fetch_with_bar(model_id: str, where: Any) -> bool:
    """Download one model's weights with a progress bar in ``where``; a failure is recorded and shown."""
    entry = zoo.get(model_id)
    bar = where.progress(0.0, text=f"{entry.name}: connecting…")

    def progress(done: int, total: int | None) -> None:
        if total:
            bar.progress(min(1.0, done / total), text=f"{entry.name}: {done / 2**20:.1f} / {total / 2**20:.1f} MB")
        else:
            bar.progress(0.0, text=f"{entry.name}: {done / 2**20:.1f} MB")

    try:
        weights.fetch(model_id, progress=progress)
    except Exception as exc:  # noqa: BLE001 - shown, and kept as the model's status
        bar.empty()
        reason = core.error_text(exc)
        core.failed_downloads()[model_id] = reason
        where.error(f"**{entry.name}**: {reason}", icon=":material/cloud_off:")
        return False
    core.failed_downloads().pop(model_id, None)
    bar.progress(1.0, text=f"{entry.name}: downloaded")
    return True


def banner(network: Network) -> None:
    """Why the demo models are on screen, and with network the button that fetches the ImageNet pair."""
    names = " and ".join(zoo.get(model_id).name for model_id in core.IMAGENET_DEFAULT)
    demo = ("pfcam shows its bundled **demo models** (R50 and R50-hybrid at width 0.25, trained on synthetic "
            "shape scenes; R50-max too) with a demo scene, each heatmap scored against the scene's ground-truth "
            "box. They know 10 shapes, not photographs.")
    photos = [zoo.get(model_id).name for model_id in photo_models()]
    if photos:
        demo += (f" The photographs are explained by **{' and '.join(photos)}**, a real ImageNet network (with "
                 "depthwise convolutions) installed with pfcam.")
    if not network.online:
        st.info(f"**Offline demo.** The ImageNet weights of {names} are not cached and cannot be downloaded "
                f"({network.reason}). {demo} To use the ImageNet models, place their checkpoints in the cache "
                "folder (each model's panel in the sidebar names the file) or upload one there. "
                "`PFCAM_OFFLINE=1` never touches the network; `PFCAM_OFFLINE=0` tries downloads without the check.",
                icon=":material/wifi_off:")
        return
    box = st.container(border=True)
    box.markdown(f"**Demo models on screen.** The ImageNet weights of {names} are not downloaded yet. {demo}")
    missing = [model_id for model_id in core.IMAGENET_DEFAULT if core.model_status(model_id) not in core.READY]
    if box.button(f"Download {names} and switch to them", key="download_imagenet", type="primary",
                  icon=":material/download:"):
        bars = {model_id: box.empty() for model_id in missing}
        for model_id, place in bars.items():
            place.progress(0.0, text=f"{zoo.get(model_id).name}: waiting…")
        results = [fetch_with_bar(model_id, bars[model_id].container()) for model_id in missing]
        if all(results):
            st.session_state[SWITCH_KEY] = True
            st.rerun()
    box.caption(f"Files go to `{weights.cache_dir()}` (`PFCAM_CACHE`). `PFCAM_OFFLINE=1` never touches the "
                "network; `PFCAM_OFFLINE=0` skips the network check.")
