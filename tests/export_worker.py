"""A stand-alone export of a folder with a tiny model, for the tests that kill or race exports in subprocesses:
``python tests/export_worker.py OUT INPUT [INPUT...]`` exits with the CLI's statuses (0 done, 3 stopped)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from cams.export import EXIT_OK, EXIT_STOPPED, run_export
from pfnet import PFResNet
from pfnet.preprocess import Preprocess

CLASSES = [f"shape {i}" for i in range(10)]


@dataclass
class TinyEntry:
    id: str = "tiny"
    name: str = "Tiny R50"
    preprocess: Preprocess = field(default_factory=lambda: Preprocess(64, 64))

    def class_names(self) -> list[str]:
        return list(CLASSES)


def tiny_models() -> dict:
    torch.manual_seed(0)
    return {"tiny": (PFResNet("conv", num_classes=10, width_mult=0.25).eval(), TinyEntry())}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    report = run_export(argv[1:], argv[0], tiny_models(), batch_size=2)
    if report.stopped:
        print(report.stopped, file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
