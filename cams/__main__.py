"""``python -m cams <command>``: a thin door onto the cams modules.

Each subcommand lives with its module and registers itself through an ``add_<name>_parser(subparsers)``
function that sets ``handler`` (``args -> exit status``) as a parser default. To add one, append its
registration function to ``SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence


def _add_export(subparsers: Any) -> None:
    from cams.export import add_export_parser

    add_export_parser(subparsers)


def _add_bench_loc(subparsers: Any) -> None:
    from cams.bench_loc import add_bench_loc_parser

    add_bench_loc_parser(subparsers)


def _add_sanity(subparsers: Any) -> None:
    from cams.sanity_cli import add_sanity_parser

    add_sanity_parser(subparsers)


SUBCOMMANDS: list[Callable[[Any], Any]] = [_add_export, _add_bench_loc, _add_sanity]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cams", description="pfcam: Grad-CAM workbench for the "
                                     "parameter-free-layer networks (ICLR 2022).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
