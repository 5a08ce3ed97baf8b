"""Batch export of CAM overlays, raw heatmaps, comparison grids and a manifest (CLI, app folder export and ZIP).

The family: ``plan`` (what each model computes, and whether an image still needs it), ``executor`` (carrying a
plan out here: decode ahead on a loader thread, explain per batch, draw and write on writer threads),
``ray_executor`` (carrying it out on a Ray cluster, ``engine="ray"``: the same files and manifest), ``encode``
(the per-result job any executor calls: overlay, encoding in the chosen format, heatmap, thumbnail), ``run``
(``run_export``: inputs -> plan -> executor -> manifests), ``inputs`` (files, folders, uploads; safe names),
``labels`` (each image's own class), ``files`` (atomic writes, records, manifests, ``ExportReport``), ``reserve``
(the manifest's room on the disk), ``cli`` (``pfcam export``). Use the names below; the modules are the family's own.

Folder layout written under ``OUT`` (every name component is sanitised: ASCII letters, digits, ``.``, ``_``
and ``-`` only, no leading dot, length-capped; nothing is ever written outside ``OUT``)::

    OUT/
      manifest.json                       the run: versions, settings, timestamps, images, rows, skipped inputs
      manifest.csv                        one row per image x model x layer x target (MANIFEST_COLUMNS)
      <stem>-<hash8>/                     one folder per input image
        grid__<method>__<target>.png      rows = models, columns = layers, caption = class + probability
        <model>/
          <layer>__<method>__<target>-<class>.png   overlay on the ORIGINAL image, at its size (EXIF-upright);
                                                    .jpg / .webp with overlay_format, absent with overlays=False
          <layer>__<method>__<target>-<class>.npy   raw heatmap, float32 [S, S] in [0, 1] at the network's input
                                                  resolution S; it covers ``crop_box`` of the original image
          <layer>__<method>__<target>-<class>.raw.npy   with raw_maps only: the same map before min-max
                                                  normalisation (float32 [S, S], the method's own units)
          results__<method>.json          what was computed for this image and model (read by re-runs)

``<stem>`` is the input's file name without extension (for uploads, the last path component of the upload
name), ``<hash8>`` the first 8 hex digits of the SHA-256 of the source: the absolute path of a file, or
``upload:<name>:<sha256 of the bytes>`` of an upload. ``<target>`` is ``top<k>`` for the k-th predicted class
(1 = the top class), ``class<id>`` for a class asked for by ``target`` (the same for every image) or ``label``
for the image's own class (``labels``, :mod:`cams.export.labels`), ``<class>`` the class name (``class<id>``
without names). ``--mode center`` heatmaps cover the central crop
only: the overlay dims the rest and outlines the crop.

Manifest rows: ``manifest.csv`` has exactly the columns ``MANIFEST_COLUMNS``::

    image, image_dir, model, layer, method, target, rank, class_id, class_name, probability, overlay, heatmap, grid,
    status

``image`` is the input as given (path or upload name), ``image_dir`` its folder, ``target`` as in the file
names, ``rank`` where the model ranks ``class_id`` for this image (1 = its top class; ``k`` for ``top<k>``),
``probability`` the softmax probability of ``class_id``, ``overlay``/``heatmap``/``grid`` paths
relative to ``OUT`` (POSIX separators), ``status`` ``computed`` (written by this run), ``existing`` (kept from an
earlier run) or ``stale`` (kept from an earlier run made with other mode/colormap/opacity/input size/heatmap
alignment, other weights (``pfnet.weights.state_digest``) or other bytes of the same input file: the files on
disk are the earlier ones; pass ``overwrite=True`` to redo them).
``manifest.json["rows"]`` has the same keys plus ``crop_box`` ([left, top,
right, bottom] in the original's pixels) and ``input_size`` (S); with ``raw_maps`` also ``raw_heatmap`` (the
``.raw.npy`` path), ``raw_min`` and ``raw_max`` (its range: the scale that min-max normalisation removed;
``heatmap = (raw - raw_min) / (raw_max - raw_min)``). Rows without them (earlier runs, runs without
``raw_maps``) read as before; ``manifest.csv``'s columns are unchanged. ``manifest.json`` also holds ``format``,
``versions`` (pfcam, python, torch, timm, pillow, numpy), ``settings``, ``started_at``/``finished_at`` (UTC,
ISO 8601), ``columns``, ``images`` (every readable or bad input, with size or reason), ``skipped`` (bad and
unsupported inputs: ``input``, ``stage`` "scan" or "load", ``reason``) and ``warnings``. Text cells a
spreadsheet would run as a formula (starting with ``= + - @``) are prefixed with ``'`` in the CSV only.

Overlay formats: ``overlay_format`` "png" (default, lossless), "jpeg" or "webp"; ``overlays=False`` writes the
heatmaps and records only (empty ``overlay`` and ``grid`` cells). Both are part of the recorded settings: an
overlay in another format than the run's is redone, a heatmaps-only run keeps earlier heatmaps.

Re-runs: an image whose outputs for a model (every requested layer and target, this method) all exist is not
recomputed; existing files are never replaced unless ``overwrite`` (an image's grid is redrawn when it gains
new results). The manifest is the folder's index: every result whose files are there, each row with its
``settings`` (those of the run that made it) and status; runs merge into it under an ``flock`` on
``OUT/.manifest.lock`` (``merge_manifest``, for other executors too), so a re-run with other settings or
concurrent exports lose no row. ``manifest.json`` also lists the ``runs`` (times, settings, ``stopped``). Every
file is written to a temporary name (``.NAME.PID.RANDOM.tmp``) and moved into place (``os.replace``), so no
output is ever half-written; the temporary files of a killed run are removed by the next run.
"""
from cams.export.cli import DEFAULT_MODELS, OFFLINE_HINT, add_export_parser, export_command
from cams.export.executor import ExportExecutor, explain_batch, result_stem
from cams.export.cli import EXIT_CANNOT_START, EXIT_NOTHING, EXIT_OK, EXIT_STOPPED
from cams.export.encode import DEFAULT_FORMAT, FORMATS, HEATMAP, OVERLAY, encode_image, overlay_suffix, render_result
from cams.export.files import (MANIFEST_COLUMNS, MANIFEST_FORMAT, STATE_FORMAT, ExportError, ExportReport,
                               ensure_dir, merge_manifest, os_error_text)
from cams.export.inputs import (InputItem, UploadSource, collect_inputs, decode_input, input_records, read_input,
                                safe_name)
from cams.export.plan import ExportPlan, ModelPlan, plan_export, plan_models, target_names, validate_settings
from cams.export.ray_executor import check_shared
from cams.export.executor import Reuse
from cams.export.run import Progress, load_models, run_export, zip_directory

__all__ = [
    "run_export", "zip_directory", "load_models", "Progress", "Reuse", "ExportError", "ExportReport",
    "MANIFEST_COLUMNS", "MANIFEST_FORMAT", "STATE_FORMAT", "merge_manifest", "os_error_text",
    "EXIT_OK", "EXIT_NOTHING", "EXIT_CANNOT_START", "EXIT_STOPPED",
    "InputItem", "UploadSource", "collect_inputs", "decode_input", "input_records", "read_input", "safe_name",
    "ExportPlan", "ModelPlan", "plan_export", "plan_models", "validate_settings", "ExportExecutor", "explain_batch",
    "result_stem", "target_names", "ensure_dir", "OVERLAY", "HEATMAP",
    "check_shared",
    "render_result", "encode_image", "overlay_suffix", "FORMATS", "DEFAULT_FORMAT",
    "add_export_parser", "export_command", "DEFAULT_MODELS", "OFFLINE_HINT",
]
