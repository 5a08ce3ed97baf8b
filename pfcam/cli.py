"""``pfcam <command>`` (also ``python -m pfcam`` and ``python -m cams``): one command line for the project.

Each subcommand lives with its module and registers itself through an ``add_<name>_parser(subparsers)``
function that sets ``handler`` (``args -> exit status``) as a parser default; a subcommand that hands unknown
options on to another program (``app``) also sets ``pass_through=True`` and gets them as ``args.extra``. To add
one, append a :class:`Subcommand` to ``SUBCOMMANDS``: its name, its one-line help and its registration. The
registrations import their modules (torch, timm, cams) only when that command runs, so ``pfcam --help`` and
``pfcam --version`` answer without loading them; this is also where the bench-loc and sanity commands learn their
default data (the demo scenes), which cams itself never imports.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

DESCRIPTION = "pfcam: Grad-CAM workbench for the parameter-free-layer networks (ICLR 2022)."


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


@dataclass(frozen=True)
class Subcommand:
    """One ``pfcam`` command: what ``pfcam --help`` lists without importing it, and how to register it."""

    name: str
    help: str  # the same line its module's parser gives (tests/test_cli.py checks)
    register: Callable[[Any], Any]


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("app", "start the web app (Streamlit); other options go to `streamlit run`", _add_app),
    Subcommand("export", "write CAM overlays, heatmaps, grids and a manifest for images", _add_export),
    Subcommand("bench-loc", "localization benchmark: pointing game, energy, box accuracy, deletion/insertion",
               _add_bench_loc),
    Subcommand("sanity", "model-parameter randomisation sanity check (cascading and independent)", _add_sanity),
    Subcommand("train-demo", "train (or re-score) a bundled demo model on procedural scenes", _add_train_demo),
]


def version() -> str:
    """pfcam's version (``pfnet/version.py``), read without importing ``pfnet``, whose import loads torch and timm."""
    if "pfnet.version" in sys.modules:
        return sys.modules["pfnet.version"].__version__
    spec = importlib.util.find_spec("pfnet")  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the pfnet package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise LookupError(f"no __version__ in {path}")


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` runs (its first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(prog: str = "pfcam", commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. ``commands``: the subcommands registered in full (their modules imported); the
    others are listed by name and help only. None: all of them."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pfcam {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        if commands is None or command.name in commands:
            command.register(subparsers)
        else:
            subparsers.add_parser(command.name, help=command.help)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "pfcam") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = chosen_command(argv)
    parser = build_parser(prog, [command] if command else [])
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "pass_through", False):
        args.extra = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
