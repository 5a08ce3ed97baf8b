"""A stand-alone export of a folder with a tiny model, for the tests that kill or race exports in subprocesses:
``python tests/export_worker.py OUT INPUT [INPUT...]`` exits with the CLI's statuses (0 done, 3 stopped)."""
from __future__ import annotations

import sys

import torch

from cams.export import EXIT_OK, EXIT_STOPPED, run_export
from test_export import FakeEntry, tiny  # the tiny model and zoo entry of the export tests


def tiny_models() -> dict:
    return {"tiny": (tiny(), FakeEntry())}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    report = run_export(argv[1:], argv[0], tiny_models(), batch_size=2)
    if report.stopped:
        print(report.stopped, file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
