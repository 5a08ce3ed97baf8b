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
earlier run) or ``stale`` (kept from an earlier run made with other mode/colormap/opacity/input size/heatmap
alignment: the files on disk are the earlier ones; pass ``overwrite=True`` to redo them).
``manifest.json["rows"]`` has the same keys plus ``crop_box`` ([left, top,
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
import io
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image

# Inputs and names, safe writing and manifests, and the per-batch work live in cams/export_inputs.py,
# cams/export_files.py and cams/export_run.py; re-exported here.
from cams.align import ALIGN_MODES
from cams.export_files import (MANIFEST_COLUMNS, MANIFEST_FORMAT, STATE_FORMAT, ExportError,  # noqa: F401
                               ExportReport, _check_out_dir, _now, _versions, _write_manifests)
from cams.export_inputs import STEM_CHARS, InputItem, UploadSource, collect_inputs, safe_name  # noqa: F401
from cams.export_run import CLASS_CHARS, Reuse, _plans, _Run  # noqa: F401
from cams.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, load_image
from cams.render import COLORMAPS
from pfnet.errors import PfnetError


DEFAULT_MODELS = ("r50", "r50_hybrid")
OFFLINE_HINT = "hint: `--models demo_r50,demo_r50_hybrid` works offline (bundled demo models)"
GRID_CELL = 224

Progress = Callable[[int, int, str], None]

__all__ = ["MANIFEST_COLUMNS", "ExportError", "ExportReport", "InputItem", "collect_inputs", "safe_name",
           "run_export", "zip_directory", "load_models", "add_export_parser", "export_command"]


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


def run_export(sources: Iterable[str | os.PathLike | UploadSource], out_dir: str | os.PathLike,
               models: Mapping[str, tuple[Any, Any]], layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
               method: str = "gradcam", topk: int = 1, batch_size: int = 8, mode: str = "full",
               colormap: str = "jet", opacity: float = 0.5, overwrite: bool = False,
               progress: Progress | None = None, *, cell_size: int = GRID_CELL, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, extra_settings: Mapping[str, Any] | None = None,
               align: str = "model", reuse: Reuse | None = None) -> ExportReport:
    """Explain every image with every model and write the layout described in this module's docstring.

    ``sources``: file paths, folder paths (searched recursively) and ``(name, bytes)`` uploads.
    ``models``: model id -> (eval-mode model, zoo entry); the entry gives ``preprocess``, ``class_names()`` and
    ``name``. ``layers``: None (each model's ``cams.layers.default_layers``), a list for every model, or a dict
    keyed by model id or family (``"resnet"``, ``"vit"``, ``"pit"``); a layer a model lacks is reported and
    skipped for that model. Images go through ``batch_size`` at a time, one ``cams.explain`` call per batch and
    model (all layers and top-``topk`` targets at once). ``progress(done, total, message)`` counts image x model
    steps, once per image. Bad inputs are recorded (``report.skipped``) and the run goes on; check ``report.ok``.
    ``align``: "model" (each model's recorded heatmap offsets, :mod:`cams.align`) or "none" (the plain resize).
    ``reuse(model_id, item, image)``: an ``Explanation`` of that one image already computed with these settings
    (the app passes the CAMs on its page), or None; only the images it has none for are explained.
    Raises ``ExportError`` for bad settings or an output folder that cannot be used.
    """
    _validate(method, topk, batch_size, mode, colormap, opacity)
    if align not in ALIGN_MODES:
        raise ExportError(f"align must be one of {', '.join(ALIGN_MODES)}; got {align!r}")
    started = _now()
    root = _check_out_dir(Path(out_dir))
    report = ExportReport(out_dir=root)
    items, scan_skipped = collect_inputs(sources, exclude=root)
    report.skipped.extend(scan_skipped)
    plans = _plans(models, layers, topk, report.warnings.append, align)
    if not models:
        report.warnings.append("no model to run")
    run = _Run(root, plans, method, mode, colormap, opacity, overwrite, batch_size, cell_size, report, reuse)
    per_image = max(1, len(plans))
    total = len(items) * per_image
    done = finished = 0

    def tick(label: str) -> None:
        """One image done (or skipped): ``per_image`` steps."""
        nonlocal done, finished
        done, finished = done + per_image, finished + 1
        if progress is not None:
            progress(done, total, f"{finished} / {len(items)} images: {label}")

    if progress is not None:
        progress(0, total, "starting")
    batch: list[tuple[InputItem, Image.Image, dict[str, Any]]] = []

    def flush() -> None:
        if not batch:
            return
        if plans:
            run.process(batch)
        for item, _, _ in batch:
            tick(item.label)
        batch.clear()

    try:
        for item in items:
            info: dict[str, Any] = {"input": item.label, "image_dir": None, "status": "bad"}
            report.images.append(info)
            try:
                image = load_image(item.path if item.data is None else item.data, name=item.label,
                                   max_bytes=max_bytes, max_pixels=max_pixels)
            except ImageError as exc:
                info["reason"] = exc.reason
                report.skipped.append({"input": item.label, "stage": "load", "reason": exc.reason})
                tick(f"skipped {item.label}: {exc.reason}")
                continue
            info.update({"image_dir": item.folder, "status": "ok", "width": image.width, "height": image.height})
            batch.append((item, image, info))
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        run.finish()  # every queued file is on disk before the manifests name it
    if run.stale_count:
        report.warnings.append(f"{run.stale_count} outputs were made earlier with other settings and were kept; "
                               f"pass --overwrite (overwrite=True) to redo them")
    if not items:
        report.warnings.append("no images found in the inputs")

    settings = {"models": {plan.id: {"name": plan.label, "layers": plan.layers, "input_size": plan.input_size,
                                     "topk": plan.topk, "cam_offsets": plan.cam_offsets} for plan in plans},
                "method": method, "topk": topk, "batch_size": batch_size, "mode": mode, "colormap": colormap,
                "align": align,
                "opacity": float(opacity), "overwrite": bool(overwrite),
                "heatmap_npy": "float32 [S, S] in [0, 1] at the network input resolution S, covering crop_box "
                               "(left, top, right, bottom) of the original image in its pixels",
                **dict(extra_settings or {})}
    report.manifest = {"format": MANIFEST_FORMAT, "versions": _versions(), "settings": settings,
                       "started_at": started, "finished_at": _now(), "columns": list(MANIFEST_COLUMNS),
                       "images": report.images, "rows": report.rows, "skipped": report.skipped,
                       "warnings": report.warnings}
    _write_manifests(root, report)
    return report


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
    parser.add_argument("--align", choices=ALIGN_MODES, default="model",
                        help="draw heatmaps with each model's measured offset (default) or the plain resize (none)")
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

    lines = not sys.stderr.isatty()  # logs, CI, nohup: one line per image instead of a bar
    with tqdm(total=0, unit="step", file=sys.stderr, disable=True if lines else None, dynamic_ncols=True) as bar:
        def progress(done: int, total: int, message: str) -> None:
            if lines:
                if done:
                    log(message)
                return
            bar.total = total
            bar.n = done
            bar.set_postfix_str(message[:60], refresh=False)
            bar.refresh()

        try:
            report = run_export(args.inputs, args.out, models, layers=args.layers, method=args.method,
                                topk=args.topk, batch_size=args.batch_size, mode=args.mode, colormap=args.colormap,
                                opacity=args.opacity, overwrite=args.overwrite, progress=progress,
                                extra_settings={"weights": weights, "device": args.device}, align=args.align)
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
