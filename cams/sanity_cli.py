"""``pfcam sanity``: the model-parameter randomisation check (:mod:`cams.sanity`) for models x layers x
methods; a table on stdout, ``--csv`` (one row per model x layer x method x randomisation step) and ``--plot``
(median Spearman and SSIM against randomisation depth, interquartile bands)."""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cams import tables
from cams.plotting import write_atomic
from cams.sanity import MODES, SanityResult, randomisation_units, sanity_check

DEFAULT_MODELS = ("demo_r50", "demo_r50_max", "demo_r50_hybrid")
DEFAULT_LAYERS = ("layer3", "layer4")
DEFAULT_METHODS = ("gradcam", "gradcampp", "layercam", "eigencam_fixed")
DEFAULT_N = 50
PASS_BELOW = 0.5  # median Spearman after randomising every unit
REFERENCES = ("centre Gaussian", "uniform random")

CSV_FIELDS = ["model", "layer", "method", "method_label", "mode", "depth", "randomised", "n", "spearman",
              "spearman_q1", "spearman_q3", "ssim", "ssim_q1", "ssim_q3", "flat_maps", "seed"]


class SanityError(Exception):
    """Bad arguments or no usable data: exit status 2."""


@dataclass
class Row:
    """Medians and quartiles over the images of one model x layer x method x step."""

    model: str
    layer: str
    method: str
    mode: str        # "cascading" | "independent" | "reference"
    depth: int       # units randomised (cascading), the unit's position from the top (independent), -1 (reference)
    randomised: str  # the unit added at this step / the only unit randomised / the reference heatmap
    n: int
    spearman: tuple[float, float, float]  # median, q1, q3
    ssim: tuple[float, float, float]
    flat: int


def _quartiles(values: np.ndarray) -> tuple[float, float, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(median), float(q1), float(q3)


def summarise(model_id: str, result: SanityResult) -> list[Row]:
    return [Row(model_id, c.layer, c.method, c.mode, c.depth, c.unit, int(len(c.spearman)), _quartiles(c.spearman),
                _quartiles(c.ssim), c.flat) for c in result.comparisons]


def method_label(method: str) -> str:
    from cams.engine import METHODS

    return METHODS.get(method, method)


# -------------------------------------------------------------------------------------------------- data


def folder_images(folder: str | Path, preprocess, n: int, problems: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` readable images under ``folder`` (recursive, path order), whole image squashed to the input
    (preprocessing mode "full", as bench-loc); unreadable files are reported in ``problems`` and skipped."""
    from cams.images import IMAGE_EXTENSIONS, ImageError, load_image
    from pfnet.preprocess import prepare

    folder = Path(folder)
    if not folder.is_dir():
        raise SanityError(f"--data {folder}: not a folder")
    tensors, names = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        if len(tensors) == n:
            break
        try:
            image = load_image(path)
        except (ImageError, OSError) as error:
            problems.append(f"{path}: {error}")
            continue
        tensors.append(prepare(image, preprocess, mode="full").tensor)
        names.append(str(path.relative_to(folder)))
    if not tensors:
        raise SanityError(f"--data {folder}: no readable image")
    return torch.stack(tensors), names


# ------------------------------------------------------------------------------------------------ outputs


def write_csv(rows: Sequence[Row], path: str | Path, seed: int) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        writer.writerow([row.model, row.layer, row.method, method_label(row.method), row.mode, row.depth,
                         row.randomised, row.n, *(f"{v:.6f}" for v in row.spearman),
                         *(f"{v:.6f}" for v in row.ssim), row.flat, seed])
    write_atomic(path, buffer.getvalue().encode("utf-8"))


def _find(rows: Sequence[Row], mode: str, depth: int | None = None, randomised: str | None = None) -> Row | None:
    for row in rows:
        if row.mode == mode and (depth is None or row.depth == depth) \
                and (randomised is None or row.randomised == randomised):
            return row
    return None


def _groups(rows: Sequence[Row]) -> dict[tuple[str, str, str], list[Row]]:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.layer, row.method), []).append(row)
    return groups


def _verdict(last: Row | None, copy: Row | None) -> str:
    """"pass" / "FAIL" on the median Spearman after randomising every unit; "flat" when at least half of the
    trained heatmaps are flat: their correlation is 0 or 1 by convention, and the median says nothing."""
    if last is None:
        return "n/a"
    if copy is not None and 2 * copy.flat >= copy.n:
        return "flat"
    return "pass" if last.spearman[0] < PASS_BELOW else "FAIL"


def table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """One line per model x layer x method; the reference heatmaps' correlations are the last columns."""
    header = ["model", "layer", "method", "flat trained", "copy", "head random", "all random (IQR)",
              "SSIM all random", "independent: lowest", "verdict", *(f"ref: {name}" for name in REFERENCES)]
    body = []
    for (model, layer, method), group in _groups(rows).items():
        cascade = sorted((r for r in group if r.mode == "cascading"), key=lambda r: r.depth)
        independent = [r for r in group if r.mode == "independent"]
        fmt = lambda row: "n/a" if row is None else f"{row.spearman[0]:.3f}"  # noqa: E731
        last = cascade[-1] if len(cascade) > 1 else None
        lowest = min(independent, key=lambda r: r.spearman[0]) if independent else None
        copy = _find(cascade, "cascading", 0)
        verdict = _verdict(last, copy)
        body.append([model, layer, method_label(method), "n/a" if copy is None else f"{copy.flat}/{copy.n}", fmt(copy),
                     fmt(_find(cascade, "cascading", 1)),
                     "n/a" if last is None
                     else f"{last.spearman[0]:.3f} ({last.spearman[1]:.2f}-{last.spearman[2]:.2f})",
                     "n/a" if last is None else f"{last.ssim[0]:.3f}",
                     "n/a" if lowest is None else f"{lowest.spearman[0]:.3f} ({lowest.randomised})", verdict,
                     *(fmt(_find(group, "reference", randomised=name)) for name in REFERENCES)])
    return header, body


def caption(rows: Sequence[Row], seed: int, source: str) -> str:
    n = max((row.n for row in rows), default=0)
    return (f"Model-parameter randomisation (Adebayo et al. 2018) on {n} images ({source}), each heatmap explaining "
            f"the trained model's top-1 class; median Spearman rank correlation of trained vs randomised heatmaps "
            f"(1 = unchanged). copy: the unchanged copy recomputed; head random: the classifier re-initialised; "
            f"all random: every unit re-initialised, head to stem (cascading), with the interquartile range; "
            f"independent: the unit whose re-initialisation alone lowers it most. A method passes when all random "
            f"< {PASS_BELOW}; flat trained: trained heatmaps with no peak (a flat map correlates 0 with any other, 1 "
            f"with a flat one; verdict 'flat' when they are half or more). References: the same trained heatmaps "
            f"against a centred Gaussian and seeded uniform noise. Re-initialisation seed {seed}.")


def format_table(rows: Sequence[Row], title: str) -> str:
    return tables.format_text(title, *table_cells(rows))


def format_markdown(rows: Sequence[Row], title: str) -> str:
    return tables.format_markdown(title, *table_cells(rows))


# ---------------------------------------------------------------------------------------------------- CLI


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


DefaultImages = Callable[[Any, int], "tuple[torch.Tensor, list[str]]"]


def add_sanity_parser(subparsers, default_images: DefaultImages | None = None) -> argparse.ArgumentParser:
    """Register ``sanity`` on an ``argparse`` subparsers object (``pfcam sanity``, ``python -m cams sanity``).

    ``default_images(preprocess, n) -> (tensor, names)``: the images used without ``--data`` (the command line
    registers the demo scenes; cams itself never imports them); without it, ``--data`` is required."""
    parser = subparsers.add_parser(
        "sanity", help="model-parameter randomisation sanity check (cascading and independent)",
        description="Re-initialise each model's units (head, blocks top-down, stem) on a copy, cascading and one at "
                    "a time, and compare every heatmap with the trained model's (Spearman, SSIM).")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated zoo ids or timm:<name>[.<tag>]")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated layer names")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated CAM method ids")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="images (default %(default)s)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="a folder of images (recursive; default: held-out demo scenes)")
    parser.add_argument("--modes", default=",".join(MODES), help="cascading, independent or both (default)")
    parser.add_argument("--seed", type=int, default=0, help="re-initialisation seed (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="default %(default)s")
    parser.add_argument("--csv", metavar="PATH", default=None, help="write one row per step as CSV")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="write the summary table as Markdown")
    parser.add_argument("--plot", metavar="PNG", default=None, help="draw correlation against randomisation depth")
    parser.add_argument("--device", default=None, help="torch device (default: PFCAM_DEVICE or auto)")
    parser.set_defaults(handler=main_sanity, default_images=default_images)
    return parser


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[str]]:
    from cams.engine import METHODS
    from pfnet import zoo

    models, layers, methods, modes = (_csv_list(args.models), _csv_list(args.layers), _csv_list(args.methods),
                                      _csv_list(args.modes))
    if not models or not layers or not methods or not modes:
        raise SanityError("need at least one model, layer, method and mode")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SanityError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SanityError(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")
    missing = [m for m in models if not _known(m)]
    if missing:
        raise SanityError(f"unknown model(s) {', '.join(missing)}; known: {', '.join(zoo.ids())}, or any timm "
                          "model as timm:<name>[.<tag>]")
    if args.n < 1 or args.batch_size < 1:
        raise SanityError("--n and --batch-size must be at least 1")
    for path in (args.csv, args.markdown, args.plot):
        if path and not Path(path).resolve().parent.is_dir():
            raise SanityError(f"{path}: its folder does not exist")
    return models, layers, methods, modes


def _known(model_id: str) -> bool:
    """A zoo id or a timm name timm's registry knows."""
    from pfnet import zoo
    from pfnet.errors import UnknownModelError

    try:
        zoo.get(model_id)
    except UnknownModelError:
        return False
    return True


def main_sanity(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``sanity`` from parsed arguments; prints the table; returns the exit status."""
    from cams.layers import LayerError, layer_names
    from cams.progress import Progress
    from pfnet import zoo
    from pfnet.errors import PfnetError
    from pfnet.weights import load

    out, err = out or sys.stdout, err or sys.stderr
    started = time.perf_counter()
    try:
        models, layers, methods, modes = _check(args)
        if args.data is None and getattr(args, "default_images", None) is None:
            raise SanityError("give the images with --data DIR (this command line has no default images)")
    except SanityError as error:
        print(f"sanity: error: {error}", file=err)
        return 2
    rows: list[Row] = []
    problems: list[str] = []
    skipped: list[str] = []
    inputs: dict = {}  # preprocessing -> images, shared by the models that use the same
    for model_id in models:
        entry = zoo.get(model_id)
        if args.data is None and entry.classes != "scenes":
            skipped.append(f"{model_id}: an {entry.classes} model needs images: give them with --data DIR")
            continue
        try:
            model = load(model_id, device=args.device)
            names = set(layer_names(model))
        except (PfnetError, LayerError) as error:
            skipped.append(f"{model_id}: {error}")
            continue
        bad = [layer for layer in layers if layer not in names]
        if bad:
            skipped.append(f"{model_id}: no layer(s) {', '.join(bad)}")
            continue
        try:
            if entry.preprocess not in inputs:
                inputs[entry.preprocess] = (args.default_images(entry.preprocess, args.n) if args.data is None
                                            else folder_images(args.data, entry.preprocess, args.n, problems))[0]
        except SanityError as error:
            print(f"sanity: error: {error}", file=err)
            return 2
        images = inputs[entry.preprocess]
        if entry.family == "resnet":
            model = model.to(memory_format=torch.channels_last)  # same maps, faster convolutions on CPU
        steps = len(randomisation_units(model)) * len(modes) + ("cascading" in modes)
        with Progress(steps, f"sanity {model_id}", err) as progress:
            progress.log(f"{len(images)} images, {len(methods)} method(s), layers {', '.join(layers)}")
            result = sanity_check(model, images, layers, methods, modes=modes, seed=args.seed,
                                  batch_size=args.batch_size, on_step=progress.step)
        rows.extend(summarise(model_id, result))
        del model
    for problem in problems:
        print(f"sanity: skipped: {problem}", file=err)
    for message in skipped:
        print(f"sanity: model skipped: {message}", file=err)
    if not rows:
        print("sanity: error: no model could be checked", file=err)
        return 1
    source = "held-out demo scenes" if args.data is None else f"the first images of {args.data}"
    title = caption(rows, args.seed, source)
    out.write(format_table(rows, title))
    out.flush()
    if args.csv:
        write_csv(rows, args.csv, args.seed)
    if args.markdown:
        write_atomic(args.markdown, format_markdown(rows, title).encode("utf-8"))
    if args.plot:
        from cams.sanity_plot import plot_sanity

        write_atomic(args.plot, plot_sanity(rows, PASS_BELOW))
    print(f"[sanity] done in {time.perf_counter() - started:.0f} s", file=err, flush=True)
    return 0
