"""Writes tests/data/bench_loc_golden.csv: the fixed small bench-loc run of test_bench_loc_speed.py, as the code
before the speed work computed it (run once, by hand: ``python tests/bench_loc_golden.py``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "bench_loc_golden.csv"
ARGS = ["--layers", "layer2.1,layer4", "--methods", "gradcam,layercam,eigencam", "--n", "8",
        "--val-n", "4", "--faith-n", "2", "--faith-steps", "4", "--batch-size", "4", "--seed", "5"]


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from bench_loc_support import TINY, install_tiny_zoo

    from pfcam.cli import main

    with pytest.MonkeyPatch.context() as patch:
        install_tiny_zoo(patch)
        raise SystemExit(main(["bench-loc", "--models", TINY, *ARGS, "--csv", str(GOLDEN)]))
