"""``run_export``: plan the export, read the inputs, carry the plan out batch by batch, write the manifests (the
layout is in the package docstring, :mod:`cams.export`); ``zip_directory`` and ``load_models`` for its callers."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

from PIL import Image

from cams.export.executor import ExportExecutor, Reuse
from cams.export.files import (LOCK_NAME, MANIFEST_COLUMNS, MANIFEST_FORMAT, TEMP_SUFFIX, ExportError,
                               ExportReport, check_out_dir, merge_manifest, now, os_error_text, remove_orphans,
                               versions)
from cams.export.inputs import InputItem, UploadSource, collect_inputs, decode_input, input_records
from cams.export.labels import label_table
from cams.export.plan import GRID_CELL, ExportPlan, LayerChoice, plan_export
from cams.export.reserve import ManifestRoom, manifest_room
from cams.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from cams.ray_runtime import RayOptions, check_engine
from pfnet.errors import PfnetError

Progress = Callable[[int, int, str], None]


def run_export(sources: Iterable[str | os.PathLike | UploadSource], out_dir: str | os.PathLike,
               models: Mapping[str, tuple[Any, Any]], layers: LayerChoice = None,
               method: str = "gradcam", topk: int = 1, batch_size: int = 8, mode: str = "full",
               colormap: str = "jet", opacity: float = 0.5, overwrite: bool = False,
               progress: Progress | None = None, *, cell_size: int = GRID_CELL, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, extra_settings: Mapping[str, Any] | None = None,
               align: str = "model", reuse: Reuse | None = None, overlay_format: str = "png",
               overlays: bool = True, writers: int | None = None, engine: str = "local",
               ray_options: RayOptions | None = None,
               read_image: Callable[[InputItem], Image.Image] | None = None,
               target: str | Sequence[str | int] | None = None,
               labels: str | os.PathLike | Mapping[str, str] | None = None, raw_maps: bool = False,
               precision: str = "float32", aug_smooth: bool = False, eigen_smooth: bool = False) -> ExportReport:
    """Explain every image with every model and write the layout described in :mod:`cams.export`.

    ``sources``: file paths, folder paths (searched recursively) and ``(name, bytes)`` uploads.
    ``models``: model id -> (eval-mode model, zoo entry); the entry gives ``preprocess``, ``class_names()`` and
    ``name``. ``layers``: None (each model's ``cams.layers.default_layers``), a list for every model, or a dict
    keyed by model id or family (``"resnet"``, ``"vit"``, ``"pit"``); a layer a model lacks is reported and
    skipped for that model. Images go through ``batch_size`` at a time, one ``cams.explain`` call per batch and
    model (all layers and targets at once). ``target``: None or "predicted" (each image's top-``topk`` classes), or
    class ids / names (a list, or one comma-separated string) explained for every image: a class a model lacks is
    reported and skipped for that model. ``labels``: each image's own class instead (a labels file, see
    :mod:`cams.export.labels`, or image path -> class id or name); an image without one gets no result, and a
    label a model lacks is reported. ``progress(done, total, message)`` counts image x model
    steps, once per image. Bad inputs are recorded (``report.skipped``) and the run goes on; check ``report.ok``.
    ``align``: "model" (each model's recorded heatmap offsets, :mod:`cams.align`) or "none" (the plain resize).
    ``precision``: "bfloat16" runs Score-CAM's / Ablation-CAM's extra forwards in bf16 autocast
    (``cams.explain``'s option); the manifest's settings record it. ``aug_smooth``: ``cams.explain``'s test-time
    augmentation (six augmented copies of each image, about 6x the time); ``eigen_smooth``: the first principal
    component of the weighted activations instead of their sum (an SVD per map; dropped with a warning for a method
    it does not change). The manifest's settings record both; outputs of an earlier run with other options are kept
    and flagged stale (``overwrite=True`` redoes them), as for every other setting.
    ``reuse(model_id, item, image)``: an ``Explanation`` of that one image already computed with these settings
    (the app passes the CAMs on its page), or None; only the images it has none for are explained.
    ``raw_maps``: also write each map before min-max normalisation (``<stem>.raw.npy``) and record its range
    (``raw_min``, ``raw_max``) in ``manifest.json``'s rows (see :mod:`cams.export`).
    ``overlay_format``: "png" (lossless), "jpeg" or "webp"; ``overlays=False`` writes heatmaps and records only
    (no overlays, no grids). ``writers``: writer threads (default :func:`cams.export.executor.default_writers`).
    ``engine``: "local" (this process) or "ray" (a Ray cluster, ``ray_options``; :mod:`cams.export.ray_executor`):
    the same plan, files and manifest; ``reuse`` and ``read_image`` are the local engine's only.
    ``read_image(item)``: how an input is decoded (default ``cams.images.load_image`` with ``max_bytes`` and
    ``max_pixels``); the app passes its session's decoder, so an export counts against the session's pixel budget
    and reuses the images already decoded. It raises ``ImageError`` to skip an input.
    Raises ``ExportError`` for bad settings, an output folder that cannot be used, or an engine that cannot run.
    An OS error part-way (disk full, permissions, a read-only or vanished folder) stops the run:
    ``report.stopped`` says why, what finished is kept and listed in the manifest, whose room on the disk is held
    from the start (:mod:`cams.export.reserve`; a disk without that room raises ``ExportError`` before anything
    is written).
    """
    check_engine(engine, ExportError)
    if engine != "local" and (reuse is not None or read_image is not None):
        raise ExportError("reuse and read_image are for the local engine (the app); --engine ray reads and explains "
                          "every image itself")
    warnings: list[str] = []
    table = None
    if labels is not None:
        table, problems = label_table(labels)
        warnings.extend(problems)
    plan = plan_export(models, layers, method, topk, batch_size, mode, colormap, opacity, overwrite, align,
                       cell_size, warn=warnings.append, overlay_format=overlay_format, overlays=overlays,
                       target=target, labels=table, raw_maps=raw_maps, precision=precision, aug_smooth=aug_smooth,
                       eigen_smooth=eigen_smooth)
    started = now()
    root = check_out_dir(Path(out_dir))
    report = ExportReport(out_dir=root, warnings=warnings)
    report.orphans = remove_orphans(root)
    items, scan_skipped = collect_inputs(sources, exclude=root)
    report.skipped.extend(scan_skipped)
    if table is not None:
        unlabelled = [item.label for item in items if item.key not in table]
        if unlabelled:
            shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
            report.warnings.append(f"{len(unlabelled)} image(s) have no label ({shown}); no result for them")
    if not models:
        report.warnings.append("no model to run")
    per_image = max(1, len(plan.models))
    total = len(items) * per_image
    done = finished = 0

    def tick(label: str) -> None:
        """One image done (or skipped): ``per_image`` steps."""
        nonlocal done, finished
        done, finished = done + per_image, finished + 1
        if progress is not None:
            progress(done, total, f"{finished} / {len(items)} images: {label}")

    room = ManifestRoom(root, manifest_room(root, plan.manifest_settings(), len(items) * sum(
        len(plan.outputs(model)) for model in plan.models), len(items), len(plan.targets)))
    try:
        room.hold()  # a full disk stops the run here, before any output, rather than leave the manifest stale
    except OSError as exc:
        raise ExportError(os_error_text(exc, "reserving room for the manifest") + "; nothing was written") from exc
    if progress is not None:
        progress(0, total, "starting")
    if engine == "ray":
        from cams.export.ray_executor import execute_on_ray

        try:
            stale_count = execute_on_ray(root, plan, items, report, tick, ray_options or RayOptions(),
                                         max_bytes=max_bytes, max_pixels=max_pixels, writers=writers)
        finally:
            room.release()  # the manifest takes its place
        return _finish_export(root, plan, report, items, stale_count, started, extra_settings)
    run = ExportExecutor(root, plan, report, reuse, writers)
    batch: list[tuple[InputItem, Image.Image, dict[str, Any]]] = []

    def flush() -> None:
        if not batch:
            return
        if plan.models:
            run.process(batch)
        for item, _, _ in batch:
            tick(item.label)
        batch.clear()

    def load(item: InputItem) -> Image.Image:
        return decode_input(item, max_bytes, max_pixels, read_image)

    try:
        try:
            # Decoded a batch ahead on the loader thread; a caller's decoder on the caller's thread (the app's
            # reads its Streamlit session, which other threads do not see).
            for item, image in run.load_ahead(items, load, on_caller=read_image is not None):
                info, problem = input_records(item, image)
                report.images.append(info)
                if problem is not None:
                    report.skipped.append(problem)
                    tick(f"skipped {item.label}: {problem['reason']}")
                    continue
                batch.append((item, image, info))
                if len(batch) >= batch_size:
                    flush()
            flush()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop met while resolving a path
            if isinstance(exc, RuntimeError) and "loop" not in str(exc).lower():
                raise
            report.stopped = os_error_text(exc, "writing the export")
    finally:
        try:
            run.finish()  # every queued file is on disk before the manifests name it
        except OSError as exc:
            report.stopped = report.stopped or os_error_text(exc, "writing the export")
        finally:
            room.release()  # the manifest takes its place
    return _finish_export(root, plan, report, items, run.stale_count, started, extra_settings)


def _finish_export(root: Path, plan: ExportPlan, report: ExportReport, items: Sequence[InputItem], stale_count: int,
                  started: str, extra_settings: Mapping[str, Any] | None) -> ExportReport:
    """The run's last warnings and its manifest, merged into the folder's (every engine ends here)."""
    if stale_count:
        report.warnings.append(f"{stale_count} outputs were made earlier with other settings, other weights or an "
                               f"earlier version of the image and were kept; pass --overwrite (overwrite=True) "
                               f"to redo them")
    if not items:
        report.warnings.append("no images found in the inputs")

    settings = {**plan.manifest_settings(), **dict(extra_settings or {})}
    report.manifest = {"format": MANIFEST_FORMAT, "versions": versions(), "settings": settings,
                       "started_at": started, "finished_at": now(), "columns": list(MANIFEST_COLUMNS),
                       "images": report.images, "rows": report.rows, "skipped": report.skipped,
                       "warnings": report.warnings, "stopped": report.stopped}
    try:
        report.manifest = merge_manifest(root, report.manifest)
    except OSError as exc:
        report.stopped = report.stopped or os_error_text(exc, "writing the manifest")
        report.warnings.append("the manifest could not be updated: " + os_error_text(exc, "writing it"))
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
                if path.is_symlink() or not path.is_file() or name == LOCK_NAME or \
                        (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
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


