"""Where the engine's time goes besides the CAM maths: Eigen-CAM's decomposition and the forward's memory format.

    python benchmarks/bench_speed.py --threads 1                 # both tables, random weights
    python benchmarks/bench_speed.py --threads 1 --reference     # also pytorch-grad-cam's EigenCAM (slow)
    python benchmarks/bench_speed.py --device cuda               # measure a GPU (the memory-format rule per device)

1. Eigen-CAM at layer1..layer4 of R50 (224 px, ``--eigen-batch`` images, random weights): ``cams.explain`` against
   one inference-mode forward of the same batch (target <= 1.3x), with the LAPACK branch each layer takes and how many
   images took the fast path (torch QR on the device + LAPACK on the small factor) rather than the exact replica of
   pytorch-grad-cam's arithmetic (the direct branch, rank-deficient activations); beside it ``eigencam_fixed``,
   the same projection with the sign fixed by the activations (``cams.eigen.fixed_sign_projection``).
2. The forward, contiguous (NCHW) vs channels_last (model and input), per model at its size and batch; for the
   ResNets also Grad-CAM layer4 in both formats and the largest heatmap difference between them, next to float32's
   own error (contiguous against float64).
3. ``--kernels``: the profiler's share of the forward per kernel (R50, R50-hybrid, both formats); R50's stride-1
   1x1 convolutions alone in ATen's kernel (``_slow_conv2d_forward``) and oneDNN's, both formats; and whole
   channels_last forwards with those convolutions sent to oneDNN.

Every case of a table is timed round-robin in one process (one run of each per round, each round in a seeded
shuffled order; median of ``--repeats`` after ``--warmup``), so that a shared CPU's changing load hits all alike; the
load average is printed with the results.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_page import loadavg  # noqa: E402

import timm  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
import torch  # noqa: E402

import pfnet  # noqa: E402
from benchmarks.bench_cam import forward_only, interleaved_medians, layer_output  # noqa: E402
from cams import eigen, explain  # noqa: E402
from cams.layers import resolve  # noqa: E402
from pfnet import memory_format  # noqa: E402

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
TARGET_EIGEN = 1.3
# label: (timm architecture or zoo id of a bundled demo model, zoo family, input size, batch)
FORWARD_MODELS = {
    "R50": ("resnet50_pf", "resnet", 224, 8),
    "R50-hybrid": ("resnet50_hybrid", "resnet", 224, 8),
    "R50-max": ("resnet50_max", "resnet", 224, 8),
    "demo R50": ("demo_r50", "resnet", 128, 32),
    "demo R50-hybrid": ("demo_r50_hybrid", "resnet", 128, 32),
    "demo R50-max": ("demo_r50_max", "resnet", 160, 32),
    "ViT-S-max": ("vit_s_max", "vit", 224, 8),
    "PiT-S-max": ("pit_s_max", "pit", 224, 8),
}
DEFAULT_FORWARD = ["R50", "R50-hybrid", "demo R50", "demo R50-hybrid", "demo R50-max"]


def _build(source: str, device: torch.device) -> torch.nn.Module:
    """A contiguous model: a bundled demo model's weights, or random weights (seed 0)."""
    if source.startswith("demo_"):
        return pfnet.load(source, device=device, memory_format="contiguous")
    torch.manual_seed(0)
    return timm.create_model(source).eval().to(device)


def _fast_share(acts: torch.Tensor) -> str:
    """"k/n": how many of the batch's images take the fast path (not gesdd's own arithmetic in numpy)."""
    exact = []
    saved = {name: getattr(eigen, name) for name in ("reference_projection", "exact_qr_projection")}
    for name, run in saved.items():
        setattr(eigen, name, lambda batch, run=run: exact.append(len(batch)) or run(batch))
    try:
        eigen.first_component_projection(acts)
    finally:
        for name, run in saved.items():
            setattr(eigen, name, run)
    return f"{len(acts) - sum(exact)}/{len(acts)}"


def eigen_table(args, device: torch.device) -> list[str]:
    """Eigen-CAM's whole call against a forward, and its projection alone (on recorded activations): the second is
    the cost Eigen-CAM adds to a forward, timed without the forward's noise."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model = _build("resnet50_pf", device)
    images = torch.randn(args.eigen_batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    acts = {layer: layer_output(model, images, layer) for layer in LAYERS}
    cases = {"forward": forward_only(model, images)}
    for layer in LAYERS:
        cases[f"ours {layer}"] = lambda layer=layer: explain(model, images, [layer], "eigencam", align="none")
        cases[f"ours projection {layer}"] = lambda layer=layer: eigen.first_component_projection(acts[layer])
        cases[f"fixed {layer}"] = lambda layer=layer: explain(model, images, [layer], "eigencam_fixed", align="none")
        cases[f"fixed projection {layer}"] = lambda layer=layer: eigen.fixed_sign_projection(acts[layer])
    if args.reference:
        from pytorch_grad_cam import EigenCAM

        def reference(layer):
            def run():
                with EigenCAM(model=model, target_layers=[resolve(model, layer)]) as cam:
                    return cam(input_tensor=images, targets=None)
            return run

        for layer in LAYERS:
            cases[f"pytorch-grad-cam {layer}"] = reference(layer)
            cases[f"pytorch-grad-cam projection {layer}"] = lambda layer=layer: get_2d_projection(
                acts[layer].cpu().numpy())
    medians = interleaved_medians(cases, args.repeats, args.warmup, device, shuffle=True)
    forward_s = medians["forward"]
    lines = [f"Eigen-CAM vs forward (R50, 224x224, batch {args.eigen_batch}, random weights, contiguous; "
             f"median of {args.repeats} after {args.warmup} warm-up, round-robin). 'x forward' is the whole call; "
             f"'1 + projection' is 1 + (the projection alone) / forward, the same cost without the forward's noise. "
             f"'eigencam' has pytorch-grad-cam's sign (LAPACK's); 'eigencam_fixed' the sign fixed by the "
             f"activations, from the small Gram matrix",
             "", "| layer | gesdd branch | fast path | eigencam ms | x forward | projection ms | 1 + projection | "
             "target | eigencam_fixed ms | x forward | projection ms | 1 + projection | target | "
             "pytorch-grad-cam ms | x forward | its projection ms | 1 + projection |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
             f"| (forward only) | | | {forward_s * 1e3:.1f} | 1.00 | | | | | | | | | | | | |"]
    for layer in LAYERS:
        branch = eigen.gesdd_branch(acts[layer].shape[2] * acts[layer].shape[3], acts[layer].shape[1])
        ours, projection = medians[f"ours {layer}"], medians[f"ours projection {layer}"]
        added = 1 + projection / forward_s
        verdict = f"<= {TARGET_EIGEN}x " + ("ok" if added <= TARGET_EIGEN else "MISSED")
        row = (f"| {layer} | {branch} | {_fast_share(acts[layer])} | {ours * 1e3:.1f} | {ours / forward_s:.2f} | "
               f"{projection * 1e3:.1f} | {added:.2f} | {verdict} |")
        fixed, fixed_projection = medians[f"fixed {layer}"], medians[f"fixed projection {layer}"]
        fixed_added = 1 + fixed_projection / forward_s
        row += (f" {fixed * 1e3:.1f} | {fixed / forward_s:.2f} | {fixed_projection * 1e3:.1f} | {fixed_added:.2f} | "
                f"<= {TARGET_EIGEN}x {'ok' if fixed_added <= TARGET_EIGEN else 'MISSED'} |")
        if args.reference:
            reference, theirs = medians[f"pytorch-grad-cam {layer}"], medians[f"pytorch-grad-cam projection {layer}"]
            row += (f" {reference * 1e3:.1f} | {reference / forward_s:.2f} | {theirs * 1e3:.1f} | "
                    f"{1 + theirs / forward_s:.2f} |")
        else:
            row += " | | | |"
        lines.append(row)
    return lines


def forward_table(args, device: torch.device) -> list[str]:
    lines = [f"Forward, contiguous vs channels_last (model and input; median of {args.repeats} after {args.warmup} "
             f"warm-up, round-robin per model); for the ResNets Grad-CAM layer4, and the largest heatmap difference "
             f"(Grad-CAM layer1..4) between the formats next to float32's own error (contiguous vs float64)", "",
             "| model | input | batch | contiguous ms | channels_last ms | speed-up | Grad-CAM l4 contiguous ms | "
             "Grad-CAM l4 channels_last ms | max diff | float32's own | rule here |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for label in args.forward_models:
        source, family, size, batch = FORWARD_MODELS[label]
        contiguous = _build(source, device)
        channels_last = memory_format.apply_format(copy.deepcopy(contiguous), "channels_last")
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
        images_cl = images.contiguous(memory_format=torch.channels_last)
        cases = {"contiguous": forward_only(contiguous, images),
                 "channels_last": forward_only(channels_last, images_cl)}
        resnet = hasattr(contiguous, "layer4")
        if resnet:
            cases["gradcam contiguous"] = lambda: explain(contiguous, images, ["layer4"], align="none")
            cases["gradcam channels_last"] = lambda: explain(channels_last, images, ["layer4"], align="none")
        medians = interleaved_medians(cases, args.repeats, args.warmup, device, shuffle=True)
        if resnet:
            plain = explain(contiguous, images, LAYERS, align="none")
            difference = (plain.heatmaps - explain(channels_last, images, LAYERS, align="none").heatmaps).abs().max()
            exact = explain(copy.deepcopy(contiguous).double(), images.double(), LAYERS, align="none")
            own = (plain.heatmaps - exact.heatmaps).abs().max() if torch.equal(exact.targets, plain.targets) else None
            grad = (f"{medians['gradcam contiguous'] * 1e3:.1f} | {medians['gradcam channels_last'] * 1e3:.1f} | "
                    f"{difference:.1e} | {'n/a' if own is None else f'{own:.1e}'}")
        else:
            grad = " | | | "
        rule = memory_format.preferred_format(family, device)
        line = (f"| {label} | {size} | {batch} | {medians['contiguous'] * 1e3:.1f} | "
                f"{medians['channels_last'] * 1e3:.1f} | {medians['contiguous'] / medians['channels_last']:.2f} | "
                f"{grad} | {rule} |")
        lines.append(line)
        print(line, flush=True)
    return lines


ONE_BY_ONE = [((8, 64, 56, 56), 256), ((8, 256, 56, 56), 64), ((8, 256, 14, 14), 1024), ((8, 1024, 14, 14), 256),
              ((8, 512, 7, 7), 2048), ((8, 2048, 7, 7), 512)]  # R50's stride-1 1x1 convolutions at batch 8


def _one_by_one_share(model: torch.nn.Module, images: torch.Tensor) -> float:
    """The stride-1 1x1 convolutions' share of all convolution multiply-accumulates in one forward."""
    macs = {"all": 0, "1x1": 0}

    def count(module, inputs, output):
        work = output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        macs["all"] += work
        macs["1x1"] += work if module.kernel_size == (1, 1) and module.stride == (1, 1) else 0

    handles = [module.register_forward_hook(count) for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    try:
        forward_only(model, images)()
    finally:
        for handle in handles:
            handle.remove()
    return macs["1x1"] / macs["all"]


def kernel_tables(args, device: torch.device) -> list[str]:
    """Which kernels a forward spends its time in (profiler, contiguous and channels_last), and the stride-1 1x1
    convolutions alone: ATen's own kernel (what one thread gets below batch 16) against oneDNN's, both formats."""
    from torch.profiler import ProfilerActivity, profile

    lines = ["Forward time by kernel (torch.profiler, one forward after one warm-up, batch 8, 224x224), and the "
             "stride-1 1x1 convolutions' share of the convolution MACs", "",
             "| model | format | _slow_conv2d_forward | mkldnn_convolution | max_pool2d_with_indices | "
             "native_batch_norm | other | 1x1 share of MACs |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    kernels = ["aten::_slow_conv2d_forward", "aten::mkldnn_convolution", "aten::max_pool2d_with_indices",
               "aten::native_batch_norm"]
    for label in ("R50", "R50-hybrid"):
        contiguous = _build(FORWARD_MODELS[label][0], device)
        for name in ("contiguous", "channels_last"):
            model = memory_format.apply_format(copy.deepcopy(contiguous), name)
            images = torch.randn(8, 3, 224, 224, device=device).contiguous(memory_format=memory_format.FORMATS[name])
            forward_only(model, images)()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                forward_only(model, images)()
            self_us = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
            total = sum(self_us.values())
            shares = [self_us.get(kernel, 0) / total for kernel in kernels]
            lines.append(f"| {label} | {name} | " + " | ".join(f"{share:.0%}" for share in shares)
                         + f" | {1 - sum(shares):.0%} | {_one_by_one_share(model, images):.0%} |")
    mkldnn = torch.ops.aten.mkldnn_convolution
    lines += ["", "Stride-1 1x1 convolutions of R50 alone (GFLOP/s, median of the runs, round-robin)", "",
              "| input | out | ATen NCHW | oneDNN NCHW | ATen NHWC | oneDNN NHWC |", "|---|---:|---:|---:|---:|---:|"]
    for shape, out in ONE_BY_ONE:
        images = torch.randn(shape, device=device)
        weight = torch.randn(out, shape[1], 1, 1, device=device) / shape[1] ** 0.5
        nhwc, weight_nhwc = (tensor.contiguous(memory_format=torch.channels_last) for tensor in (images, weight))
        cases = {"aten nchw": lambda: torch.nn.functional.conv2d(images, weight),
                 "onednn nchw": lambda: mkldnn(images, weight, None, [0, 0], [1, 1], [1, 1], 1),
                 "aten nhwc": lambda: torch.nn.functional.conv2d(nhwc, weight_nhwc),
                 "onednn nhwc": lambda: mkldnn(nhwc, weight_nhwc, None, [0, 0], [1, 1], [1, 1], 1)}
        with torch.inference_mode():
            medians = interleaved_medians(cases, args.repeats, args.warmup, device, shuffle=True)
        flops = 2 * shape[0] * shape[2] * shape[3] * shape[1] * out
        lines.append(f"| {list(shape)} | {out} | " + " | ".join(f"{flops / medians[name] / 1e9:.1f}" for name in cases)
                     + " |")
    lines += ["", "Whole forwards in channels_last, the stride-1 1x1 convolutions on oneDNN too (their dilation "
              "set to 2, which changes nothing but ATen's choice of kernel; not applied by pfnet.load)", "",
              "| model | batch | channels_last ms | + 1x1 on oneDNN ms | speed-up |", "|---|---:|---:|---:|---:|"]
    for label in ("R50", "R50-hybrid"):
        model = memory_format.apply_format(_build(FORWARD_MODELS[label][0], device), "channels_last")
        routed = copy.deepcopy(model)
        for module in routed.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1):
                module.dilation = (2, 2)
        for batch in (1, 8):
            images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
            cases = {"plain": forward_only(model, images), "routed": forward_only(routed, images)}
            medians = interleaved_medians(cases, args.repeats, args.warmup, device, shuffle=True)
            lines.append(f"| {label} | {batch} | {medians['plain'] * 1e3:.1f} | {medians['routed'] * 1e3:.1f} | "
                         f"{medians['plain'] / medians['routed']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eigen-batch", type=int, default=1)
    parser.add_argument("--reference", action="store_true", help="also time pytorch-grad-cam's EigenCAM")
    parser.add_argument("--forward-models", nargs="*", default=DEFAULT_FORWARD, choices=list(FORWARD_MODELS))
    parser.add_argument("--no-eigen", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="also the profiler's kernel shares and the 1x1 "
                        "convolutions alone (CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # numpy's BLAS (pytorch-grad-cam's SVD) gets torch's thread count too, as cams.eigen gives it.
    threadpool_limits(limits=torch.get_num_threads(), user_api="blas")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"bench_speed: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"load avg at start {loadavg()}")
    print(header, "", sep="\n", flush=True)
    lines = [header, ""]
    if not args.no_eigen:
        table = eigen_table(args, device)
        print("\n".join(table), "", sep="\n", flush=True)
        lines += table + [""]
    if args.forward_models:
        lines += forward_table(args, device)
    if args.kernels:
        table = kernel_tables(args, device)
        print("", *table, sep="\n", flush=True)
        lines += [""] + table
    footer = f"\nload avg at end {loadavg()} (a shared CPU: figures taken under load are pessimistic, ratios hold)"
    print(footer, flush=True)
    return "\n".join(lines + [footer]) + "\n"


if __name__ == "__main__":
    main()
