"""What an export and a bench-loc run cost, in one run.

    python benchmarks/bench_export.py                     # 48 photos, the bundled demo pair; bench-loc at --bench-n
    python benchmarks/bench_export.py --images 200 --bench-n 50 --markdown speed.md
    python benchmarks/bench_export.py --images 200 --rounds 5 --bench-n 0 --formats png --docs  # docs/performance.md
    python benchmarks/bench_export.py --skip-export --bench-n 500  # bench-loc's defaults against the 3-minute target

Export: ``pfcam export``'s path (``run_export``: decode, preprocess, explain layer3 + layer4 with demo_r50 and
demo_r50_hybrid, overlays, grids, ``.npy``, manifests) over a folder of 640x480 photo JPEGs (cut from the bundled
example photos), against a forward-only loop (``torch.inference_mode``) of the same two models over the same
decoded images at the same batch size: one thread, decode, preprocess (once per distinct preprocessing, as the
export does: the demo pair shares one), forward. Cases: overlays in each format, and heatmaps only
(``--no-overlays``); then, as information (the targets are for layer3 + layer4), the explain-only loop and the
heatmaps-only export with layer4 alone. Targets: >= 0.5x forward-only with overlays, >= 0.9x heatmaps only. The
same loop with ``cams.explain`` in place of the forward (the export's call: both layers, top-1, batch at once) gives
the engine's own ratio, the ceiling of a heatmaps-only export that runs the network on one thread and nothing
else; a second table divides the two, round by round (target: the heatmaps-only export at >= 0.95 of that
loop). Each round times forward-only, then each case; ratios are medians over ``--rounds`` rounds, with the
process's CPU seconds per image (all threads) beside them: on a shared machine the wall clock moves with the load,
CPU time much less. The header says how many cores two GIL-free threads got before and after (``cores_free``):
the export's threads can use no more than that.

bench-loc: ``python -m cams bench-loc --n N`` with every other option at its default (3 demo models x layer3,
layer4 x 4 methods, the validation split, deletion/insertion on the default ``--faith-n`` test images), in a fresh
process as a user runs it (torch's own thread count, not the export's ``--threads``): its wall time against the
180 s target of the defaults at n=500 (``--bench-n 500``), with the load average before and after. At another
``--bench-n`` the line says it is not the target's run. ``--skip-export`` times bench-loc alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cams import engine  # noqa: E402
from cams.export import run_export  # noqa: E402
from cams.images import load_image  # noqa: E402
from pfnet.assets import assets_dir  # noqa: E402
from pfnet.preprocess import prepare_batch  # noqa: E402

MODELS = ("demo_r50", "demo_r50_hybrid")
LAYERS = ["layer3", "layer4"]
TARGET_OVERLAYS = 0.5
TARGET_HEATMAPS = 0.9
TARGET_OF_ENGINE = 0.95  # heatmaps-only export / the explain-only loop (its ceiling), same round
BENCH_LOC_TARGET_S = 180.0  # the plain bench-loc (defaults, n=500) on this 2-core machine, quiet
BENCH_LOC_TARGET_N = 500


def at_least(ratio: float, target: float | None) -> str:
    """The verdict cell: empty without a target; a miss shows the ratio to three places (0.497 prints as 0.50)."""
    if target is None:
        return ""
    return f">= {target} ok" if ratio >= target else f">= {target} MISSED ({ratio:.3f})"


def make_photos(folder: Path, count: int) -> list[Path]:
    """``count`` 640x480 JPEGs: crops of the example photos at varying positions and scales."""
    sources = [Image.open(path).convert("RGB") for path in sorted((assets_dir() / "examples").glob("*.jpg"))]
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        scale = 0.6 + 0.4 * ((index * 7) % 11) / 10
        width, height = int(photo.width * scale), int(photo.height * scale)
        left, top = (index * 13) % max(1, photo.width - width + 1), (index * 17) % max(1, photo.height - height + 1)
        path = folder / f"photo{index:04d}.jpg"
        photo.crop((left, top, left + width, top + height)).resize((640, 480)).save(path, quality=90)
        paths.append(path)
    return paths


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def cores_free(threads: int = 2) -> float:
    """How many cores ``threads`` threads of GIL-free work (zlib) get right now: CPU seconds / wall seconds. On a
    shared machine this says how much of the export's parallelism the machine can show at all."""
    data = bytes(range(256)) * 4096

    def work() -> None:
        for _ in range(12):
            zlib.compress(data, 6)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    wall, cpu = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def network_loop(models: dict, paths: list[Path], batch: int, explain: bool = False,
                 layers: list[str] = LAYERS) -> None:
    """Decode + preprocess + an inference_mode forward of every model (``explain``: the export's ``cams.explain``
    call instead), ``batch`` images at a time, on this thread; one input per distinct preprocessing."""
    for first in range(0, len(paths), batch):
        images = [load_image(path) for path in paths[first:first + batch]]
        inputs: dict = {}
        for network, entry in models.values():
            if entry.preprocess not in inputs:
                inputs[entry.preprocess] = prepare_batch(images, entry.preprocess, "full")[0]
            if explain:
                engine.explain(network, inputs[entry.preprocess], layers, "gradcam", targets=1, batch_size=batch)
            else:
                with torch.inference_mode():
                    network(inputs[entry.preprocess])


def export(models: dict, folder: Path, out: Path, batch: int, layers: list[str] = LAYERS, **options) -> None:
    report = run_export([folder], out, models, layers=layers, batch_size=batch, **options)
    if report.computed != len(models) * len(layers) * len(report.images) or report.skipped:
        raise SystemExit(f"export did not compute everything: {report.errors}")


def bench_loc(n: int, faith_n: int | None) -> tuple[float, int]:
    """``python -m cams bench-loc --n n`` (``--faith-n`` only when given) in a fresh process: (wall s, CSV rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp, "bench_loc.csv")
        command = [sys.executable, "-m", "cams", "bench-loc", "--n", str(n), "--csv", str(table)]
        command += [] if faith_n is None else ["--faith-n", str(faith_n)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        rows = len(table.read_text(encoding="utf-8").splitlines()) - 1  # less the header
    return seconds, rows


def bench_loc_report(n: int, faith_n: int | None) -> list[str]:
    """Times bench-loc and says how it stands against the target."""
    load_before = os.getloadavg()
    seconds, rows = bench_loc(n, faith_n)
    load_after = os.getloadavg()
    options = f"--n {n}" + ("" if faith_n is None else f" --faith-n {faith_n}")
    if n == BENCH_LOC_TARGET_N and faith_n is None:
        verdict = (f"target <= {BENCH_LOC_TARGET_S:.0f} s: {'met' if seconds <= BENCH_LOC_TARGET_S else 'MISSED'} "
                   f"({seconds / BENCH_LOC_TARGET_S:.2f}x the target)")
    else:
        verdict = f"not the target's run (the defaults at --n {BENCH_LOC_TARGET_N}: <= {BENCH_LOC_TARGET_S:.0f} s)"
    return ["", f"bench-loc: `python -m cams bench-loc {options}` (other options at their defaults; {rows} rows): "
                f"{seconds:.0f} s wall; {verdict}; load average (1, 5, 15 min) "
                f"{load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
                f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after, {os.cpu_count()} CPUs."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--formats", default="png,jpeg", help="overlay formats to time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case; medians are printed")
    parser.add_argument("--bench-n", type=int, default=20, help="bench-loc test images (0: skip bench-loc; the "
                        f"target is for {BENCH_LOC_TARGET_N})")
    parser.add_argument("--faith-n", type=int, default=None, help="bench-loc deletion/insertion images "
                        "(default: bench-loc's own default)")
    parser.add_argument("--skip-export", action="store_true", help="time bench-loc only")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--docs", action="store_true",
                        help="also write the report into docs/performance.md (section bench_export-cpu)")
    args = parser.parse_args(argv)
    if args.skip_export:
        return finish(bench_loc_report(args.bench_n, args.faith_n) if args.bench_n else [], args.markdown,
                      args.docs)
    torch.set_num_threads(args.threads)
    from pfnet.weights import load
    from pfnet import zoo

    models = {model_id: (load(model_id), zoo.get(model_id)) for model_id in MODELS}
    lines = ["| case | forward-only img/s | case img/s | ratio (median) | ratios | CPU ms/img forward-only / case | "
             "load | target |", "|---|---:|---:|---:|---|---:|---|---|"]
    load_before, cores_before = os.getloadavg(), cores_free()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "photos")
        folder.mkdir()
        paths = make_photos(folder, args.images)
        network_loop(models, paths[: args.batch], args.batch, explain=True)  # warm-up
        cases = [("engine alone: explain-only loop", lambda out: network_loop(models, paths, args.batch, True), None)]
        cases += [(f"export, overlays {fmt}", lambda out, fmt=fmt: export(models, folder, out, args.batch,
                                                                          overlay_format=fmt), TARGET_OVERLAYS)
                  for fmt in args.formats.split(",")]
        cases.append(("export, heatmaps only (--no-overlays)",
                      lambda out: export(models, folder, out, args.batch, overlays=False), TARGET_HEATMAPS))
        # Not the target's case: what one layer costs, for a decision on the heatmaps-only target.
        cases.append(("layer4 alone: explain-only loop", lambda out: network_loop(models, paths, args.batch, True,
                                                                                  ["layer4"]), None))
        cases.append(("layer4 alone: export, heatmaps only", lambda out: export(
            models, folder, out, args.batch, layers=["layer4"], overlays=False), None))
        times: dict[str, list[tuple[float, float, float, float, float]]] = {name: [] for name, _, _ in cases}
        for round_index in range(args.rounds):
            for index, (name, work, _) in enumerate(cases):
                forward = timed(lambda: network_loop(models, paths, args.batch))  # next to each case: the load moves
                case = timed(lambda: work(Path(tmp, f"out{round_index}-{index}")))
                times[name].append((*forward, *case, os.getloadavg()[0]))
        count = len(paths)
        for name, _, target in cases:
            runs = times[name]
            ratios = [forward / case for forward, _, case, _, _ in runs]
            ratio = statistics.median(ratios)
            verdict = at_least(ratio, target)
            lines.append(f"| {name} | {count / statistics.median(run[0] for run in runs):.2f} | "
                         f"{count / statistics.median(run[2] for run in runs):.2f} | {ratio:.2f} | "
                         f"{', '.join(f'{value:.2f}' for value in ratios)} | "
                         f"{1000 * statistics.median(run[1] for run in runs) / count:.1f} / "
                         f"{1000 * statistics.median(run[3] for run in runs) / count:.1f} | "
                         f"{min(run[4] for run in runs):.1f}-{max(run[4] for run in runs):.1f} | {verdict} |")
            print(lines[-1], flush=True)
        lines += ["", "| heatmaps-only export against its ceiling | ratio (median) | ratios | target |",
                  "|---|---:|---|---|"]
        for loop, case, target in (("engine alone: explain-only loop", "export, heatmaps only (--no-overlays)",
                                    TARGET_OF_ENGINE),
                                   ("layer4 alone: explain-only loop", "layer4 alone: export, heatmaps only", None)):
            ratios = [loop_run[2] / case_run[2] for loop_run, case_run in zip(times[loop], times[case])]
            ratio = statistics.median(ratios)
            verdict = at_least(ratio, target)
            lines.append(f"| {case} / {loop} | {ratio:.2f} | {', '.join(f'{value:.2f}' for value in ratios)} | "
                         f"{verdict} |")
            print(lines[-1], flush=True)
    load_after, cores_after = os.getloadavg(), cores_free()
    text = [f"Export: demo_r50 + demo_r50_hybrid, layers {', '.join(LAYERS)}, {args.images} JPEGs 640x480, batch "
            f"{args.batch}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, {args.rounds} round(s); load "
            f"average (1, 5, 15 min) "
            f"{load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
            f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after; two GIL-free threads got "
            f"{cores_before:.2f} cores before, {cores_after:.2f} after.", "", *lines]
    if args.bench_n:
        text += bench_loc_report(args.bench_n, args.faith_n)
    return finish(text, args.markdown, args.docs)


def finish(text: list[str], markdown: Path | None, docs: bool = False) -> int:
    report = "\n".join(text).lstrip("\n")
    print(report)
    if markdown:
        markdown.write_text(report + "\n", encoding="utf-8")
    if docs:
        from benchmarks.docs_page import write_section

        page = write_section("performance.md", "bench_export-cpu", report + "\n")
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
