"""Batch export of CAM overlays, raw heatmaps, comparison grids and a manifest (CLI, app folder export and ZIP).

Folder layout written under ``OUT`` (every name component is sanitised: ASCII letters, digits, ``.``, ``_``
and ``-`` only, no leading dot, length-capped; nothing is ever written outside ``OUT``)::

    OUT/
      manifest.json                       the run: versions, settings, timestamps, images, rows, skipped inputs
      manifest.csv                        one row per image x model x layer x target rank (MANIFEST_COLUMNS)
      <stem>-<hash8>/                     one folder per input image
        grid__<method>__top<k>.png        rows = models, columns = layers, caption = class + probability
        <model>/
          <layer>__<method>__top<k>-<class>.png   overlay on the ORIGINAL image, at its size (EXIF-upright)
          <layer>__<method>__top<k>-<class>.npy   raw heatmap, float32 [S, S] in [0, 1] at the network's input
                                                  resolution S; it covers ``crop_box`` of the original image
          results__<method>.json          what was computed for this image and model (read by re-runs)

``<stem>`` is the input's file name without extension (for uploads, the last path component of the upload
name), ``<hash8>`` the first 8 hex digits of the SHA-256 of the source: the absolute path of a file, or
``upload:<name>:<sha256 of the bytes>`` of an upload. ``<k>`` is the target rank (1 = the top class),
``<class>`` the class name (``class<id>`` without names). ``--mode center`` heatmaps cover the central crop
only: the overlay dims the rest and outlines the crop.

Manifest rows: ``manifest.csv`` has exactly the columns ``MANIFEST_COLUMNS``::

    image, image_dir, model, layer, method, rank, class_id, class_name, probability, overlay, heatmap, grid, status

``image`` is the input as given (path or upload name), ``image_dir`` its folder, ``rank`` the target rank
(1 = top class), ``probability`` the softmax probability of ``class_id``, ``overlay``/``heatmap``/``grid`` paths
relative to ``OUT`` (POSIX separators), ``status`` ``computed`` (written by this run), ``existing`` (kept from an
earlier run) or ``stale`` (kept from an earlier run made with other mode/colormap/opacity/input size: pass
``overwrite=True`` to redo it). ``manifest.json["rows"]`` has the same keys plus ``crop_box`` ([left, top,
right, bottom] in the original's pixels) and ``input_size`` (S). ``manifest.json`` also holds ``format``,
``versions`` (pfcam, python, torch, timm, pillow, numpy), ``settings``, ``started_at``/``finished_at`` (UTC,
ISO 8601), ``columns``, ``images`` (every readable or bad input, with size or reason), ``skipped`` (bad and
unsupported inputs: ``input``, ``stage`` "scan" or "load", ``reason``) and ``warnings``. Text cells a
spreadsheet would run as a formula (starting with ``= + - @``) are prefixed with ``'`` in the CSV only.

Re-runs: an image whose outputs for a model (every requested layer and rank, this method) all exist is not
recomputed; existing files are never replaced unless ``overwrite`` (an image's grid is redrawn when it gains
new results). The manifests always describe the whole latest run (existing outputs included). Every file is written to a temporary name and moved into place
(``os.replace``), so no output is ever half-written.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from cams.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, has_image_extension, load_image
from cams.render import COLORMAPS, grid, overlay
from pfnet.errors import PfnetError

MANIFEST_COLUMNS = ("image", "image_dir", "model", "layer", "method", "rank", "class_id", "class_name",
                    "probability", "overlay", "heatmap", "grid", "status")
MANIFEST_FORMAT = "pfcam-export/1"
STATE_FORMAT = "pfcam-export-state/1"
DEFAULT_MODELS = ("r50", "r50_hybrid")
OFFLINE_HINT = "hint: `--models demo_r50,demo_r50_hybrid` works offline (bundled demo models)"
STEM_CHARS = 48
CLASS_CHARS = 40
GRID_CELL = 224

Progress = Callable[[int, int, str], None]
UploadSource = tuple[str, bytes]

__all__ = ["MANIFEST_COLUMNS", "ExportError", "ExportReport", "InputItem", "collect_inputs", "safe_name",
           "run_export", "zip_directory", "load_models", "add_export_parser", "export_command"]


class ExportError(PfnetError):
    """An export that cannot start (bad settings, an output folder that is not ours to write)."""


# ------------------------------------------------------------------------------------------------ names
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_name(text: object, max_len: int = 64, fallback: str = "x") -> str:
    """One path component from arbitrary text: ASCII ``[A-Za-z0-9._-]``, no leading dot, no ``..``, capped."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"_+", "_", _UNSAFE.sub("_", ascii_text)).strip("._-")
    name = name[:max_len].rstrip("._-")
    if not name:
        return fallback
    if name.split(".")[0].upper() in _RESERVED:
        name = "_" + name
    return name


def _printable(text: str) -> str:
    """A label safe for JSON/CSV: undecodable bytes replaced, control characters escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _short_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class InputItem:
    """One image to export: a file or an upload."""

    label: str  # what the manifest calls it: the path as given, or the upload name
    key: str  # what the folder hash is taken from
    stem: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    @property
    def folder(self) -> str:
        return f"{safe_name(self.stem, STEM_CHARS, 'image')}-{_short_hash(self.key)}"

    def load(self) -> Image.Image:
        return load_image(self.path if self.data is None else self.data, name=self.label)


def _upload_item(name: object, data: object) -> InputItem:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"an upload must be (name, bytes); got ({type(name).__name__}, {type(data).__name__})")
    data = bytes(data)
    label = _printable(str(name))
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem = PurePosixPath(base).stem if base not in ("", ".", "..") else ""
    key = f"upload:{name}:{hashlib.sha256(data).hexdigest()}"
    return InputItem(label, key, stem, None, data)


def _inside(path: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def collect_inputs(sources: Iterable[str | os.PathLike | UploadSource],
                   exclude: Path | None = None) -> tuple[list[InputItem], list[dict[str, str]]]:
    """Expand files, folders (recursively, sorted) and uploads into images; list everything else as skipped.

    Files and folders keep the order given; a folder's images come in sorted path order. Files under
    ``exclude`` (the output folder) are ignored. Duplicates (same file, same upload) are listed once.
    """
    items: list[InputItem] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    root = exclude.resolve() if exclude is not None else None

    def add(item: InputItem) -> None:
        if item.key not in seen:
            seen.add(item.key)
            items.append(item)

    def add_file(path: Path) -> None:
        label = _printable(str(path))
        if not has_image_extension(path):
            skipped.append({"input": label, "stage": "scan",
                            "reason": f"not a supported image type ({path.suffix.lower() or 'no extension'})"})
            return
        add(InputItem(label, str(path.resolve()), path.stem, path))

    for source in sources:
        if isinstance(source, tuple):
            add(_upload_item(*source))
            continue
        path = Path(source)
        if path.is_dir():
            if _inside(path, root):
                skipped.append({"input": _printable(str(path)), "stage": "scan", "reason": "inside the output folder"})
                continue
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not _inside(Path(folder, d), root))
                for name in sorted(files):
                    add_file(Path(folder, name))
        elif path.is_file():
            if not _inside(path, root):
                add_file(path)
        elif path.exists() or path.is_symlink():
            skipped.append({"input": _printable(str(path)), "stage": "scan", "reason": "not a regular file"})
        else:
            skipped.append({"input": _printable(str(path)), "stage": "scan", "reason": "no such file or folder"})
    return items, skipped


# ------------------------------------------------------------------------------------------------ safe writing
def _ensure_dir(root: Path, *parts: str) -> Path:
    """``root/parts...`` created as real directories inside ``root`` (never through a symlink)."""
    folder = root
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part:
            raise ExportError(f"unsafe path component {part!r}")
        folder = folder / part
        if folder.is_symlink():
            raise ExportError(f"refusing to write through the symbolic link {folder}")
        folder.mkdir(exist_ok=True)
    if not _inside(folder, root):
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


def _write_png(path: Path, image: Image.Image) -> None:
    _atomic_write(path, lambda stream: image.save(stream, format="PNG", compress_level=1))


def _write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda stream: np.save(stream, np.ascontiguousarray(array, dtype=np.float32),
                                               allow_pickle=False))


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# ------------------------------------------------------------------------------------------------ report
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


# ------------------------------------------------------------------------------------------------ per-model plan
@dataclass
class _Plan:
    id: str
    folder: str
    label: str
    model: Any
    entry: Any
    layers: list[str]
    class_names: list[str] | None
    topk: int

    @property
    def input_size(self) -> int:
        return int(self.entry.preprocess.input_size)


def _requested_layers(layers: Any, model_id: str, family: str | None) -> Sequence[str] | None:
    if layers is None or isinstance(layers, str):
        return None if layers is None else [name.strip() for name in layers.split(",") if name.strip()]
    if isinstance(layers, Mapping):  # keyed by model id or by family ("resnet", "vit", "pit")
        chosen = layers.get(model_id, layers.get(family) if family else None)
        return None if chosen is None else list(chosen)
    return list(layers)


def _plans(models: Mapping[str, tuple[Any, Any]], layers: Any, topk: int, warn: Callable[[str], None]) -> list[_Plan]:
    from cams.layers import LayerError, default_layers, family_of, layer_names

    plans: list[_Plan] = []
    folders: set[str] = set()
    for model_id, pair in models.items():
        model, entry = pair
        label = getattr(entry, "name", None) or model_id
        try:
            family = family_of(model)
            valid = layer_names(model)
            wanted = _requested_layers(layers, model_id, family)
            wanted = list(default_layers(model)) if wanted is None else wanted
        except LayerError as exc:
            warn(f"{model_id}: skipped ({exc})")
            continue
        chosen: list[str] = []
        for name in wanted:
            if name not in valid:
                shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
                warn(f"{model_id}: has no layer {name!r}; skipped for this model (valid layers: {shown})")
            elif name not in chosen:
                chosen.append(name)
        if not chosen:
            warn(f"{model_id}: none of the requested layers exists; model skipped")
            continue
        try:
            class_names = list(entry.class_names())
        except Exception:  # noqa: BLE001 - names are a nicety; ids still work
            class_names = None
        classes = getattr(model, "num_classes", None) or (len(class_names) if class_names else None)
        k = topk
        if isinstance(classes, int) and k > classes:
            warn(f"{model_id}: top-{topk} asked of a model with {classes} classes; using top-{classes}")
            k = classes
        folder = safe_name(model_id, 64, "model")
        if folder in folders:
            folder = f"{folder}-{_short_hash(model_id)}"
        folders.add(folder)
        plans.append(_Plan(model_id, folder, str(label), model, entry, chosen, class_names, k))
    return plans


# ------------------------------------------------------------------------------------------------ per-image state
def _key(layer: str, rank: int) -> str:
    return f"{layer}|{rank}"


def _read_state(path: Path) -> dict[str, Any] | None:
    """An earlier run's record for one image and model, or None if absent or unusable."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("entries"), dict):
        return None
    return state


def _usable(root: Path, entry: Any) -> bool:
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
        if ".." in PurePosixPath(relative).parts or not _inside(path, root) or not path.is_file():
            return False
    return True


# ------------------------------------------------------------------------------------------------ versions
def _pfcam_version() -> str:
    try:
        from importlib.metadata import version

        return version("pfcam")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    for module in ("cams", "pfnet"):
        value = getattr(sys.modules.get(module), "__version__", None)
        if value:
            return str(value)
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = head.parent / ref[5:]
            commit = ref_path.read_text().strip() if ref_path.is_file() else ""
            if not commit:
                packed = (head.parent / "packed-refs").read_text()
                commit = next((line.split()[0] for line in packed.splitlines() if line.endswith(" " + ref[5:])), "")
        else:
            commit = ref
        return f"0+git.{commit[:10]}" if commit else "unknown"
    except (OSError, StopIteration):
        return "unknown"


def _versions() -> dict[str, str]:
    import PIL
    import timm
    import torch

    return {"pfcam": _pfcam_version(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ run
def _validate(method: str, topk: int, batch_size: int, mode: str, colormap: str, opacity: float) -> None:
    from cams.engine import METHODS
    from pfnet.preprocess import MODES

    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ExportError(f"topk must be a positive integer, got {topk!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mode not in MODES:
        raise ExportError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if colormap not in COLORMAPS:
        raise ExportError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ExportError(f"opacity must be between 0 and 1, got {opacity}")


def _check_out_dir(out: Path) -> Path:
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


class _Run:
    """One export run: holds the settings and accumulates the report."""

    def __init__(self, root: Path, plans: list[_Plan], method: str, mode: str, colormap: str, opacity: float,
                 overwrite: bool, batch_size: int, cell_size: int, report: ExportReport):
        self.root, self.plans, self.method, self.mode = root, plans, method, mode
        self.colormap, self.opacity, self.overwrite = colormap, float(opacity), overwrite
        self.batch_size, self.cell_size, self.report = batch_size, cell_size, report
        self.stale_count = 0

    def settings_for(self, plan: _Plan) -> dict[str, Any]:
        return {"mode": self.mode, "colormap": self.colormap, "opacity": round(self.opacity, 4),
                "input_size": plan.input_size}

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -------------------------------------------------------------------------------------------- one batch
    def process(self, batch: list[tuple[InputItem, Image.Image, dict[str, Any]]]) -> None:
        from cams.engine import explain
        from pfnet.preprocess import crop_box_for, prepare_batch

        # cells[(image index, model id, layer, rank)] = (thumbnail or None, caption, computed now?)
        cells: dict[tuple[int, str, str, int], tuple[Image.Image | None, str, bool]] = {}
        rows: dict[int, list[dict[str, Any]]] = {index: [] for index in range(len(batch))}
        for plan in self.plans:
            states: list[dict[str, Any]] = []
            need: list[int] = []
            for index, (item, image, _) in enumerate(batch):
                folder = _ensure_dir(self.root, item.folder, plan.folder)
                state = _read_state(folder / f"results__{safe_name(self.method)}.json") or {}
                entries = state.get("entries", {}) if state else {}
                done = all(_usable(self.root, entries.get(_key(layer, rank)))
                           for layer in plan.layers for rank in range(1, plan.topk + 1))
                states.append(state)
                if self.overwrite or not done:
                    need.append(index)
            explanation = None
            if need:
                images = [batch[index][1] for index in need]
                tensor, boxes = prepare_batch(images, plan.entry.preprocess, self.mode)
                try:
                    explanation = explain(plan.model, tensor, plan.layers, self.method, targets=plan.topk,
                                          class_names=plan.class_names, batch_size=self.batch_size)
                except (PfnetError, ValueError, RuntimeError) as exc:
                    names = ", ".join(batch[index][0].label for index in need)
                    self.report.warnings.append(f"{plan.id}: explaining failed for {names}: {exc}")
                    need = []
            for index, (item, image, info) in enumerate(batch):
                position = need.index(index) if index in need else None
                box = crop_box_for(image.size, plan.entry.preprocess, self.mode)
                state = self._update(plan, item, image, box, states[index], explanation, position)
                for layer in plan.layers:
                    for rank in range(1, plan.topk + 1):
                        entry = state.get("entries", {}).get(_key(layer, rank))
                        if entry is None:
                            continue
                        rows[index].append(self._row(item, plan, entry))
                        cells[(index, plan.id, layer, rank)] = (entry.pop("_thumb", None),
                                                                f"{entry['class_name']}\n{entry['probability']:.1%}",
                                                                entry.get("_status") == "computed")
        for index, (item, image, info) in enumerate(batch):
            grids = self._grids(index, item, cells)
            info["grids"] = grids
            for row in rows[index]:
                row["grid"] = grids.get(row["rank"], "")
            self.report.rows.extend(rows[index])

    def _update(self, plan: _Plan, item: InputItem, image: Image.Image, box, state: dict[str, Any], explanation,
                position: int | None) -> dict[str, Any]:
        """Write what this image and model still need; return the merged state (entries get ``_status``)."""
        settings = self.settings_for(plan)
        old_entries = state.get("entries", {}) if isinstance(state.get("entries"), dict) else {}
        folder = self.root / item.folder / plan.folder
        entries: dict[str, Any] = {}
        changed = False
        for layer_index, layer in enumerate(plan.layers):
            for rank in range(1, plan.topk + 1):
                key = _key(layer, rank)
                old = old_entries.get(key)
                old_ok = _usable(self.root, old)
                if old_ok and not self.overwrite:
                    kept = dict(old)
                    kept["_status"] = "existing" if (old.get("settings") or state.get("settings")) == settings \
                        else "stale"
                    self.stale_count += kept["_status"] == "stale"
                    entries[key] = kept
                    continue
                if explanation is None or position is None:
                    continue  # not computed (explain failed): no row
                class_id = int(explanation.targets[position, rank - 1])
                names = plan.class_names
                class_name = names[class_id] if names and 0 <= class_id < len(names) else f"class{class_id}"
                probability = float(explanation.probs[position, class_id])
                stem = (f"{safe_name(layer)}__{safe_name(self.method)}__top{rank}-"
                        f"{safe_name(class_name, CLASS_CHARS, f'class{class_id}')}")
                png, npy = folder / f"{stem}.png", folder / f"{stem}.npy"
                heat = explanation.heatmaps[position, rank - 1, layer_index].numpy()
                picture = overlay(image, heat, box, self.colormap, self.opacity)
                for path, write, value in ((png, _write_png, picture), (npy, _write_npy, heat)):
                    if self.overwrite or not path.exists():
                        write(path, value)
                        self.report.files.append(self.rel(path))
                if self.overwrite and isinstance(old, dict):  # a different class name leaves an old file behind
                    for name in ("overlay", "heatmap"):
                        previous = old.get(name)
                        if isinstance(previous, str) and previous not in (self.rel(png), self.rel(npy)):
                            target = self.root / previous
                            if _inside(target, self.root) and target.is_file() and target.parent == folder.resolve():
                                target.unlink()
                thumb = picture.copy()
                thumb.thumbnail((self.cell_size, self.cell_size), Image.Resampling.LANCZOS, reducing_gap=None)
                entries[key] = {"layer": layer, "rank": rank, "class_id": class_id, "class_name": class_name,
                                "probability": probability, "overlay": self.rel(png), "heatmap": self.rel(npy),
                                "crop_box": [round(float(v), 4) for v in box], "input_size": plan.input_size,
                                "settings": settings, "_status": "computed", "_thumb": thumb}
                changed = True
        if changed:
            kept_extra = {key: value for key, value in old_entries.items()
                          if key not in entries and isinstance(value, dict)}
            record = {"format": STATE_FORMAT, "image": item.label, "model": plan.id, "method": self.method,
                      "settings": settings, "size": list(image.size), "updated_at": _now(),
                      "entries": {key: {k: v for k, v in value.items() if not k.startswith("_")}
                                  for key, value in {**kept_extra, **entries}.items()}}
            path = folder / f"results__{safe_name(self.method)}.json"
            _write_text(path, json.dumps(record, indent=1, ensure_ascii=True))
            self.report.files.append(self.rel(path))
        return {"entries": entries}

    def _row(self, item: InputItem, plan: _Plan, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"image": item.label, "image_dir": item.folder, "model": plan.id, "layer": entry["layer"],
                "method": self.method, "rank": int(entry["rank"]), "class_id": int(entry["class_id"]),
                "class_name": str(entry["class_name"]), "probability": round(float(entry["probability"]), 6),
                "overlay": entry["overlay"], "heatmap": entry["heatmap"], "grid": "",
                "status": entry.get("_status", "existing"),
                "crop_box": entry.get("crop_box"), "input_size": entry.get("input_size")}

    def _grids(self, index: int, item: InputItem, cells) -> dict[int, str]:
        """Write (when new results or missing) one grid per rank; return rank -> relative path."""
        columns: list[str] = []
        for plan in self.plans:
            columns.extend(layer for layer in plan.layers if layer not in columns)
        ranks = max(plan.topk for plan in self.plans)
        written: dict[int, str] = {}
        for rank in range(1, ranks + 1):
            mine = {key: value for key, value in cells.items() if key[0] == index and key[3] == rank}
            if not mine:
                continue
            path = self.root / item.folder / f"grid__{safe_name(self.method)}__top{rank}.png"
            fresh = any(value[2] for value in mine.values())
            if path.exists() and not fresh and not self.overwrite:
                written[rank] = self.rel(path)
                continue
            pictures, captions = [], []
            for plan in self.plans:
                row_pictures, row_captions = [], []
                for layer in columns:
                    cell = mine.get((index, plan.id, layer, rank))
                    picture = None if cell is None else cell[0]
                    if cell is not None and picture is None:  # kept from an earlier run: read it back
                        picture = self._thumb_from_disk(item, plan, layer, rank)
                    row_pictures.append(picture)
                    row_captions.append("" if cell is None else cell[1])
                pictures.append(row_pictures)
                captions.append(row_captions)
            sheet = grid(pictures, [plan.label for plan in self.plans], columns, captions, cell_size=self.cell_size)
            _write_png(path, sheet)
            self.report.files.append(self.rel(path))
            written[rank] = self.rel(path)
        return written

    def _thumb_from_disk(self, item: InputItem, plan: _Plan, layer: str, rank: int) -> Image.Image | None:
        state = _read_state(self.root / item.folder / plan.folder / f"results__{safe_name(self.method)}.json")
        entry = (state or {}).get("entries", {}).get(_key(layer, rank))
        if not _usable(self.root, entry):
            return None
        try:
            picture = load_image(self.root / entry["overlay"])
        except ImageError:
            return None
        picture.thumbnail((self.cell_size, self.cell_size), Image.Resampling.LANCZOS, reducing_gap=None)
        return picture


def run_export(sources: Iterable[str | os.PathLike | UploadSource], out_dir: str | os.PathLike,
               models: Mapping[str, tuple[Any, Any]], layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
               method: str = "gradcam", topk: int = 1, batch_size: int = 8, mode: str = "full",
               colormap: str = "jet", opacity: float = 0.5, overwrite: bool = False,
               progress: Progress | None = None, *, cell_size: int = GRID_CELL, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, extra_settings: Mapping[str, Any] | None = None) -> ExportReport:
    """Explain every image with every model and write the layout described in this module's docstring.

    ``sources``: file paths, folder paths (searched recursively) and ``(name, bytes)`` uploads.
    ``models``: model id -> (eval-mode model, zoo entry); the entry gives ``preprocess``, ``class_names()`` and
    ``name``. ``layers``: None (each model's ``cams.layers.default_layers``), a list for every model, or a dict
    keyed by model id or family (``"resnet"``, ``"vit"``, ``"pit"``); a layer a model lacks is reported and
    skipped for that model. Images go through ``batch_size`` at a time, one ``cams.explain`` call per batch and
    model (all layers and top-``topk`` targets at once). ``progress(done, total, message)`` counts image x model
    steps. Bad inputs are recorded (``report.skipped``) and the run goes on; check ``report.ok``.
    Raises ``ExportError`` for bad settings or an output folder that cannot be used.
    """
    _validate(method, topk, batch_size, mode, colormap, opacity)
    started = _now()
    root = _check_out_dir(Path(out_dir))
    report = ExportReport(out_dir=root)
    items, scan_skipped = collect_inputs(sources, exclude=root)
    report.skipped.extend(scan_skipped)
    plans = _plans(models, layers, topk, report.warnings.append)
    if not models:
        report.warnings.append("no model to run")
    run = _Run(root, plans, method, mode, colormap, opacity, overwrite, batch_size, cell_size, report)
    per_image = max(1, len(plans))
    total = len(items) * per_image
    done = 0

    def tick(step: int, message: str) -> None:
        nonlocal done
        done += step
        if progress is not None:
            progress(done, total, message)

    if progress is not None:
        progress(0, total, "starting")
    batch: list[tuple[InputItem, Image.Image, dict[str, Any]]] = []

    def flush() -> None:
        if not batch:
            return
        if plans:
            run.process(batch)
        tick(len(batch) * per_image, f"{len(report.images)} / {len(items)} images: {batch[-1][0].label}")
        batch.clear()

    for item in items:
        info: dict[str, Any] = {"input": item.label, "image_dir": None, "status": "bad"}
        report.images.append(info)
        try:
            image = load_image(item.path if item.data is None else item.data, name=item.label,
                               max_bytes=max_bytes, max_pixels=max_pixels)
        except ImageError as exc:
            info["reason"] = exc.reason
            report.skipped.append({"input": item.label, "stage": "load", "reason": exc.reason})
            tick(per_image, f"skipped {item.label}: {exc.reason}")
            continue
        info.update({"image_dir": item.folder, "status": "ok", "width": image.width, "height": image.height})
        batch.append((item, image, info))
        if len(batch) >= batch_size:
            flush()
    flush()
    if run.stale_count:
        report.warnings.append(f"{run.stale_count} outputs were made earlier with other settings and were kept; "
                               f"pass --overwrite (overwrite=True) to redo them")
    if not items:
        report.warnings.append("no images found in the inputs")

    settings = {"models": {plan.id: {"name": plan.label, "layers": plan.layers, "input_size": plan.input_size,
                                     "topk": plan.topk} for plan in plans},
                "method": method, "topk": topk, "batch_size": batch_size, "mode": mode, "colormap": colormap,
                "opacity": float(opacity), "overwrite": bool(overwrite),
                "heatmap_npy": "float32 [S, S] in [0, 1] at the network input resolution S, covering crop_box "
                               "(left, top, right, bottom) of the original image in its pixels",
                **dict(extra_settings or {})}
    report.manifest = {"format": MANIFEST_FORMAT, "versions": _versions(), "settings": settings,
                       "started_at": started, "finished_at": _now(), "columns": list(MANIFEST_COLUMNS),
                       "images": report.images, "rows": report.rows, "skipped": report.skipped,
                       "warnings": report.warnings}
    _write_text(root / "manifest.json", json.dumps(report.manifest, indent=1, ensure_ascii=False, default=str))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    _write_text(root / "manifest.csv", buffer.getvalue())
    return report


# ------------------------------------------------------------------------------------------------ ZIP
def zip_directory(directory: str | os.PathLike) -> bytes:
    """The folder's regular files (sorted, relative POSIX names; symlinks and temp files left out) as a ZIP."""
    root = Path(directory)
    if not root.is_dir():
        raise ExportError(f"{root} is not a folder")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not Path(folder, d).is_symlink())
            for name in sorted(files):
                path = Path(folder, name)
                if path.is_symlink() or not path.is_file() or (name.startswith(".") and name.endswith(".tmp")):
                    continue
                archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ CLI
def load_models(model_ids: Sequence[str], weights: Mapping[str, str] | None = None, device: str | None = None,
                log: Callable[[str], None] = print,
                loader: Callable[..., Any] | None = None) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Load each zoo model (``pfnet.load``, with a local checkpoint where ``weights`` names one).

    A model that cannot be loaded is reported through ``log`` and left out. Returns the loaded models and
    the ids whose weights were unavailable (not cached, no network).
    """
    from pfnet import zoo
    from pfnet.errors import CheckpointError, UnknownModelError, WeightsUnavailableError

    if loader is None:
        from pfnet.weights import load as loader
    weights = dict(weights or {})
    loaded: dict[str, tuple[Any, Any]] = {}
    unavailable: list[str] = []
    for model_id in model_ids:
        try:
            entry = zoo.get(model_id)
        except UnknownModelError as exc:
            log(f"skipping {model_id}: {exc}")
            continue
        path = weights.get(model_id)
        try:
            model = loader(model_id, weights=path, device=device)
        except WeightsUnavailableError as exc:
            log(f"skipping {model_id}: {exc}")
            unavailable.append(model_id)
            continue
        except (CheckpointError, PfnetError, OSError) as exc:
            log(f"skipping {model_id}: {exc}")
            continue
        loaded[model_id] = (model, entry)
    return loaded, unavailable


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _weights_pair(text: str) -> tuple[str, str]:
    model_id, sep, path = text.partition("=")
    if not sep or not model_id.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH, got {text!r}")
    return model_id.strip(), path.strip()


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``export`` on an ``argparse`` subparsers object (``python -m cams export``)."""
    parser = subparsers.add_parser(
        "export", help="write CAM overlays, heatmaps, grids and a manifest for images",
        description="Explain images with one or more models and write overlays (PNG), raw heatmaps (.npy), "
                    "a grid per image and manifest.json/manifest.csv. Without network, use the bundled demo "
                    "models (--models demo_r50,demo_r50_hybrid) or --weights MODEL=PATH.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--models", type=_split, default=",".join(DEFAULT_MODELS),
                        help="comma-separated zoo ids (default: %(default)s; offline: demo_r50,demo_r50_hybrid)")
    parser.add_argument("--layers", type=_split, default=None,
                        help="comma-separated layer names (default: each model's default layers)")
    from cams.engine import METHODS

    parser.add_argument("--method", choices=list(METHODS), default="gradcam", help="CAM method (default: %(default)s)")
    parser.add_argument("--topk", type=_positive, default=1, help="explain the top-k classes (default: 1)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: $PFCAM_DEVICE, else cuda if available")
    parser.add_argument("--weights", type=_weights_pair, action="append", default=[], metavar="MODEL=PATH",
                        help="use a local checkpoint file for MODEL (repeatable)")
    parser.add_argument("--mode", choices=("full", "center"), default="full",
                        help="full: whole image squashed to the input size; center: ImageNet resize + centre crop")
    parser.add_argument("--colormap", choices=list(COLORMAPS), default="jet", help="default: %(default)s")
    parser.add_argument("--opacity", type=_probability, default=0.5,
                        help="heatmap opacity in the overlays, 0..1 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace existing outputs")
    parser.set_defaults(handler=export_command)
    return parser


def export_command(args: argparse.Namespace) -> int:
    """``python -m cams export``: load the models, run the export with a progress bar, print a summary."""
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    model_ids = list(dict.fromkeys(args.models))
    weights = dict(args.weights)
    for model_id in weights:
        if model_id not in model_ids:
            log(f"warning: --weights given for {model_id}, which is not in --models; ignored")
    for model_id, path in weights.items():
        if model_id in model_ids and not Path(path).is_file():
            log(f"warning: --weights {model_id}={path}: no such file")
    models, unavailable = load_models(model_ids, weights, args.device, log)
    from pfnet.zoo import DEMO_IDS

    if any(model_id not in DEMO_IDS for model_id in unavailable):
        log(OFFLINE_HINT)
    if not models:
        log("nothing could be processed: no model could be loaded")
        return 1
    from tqdm import tqdm

    with tqdm(total=0, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        def progress(done: int, total: int, message: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(message[:60], refresh=False)
            bar.refresh()

        try:
            report = run_export(args.inputs, args.out, models, layers=args.layers, method=args.method,
                                topk=args.topk, batch_size=args.batch_size, mode=args.mode, colormap=args.colormap,
                                opacity=args.opacity, overwrite=args.overwrite, progress=progress,
                                extra_settings={"weights": weights, "device": args.device})
        except ExportError as exc:
            log(f"error: {exc}")
            return 2
    for warning in report.warnings:
        log(f"warning: {warning}")
    for item in report.skipped:
        log(f"skipped {item['input']}: {item['reason']}")
    images = sum(1 for info in report.images if info["status"] == "ok")
    print(f"{report.processed} of {len(report.images)} images processed ({images} readable): "
          f"{report.computed} results computed, {report.existing} kept from earlier runs, "
          f"{len(report.skipped)} inputs skipped -> {report.out_dir}")
    if not report.ok:
        log("nothing could be processed")
        return 1
    return 0
