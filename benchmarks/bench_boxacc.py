"""MaxBoxAccV2 curve speed per protocol: ``python benchmarks/bench_boxacc.py [--n 48] [--side 160] [--docs]``.

Times :func:`cams.boxacc.best_iou_curve` (the numba sweep) in the ``pfcam`` and ``wsol`` protocols on the same
smooth CAM-like maps and uniform noise, plus the per-threshold contour path of the ``wsol`` protocol
(:func:`cams.boxacc.threshold_boxes` + :func:`cams.boxacc.curve_from_boxes`), and prints the ratios. Best of
``--repeat`` runs (a shared machine's noise only adds time)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cams import boxacc as B  # noqa: E402 - importable once the repository root is on the path


def maps(n: int, side: int, seed: int = 0) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            h = rng.random((side, side)).astype(np.float32)
        else:
            coarse = rng.random((side // 32 + 1, side // 32 + 1)).astype(np.float32)
            h = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_LINEAR)
        x0, y0 = rng.integers(0, side // 2, size=2)
        out.append((h, (int(x0), int(y0), int(x0 + side // 3), int(y0 + side // 3))))
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--side", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="write the table into docs/measuring.md")
    args = parser.parse_args()
    data = maps(args.n, args.side)
    for protocol in B.PROTOCOLS:  # compile and warm
        B.best_iou_curve(*data[0], protocol=protocol)
    timings = {}
    for protocol in B.PROTOCOLS:
        for step in B.STEPS:
            cuts = B.thresholds_for(protocol, step)
            timings[protocol, step] = best_of(
                lambda cuts=cuts, protocol=protocol: [B.best_iou_curve(h, box, cuts, protocol=protocol)
                                                      for h, box in data], args.repeat)
    cuts = B.thresholds_for("wsol", 0.01)
    traced = best_of(lambda: [B.curve_from_boxes(*B.threshold_boxes(h, cuts, "wsol"), box, len(cuts), "wsol")
                              for h, box in data], 1)
    lines = [f"{args.n} maps of {args.side} x {args.side} (half smooth CAM-like, half uniform noise), best of "
             f"{args.repeat}:", "", "| path | protocol | step | ms per map |", "|---|---|---:|---:|"]
    for (protocol, step), seconds in timings.items():
        lines.append(f"| numba sweep | {protocol} | {step:g} | {1000 * seconds / args.n:.2f} |")
    lines.append(f"| per-threshold contours | wsol | 0.01 | {1000 * traced / args.n:.2f} |")
    lines.append("")
    lines.append("Ratio wsol / pfcam: " + ", ".join(
        f"{timings['wsol', step] / timings['pfcam', step]:.2f} at step {step:g}" for step in B.STEPS)
        + f"; contours / sweep (wsol, 0.01): {traced / timings['wsol', 0.01]:.1f}.")
    body = "\n".join(lines)
    print(body)
    if args.docs:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from docs_page import write_section

        print(f"wrote {write_section('measuring.md', 'bench_boxacc', body)}")

if __name__ == "__main__":
    main()
