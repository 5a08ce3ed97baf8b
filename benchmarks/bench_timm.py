"""Grad-CAM on networks pfnet did not build (timm models, random weights) as a multiple of a forward pass, beside
pytorch-grad-cam on the same model, layers and batch.

    python benchmarks/bench_timm.py --threads 1          # the table
    python benchmarks/bench_timm.py --threads 1 --docs   # and into docs/performance.md (section bench_timm-cpu)
    python benchmarks/bench_timm.py --threads 1 --clock thread --docs   # CPU time, on a loaded machine

Per model (``--models``: convnext_tiny, tf_efficientnet_lite0, deit_small_patch16_224 at 224x224, batch ``--batch``):
one inference-mode forward; the floor of any Grad-CAM at the default layer (a forward, then the backward from the
top logit to that layer with plain autograd: the work that is left when the CAM maths and checks cost nothing);
``cams.explain`` Grad-CAM at the default layer (``cams.default_layer``: the last stage;
EfficientNet's final feature map ``bn2``, after its head convolution, and then also at the last stage, which needs
a backward through that convolution; for DeiT, whose head reads the class token only, the last block but one, since
the last block's patch tokens get no gradient) and at every stage in one call (the stem and every stage; a ViT has
no stages: every block);
pytorch-grad-cam's ``GradCAM`` at the same layer, and one ``GradCAM`` object per layer for every stage (its API
gives one map per layer per call), with the ``reshape_transform`` a user writes for it (tokens: prefix tokens
dropped, the rest on the patch grid). Target: <= 1.05x forward at the default layer.

The cases of one model are timed round-robin in one process (each round in a seeded shuffled order; median of
``--repeats`` after ``--warmup``), so that a shared CPU's changing load hits them alike; the ratios are what to read.
On a CPU shared with other processes, ``--threads 1 --clock thread`` times the thread's CPU time instead of the wall
clock: the work itself, not the share of the core other processes took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_page import loadavg  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_cam import forward_only, interleaved_medians, layer_output  # noqa: E402
from cams import available_layers, default_layer, explain  # noqa: E402
from cams.any_model import layout, outline  # noqa: E402
from cams.layers import resolve  # noqa: E402

MODELS = ["convnext_tiny", "tf_efficientnet_lite0", "deit_small_patch16_224"]
TARGET = 1.05


def every_stage(model: torch.nn.Module) -> list[str]:
    """The stem and every stage (a network without stages: every block), shallow to deep."""
    specs = available_layers(model)
    names = [spec.name for spec in specs if spec.kind in ("stem", "stage")]
    if not any(spec.kind == "stage" for spec in specs):
        names = [spec.name for spec in specs if spec.kind == "block"]
    return names


def reshape_transform(model: torch.nn.Module, name: str, images: torch.Tensor):
    """The reshape a pytorch-grad-cam user writes by hand for layer ``name`` (None for a map [N, C, h, w])."""
    how = layout(model, tuple(layer_output(model, images[:1], name).shape), tuple(images.shape[-2:]))
    if how[0] == "nchw":
        return None
    if how[0] == "nhwc":
        return lambda tensor: tensor.permute(0, 3, 1, 2)
    _, prefix, height, width = how
    return lambda tensor: tensor[:, prefix:].reshape(tensor.shape[0], height, width, -1).permute(0, 3, 1, 2)


def grad_cam_objects(model: torch.nn.Module, images: torch.Tensor, layers: list[str]):
    """pytorch-grad-cam: one GradCAM object per layer, each called (top-1), with the hand-written reshape."""
    from pytorch_grad_cam import GradCAM

    plans = [(resolve(model, name), reshape_transform(model, name, images)) for name in layers]

    def run():
        maps = []
        for module, reshape in plans:
            with GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as cam:
                maps.append(cam(input_tensor=images, targets=None))
        model.zero_grad(set_to_none=True)
        return maps

    return run


def backward_floor(model: torch.nn.Module, images: torch.Tensor, name: str):
    """What any Grad-CAM at layer ``name`` must do: a forward without recording up to the layer, then recording,
    and the backward from the top logit to the layer's output (plain autograd, no CAM maths, no checks)."""
    module = resolve(model, name)

    def run():
        recorded = []

        def start_recording(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            torch.set_grad_enabled(True)
            leaf = tensor.detach().requires_grad_(True)
            recorded.append(leaf)
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

        handle = module.register_forward_hook(start_recording)
        try:
            with torch.no_grad():
                logits = model(images)
        finally:
            handle.remove()
        return torch.autograd.grad(logits.max(dim=1).values.sum(), recorded[0])

    return run


def bench_model(name: str, args) -> list[tuple[str, str, float, float, float | None]]:
    torch.manual_seed(0)
    try:  # ViTs are built for one input size
        model = timm.create_model(name, pretrained=False, img_size=args.size).eval()
    except TypeError:
        model = timm.create_model(name, pretrained=False).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    last, stages = default_layer(model), every_stage(model)
    kind = "stage" if any(spec.kind == "stage" for spec in available_layers(model)) else "block"
    cases = {
        "forward only (inference_mode)": (forward_only(model, images), None),
        f"floor: forward + backward to {last} (plain autograd)": (backward_floor(model, images, last), None),
        f"ours: Grad-CAM {last}": (lambda: explain(model, images, [last], align="none"), TARGET),
    }
    if outline(model).head == last:
        last_stage = stages[-2]
        cases[f"ours: Grad-CAM {last_stage} (last stage, before the head)"] = (
            lambda: explain(model, images, [last_stage], align="none"), None)
    cases |= {
        f"ours: Grad-CAM every {kind} ({len(stages)}), one call": (
            lambda: explain(model, images, stages, align="none"), None),
    }
    if not args.no_reference:
        cases[f"pytorch-grad-cam: GradCAM {last}"] = (grad_cam_objects(model, images, [last]), None)
        cases[f"pytorch-grad-cam: {len(stages)} GradCAM objects, every {kind}"] = (
            grad_cam_objects(model, images, stages), None)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    medians = interleaved_medians({label: fn for label, (fn, _) in cases.items()}, args.repeats, args.warmup,
                                  torch.device("cpu"), shuffle=True, clock=clock)
    forward_s = medians["forward only (inference_mode)"]
    return [(name, label, medians[label], medians[label] / forward_s, target) for label, (_, target) in cases.items()]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm model names (random weights)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: this thread's CPU time (with --threads 1: the work, not the other processes' "
                             "share of a loaded CPU)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread needs --threads 1 (other threads' CPU time would not be counted)")
    if args.threads:
        torch.set_num_threads(args.threads)
    title = (f"Grad-CAM on timm models vs a forward (cpu, {args.size}x{args.size}, batch {args.batch}, random "
             f"weights, median of {args.repeats} after {args.warmup} warm-up, {torch.get_num_threads()} torch "
             f"threads, {'CPU time of the thread' if args.clock == 'thread' else 'wall time'}, load average at the "
             f"start {loadavg(1)})")
    lines = [title, "", "| model | measurement | median ms | x forward | target |", "|---|---|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for name in args.models:
        for model_name, label, seconds, ratio, target in bench_model(name, args):
            verdict = "" if target is None else (
                f"<= {target}x " + ("ok" if ratio <= target else f"MISSED ({ratio:.3f})"))
            line = f"| {model_name} | {label} | {seconds * 1e3:.1f} | {ratio:.2f} | {verdict} |"
            lines.append(line)
            print(line, flush=True)
    text = "\n".join(lines) + "\n"
    if args.docs:
        from benchmarks.docs_page import write_section

        print(f"wrote {write_section('performance.md', 'bench_timm-cpu', text)}", flush=True)
    return text


if __name__ == "__main__":
    main()
