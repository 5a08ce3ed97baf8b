"""The export panel: "Download ZIP" and "Export to folder", both through ``cams.export.run_export`` so they write
exactly the layout and manifest of ``python -m cams export``."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import streamlit as st

from pfcam_app.core import Slot, Source, error_text

DEFAULT_DIR = "./cam_exports"


def _signature(sources: list[Source], slots: list[Slot], *settings: Any) -> str:
    """What the export would contain: a ZIP built for other settings is not offered for download."""
    parts = [s.digest + s.name for s in sources] + [s.id + s.key for s in slots] + [repr(x) for x in settings]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _export(out_dir: Path, sources: list[Source], slots: list[Slot], layers_by_family: dict[str, list[str]],
            method: str, target: tuple, mode: str, colormap: str, opacity: float, overwrite: bool,
            align: str = "model") -> Any:
    from cams.export import run_export

    bar = st.progress(0.0, text="Exporting…")

    def progress(done: int, total: int, message: str = "") -> None:
        bar.progress(min(1.0, done / total) if total else 0.0, text=message or f"{done} / {total}")

    families = {slot.entry.family for slot in slots}
    layers = {family: list(names) for family, names in layers_by_family.items() if family in families}
    report = run_export(
        sources=[(s.name, s.data) for s in sources if not s.refused], out_dir=out_dir,
        models={slot.id: (slot.model, slot.entry) for slot in slots}, layers=layers, method=method,
        topk=int(target[1]) if target[0] == "top" else 1, batch_size=8, mode=mode, colormap=colormap,
        opacity=opacity, overwrite=overwrite, progress=progress, align=align)
    bar.empty()
    return report


def _summary(report: Any) -> str:
    return (f"Exported {len(report.rows)} heatmaps of {report.processed} image(s) to `{report.out_dir}` "
            f"({report.computed} computed, {report.existing} kept from an earlier export); "
            f"manifest: `{report.manifest_json.name}`, `{report.manifest_csv.name}`.")


def _problems(report: Any) -> None:
    for problem in list(report.errors)[:20]:
        st.warning(problem, icon=":material/warning:")


def export_panel(sources: list[Source], slots: list[Slot], layers_by_family: dict[str, list[str]], method: str,
                 target: tuple, mode: str, colormap: str, opacity: float, align: str = "model") -> None:
    st.header("Export", anchor=False)
    try:
        from cams.export import zip_directory  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        st.warning(f"Export is unavailable: `cams.export` could not be loaded ({error_text(exc)}).")
        return
    if target[0] == "class":
        st.caption(f"Exports explain each image's predicted class (the export format has no fixed-class target); "
                   f"the class picked in the sidebar ('{target[1]}') applies to the page only.")
    st.caption("Both write the folder layout and `manifest.json` / `manifest.csv` of `python -m cams export`.")
    settings = (tuple(sorted((k, tuple(v)) for k, v in layers_by_family.items())), method, target, mode, colormap,
                round(opacity, 3), align)
    signature = _signature(sources, slots, *settings)
    zip_col, folder_col = st.columns(2, gap="large")
    with zip_col:
        st.markdown("**Download ZIP** of everything shown")
        if st.button("Build ZIP", key="build_zip", icon=":material/folder_zip:"):
            try:
                from cams.export import zip_directory

                with tempfile.TemporaryDirectory(prefix="pfcam_zip_") as tmp:
                    out_dir = Path(tmp) / "pfcam_export"
                    report = _export(out_dir, sources, slots, layers_by_family, method, target, mode, colormap,
                                     opacity, overwrite=True, align=align)
                    st.session_state["_zip"] = (signature, zip_directory(out_dir))
                _problems(report)
            except Exception as exc:  # noqa: BLE001
                st.error(f"**ZIP export failed** — {error_text(exc)}", icon=":material/error:")
        built = st.session_state.get("_zip")
        if built and built[0] == signature:
            st.download_button("Download ZIP", data=built[1], file_name="pfcam_export.zip", mime="application/zip",
                               key="download_zip", icon=":material/download:", type="primary", on_click="ignore")
        elif built:
            st.caption("The settings changed since the last ZIP; build it again.")
    with folder_col:
        folder = st.text_input("Folder on the server", value=DEFAULT_DIR, key="export_dir")
        overwrite = st.checkbox("Overwrite existing files", value=False, key="export_overwrite")
        if st.button("Export to folder", key="export_folder", icon=":material/save:"):
            try:
                out_dir = Path(folder).expanduser()
                report = _export(out_dir, sources, slots, layers_by_family, method, target, mode, colormap,
                                 opacity, overwrite=overwrite, align=align)
                (st.success if report.ok else st.warning)(_summary(report), icon=":material/check:")
                _problems(report)
            except Exception as exc:  # noqa: BLE001
                st.error(f"**Export failed** — {error_text(exc)}", icon=":material/error:")
