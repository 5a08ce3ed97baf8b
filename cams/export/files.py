"""Writing an export folder safely: atomic files, per-image result records read back by re-runs, the output
folder check, the report and the manifests (``manifest.json`` / ``manifest.csv``)."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
from PIL import Image

from cams.export.inputs import inside
from pfnet.errors import PfnetError
from pfnet.version import __version__


MANIFEST_COLUMNS = ("image", "image_dir", "model", "layer", "method", "rank", "class_id", "class_name",
                    "probability", "overlay", "heatmap", "grid", "status")
MANIFEST_FORMAT = "pfcam-export/1"
STATE_FORMAT = "pfcam-export-state/1"


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
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
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


def write_png(path: Path, image: Image.Image) -> None:
    _atomic_write(path, lambda stream: image.save(stream, format="PNG", compress_level=1))


def write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda stream: np.save(stream, np.ascontiguousarray(array, dtype=np.float32),
                                               allow_pickle=False))


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def entry_key(layer: str, rank: int) -> str:
    return f"{layer}|{rank}"


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


def check_out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f"the output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
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


def versions() -> dict[str, str]:
    import PIL
    import timm
    import torch

    return {"pfcam": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def write_manifests(root: Path, report: ExportReport) -> None:
    """``manifest.json`` (``report.manifest``) and ``manifest.csv`` (``report.rows``, columns MANIFEST_COLUMNS)."""
    write_text(root / "manifest.json", json.dumps(report.manifest, indent=1, ensure_ascii=False, default=str,
                                                       allow_nan=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    write_text(root / "manifest.csv", buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` (an already encoded file) written atomically."""
    _atomic_write(path, lambda stream: stream.write(data))
