"""Scale-out overhead: images/s of ``export --engine ray`` against ``--engine local`` on this machine, Ray's
start-up time, and the per-image costs a cluster plan is made from.

    python benchmarks/bench_scale.py                                  # 200 photos, demo pair, layer3+layer4
    python benchmarks/bench_scale.py --models r50,r50_hybrid --random-weights   # full-size nets, 224 px
    python benchmarks/bench_scale.py --markdown scale.md              # also write the tables

The inputs are ``--images`` JPEGs at ``--size`` (default 500x375, ImageNet val's typical size) cut from the
bundled example photos. Each engine exports them ``--rounds`` times into fresh folders, the engines taking turns
(a shared CPU's load hits both alike); the figure is the median wall time per run, the ratio ray / local images/s
(target >= 0.8). Ray's start-up is timed apart: ``ray.init`` of a local runtime sized to this machine, then an
export of two images twice: the first starts Ray Data's own processes (which the timed runs do not pay), the
second is what every run pays (Ray Data's plan and a new actor pool, whose processes import torch and receive the
models); and how long a fresh Python process takes to import what an actor imports (most of that fixed cost).

Then the per-image costs, one torch thread, measured in this process: read + decode + preprocess, explain per
model, and draw + write every file of an image (the local executor's own code), all of which an actor does for
its blocks. A cluster plan divides these among its CPUs and GPUs (docs/ray.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cams.engine import Explanation  # noqa: E402
from cams.export import (ExportExecutor, ExportReport, collect_inputs, explain_batch, load_models,  # noqa: E402
                         plan_export, read_input, run_export)
from cams.ray_runtime import RayOptions, init_ray  # noqa: E402
from pfnet import zoo  # noqa: E402
from pfnet.assets import assets_dir  # noqa: E402
from pfnet.preprocess import prepare  # noqa: E402

TARGET_RATIO = 0.8


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` JPEGs of ``size``, each a different crop of one of the bundled example photos."""
    photos = [Image.open(path).convert("RGB") for path in sorted((assets_dir() / "examples").glob("*.jpg"))]
    rng = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        picture = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
        if index % 2:
            picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
        picture.save(folder / f"photo{index:04d}.jpg", quality=90)


def build_models(model_ids: list[str], random_weights: bool) -> dict:
    if not random_weights:
        models, _ = load_models(model_ids, device="cpu", log=lambda message: print(message, file=sys.stderr))
        return models
    torch.manual_seed(0)
    return {model_id: (zoo.get(model_id).build().eval(), zoo.get(model_id)) for model_id in model_ids}


def timed_export(inputs: Path, out: Path, models: dict, args: argparse.Namespace, engine: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = run_export([inputs], out, models, layers=args.layers, method=args.method, batch_size=args.batch_size,
                        engine=engine, ray_options=RayOptions(workers=args.workers,
                                                              gpus_per_worker=args.gpus_per_worker))
    seconds = time.perf_counter() - start
    assert report.computed == args.images * len(models) * len(args.layers), report.errors
    return seconds


class Handed(ExportExecutor):
    """The local executor handed explanations made beforehand: what is left is drawing and writing."""

    def __init__(self, root: Path, plan, explained: list[dict]):
        super().__init__(root, plan, ExportReport(out_dir=root))
        self.explained = explained  # per batch image: model id -> (heatmaps, targets, probs)

    def explain(self, model, batch, need, loaded=None):
        return {i: (Explanation(*(torch.from_numpy(value[None]) for value in self.explained[i][model.id]),
                                tuple(model.layers), self.plan.method, model.class_names), 0) for i in need}


def per_image_costs(inputs: Path, out: Path, models: dict, args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per image of each stage, one torch thread, ``--cost-images`` images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items, _ = collect_inputs([inputs])
        items = items[:args.cost_images]
        plan = plan_export(models, args.layers, method=args.method, batch_size=args.batch_size)
        costs: dict[str, float] = {}
        start = time.perf_counter()
        images = [read_input(item)[0] for item in items]
        costs["read + decode"] = time.perf_counter() - start
        start = time.perf_counter()
        tensors = {model.id: torch.stack([prepare(image, model.entry.preprocess, plan.mode).tensor
                                          for image in images]) for model in plan.models}
        costs["preprocess (all models)"] = time.perf_counter() - start
        explained: list[dict] = [{} for _ in items]
        for model in plan.models:
            device = torch.device(args.device)
            model.network.to(device)
            start = time.perf_counter()
            for first in range(0, len(items), args.batch_size):
                batch = tensors[model.id][first:first + args.batch_size].to(device)
                result = explain_batch(plan, model, batch, items[first:first + args.batch_size], print)
                for offset in range(batch.shape[0]):
                    explained[first + offset][model.id] = (result.heatmaps[offset].numpy(),
                                                           result.targets[offset].numpy(),
                                                           result.probs[offset].numpy())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            costs[f"explain {model.id} ({args.device})"] = time.perf_counter() - start
            model.network.to("cpu")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        for first in range(0, len(items), args.batch_size):
            chunk = range(first, min(len(items), first + args.batch_size))
            executor = Handed(out, plan, [explained[i] for i in chunk])
            executor.process([(items[i], images[i], {}) for i in chunk])
            executor.finish()
        costs["draw + write every file"] = time.perf_counter() - start
        return {name: 1000 * seconds / len(items) for name, seconds in costs.items()}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated photos")
    parser.add_argument("--models", default="demo_r50,demo_r50_hybrid")
    parser.add_argument("--random-weights", action="store_true", help="build the zoo models with random weights "
                        "(same cost as the real ones, no download)")
    parser.add_argument("--layers", default="layer3,layer4")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: the engine's choice)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", help="device of the per-image explain cost")
    parser.add_argument("--cost-images", type=int, default=48, help="images for the per-image costs (0: skip them)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of the local engine (default: torch's; each Ray actor has one per CPU)")
    parser.add_argument("--costs-only", action="store_true", help="only the per-image costs (no engines, no Ray)")
    parser.add_argument("--markdown", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    args.layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    width, height = (int(v) for v in args.size.lower().split("x"))
    models = build_models([m.strip() for m in args.models.split(",") if m.strip()], args.random_weights)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    work = Path(tempfile.mkdtemp(prefix="pfcam-bench-scale-"))
    try:
        inputs = work / "in"
        inputs.mkdir()
        make_photos(inputs, args.images, (width, height))
        print(f"{args.images} photos {width}x{height}, models {', '.join(models)}, layers {', '.join(args.layers)}, "
              f"{args.method}, batch {args.batch_size}; {os.cpu_count()} CPUs, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads for the local engine), "
              f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}", flush=True)

        size = (width, height)
        lines: list[str] = [] if args.costs_only else engines_compared(inputs, work, models, args, size)
        if args.cost_images > 0:  # 0: the engines only
            costs = per_image_costs(inputs, work / "out-costs", models, args)
            lines += ["", f"Per-image costs (ms, one torch thread, {args.cost_images} images):", "",
                      "| stage | ms per image |", "|---|---:|"]
            lines += [f"| {name} | {ms:.1f} |" for name, ms in costs.items()]
        lines += ["", f"load average at the end: {os.getloadavg()[0]:.1f}"]
        text = "\n".join(lines)
        print("\n" + text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def actor_imports() -> float:
    """Seconds a fresh Python process takes to import what an actor of the export imports (Ray Data, torch, the
    networks' modules): the bulk of the fixed cost of a Ray run, paid by every new actor pool."""
    code = ("import time; start = time.perf_counter(); import ray.data, cams.export.ray_executor; "
            "print(time.perf_counter() - start)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def engines_compared(inputs: Path, work: Path, models: dict, args: argparse.Namespace,
                     size: tuple[int, int]) -> list[str]:
    """Ray's start-up, then both engines on the photos, taking turns; the summary as Markdown lines."""
    start = time.perf_counter()
    ray = init_ray(RayOptions())
    init_s = time.perf_counter() - start
    resources = ray.cluster_resources()
    small = work / "two"
    small.mkdir()
    make_photos(small, 2, size)
    small_runs = []
    for attempt in range(2):  # cold: the task workers start; warm: what every run pays (plan, actor pool start)
        start = time.perf_counter()
        run_export([small], work / f"out-two-{attempt}", models, layers=args.layers, method=args.method,
                   batch_size=args.batch_size, engine="ray",
                   ray_options=RayOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker))
        small_runs.append(time.perf_counter() - start)
    first_s, again_s = small_runs
    imports_s = actor_imports()
    print(f"Ray start-up: ray.init {init_s:.1f} s (local runtime: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs); an export of 2 images: {first_s:.1f} s the first time, "
          f"{again_s:.1f} s again; an actor's imports in a fresh process: {imports_s:.1f} s", flush=True)

    times: dict[str, list[float]] = {"local": [], "ray": []}
    for round_index in range(args.rounds):
        for engine in ("local", "ray"):
            seconds = timed_export(inputs, work / f"out-{engine}", models, args, engine)
            times[engine].append(seconds)
            print(f"round {round_index + 1}: {engine:5s} {seconds:6.1f} s  {args.images / seconds:5.2f} images/s",
                  flush=True)
    ray.shutdown()
    local_s, ray_s = (statistics.median(times[engine]) for engine in ("local", "ray"))
    ratio = local_s / ray_s
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    return ["| engine | median s per run | images/s |", "|---|---:|---:|",
             f"| local | {local_s:.1f} | {args.images / local_s:.2f} |",
             f"| ray (warm runtime) | {ray_s:.1f} | {args.images / ray_s:.2f} |",
             "", f"ray / local throughput: {ratio:.2f} ({verdict} the {TARGET_RATIO} target). Ray start-up: "
             f"ray.init {init_s:.1f} s; an export of 2 images {first_s:.1f} s the first time, {again_s:.1f} s "
             f"on the warm runtime (the fixed cost of every run, inside the figures above), of which "
             f"{imports_s:.1f} s is a new actor's imports (timed in a fresh process)"]


if __name__ == "__main__":
    sys.exit(main())
