"""``pfcam export`` (also ``python -m cams export``): load the models, run the export with a progress bar, print a
summary. Registered through :func:`add_export_parser`."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from cams.align import ALIGN_MODES
from cams.engine import METHODS, PRECISIONS
from cams.export.encode import DEFAULT_FORMAT, FORMATS
from cams.export.executor import network_threads
from cams.export.files import ExportError, os_error_text
from cams.export.run import load_models, run_export
from cams.ray_runtime import add_engine_arguments, check_engine, ray_options
from cams.render import COLORMAPS
from pfnet.zoo import DEMO_IDS, PHOTO_FALLBACK

DEFAULT_MODELS = ("r50", "r50_hybrid")
DEMO_DEFAULT = ("demo_r50", "demo_r50_hybrid")  # the embedded default: bundled, works offline
# Exit statuses (docs/security.md).
EXIT_OK = 0
EXIT_NOTHING = 1  # nothing could be processed (no model loaded, no readable image)
EXIT_CANNOT_START = 2  # bad settings or an output folder that cannot be used; nothing written
EXIT_STOPPED = 3  # an OS error part-way (disk full, permissions, read-only); what finished is kept and listed
OFFLINE_HINT = ("hint: `--models effnet_lite0` (a real ImageNet network installed with pfcam) and "
                "`--models demo_r50,demo_r50_hybrid` (bundled demo models) work offline")


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
                    "a grid per image and manifest.json/manifest.csv. Without network and without --models it "
                    "uses the bundled demo models (demo_r50,demo_r50_hybrid); --weights MODEL=PATH reads a local "
                    "checkpoint.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--models", type=_split, default=None,
                        help=f"comma-separated zoo ids or timm models as timm:<name>[.<tag>] (e.g. "
                             f"timm:convnext_tiny.fb_in1k); default: {','.join(DEFAULT_MODELS)}, or "
                             f"{','.join(PHOTO_FALLBACK)} (an ImageNet network installed with pfcam) when neither "
                             f"one's weights can be had (not cached, no network), else the bundled "
                             f"{','.join(DEMO_DEFAULT)}")
    parser.add_argument("--layers", type=_split, default=None,
                        help="comma-separated layer names (default: each model's default layers)")
    parser.add_argument("--method", choices=list(METHODS), default="gradcam", help="CAM method (default: %(default)s)")
    parser.add_argument("--topk", type=_positive, default=1, help="explain the top-k classes (default: 1)")
    parser.add_argument("--target", default="predicted", metavar="CLASSES",
                        help="'predicted' (default: each image's top-k classes) or comma-separated class ids or "
                             "names explained for every image, e.g. 'tabby,340' (names match without regard to "
                             "case; a class a model lacks is skipped for that model)")
    parser.add_argument("--labels", type=Path, default=None, metavar="CSV",
                        help="each image's own class instead: a CSV with image and label columns (bench-loc's "
                             "boxes.csv works), image paths relative to the CSV's folder, labels as class ids or "
                             "names; an image without a label gets no result")
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: $PFCAM_DEVICE, else cuda if available")
    parser.add_argument("--weights", type=_weights_pair, action="append", default=[], metavar="MODEL=PATH",
                        help="use a local checkpoint file for MODEL (repeatable); PATH 'random' asks for random "
                             "weights (marked so in the manifest and the grids)")
    parser.add_argument("--mode", choices=("full", "center"), default="full",
                        help="full: whole image squashed to the input size; center: ImageNet resize + centre crop")
    parser.add_argument("--colormap", choices=list(COLORMAPS), default="jet", help="default: %(default)s")
    parser.add_argument("--opacity", type=_probability, default=0.5,
                        help="heatmap opacity in the overlays, 0..1 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace existing outputs")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="bfloat16: Score-CAM's / Ablation-CAM's extra forwards in bf16 autocast (0.6-0.75 of the "
                             "time on a CPU, logits within ~0.5%%), recorded in the manifest (default: %(default)s)")
    parser.add_argument("--aug-smooth", action="store_true",
                        help="test-time augmentation: each map averaged over 6 augmented passes (flip x brightness "
                             "0.9 / 1 / 1.1), about 6x the time; recorded in the manifest")
    parser.add_argument("--eigen-smooth", action="store_true",
                        help="the first principal component of the weighted activations instead of their sum (an "
                             "SVD per map; ignored, with a warning, by the methods that are projections already or "
                             "have no weighted activations); recorded in the manifest")
    parser.add_argument("--align", choices=ALIGN_MODES, default="model",
                        help="draw heatmaps with each model's measured offset (default) or the plain resize (none)")
    parser.add_argument("--format", dest="overlay_format", choices=list(FORMATS), default=DEFAULT_FORMAT,
                        help="overlay file format: png (lossless, default), jpeg or webp (lossy, smaller, jpeg "
                             "much faster to write)")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false",
                        help="heatmaps only: write the .npy heatmaps and records, no overlays and no grids "
                             "(for dataset-scale runs)")
    parser.add_argument("--raw-maps", action="store_true",
                        help="also write each layer's map before min-max normalisation (<stem>.raw.npy, the "
                             "method's own units, comparable across images and models) with its range in "
                             "manifest.json (raw_min, raw_max)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch threads for the network on the CPU (default: $OMP_NUM_THREADS if set, else "
                             "half the cores with overlays and all but one without, leaving the rest to the "
                             "threads that decode, draw and write)")
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
    model_ids = list(dict.fromkeys(args.models or DEFAULT_MODELS))
    weights = dict(args.weights)
    for model_id in weights:
        if model_id not in model_ids:
            log(f"warning: --weights given for {model_id}, which is not in --models; ignored")
    for model_id, path in weights.items():
        if model_id in model_ids and path != "random" and not Path(path).is_file():
            log(f"warning: --weights {model_id}={path}: no such file")
    models, unavailable = load_models(model_ids, weights, device, log)
    if args.models is None and not models and set(unavailable) == set(DEFAULT_MODELS):
        models, unavailable = load_models(list(PHOTO_FALLBACK), weights, device, log)
        if models:
            names = ", ".join(entry.name for _, entry in models.values())
            log(f"the ImageNet weights of {' and '.join(DEFAULT_MODELS)} are not available here; exporting with "
                f"{names} ({', '.join(models)}) instead: a real ImageNet network installed with pfcam, not one of "
                "the paper's. `--models` chooses; docs/models.md says how to get the paper's weights")
        else:
            log(f"the ImageNet weights of {' and '.join(DEFAULT_MODELS)} are not available here; exporting with "
                f"the bundled demo models {', '.join(DEMO_DEFAULT)} instead (trained on synthetic shape scenes: "
                "their classes are shapes, not ImageNet's). `--models` chooses; docs/models.md says how to get the "
                "ImageNet ones")
            models, unavailable = load_models(list(DEMO_DEFAULT), weights, device, log)
    elif any(model_id not in DEMO_IDS for model_id in unavailable):
        log(OFFLINE_HINT)
    if not models:
        log("nothing could be processed: no model could be loaded")
        return EXIT_NOTHING
    if args.engine != "local":
        if args.threads is not None:
            log("warning: --threads is for --engine local; each Ray actor runs its network on one thread per CPU")
        return _export(args, models, weights, log)
    with export_threads(args.threads, args.overlays, models) as threads:
        log(f"torch threads: {threads} (--threads)")
        return _export(args, models, weights, log)


def _export(args: argparse.Namespace, models: dict[str, tuple[Any, Any]], weights: dict[str, str], log) -> int:
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
                                extra_settings={"weights": weights, "device": args.device, "engine": args.engine,
                                                "labels": str(args.labels) if args.labels else None},
                                align=args.align, overlay_format=args.overlay_format, overlays=args.overlays,
                                engine=args.engine, ray_options=ray_options(args), target=args.target,
                                labels=args.labels, raw_maps=args.raw_maps, precision=args.precision,
                                aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth)
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


@contextmanager
def export_threads(threads: int | None, overlays: bool, models: dict[str, tuple[Any, Any]]) -> Iterator[int]:
    """Torch's thread count for the export inside the block (restored after it), yielded: ``threads`` when given;
    else, for models on the CPU, :func:`cams.export.executor.network_threads` unless ``$OMP_NUM_THREADS`` is set
    (torch follows it already); on a GPU torch's own count stays."""
    import torch

    before = torch.get_num_threads()
    if threads is None:
        on_cpu = any(getattr(next(network.parameters(), None), "device", torch.device("cpu")).type == "cpu"
                     for network, _ in models.values())
        if not on_cpu or os.environ.get("OMP_NUM_THREADS", "").strip():
            threads = before
        else:
            threads = network_threads(overlays)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
