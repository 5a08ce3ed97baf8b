"""Sidebar model management: the zoo picker, each model's weight status, download with progress, checkpoint upload."""
from __future__ import annotations

import hashlib

import streamlit as st

from pfcam_app import core
from pfcam_app.core import STATUS_ICON, STATUS_LABEL, Slot
from pfnet import weights, zoo


def _status(model_id: str) -> str:
    try:
        return weights.weight_status(model_id)
    except Exception:  # noqa: BLE001 - an unreadable cache must not break the picker
        return "missing"


def model_picker(defaults: tuple[str, ...]) -> list[Slot]:
    """Multi-select over the zoo (label shows the weight status), then one expander of controls per model."""
    def label(model_id: str) -> str:
        return f"{zoo.get(model_id).name} · {STATUS_LABEL.get(_status(model_id), '?')}"

    selected = st.multiselect("Models", zoo.ids(), default=list(defaults), format_func=label, key="models",
                              help="Any model of the zoo. ImageNet models need their weights: bundled, cached, "
                                   "downloaded here, or uploaded as a checkpoint file.")
    return [_model_controls(model_id) for model_id in selected]


def _download(model_id: str, where) -> None:
    entry = zoo.get(model_id)
    bar = where.progress(0.0, text=f"Downloading {entry.name}…")

    def progress(done: int, total: int | None) -> None:
        if total:
            bar.progress(min(1.0, done / total), text=f"{entry.name}: {done / 2**20:.1f} / {total / 2**20:.1f} MB")
        else:
            bar.progress(0.0, text=f"{entry.name}: {done / 2**20:.1f} MB")

    try:
        weights.fetch(model_id, progress=progress)
    except Exception as exc:  # noqa: BLE001
        bar.empty()
        where.error(core.error_text(exc), icon=":material/cloud_off:")
        return
    bar.progress(1.0, text=f"{entry.name}: downloaded")
    st.rerun()


def _upload_digest(upload) -> str:
    """sha256 of an uploaded checkpoint, computed once per upload (they can be up to 1 GB)."""
    known = st.session_state.setdefault("_ckpt_digests", {})
    key = f"{upload.file_id}:{upload.size}"
    if key not in known:
        known[key] = hashlib.sha256(upload.getvalue()).hexdigest()[:20]
    return known[key]


def _model_controls(model_id: str) -> Slot:
    entry = zoo.get(model_id)
    status = _status(model_id)
    with st.expander(f"{entry.name} · {STATUS_LABEL.get(status, status)}", icon=STATUS_ICON.get(status)):
        path = weights.cached_path(model_id)
        if status == "bundled":
            st.caption(f"Bundled with pfcam (`{path.name}`); works offline.")
        elif status == "cached":
            st.caption(f"Cached at `{path}`.")
        elif status == "downloadable":
            st.caption(f"Not downloaded yet. Source: {entry.source.page}")
            if st.button("Download", key=f"download_{model_id}", icon=":material/download:", width="stretch"):
                _download(model_id, st)
        else:
            st.caption(f"Not available offline. Download it from {entry.source.page} and save it as `{path}`, "
                       "or upload the checkpoint below.")
        upload = st.file_uploader("Use a checkpoint file", type=core.CHECKPOINT_TYPES, key=f"ckpt_{model_id}",
                                  max_upload_size=core.CHECKPOINT_LIMIT_MB,
                                  help="A .pth/.pt/.safetensors state dict or training checkpoint; its architecture "
                                       "is detected from the keys and shapes.")
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
        st.error(f"{upload.name} is {upload.size / 2**30:.2f} GB; checkpoints are limited to "
                 f"{core.CHECKPOINT_LIMIT_MB / 1024:.0f} GB.")
        return None
    digest = _upload_digest(upload)
    try:
        with st.spinner(f"Reading {upload.name}…"):
            state = core.read_upload(digest, upload.getvalue())
    except Exception as exc:  # noqa: BLE001
        st.error(core.error_text(exc), icon=":material/error:")
        return None
    fit = weights.detect_architecture(state)
    if fit is None:
        st.error(f"{upload.name} does not match any architecture in the zoo.", icon=":material/error:")
    elif model_id in fit.model_ids:
        st.success(f"Detected {fit}: fits {entry.name}.", icon=":material/check:")
    else:
        others = [zoo.get(other).name for other in fit.model_ids]
        advice = f" Select {' or '.join(others)} in the model list to use it." if others else ""
        st.error(f"Detected {fit}, which is not {entry.name} ({entry.arch}, {entry.num_classes} classes)."
                 + advice, icon=":material/error:")
    with st.spinner(f"Loading {upload.name} into {entry.name}…"):
        slot = core.load_uploaded(model_id, digest, state, upload.name)
    if slot.problem:
        if fit is not None and model_id in fit.model_ids:
            st.error(slot.problem, icon=":material/error:")
        else:
            st.caption(slot.problem)
        st.caption(f"{entry.name} keeps its default weights (if it has any).")
        return None
    return slot
