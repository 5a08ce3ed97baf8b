"""How fast ``pfdemo.scenes`` renders: scenes per second on one core and in N processes, per image size.

    python benchmarks/bench_scenes.py [--n 1000] [--sizes 128 160 224] [--workers 2]

With ``--workers N`` the same scenes are also rendered by N processes (chunks of 50 indices, scenes pickled back
to the parent, as a DataLoader's workers would hand them over); each scene depends only on (seed, index), so
the split changes nothing in the output.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pfdemo.scenes import render_scene  # noqa: E402


def scenes_per_second(size: int, n: int, seed: int = 0) -> float:
    render_scene(seed, 0, size)  # warm-up (noise bank, imports)
    start = time.perf_counter()
    for index in range(n):
        render_scene(seed, index, size)
    return n / (time.perf_counter() - start)


CHUNK = 50


def _render_chunk(job: tuple[int, int, int, int]) -> list:
    seed, start, stop, size = job
    return [render_scene(seed, index, size) for index in range(start, stop)]


def parallel_scenes_per_second(size: int, n: int, workers: int, seed: int = 0) -> float:
    jobs = [(seed, lo, min(lo + CHUNK, n), size) for lo in range(0, n, CHUNK)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_render_chunk, [(seed, 0, workers, size)] * workers)  # warm-up every worker
        start = time.perf_counter()
        count = sum(len(chunk) for chunk in pool.imap(_render_chunk, jobs))
        elapsed = time.perf_counter() - start
    assert count == n
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="scenes per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 224])
    parser.add_argument("--workers", type=int, default=0, help="also measure N rendering processes (0: skip)")
    args = parser.parse_args(argv)
    header = "| size | scenes/s (one process, one core) |"
    if args.workers:
        header += f" scenes/s ({args.workers} processes) |"
    print(header + "\n|---:|---:|" + ("---:|" if args.workers else ""))
    for size in args.sizes:
        row = f"| {size} | {scenes_per_second(size, args.n):.0f} |"
        if args.workers:
            row += f" {parallel_scenes_per_second(size, args.n, args.workers):.0f} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
