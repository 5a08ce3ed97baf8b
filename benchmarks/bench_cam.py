"""How much a CAM costs next to a plain forward pass: our engine vs pytorch-grad-cam, on CPU (or any device).

    python benchmarks/bench_cam.py                      # R50 and R50-hybrid, 224x224, batch 1, random weights
    python benchmarks/bench_cam.py --markdown bench.md  # also write the Markdown tables to a file
    python benchmarks/bench_cam.py --threads 1 --docs   # and into docs/performance.md and the README's headline

For each model: forward-only inference time (``torch.inference_mode``); ``cams.explain`` Grad-CAM for layer4 and
for layer1..layer4 in one call; pytorch-grad-cam's ``GradCAM`` for layer4 and for the four layers one after the
other (four ``GradCAM`` objects, each called, as its API needs for per-layer maps); each as the median of
``--repeats`` timed runs after ``--warmup`` untimed ones (timed round-robin, so load changes on a shared CPU
hit every case alike), and as a ratio to forward-only.
Targets: ours <= 1.25x forward for one layer, <= 2.2x for four. ``--scorecam`` adds Score-CAM at layer4 (one masked
forward per channel: its floor is about channels / ``--scorecam-batch`` batched forwards).

Then the engine throughput (:func:`engine_throughput`): images/s of ``explain`` over batches of ``--batch`` (8)
images vs forward-only images/s at the same batch size (target >= 0.7). This is the engine alone; the export
path (rendering + writing files, ``cams.export``) is not in it.

Why ours is cheaper: one forward for all layers; nothing before the shallowest requested layer is recorded by
autograd; one ``torch.autograd.grad`` to the activations only (no weight gradients, no backward below the
shallowest layer, no ``.grad`` writes); weighting, ReLU, min-max and bilinear upsampling batched in torch.
pytorch-grad-cam runs a full ``loss.backward()`` (all weight gradients, down to the first layer) per call and
post-processes in numpy/OpenCV.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_page import loadavg  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import pfnet  # noqa: E402,F401  (registers the architectures)
from cams import explain  # noqa: E402

MODELS = {"R50": "resnet50_pf", "R50-hybrid": "resnet50_hybrid"}
FOUR_LAYERS = ["layer1", "layer2", "layer3", "layer4"]
TARGET_ONE = 1.25
TARGET_FOUR = 2.2
TARGET_THROUGHPUT = 0.7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    return interleaved_medians({"case": fn}, repeats, warmup, device)["case"]


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, warmup: int,
                        device: torch.device, shuffle: bool = False,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per case, the cases timed round-robin (one run of each per round) so that a shared CPU's
    changing load hits them alike and the ratios between them stay meaningful. ``shuffle``: each round in another
    (seeded) order, so that no case always runs right after the same one (a case that frees much memory slows
    the next one's page faults). ``clock``: wall time by default; ``time.thread_time`` counts only this thread's CPU
    time (one torch thread on the CPU: the work itself, without the time other processes take the core away)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    rounds = random.Random(0)
    for _ in range(repeats):
        if shuffle:
            rounds.shuffle(order)
        for name in order:
            start = clock()
            cases[name]()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def layer_output(model: torch.nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
    """Layer ``name``'s output for ``images`` (one inference-mode forward, as the model returns it: a map, tokens)."""
    from cams.layers import resolve

    recorded = []
    handle = resolve(model, name).register_forward_hook(lambda module, inputs, output: recorded.append(output))
    try:
        with torch.inference_mode():
            model(images)
    finally:
        handle.remove()
    return recorded[0]


def forward_only(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(images)

    return run


def pytorch_grad_cam_per_layer(model: torch.nn.Module, images: torch.Tensor, layers: list[str]) -> Callable[[], object]:
    """pytorch-grad-cam's way to get one map per layer: one GradCAM object per layer, each called (top-1)."""
    from pytorch_grad_cam import GradCAM

    from cams.layers import resolve

    modules = [resolve(model, name) for name in layers]

    def run():
        maps = []
        for module in modules:
            with GradCAM(model=model, target_layers=[module]) as cam:
                maps.append(cam(input_tensor=images, targets=None))
        model.zero_grad(set_to_none=True)
        return maps

    return run


def ours(model: torch.nn.Module, images: torch.Tensor, layers: list[str]) -> Callable[[], object]:
    return lambda: explain(model, images, layers, "gradcam")


def engine_throughput(model: torch.nn.Module, layers: list[str], batch: int = 8, size: int = 224,
                      repeats: int = 5, warmup: int = 1, method: str = "gradcam",
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """Images/s of ``cams.explain`` on batches of ``batch`` images vs forward-only images/s at that batch size.

    The hook for the export engineer: the full export path (render + files) can be timed the same way and
    reported next to this engine-only figure.
    """
    device = torch.device(device)
    images = torch.randn(batch, 3, size, size, device=device)
    medians = interleaved_medians({
        "forward": forward_only(model, images),
        "engine": lambda: explain(model, images, layers, method, batch_size=batch),
    }, repeats, warmup, device)
    forward_s, engine_s = medians["forward"], medians["engine"]
    return {"forward_ips": batch / forward_s, "measured_ips": batch / engine_s, "ratio": forward_s / engine_s}


MODEL_IDS = {"R50": "r50", "R50-hybrid": "r50_hybrid"}


def export_throughput(model: torch.nn.Module, model_id: str, layers: list[str], batch: int = 8,
                      n_images: int = 48, repeats: int = 3, device: torch.device | str = "cpu") -> dict[str, float]:
    """Images/s of the whole export path (decode, preprocess, explain, render, write PNG/npy/grid/manifest)
    against forward-only images/s at the same batch size."""
    import tempfile

    from PIL import Image

    from cams.export import run_export
    from pfnet import zoo

    entry = zoo.get(model_id)
    size = entry.preprocess.input_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        photos = sorted((ROOT / "assets" / "examples").glob("*.jpg"))
        for index in range(n_images):  # the bundled photos at 640x480: realistic decode/encode cost
            with Image.open(photos[index % len(photos)]) as photo:
                photo.convert("RGB").resize((640, 480)).save(folder / f"img{index:03d}.jpg", quality=90)
        images = torch.randn(batch, 3, size, size, device=torch.device(device))
        forward_s = median_seconds(forward_only(model, images), max(3, repeats), 1, torch.device(device)) / batch
        export_s = []
        for run in range(repeats):
            start = time.perf_counter()
            report = run_export([folder], Path(tmp) / f"out{run}", {model_id: (model, entry)}, layers,
                                batch_size=batch)
            export_s.append((time.perf_counter() - start) / n_images)
            if not report.ok:
                raise RuntimeError(f"export benchmark failed: {report.errors}")
    per_image = sorted(export_s)[len(export_s) // 2]
    return {"forward_ips": 1 / forward_s, "measured_ips": 1 / per_image, "ratio": forward_s / per_image}


def bench_model(label: str, arch: str, args,
                device: torch.device) -> list[tuple[str, str, float, float, float | None]]:
    torch.manual_seed(0)
    model = timm.create_model(arch, width_mult=args.width_mult).eval().to(device)
    images = torch.randn(1, 3, args.size, args.size, device=device)
    cases = {"forward only (inference_mode)": (forward_only(model, images), None),
             "ours: Grad-CAM layer4": (ours(model, images, ["layer4"]), TARGET_ONE),
             "ours: Grad-CAM layer1..layer4, one call": (ours(model, images, FOUR_LAYERS), TARGET_FOUR)}
    if args.scorecam:  # one masked forward per layer4 channel (2048 for R50), --scorecam-batch at a time
        cases["ours: Score-CAM layer4"] = (
            lambda: explain(model, images, ["layer4"], "scorecam", batch_size=args.scorecam_batch), None)
    if not args.no_reference:
        cases["pytorch-grad-cam: GradCAM layer4"] = (pytorch_grad_cam_per_layer(model, images, ["layer4"]), None)
        cases["pytorch-grad-cam: 4 GradCAM objects, layer1..layer4"] = (
            pytorch_grad_cam_per_layer(model, images, FOUR_LAYERS), None)
    medians = interleaved_medians({name: fn for name, (fn, _) in cases.items()}, args.repeats, args.warmup, device)
    forward_s = medians["forward only (inference_mode)"]
    return [(label, name, medians[name], medians[name] / forward_s, target) for name, (_, target) in cases.items()]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = CPU count)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--width-mult", type=float, default=1.0, help="<1 only for smoke tests")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput section")
    parser.add_argument("--export-images", type=int, default=48,
                        help="images per export run (the last batch's writes cannot overlap anything; more images "
                             "weigh that tail less, as in a real folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    parser.add_argument("--scorecam", action="store_true", help="also Score-CAM at layer4 (one forward per channel: "
                        "minutes per image on a CPU, meant for a GPU)")
    parser.add_argument("--scorecam-batch", type=int, default=256, help="masked inputs per forward for Score-CAM")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--docs", action="store_true", help="write the tables into docs/performance.md (and, "
                        "on the CPU with the reference, the README's headline table)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    load_before = loadavg()
    lines = [
        f"CAM cost vs forward ({args.device}, {args.size}x{args.size}, batch 1, random weights, "
        f"median of {args.repeats} after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load avg at start {load_before})",
        "",
        "| model | measurement | median ms | x forward | target |",
        "|---|---|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[str, dict[str, float]] = {}
    for label in args.models:
        for model_label, name, seconds, ratio, target in bench_model(label, MODELS[label], args, device):
            ratios.setdefault(model_label, {})[name] = ratio
            verdict = "" if target is None else f"<= {target}x " + ("ok" if ratio <= target else "MISSED")
            line = f"| {model_label} | {name} | {seconds * 1e3:.1f} | {ratio:.2f} | {verdict} |"
            lines.append(line)
            print(line, flush=True)

    if not args.no_throughput:
        def engine(model, label, layers):
            return engine_throughput(model, layers, args.batch, args.size, max(3, args.repeats // 2),
                                     min(args.warmup, 1), device=device)

        def export(model, label, layers):
            return export_throughput(model, MODEL_IDS[label], layers, args.batch, args.export_images, device=device)

        sections = [
            (f"Engine throughput (cams.explain only, no rendering or files; batch {args.batch}, "
             f"{args.size}x{args.size}, Grad-CAM, top-1)", "engine throughput img/s", engine),
            (f"Export throughput (python -m cams export path: decode 640x480 JPEGs, preprocess, explain, overlays, "
             f"grids, .npy, manifest; batch {args.batch}, {args.export_images} images, Grad-CAM, top-1)",
             "export img/s", export),
        ]
        for title, column, measure in sections:
            header = ["", title, "", f"| model | layers | forward-only img/s | {column} | ratio | target |",
                      "|---|---|---:|---:|---:|---|"]
            lines += header
            print("\n".join(header), flush=True)
            for label in args.models:
                torch.manual_seed(0)
                model = timm.create_model(MODELS[label], width_mult=args.width_mult).eval().to(device)
                for layers in (["layer4"], ["layer3", "layer4"]):
                    result = measure(model, label, layers)
                    verdict = f">= {TARGET_THROUGHPUT} " + ("ok" if result["ratio"] >= TARGET_THROUGHPUT else "MISSED")
                    line = (f"| {label} | {', '.join(layers)} | {result['forward_ips']:.2f} | "
                            f"{result['measured_ips']:.2f} | {result['ratio']:.2f} | {verdict} |")
                    lines.append(line)
                    print(line, flush=True)

    footer = f"\nload avg at end {loadavg()} (the CPU is shared: figures taken under load are pessimistic)"
    lines.append(footer)
    print(footer, flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    if args.docs:
        write_docs(text, ratios, args)
    return text


HEADLINE = {"ours, layer4": "ours: Grad-CAM layer4",
            "ours, layer1..layer4 in one call": "ours: Grad-CAM layer1..layer4, one call",
            "pytorch-grad-cam, layer4": "pytorch-grad-cam: GradCAM layer4",
            "pytorch-grad-cam, layer1..layer4": "pytorch-grad-cam: 4 GradCAM objects, layer1..layer4"}


def write_docs(text: str, ratios: dict[str, dict[str, float]], args) -> None:
    """The full tables into docs/performance.md (a section per device); on the CPU with the reference measured,
    the x-forward ratios into the README's headline table."""
    from docs_page import command_line, write_section

    command = command_line()
    page = write_section("performance.md", f"bench_cam-{args.device}", text, command)
    print(f"wrote {page}", flush=True)
    if args.device != "cpu" or args.no_reference or args.width_mult != 1.0:
        return
    rows = ["| model | " + " | ".join(HEADLINE) + " |", "|---|" + "---:|" * len(HEADLINE)]
    for model_label, by_name in ratios.items():
        rows.append(f"| {model_label} | " + " | ".join(f"{by_name[name]:.2f}" for name in HEADLINE.values()) + " |")
    body = ("Grad-CAM's cost as a multiple of a forward pass (224x224, batch 1, random weights, median of "
            f"{args.repeats}):\n\n" + "\n".join(rows))
    print(f"wrote {write_section(ROOT / 'README.md', 'headline', body, command)}", flush=True)


if __name__ == "__main__":
    main()
