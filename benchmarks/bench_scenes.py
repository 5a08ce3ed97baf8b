"""How fast ``pfnet.scenes`` renders: scenes per second on one core, per image size.

    python benchmarks/bench_scenes.py [--n 1000] [--sizes 128 160 224]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pfnet.scenes import render_scene  # noqa: E402


def scenes_per_second(size: int, n: int, seed: int = 0) -> float:
    render_scene(seed, 0, size)  # warm-up (noise bank, imports)
    start = time.perf_counter()
    for index in range(n):
        render_scene(seed, index, size)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="scenes per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 224])
    args = parser.parse_args(argv)
    print("| size | scenes/s (one process, one core) |\n|---:|---:|")
    for size in args.sizes:
        print(f"| {size} | {scenes_per_second(size, args.n):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
