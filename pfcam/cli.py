"""``pfcam <command>`` (also ``python -m pfcam`` and ``python -m cams``): one command line for the project.

Each subcommand lives with its module and registers itself through an ``add_<name>_parser(subparsers)``
function that sets ``handler`` (``args -> exit status``) as a parser default; a subcommand that hands unknown
options on to another program (``app``) also sets ``pass_through=True`` and gets them as ``args.extra``. To add
one, append its registration to ``SUBCOMMANDS``. Registrations import their modules here, at the top: this is
where the bench-loc and sanity commands learn their default data (the demo scenes), which cams itself never imports.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from pfnet.version import __version__


def _add_app(subparsers: Any) -> None:
    from pfcam.launch import add_app_parser

    add_app_parser(subparsers)


def _add_export(subparsers: Any) -> None:
    from cams.export import add_export_parser

    add_export_parser(subparsers)


def _add_bench_loc(subparsers: Any) -> None:
    from cams.bench_loc import add_bench_loc_parser
    from pfdemo.bench import SCENES

    add_bench_loc_parser(subparsers, default_data=SCENES)


def _add_sanity(subparsers: Any) -> None:
    from cams.sanity_cli import add_sanity_parser
    from pfdemo.bench import scene_images

    add_sanity_parser(subparsers, default_images=scene_images)


def _add_train_demo(subparsers: Any) -> None:
    from pfdemo.train import add_train_demo_parser

    add_train_demo_parser(subparsers)


SUBCOMMANDS: list[Callable[[Any], Any]] = [_add_app, _add_export, _add_bench_loc, _add_sanity, _add_train_demo]


def build_parser(prog: str = "pfcam") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="pfcam: Grad-CAM workbench for the parameter-free-layer "
                                     "networks (ICLR 2022).")
    parser.add_argument("--version", action="version", version=f"pfcam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "pfcam") -> int:
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "pass_through", False):
        args.extra = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
