"""How many torch threads an export's network should have: ``python -m cams export`` as a user runs it, in a fresh
process each time, with the default thread rule and with every fixed ``--threads`` count from 1 to the cores.

    python benchmarks/bench_export_threads.py                  # 200 photos, demo pair, PNG overlays and heatmaps only
    python benchmarks/bench_export_threads.py --images 100 --rounds 3 --markdown threads.md

The export runs the network on one thread and decodes, draws and writes on others (a loader and
``default_writers()`` writers); torch's own default is one thread per core, and its threads then wait on cores the
writers hold. The default rule (``cams.export.executor.network_threads``) leaves cores to those threads. Each case
is the command's whole wall time (start-up and model loading included, as a user sees it) over the same 640x480
photo JPEGs (``bench_export.make_photos``) with demo_r50 + demo_r50_hybrid at layer3,layer4; ``$OMP_NUM_THREADS``
is removed from the environment so the default is the rule's. Cases take turns within a round; medians over
``--rounds``. The last column compares each case with torch's own count (``--threads`` = the cores), the count
an export used before it chose one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_export import LAYERS, MODELS, make_photos  # noqa: E402
from cams.export.executor import network_threads  # noqa: E402

OUTPUTS = {"png": ["--format", "png"], "heatmaps only": ["--no-overlays"]}


def export_seconds(photos: Path, out: Path, options: list[str], threads: int | None) -> float:
    """Wall seconds of one ``python -m cams export`` in a fresh process (``threads``: None = the default)."""
    command = [sys.executable, "-m", "cams", "export", str(photos), "--out", str(out), "--models", ",".join(MODELS),
               "--layers", ",".join(LAYERS), *options]
    command += [] if threads is None else ["--threads", str(threads)]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--outputs", default=",".join(OUTPUTS), help="cases (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    counts: list[int | None] = [None, *range(1, cores + 1)]
    outputs = [name.strip() for name in args.outputs.split(",") if name.strip()]
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        parser.error(f"unknown outputs {unknown}; known: {', '.join(OUTPUTS)}")
    times: dict[tuple[str, int | None], list[float]] = {(name, count): [] for name in outputs for count in counts}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp, "photos")
        photos.mkdir()
        make_photos(photos, args.images)
        for round_index in range(args.rounds):
            for name in outputs:
                for count in counts:
                    out = Path(tmp, f"out-{round_index}-{name.replace(' ', '_')}-{count}")
                    times[(name, count)].append(export_seconds(photos, out, OUTPUTS[name], count))
    load_after = os.getloadavg()
    lines = [f"`python -m cams export` of {args.images} photos (640x480 JPEG), {', '.join(MODELS)}, layers "
             f"{','.join(LAYERS)}; {cores} CPUs; medians of {args.rounds} rounds; load average (1 min) "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after.", "",
             "| output | --threads | wall s (median) | runs | img/s | vs torch's own count |",
             "|---|---|---:|---|---:|---:|"]
    for name in outputs:
        own = statistics.median(times[(name, cores)])
        for count in counts:
            runs = times[(name, count)]
            median = statistics.median(runs)
            label = (f"default ({network_threads(name == 'png', cores)})" if count is None else str(count))
            lines.append(f"| {name} | {label} | {median:.2f} | {', '.join(f'{run:.2f}' for run in runs)} | "
                         f"{args.images / median:.1f} | {own / median:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
