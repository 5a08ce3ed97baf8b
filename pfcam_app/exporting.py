"""The export panel: "Download ZIP" and "Export to folder", both through ``cams.export.run_export`` so they write
exactly the layout and manifest of ``pfcam export``. The CAMs already computed for the page are passed
in (``run_export(reuse=...)``, from the page's CAM store): an export computes only what the page has not; its
images are the session's decoded ones (``read_image=``), within the session's pixel budget.

The app is a multi-user server: "Export to folder" writes only under one root the server sets
(``PFCAM_EXPORT_ROOT``, default ``./cam_exports``); a browser user picks at most a sub-folder name, made safe
(:func:`export_folder`)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import streamlit as st

from pfcam_app.core import Settings, Slot, Source, cam_store, decode, digest_of, error_text, plain

ROOT_ENV = "PFCAM_EXPORT_ROOT"
DEFAULT_ROOT = "./cam_exports"


def export_root() -> Path:
    """Where every folder export of this server goes: ``$PFCAM_EXPORT_ROOT``, else ``./cam_exports``."""
    return Path(os.environ.get(ROOT_ENV, "").strip() or DEFAULT_ROOT).expanduser()


def export_folder(name: str) -> Path:
    """The folder for a browser-given sub-folder name: one safe path component under :func:`export_root` (absolute
    paths, ``..`` and separators lose their meaning; empty = the root itself). Never a symbolic link out."""
    from cams.export import ExportError

    root = export_root()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    sub = safe_sub(name)
    if sub and (root / sub).is_symlink():  # one component with no '..' or '/': only a link could lead out
        raise ExportError(f"the sub-folder {sub} is a symbolic link; choose another name")
    return root / sub if sub else root


def safe_sub(name: str) -> str:
    """The sub-folder a typed name becomes (as :func:`export_folder` makes it)."""
    from cams.export import safe_name

    return safe_name(name) if name.strip() else ""


def _signature(sources: list[Source], slots: list[Slot], *settings: Any) -> str:
    """What the export would contain: a ZIP built for other settings is not offered for download."""
    parts = [s.digest + s.name for s in sources] + [s.id + s.key for s in slots] + [repr(x) for x in settings]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def export_topk(target: tuple) -> int:
    """The export's top-k for the page's target (1 for a picked class)."""
    return int(target[1]) if target[0] == "top" else 1


def export_classes(target: tuple) -> list[str] | None:
    """The export's fixed target for the page's: the picked class, else None (the predicted top-k)."""
    return [str(target[1])] if target[0] == "class" else None


def page_cams(settings: Settings, reused: list[str]):
    """``run_export``'s ``reuse``: the page's stored CAMs of an image (as an Explanation), or None."""
    slots = {slot.id: slot for slot in settings.runnable}

    def reuse(model_id: str, item: Any, image: Any) -> Any:
        import torch

        from cams.engine import Explanation

        slot = slots.get(model_id)
        if slot is None or item.data is None:
            return None
        found = cam_store().get(settings.key(digest_of(bytes(item.data)), slot))
        if found is None:
            return None
        reused.append(model_id)
        return Explanation(heatmaps=torch.from_numpy(found["heatmaps"][None]),
                           targets=torch.from_numpy(found["targets"][None]),
                           probs=torch.from_numpy(found["probs"][None]),
                           layers=settings.layers_of(slot), method=settings.method,
                           class_names=tuple(slot.entry.class_names()), options=settings.options.recorded)

    return reuse


def session_image(item: Any) -> Any:
    """``run_export``'s ``read_image``: the session's decoded image (:func:`pfcam_app.core.decode`), so an export
    reuses what the page decoded and counts against the session's pixel budget instead of decoding again."""
    from cams.images import ImageError

    if item.data is None:
        raise ImageError(item.label, "the app exports only the images on its page")
    data = bytes(item.data)
    return decode(digest_of(data), item.label, data)


def _export(out_dir: Path, sources: list[Source], settings: Settings, overwrite: bool) -> tuple[Any, int]:
    """The export report, and how many image x model results came from the page instead of being computed."""
    from cams.export import run_export

    bar = st.progress(0.0, text="Exporting…")

    def progress(done: int, total: int, message: str = "") -> None:
        bar.progress(min(1.0, done / total) if total else 0.0, text=message or f"{done} / {total}")

    slots = settings.runnable
    layers = {slot.id: list(settings.layers_of(slot)) for slot in slots}  # by model id: timm models differ
    reused: list[str] = []
    report = run_export(
        sources=[(s.name, s.data) for s in sources if not s.refused], out_dir=out_dir,
        models={slot.id: (slot.model, slot.entry) for slot in slots}, layers=layers, method=settings.method,
        topk=export_topk(settings.target), batch_size=8, mode=settings.mode, colormap=settings.colormap,
        opacity=settings.opacity, overwrite=overwrite, progress=progress, align=settings.align,
        reuse=page_cams(settings, reused), read_image=session_image, target=export_classes(settings.target),
        **settings.options.explain_arguments())
    bar.empty()
    return report, len(reused)


def _summary(report: Any, reused: int) -> str:
    return (f"Exported {len(report.rows)} heatmaps of {report.processed} image(s) to {plain(report.out_dir.name)} "
            f"({report.computed} computed, {report.existing} kept from an earlier export; {reused} image × model "
            f"results taken from the page); manifest: `{report.manifest_json.name}`, `{report.manifest_csv.name}`.")


def _problems(report: Any) -> None:
    if report.stopped:
        st.error(f"**The export stopped** — {plain(report.stopped)}. What finished is kept and listed in the "
                 f"manifest.", icon=":material/error:")
    for problem in list(report.errors)[:20]:
        st.warning(plain(problem), icon=":material/warning:")


def export_panel(sources: list[Source], settings: Settings) -> None:
    st.header("Export", anchor=False)
    try:
        from cams.export import zip_directory  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        st.warning(f"Export is unavailable: `cams.export` could not be loaded ({error_text(exc)}).")
        return
    if settings.target[0] == "class":
        st.caption(f"Exports explain the class picked in the sidebar ('{plain(settings.target[1])}') in every "
                   f"image; a model without that class is left out, with a warning.")
    st.caption("Both write the folder layout and `manifest.json` / `manifest.csv` of `pfcam export`, "
               "from the CAMs already on the page (only what is missing is computed).")
    chosen = (tuple(sorted((k, tuple(v)) for k, v in settings.layers_by_family.items())), settings.method,
              settings.target, settings.mode, settings.colormap, round(settings.opacity, 3), settings.align,
              settings.options)
    signature = _signature(sources, settings.runnable, *chosen)
    zip_col, folder_col = st.columns(2, gap="large")
    with zip_col:
        st.markdown("**Download ZIP** of everything shown")
        if st.button("Build ZIP", key="build_zip", icon=":material/folder_zip:"):
            try:
                from cams.export import zip_directory

                with tempfile.TemporaryDirectory(prefix="pfcam_zip_") as tmp:
                    out_dir = Path(tmp) / "pfcam_export"
                    report, _ = _export(out_dir, sources, settings, overwrite=True)
                    st.session_state["_zip"] = (signature, zip_directory(out_dir))
                _problems(report)
            except Exception as exc:  # noqa: BLE001
                st.error(f"**ZIP export failed** — {plain(error_text(exc))}", icon=":material/error:")
        built = st.session_state.get("_zip")
        if built and built[0] == signature:
            st.download_button("Download ZIP", data=built[1], file_name="pfcam_export.zip", mime="application/zip",
                               key="download_zip", icon=":material/download:", type="primary", on_click="ignore")
        elif built:
            st.caption("The settings changed since the last ZIP; build it again.")
    with folder_col:
        folder = st.text_input("Sub-folder on the server", value="", key="export_dir", max_chars=64,
                               help="Exports go to the server's export folder (set by whoever runs the server), "
                                    "in this sub-folder: letters, digits, '.', '_' and '-' only.")
        st.caption("Folder: " + plain(f"<export folder>/{safe_sub(folder)}"))
        overwrite = st.checkbox("Overwrite existing files", value=False, key="export_overwrite")
        if st.button("Export to folder", key="export_folder", icon=":material/save:"):
            try:
                out_dir = export_folder(folder)
                report, reused = _export(out_dir, sources, settings, overwrite=overwrite)
                (st.success if report.ok else st.warning)(_summary(report, reused), icon=":material/check:")
                _problems(report)
            except Exception as exc:  # noqa: BLE001
                st.error(f"**Export failed** — {plain(error_text(exc))}", icon=":material/error:")
