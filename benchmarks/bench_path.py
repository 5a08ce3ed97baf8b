"""Every figure the speed issue asks for, in one run: export vs forward-only (overlays, heatmaps only), Eigen-CAM
against a forward at layer1..layer4 of R50, the forward contiguous vs channels_last, and bench-loc's wall time.

    python benchmarks/bench_path.py                                   # the full run (bench-loc at its default n=500)
    python benchmarks/bench_path.py --images 48 --rounds 1 --bench-n 50 --markdown path.md   # a quicker look

It runs ``bench_speed.py --threads 1`` (Eigen-CAM and forward tables) and then ``bench_export.py`` (export cases,
then bench-loc with its defaults at ``--bench-n`` test images), one after the other in this process, and prints (and
with ``--markdown`` writes) both reports. See those two scripts for what each table measures.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_export, bench_speed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="export photos (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="export rounds (default 2)")
    parser.add_argument("--formats", default="png,jpeg", help="overlay formats (default: %(default)s)")
    parser.add_argument("--bench-n", type=int, default=500, help="bench-loc test images (default 500, its own "
                        "default; 0 skips bench-loc)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    speed = bench_speed.main(["--threads", "1"])
    with tempfile.TemporaryDirectory() as tmp:
        export_md = Path(tmp, "export.md")
        bench_export.main(["--images", str(args.images), "--rounds", str(args.rounds), "--formats", args.formats,
                           "--bench-n", str(args.bench_n), "--markdown", str(export_md)])
        export = export_md.read_text(encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(speed + "\n" + export, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
