"""Every CAM method's time as a multiple of one forward, beside pytorch-grad-cam's (torch-cam's for SmoothGrad-CAM++)
on the same model, layer and batch; writes the table into docs/methods.md.

    python benchmarks/bench_methods.py --threads 1                        # demo R50 (all methods) + R50 Ablation-CAM
    python benchmarks/bench_methods.py --threads 1 --docs   # and write the table into docs/methods.md

Case 1: the bundled demo R50 (contiguous), ``--batch`` scenes-sized images (``--size``), one layer (``--layer``), top-1.
Case 2: Ablation-CAM at layer4 of R50 (random weights, ``--r50-size`` px, one image), the issue's >= 3x target.
Every row is timed round-robin in one process (median of ``--repeats`` after ``--warmup``), the forward with them, so
that a shared CPU's changing load hits all alike; the load average is printed with the table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_page import loadavg  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import pfnet  # noqa: E402
from benchmarks.bench_cam import forward_only, interleaved_medians  # noqa: E402
from cams import METHODS, explain  # noqa: E402
from cams.layers import resolve  # noqa: E402

REFERENCE_CLASS = {
    "gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
    "layercam": "LayerCAM", "gradcamelementwise": "GradCAMElementWise", "eigengradcam": "EigenGradCAM",
    "eigencam": "EigenCAM", "kpcacam": "KPCA_CAM", "finercam": "FinerCAM", "shapleycam": "ShapleyCAM",
    "fullgrad": "FullGrad", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM",
}


def _reference(method: str, model, images, layer: str):
    """A callable running the peer library's implementation of ``method`` on ``images`` (top-1), or None."""
    if method == "smoothgradcampp":
        try:
            from torchcam.methods import SmoothGradCAMpp
        except ImportError:
            return None

        def run_torchcam():
            with SmoothGradCAMpp(model, layer, input_shape=tuple(images.shape[1:])) as extractor:
                scores = model(images.clone().requires_grad_(True))
                extractor(scores.argmax(1).tolist(), scores)
            model.zero_grad(set_to_none=True)
        return run_torchcam
    if method == "guidedgradcam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
        guided_model = copy.deepcopy(model)

        def run_guided():
            with GradCAM(model=model, target_layers=[resolve(model, layer)]) as cam:
                cam(input_tensor=images, targets=None)
            guide = GuidedBackpropReLUModel(guided_model, device=images.device)
            for index in range(images.shape[0]):  # it explains one image per call
                guide(images[index:index + 1].clone())
        return run_guided
    name = REFERENCE_CLASS.get(method)
    if name is None:
        return None
    import pytorch_grad_cam
    cls = getattr(pytorch_grad_cam, name)

    def run():
        with contextlib.redirect_stderr(io.StringIO()):  # AblationCAM's / ScoreCAM's tqdm bars
            targets = [] if method == "fullgrad" else [resolve(model, layer)]
            with cls(model=model, target_layers=targets) as cam:
                cam(input_tensor=images, targets=None)
        model.zero_grad(set_to_none=True)
    return run


def _row(label: str, method: str, layer: str, ours: float, forward: float, theirs: float | None, peer: str) -> str:
    peer_cell = f"{theirs / forward:.2f}x ({peer})" if theirs is not None else "—"
    speedup = f"{theirs / ours:.1f}x" if theirs is not None else "—"
    return (f"| {label} | {METHODS[method]} (`{method}`) | {layer} | {ours / forward:.2f}x | {peer_cell} | "
            f"{speedup} | {ours * 1000:.0f} |")


def bench(model, label: str, images: torch.Tensor, layer: str, methods: list[str], args) -> list[str]:
    cases = {"forward": forward_only(model, images)}
    for method in methods:
        cases[f"ours {method}"] = (lambda method=method: explain(model, images, [layer], method, align="none",
                                                                 batch_size=args.channel_batch))
        reference = None if args.no_reference else _reference(method, model, images, layer)
        if reference is not None:
            cases[f"ref {method}"] = reference
    times = interleaved_medians(cases, args.repeats, args.warmup, images.device, shuffle=True)
    forward = times["forward"]
    rows = []
    for method in methods:
        peer = "torch-cam" if method == "smoothgradcampp" else "pytorch-grad-cam"
        rows.append(_row(label, method, layer, times[f"ours {method}"], forward, times.get(f"ref {method}"), peer))
    print(f"[{label}] forward {forward * 1000:.1f} ms", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="demo R50 input size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "cam"))
    parser.add_argument("--channel-batch", type=int, default=32, help="Score-CAM / Ablation-CAM inputs per forward")
    parser.add_argument("--r50-size", type=int, default=96, help="R50 Ablation-CAM case input size (0: skip)")
    parser.add_argument("--r50-repeats", type=int, default=1, help="runs of the R50 case (pytorch-grad-cam's takes "
                        "64 whole forwards of 32 images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true", help="time pfcam only")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/methods.md (its bench section)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}")

    torch.manual_seed(0)
    demo = pfnet.load("demo_r50", memory_format="contiguous")
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    rows = bench(demo, f"demo R50, {args.batch} x {args.size} px", images, args.layer, methods, args)
    if args.r50_size and "ablationcam" in methods:
        torch.manual_seed(0)
        r50 = timm.create_model("resnet50_pf").eval()
        one = torch.randn(1, 3, args.r50_size, args.r50_size, generator=torch.Generator().manual_seed(2))
        r50_args = argparse.Namespace(**{**vars(args), "repeats": args.r50_repeats, "warmup": 0})
        rows += bench(r50, f"R50, 1 x {args.r50_size} px", one, "layer4", ["ablationcam"], r50_args)

    header = ["| model, batch | method | layer | pfcam (x forward) | peer (x forward) | pfcam faster | pfcam ms |",
              "|---|---|---|---|---|---|---|"]
    text = "\n".join([f"Median of {args.repeats} round-robin runs ({args.r50_repeats} for the R50 row), "
                      f"{args.threads} torch thread(s); each time divided by one inference-mode forward of the same "
                      "batch.", "", *header, *rows]) + "\n"
    print(f"load average {loadavg()}\n{text}")
    if args.docs:
        from benchmarks.docs_page import write_section
        write_section("methods.md", "methods", text)
    return text


if __name__ == "__main__":
    main()
