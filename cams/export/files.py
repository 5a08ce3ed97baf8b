"""Writing an export folder safely: atomic files, per-image result records read back by re-runs, the output
folder check, the report and the manifests (``manifest.json`` / ``manifest.csv``)."""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime, UTC
from pathlib import Path, PurePosixPath
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from cams.export.inputs import inside
from pfnet.errors import PfnetError
from pfnet.version import __version__


MANIFEST_COLUMNS = ("image", "image_dir", "model", "layer", "method", "target", "rank", "class_id", "class_name",
                    "probability", "overlay", "heatmap", "grid", "status")
MANIFEST_FORMAT = "pfcam-export/1"
STATE_FORMAT = "pfcam-export-state/1"
LOCK_NAME = ".manifest.lock"  # flock'd while the manifests are merged; never exported
TEMP_SUFFIX = ".tmp"
ORPHAN_AGE_S = 3600  # a temporary file without a live writer's pid is removed once this old
MAX_RUNS = 100  # the manifest's history of runs


class ExportError(PfnetError):
    """An export that cannot start (bad settings, an output folder that is not ours to write)."""


def ensure_dir(root: Path, *parts: str) -> Path:
    """``root/parts...`` created as real directories inside ``root`` (never through a symlink)."""
    folder = root
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part:
            raise ExportError(f"unsafe path component {part!r}")
        folder = folder / part
        if folder.is_symlink():
            raise ExportError(f"refusing to write through the symbolic link {folder}")
        folder.mkdir(exist_ok=True)
    if not inside(folder, root):
        raise ExportError(f"refusing to write outside {root}: {folder}")
    return folder


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder, then ``os.replace``: readers never see half a file."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda stream: np.save(stream, np.ascontiguousarray(array, dtype=np.float32),
                                               allow_pickle=False))


def json_text(value: Any, ensure_ascii: bool = False) -> str:
    """``value`` as JSON text a person can read and diff: one line per top-level key and one per element of a
    top-level list or dict (a manifest row, a record's entry), each encoded compactly. ``json.dumps(indent=...)``
    would take Python's pure-Python encoder, about 10x slower on a large manifest; this keeps the C one.
    NaN and infinity are refused (``allow_nan=False``); other objects are written as their ``str``."""
    dump = partial(json.dumps, ensure_ascii=ensure_ascii, allow_nan=False, default=str)
    if not isinstance(value, dict) or not value:
        return dump(value) + "\n"

    def nested(item: Any) -> str:
        if isinstance(item, list) and item:
            return "[\n  " + ",\n  ".join(map(dump, item)) + "\n ]"
        if isinstance(item, dict) and item:
            return "{\n  " + ",\n  ".join(f"{dump(str(key))}: {dump(inner)}" for key, inner in item.items()) + "\n }"
        return dump(item)

    return "{\n" + ",\n".join(f" {dump(str(key))}: {nested(item)}" for key, item in value.items()) + "\n}\n"


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def entry_key(layer: str, target: str) -> str:
    """An entry's key in an image's record: ``layer|<k>`` for the top-k target "top<k>" (the key records have
    always used), ``layer|class<id>`` for a fixed class."""
    return f"{layer}|{target[3:] if target.startswith('top') else target}"


def row_target(row: Mapping[str, Any]) -> str:
    """A row's target: "top<k>" or "class<id>" (rows written before fixed classes existed are top-k)."""
    target = row.get("target")
    return target if isinstance(target, str) and target else f"top{row.get('rank')}"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def read_state(path: Path) -> dict[str, Any] | None:
    """An earlier run's record for one image and model, or None if absent or unusable."""
    try:  # NaN and Infinity are not JSON: a record holding them is redone, never carried into the manifest
        state = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("entries"), dict):
        return None
    return state


def usable_entry(root: Path, entry: Any) -> bool:
    """An earlier run's entry that is well-formed and whose files are still there (inside ``root``)."""
    if not isinstance(entry, dict):
        return False
    types = {"layer": str, "rank": int, "class_id": int, "class_name": str, "probability": (int, float)}
    if any(not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool) for key, kind in types.items()):
        return False
    for key in ("overlay", "heatmap"):
        relative = entry.get(key)
        if not isinstance(relative, str) or not relative:
            return False
        path = root / relative
        if ".." in PurePosixPath(relative).parts or not inside(path, root) or not path.is_file():
            return False
    return True


_ERRNO_TEXT = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only", errno.ELOOP: "a symbolic link loop",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENOENT: "no such file or folder",
               errno.ENAMETOOLONG: "the name is too long", errno.EEXIST: "the path exists already",
               errno.EISDIR: "the path is a folder", errno.EIO: "an input/output error"}


def os_error_text(exc: BaseException, doing: str = "") -> str:
    """An OS error as one line for people: what failed, where, and why (no traceback)."""
    code = getattr(exc, "errno", None)
    why = _ERRNO_TEXT.get(code) or (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    if isinstance(exc, RuntimeError) and "loop" in str(exc).lower():
        why = "a symbolic link loop"
    elif code is None and " requested and " in str(exc) and " written" in str(exc):  # numpy's short write
        why = f"the disk is full ({exc})"
    where = getattr(exc, "filename", None)
    lead = f"{doing} failed" if doing else "failed"
    return f"{lead}: {why}" + (f" ({where})" if where else "")


def check_out_dir(out: Path) -> Path:
    """The output folder, created if needed, writable, and ours (no foreign manifest); else ``ExportError``."""
    try:
        if out.exists() and not out.is_dir():
            raise ExportError(f"the output path {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        root = out.resolve()
        with open(root / LOCK_NAME, "ab"):
            pass  # the folder can be written (read-only file systems and permissions fail here, before any work)
    except (OSError, RuntimeError) as exc:
        raise ExportError(os_error_text(exc, f"using the output folder {out}")) from exc
    for name in ("manifest.json", "manifest.csv"):
        path = root / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ExportError(f"{path} is not a regular file; refusing to replace it")
    existing = root / "manifest.json"
    if existing.is_file():
        try:
            ours = json.loads(existing.read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ExportError(f"{existing} exists and was not written by pfcam; choose another output folder")
    return root


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid is in a temporary file's name (``.NAME.PID.RANDOM.tmp``) still runs."""
    parts = name.split(".")
    pid = parts[-3] if len(parts) >= 4 else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_orphans(root: Path) -> list[str]:
    """Delete temporary files a killed run left in ``root`` (its writer is gone, or it is an hour old);
    return their relative paths. Files of a run still writing here are left alone."""
    removed: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not Path(folder, d).is_symlink()]
        for name in files:
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            path = Path(folder, name)
            try:
                old = path.lstat().st_mtime < datetime.now().timestamp() - ORPHAN_AGE_S
                if old or not _writer_alive(name):
                    path.unlink()
                    removed.append(path.relative_to(root).as_posix())
            except OSError:
                continue  # gone already (another run cleaned it) or not ours to remove
    return removed


def versions() -> dict[str, str]:
    import PIL
    import timm
    import torch

    return {"pfcam": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ExportReport:
    """What ``run_export`` did. Paths in ``rows``/``files`` are relative to ``out_dir`` (POSIX separators)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad or unsupported inputs, with the reason
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # files written by this run (manifests excluded)
    manifest: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None  # why the run stopped early (an OS error: disk full, permissions...); else None
    orphans: list[str] = field(default_factory=list)  # temporary files of a killed earlier run, removed

    @property
    def processed(self) -> int:
        """Images with at least one result (computed now or kept from an earlier run)."""
        return len({row["image_dir"] for row in self.rows})

    @property
    def ok(self) -> bool:
        return self.processed > 0

    @property
    def computed(self) -> int:
        return sum(row["status"] == "computed" for row in self.rows)

    @property
    def existing(self) -> int:
        return sum(row["status"] != "computed" for row in self.rows)

    @property
    def errors(self) -> list[str]:
        """Every problem as one line: skipped inputs, then warnings."""
        return [f"{item['input']}: {item['reason']}" for item in self.skipped] + list(self.warnings)

    @property
    def manifest_json(self) -> Path:
        return self.out_dir / "manifest.json"

    @property
    def manifest_csv(self) -> Path:
        return self.out_dir / "manifest.csv"


def row_key(row: Mapping[str, Any]) -> tuple:
    """One result slot of the folder: a later result for the same slot replaces the earlier row."""
    return (*(str(row.get(key)) for key in ("image_dir", "model", "layer", "method")), row_target(row))


def _row_files_present(root: Path, row: Mapping[str, Any]) -> bool:
    """The row's heatmap is on disk, and so is its overlay unless it has none (a heatmaps-only export)."""
    heatmap, overlay = row.get("heatmap"), row.get("overlay")
    if not isinstance(heatmap, str) or not heatmap or not (root / heatmap).is_file():
        return False
    return overlay in (None, "") or (isinstance(overlay, str) and (root / overlay).is_file())


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else {}


def merge_rows(root: Path, old_rows: list[Any], new_rows: list[dict[str, Any]],
               settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The folder's rows: earlier rows whose files are still there, each replaced in place by a newer result for
    its slot (:func:`row_key`), then new slots. New rows get ``settings`` unless they were kept from an earlier
    run with other settings ("stale"), which keep the settings their earlier row recorded."""
    previous = {row_key(row): {**row, "target": row_target(row)} for row in old_rows
                if isinstance(row, dict) and _row_files_present(root, row)}
    merged: dict[tuple, dict[str, Any]] = dict(previous)
    for row in new_rows:
        key = row_key(row)
        row = dict(row)
        earlier = previous.get(key)
        if row.get("status") == "stale":
            row["settings"] = earlier.get("settings") if earlier else None
        else:
            row["settings"] = dict(settings)
        merged[key] = row
    return [row for row in merged.values() if _row_files_present(root, row)]


def _merge_images(old: list[Any], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    images: dict[str, dict[str, Any]] = {}
    for image in [*old, *new]:
        if isinstance(image, dict):
            images[str(image.get("image_dir") or image.get("input"))] = image
    return list(images.values())


def merge_manifest(root: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one run's manifest (``rows``, ``images``, ``settings``, ...) into the folder's ``manifest.json`` /
    ``manifest.csv`` and return what was written. The manifest is the folder's index: every result whose files are
    there, each with its settings and status. Runs merge under an exclusive ``flock`` on ``root/.manifest.lock``,
    so concurrent exports into one folder (this process, others, other executors) all end up listed.
    """
    with open(root / LOCK_NAME, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = _read_manifest(root)
            settings = manifest.get("settings") or {}
            run = {key: manifest.get(key) for key in ("started_at", "finished_at", "settings", "stopped")}
            run["results"] = len(manifest.get("rows") or [])
            merged = {**manifest,
                      "rows": merge_rows(root, list(old.get("rows") or []), list(manifest.get("rows") or []),
                                         settings),
                      "images": _merge_images(list(old.get("images") or []), list(manifest.get("images") or [])),
                      "runs": [*list(old.get("runs") or [])[-(MAX_RUNS - 1):], run]}
            write_manifests(root, merged)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return merged


def write_manifests(root: Path, manifest: Mapping[str, Any]) -> None:
    """``manifest.json`` (``manifest``) and ``manifest.csv`` (its ``rows``, columns MANIFEST_COLUMNS), as they
    are; callers merging into a folder use :func:`merge_manifest`."""
    write_text(root / "manifest.json", json_text(manifest))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in manifest.get("rows") or []:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    write_text(root / "manifest.csv", buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` (an already encoded file) written atomically."""
    _atomic_write(path, lambda stream: stream.write(data))
