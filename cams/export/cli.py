"""``pfcam export`` (also ``python -m cams export``): load the models, run the export with a progress bar, print a
summary. Registered through :func:`add_export_parser`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cams.align import ALIGN_MODES
from cams.engine import METHODS
from cams.export.encode import DEFAULT_FORMAT, FORMATS
from cams.export.files import ExportError, os_error_text
from cams.export.run import load_models, run_export
from cams.ray_runtime import add_engine_arguments, check_engine, ray_options
from cams.render import COLORMAPS
from pfnet.zoo import DEMO_IDS

DEFAULT_MODELS = ("r50", "r50_hybrid")
# Exit statuses (README, "Security and limits").
EXIT_OK = 0
EXIT_NOTHING = 1  # nothing could be processed (no model loaded, no readable image)
EXIT_CANNOT_START = 2  # bad settings or an output folder that cannot be used; nothing written
EXIT_STOPPED = 3  # an OS error part-way (disk full, permissions, read-only); what finished is kept and listed
OFFLINE_HINT = "hint: `--models demo_r50,demo_r50_hybrid` works offline (bundled demo models)"


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
    """Register ``export`` on an ``argparse`` subparsers object (``pfcam export``)."""
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
    parser.add_argument("--format", dest="overlay_format", choices=list(FORMATS), default=DEFAULT_FORMAT,
                        help="overlay file format: png (lossless, default), jpeg or webp (lossy, smaller, jpeg "
                             "much faster to write)")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false",
                        help="heatmaps only: write the .npy heatmaps and records, no overlays and no grids "
                             "(for dataset-scale runs)")
    add_engine_arguments(parser)
    parser.set_defaults(handler=export_command)
    return parser


def export_command(args: argparse.Namespace) -> int:
    """``pfcam export``: load the models, run the export with a progress bar, print a summary."""
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    device = args.device
    if args.engine == "ray":
        try:
            check_engine(args.engine, ExportError)  # before loading anything: without Ray, say how to install it
        except ExportError as exc:
            log(f"error: {exc}")
            return EXIT_CANNOT_START
        if device is not None:
            log("warning: --device is for --engine local; Ray's actors use a GPU when --gpus-per-worker gives "
                "them one")
        device = "cpu"  # the driver plans on the CPU and ships the models to the actors
    model_ids = list(dict.fromkeys(args.models))
    weights = dict(args.weights)
    for model_id in weights:
        if model_id not in model_ids:
            log(f"warning: --weights given for {model_id}, which is not in --models; ignored")
    for model_id, path in weights.items():
        if model_id in model_ids and not Path(path).is_file():
            log(f"warning: --weights {model_id}={path}: no such file")
    models, unavailable = load_models(model_ids, weights, device, log)
    if any(model_id not in DEMO_IDS for model_id in unavailable):
        log(OFFLINE_HINT)
    if not models:
        log("nothing could be processed: no model could be loaded")
        return EXIT_NOTHING
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
                                extra_settings={"weights": weights, "device": args.device, "engine": args.engine},
                                align=args.align, overlay_format=args.overlay_format, overlays=args.overlays,
                                engine=args.engine, ray_options=ray_options(args))
        except ExportError as exc:
            log(f"error: {exc}")
            return EXIT_CANNOT_START
        except (OSError, RuntimeError) as exc:  # an OS error before the run could record anything
            if isinstance(exc, RuntimeError) and "loop" not in str(exc).lower():
                raise
            log(f"error: {os_error_text(exc, 'the export')}")
            return EXIT_CANNOT_START
    if report.orphans:
        log(f"removed {len(report.orphans)} temporary files left by an interrupted earlier run")
    for warning in report.warnings:
        log(f"warning: {warning}")
    for item in report.skipped:
        log(f"skipped {item['input']}: {item['reason']}")
    images = sum(1 for info in report.images if info["status"] == "ok")
    print(f"{report.processed} of {len(report.images)} images processed ({images} readable): "
          f"{report.computed} results computed, {report.existing} kept from earlier runs, "
          f"{len(report.skipped)} inputs skipped -> {report.out_dir}")
    if report.stopped:
        log(f"error: the export stopped: {report.stopped}; what finished is kept and listed in the manifest")
        return EXIT_STOPPED
    if not report.ok:
        log("nothing could be processed")
        return EXIT_NOTHING
    return EXIT_OK
