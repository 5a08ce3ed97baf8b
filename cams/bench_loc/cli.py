"""``bench-loc`` on the command line: the options, and the command that runs ``run_bench`` and prints the table.

The data without ``--data`` is the registrar's choice (``add_bench_loc_parser(..., default_data=...)``): pfcam's
command line offers the demo scenes (``pfdemo.bench``), which this family does not import.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from cams import metrics as M
from cams.layers import BLOCKS
from cams.plotting import write_atomic
from cams.progress import Progress
from cams.bench_loc.bench import (ALIGN_CHOICES, DEFAULT_LAYERS, DEFAULT_METHODS, DEFAULT_MODELS, DEFAULT_N,
                                  DEFAULT_VAL_N, TARGETS, NothingEvaluated, run_bench)
from cams.bench_loc.data import CSV_NAME, DEFAULT_SEED, BenchError, DataSource, DefaultData, FolderData
from cams.boxacc import DEFAULT_PROTOCOL, PROTOCOLS, STEPS
from cams.bench_loc.scoring import DEFAULT_BATCH_SIZE, DEFAULT_FAITH_N, DEFAULT_FAITH_STEPS, DEFAULT_ROAD_N
from cams.bench_loc.plot import plot_depth
from cams.bench_loc.table import format_markdown, format_table, write_csv
from cams.ray_runtime import add_engine_arguments, ray_options


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_bench_loc_parser(subparsers, default_data: DefaultData | None = None) -> argparse.ArgumentParser:
    """Register ``bench-loc`` on an ``argparse`` subparsers object (``pfcam bench-loc``). Without
    ``default_data``, ``--data DIR`` is required."""
    images = f"{default_data.description} (or --data DIR)" if default_data else "your images with boxes (--data DIR)"
    parser = subparsers.add_parser(
        "bench-loc", help="localization benchmark: pointing game, energy, box accuracy, deletion/insertion",
        description=f"Score CAM localization per model x layer x method on {images}, "
                    "with a centred-Gaussian and a uniform-random reference; prints one table.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated zoo ids or timm:<name>[.<tag>]")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                        help=f"comma-separated layer names; '{BLOCKS}' means every block, shallow to deep "
                             "(default: layer3,layer4 for the ResNets, each other network's own default layers)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated CAM method ids")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="test images (default %(default)s)")
    parser.add_argument("--val-n", type=int, default=DEFAULT_VAL_N,
                        help="validation images for the box-accuracy threshold (default %(default)s)")
    parser.add_argument("--faith-n", type=int, default=DEFAULT_FAITH_N,
                        help="test images for deletion/insertion, the first ones (default %(default)s: ~0.85 s per "
                             "image and model on a quiet 2-core CPU, 2-3x that when shared; --faith-n 100 for the "
                             "full-size figure, ~3 min more there when quiet)")
    parser.add_argument("--faith-steps", type=int, default=DEFAULT_FAITH_STEPS,
                        help="deletion/insertion steps (default %(default)s)")
    parser.add_argument("--faith-baseline", choices=M.BASELINES, default="blur",
                        help="what deleted pixels become / insertion starts from (default %(default)s)")
    parser.add_argument("--road-n", type=int, default=DEFAULT_ROAD_N,
                        help="test images for ROAD, the first ones (default %(default)s: each image costs about 4 s "
                             "per heatmap, ~2 min for the 30 heatmaps of the default run)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="fixed box threshold (fraction of the max) instead of choosing it on validation")
    seed_help = f"{default_data.seed_help}; with --data: " if default_data else ""
    parser.add_argument("--seed", type=int, default=None,
                        help=f"{seed_help}the shuffle seed (default {DEFAULT_SEED})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default %(default)s")
    parser.add_argument("--csv", metavar="PATH", default=None, help="also write the table as CSV")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="also write the table as Markdown")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="also draw each metric against depth (block index), one line per model: use with "
                             "--layers blocks")
    parser.add_argument("--data", metavar="DIR", default=None, required=default_data is None,
                        help=f"your own images with {CSV_NAME} (image,x0,y0,x1,y1[,label]) or VOC .xml per image")
    parser.add_argument("--target", choices=TARGETS, default="predicted",
                        help="class to explain: each image's top-1 class (default) or its ground-truth label "
                             "(an image without a usable label: its top-1 class)")
    parser.add_argument("--align", choices=ALIGN_CHOICES, default="model",
                        help="where heatmaps are drawn: each model's recorded alignment offset (default), the plain "
                             "resize (none), or an offset fitted per row on the validation split (fit)")
    parser.add_argument("--box-protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                        help="MaxBoxAccV2's protocol: wsolevaluation's (wsol, the default: 8-bit thresholds, "
                             "inclusive boxes, the WSOL literature's numbers) or pfcam's own (pfcam)")
    parser.add_argument("--box-step", type=float, choices=STEPS, default=0.01,
                        help="MaxBoxAccV2's threshold step (default %(default)s; wsolevaluation's own default is "
                             "0.001)")
    parser.add_argument("--device", default=None, help="torch device (default: PFCAM_DEVICE or auto)")
    add_engine_arguments(parser)
    parser.set_defaults(handler=main_bench_loc, default_data=default_data)
    return parser


def data_source(args: argparse.Namespace) -> DataSource:
    """``--data DIR``, else the registrar's default data (raises ``BenchError`` when unusable)."""
    if args.data is not None:
        return FolderData(args.data, seed=args.seed)
    if getattr(args, "default_data", None) is None:
        raise BenchError("--data DIR is required")
    return args.default_data.make(args.seed)


def main_bench_loc(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``bench-loc`` from parsed arguments; prints the table; returns the exit status."""
    from pfnet.errors import UnknownModelError

    out = out or sys.stdout
    err = err or sys.stderr

    progress = Progress(0, "bench-loc", err)
    log = progress.log

    t0 = time.perf_counter()
    try:
        result = run_bench(_csv_list(args.models), _csv_list(args.layers), _csv_list(args.methods),
                           data_source(args), n=args.n, val_n=args.val_n, faith_n=args.faith_n,
                           faith_steps=args.faith_steps, faith_baseline=args.faith_baseline,
                           batch_size=args.batch_size, threshold=args.threshold, device=args.device,
                           target=args.target, align=args.align, log=log, road_n=args.road_n,
                           progress=progress, engine=args.engine, ray_options=ray_options(args),
                           box_protocol=args.box_protocol, box_step=args.box_step)
    except (BenchError, UnknownModelError) as error:
        progress.close()
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"bench-loc: error: {message}", file=err)
        return 1 if isinstance(error, NothingEvaluated) else 2
    progress.close()
    for problem in result.problems:
        print(f"bench-loc: skipped: {problem}", file=err)
    for message in result.skipped:
        print(f"bench-loc: model skipped: {message}", file=err)
    out.write(format_table(result.rows, result.caption))
    out.flush()
    if args.csv:
        write_csv(result.rows, args.csv)
    if args.markdown:
        write_atomic(args.markdown, format_markdown(result.rows, result.caption).encode("utf-8"))
    if args.plot:
        try:
            write_atomic(args.plot, plot_depth(result.rows))
        except ValueError as error:
            print(f"bench-loc: --plot: {error}", file=err)
            return 2
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
