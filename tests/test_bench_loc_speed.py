"""bench-loc's speed work changes no number: a fixed small run gives the CSV the code gave before it
(tests/data/bench_loc_golden.csv, written by tests/bench_loc_golden.py before the shared forward/backward, the
reused unaligned maps and the cached reference curves landed; written again when a metric's definition changed:
the any-maximum pointing game and the wsol MaxBoxAccV2, which moved only those columns)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench_loc_golden import ARGS, GOLDEN
from pfcam.cli import main
from bench_loc_support import TINY


def _records(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_fixed_run_gives_the_csv_of_before_the_speed_work(tiny_zoo, tmp_path: Path, capsys):
    out = tmp_path / "now.csv"
    assert main(["bench-loc", "--models", TINY, *ARGS, "--csv", str(out)]) == 0, capsys.readouterr().err
    now, before = _records(out), _records(GOLDEN)
    assert [list(r) for r in now][:1] == [list(r) for r in before][:1]  # same columns
    assert len(now) == len(before)
    for mine, theirs in zip(now, before):
        for key, value in theirs.items():
            try:
                expected = float(value)
            except ValueError:
                assert mine[key] == value, (key, mine, theirs)
                continue
            # The CSV rounds to 6 decimals; float32 noise (~2e-8 between one and two torch threads) can tip a value
            # sitting on a rounding boundary one step over (0.1199715: 0.119971 or 0.119972), which 1.5e-6 allows.
            assert float(mine[key]) == pytest.approx(expected, abs=1.5e-6), (key, mine["layer"], mine["method"])
