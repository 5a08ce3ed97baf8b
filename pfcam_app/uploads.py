"""What each uploader of the page takes, checked by the app itself (issue #26).

Streamlit checks an uploaded file's extension against the uploader's ``type`` while the script reads the widget and
raises when it does not fit (a file renamed or retyped between picking and upload, or sent to another uploader's
URL); the page then shows only "This app has encountered an error". So each uploader's types carry one MIME type
of pfcam's own (:func:`upload_types`): the browser still filters by the extensions, Streamlit leaves the check to
the app, and :func:`accepted` refuses such a file with a plain message naming it and the reason, and drops its
bytes from the server's store at once. The HTTP layer (:mod:`pfcam_app.upload_limits`) has already refused names
that fit no uploader and sizes over the limits."""
from __future__ import annotations

from typing import Any

import streamlit as st

from pfcam_app.core import plain
from pfcam_app.upload_limits import CHECKPOINT_LIMIT_MB, IMAGE_LIMIT_MB, WIDGET_TYPES, widget_problem

SIZE_LIMIT_MB = {"image": IMAGE_LIMIT_MB, "checkpoint": CHECKPOINT_LIMIT_MB, "boxes CSV": 1}


def upload_types(kind: str) -> list[str]:
    """``st.file_uploader``'s ``type`` for the ``kind`` uploader (a key of ``WIDGET_TYPES``): its extensions, and a
    MIME type no file has, which makes Streamlit leave the extension check to :func:`accepted`."""
    return [*WIDGET_TYPES[kind], f"application/x-pfcam-{kind.replace(' ', '-').lower()}"]


def problem(upload: Any, kind: str) -> str | None:
    """Why an uploaded file does not fit the ``kind`` uploader (its name, or its size), or None."""
    reason = widget_problem(str(upload.name), kind)
    if reason is None and int(upload.size) > SIZE_LIMIT_MB[kind] * 2**20:
        reason = f"it is {upload.size / 2**20:,.1f} MB, over the {SIZE_LIMIT_MB[kind]:,} MB limit for {kind} files"
    return reason


def accepted(files: Any, kind: str, where: Any = None) -> Any:
    """``files`` (a widget's value: one file, a list, or None) without those that do not fit the ``kind``
    uploader; each of those is named in a plain error (in ``where``) with the reason, and its bytes dropped."""
    many = isinstance(files, list)
    kept = []
    for upload in files if many else [files] if files is not None else []:
        reason = problem(upload, kind)
        if reason is None:
            kept.append(upload)
            continue
        (where or st).error(f"{plain(upload.name)} was not used: {plain(reason)}. If it was renamed or changed after "
                            "it was picked, pick it again.", icon=":material/block:")
        drop(upload)
    return kept if many else (kept[0] if kept else None)


def drop(upload: Any) -> None:
    """Remove one uploaded file's bytes from Streamlit's store (kept otherwise until the session ends)."""
    try:
        from streamlit.runtime import get_instance
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        context = get_script_run_ctx()
        if context is not None:
            get_instance().uploaded_file_mgr.remove_file(context.session_id, upload.file_id)
    except Exception:  # noqa: BLE001 - no runtime (AppTest): nothing held beyond the session
        pass
