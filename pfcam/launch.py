"""``pfcam app``: start the Streamlit app from wherever pfcam is installed: ``pfcam_app/server.py``, the page
(``pfcam_app/page.py``) behind the server's upload limits (``pfcam_app/upload_limits.py``).

The project's Streamlit settings (``.streamlit/config.toml``: upload limit, error details, theme) are passed as
command-line flags, so they hold whatever folder the app is started from; options after ``pfcam app`` go to
``streamlit run`` and win over them (``pfcam app --server.port 8502``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tomllib
from pathlib import Path
from typing import Any
from collections.abc import Sequence

ENTRY = "server.py"


def entry_path() -> Path:
    """The app's Streamlit entry, found without importing the app (which needs Streamlit)."""
    spec = importlib.util.find_spec("pfcam_app")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pfcam_app package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / ENTRY


def config_flags(config: Path | None = None) -> list[str]:
    """``--section.key=value`` for every setting of the project's Streamlit config (none if it is missing)."""
    from pfnet.assets import bundled_dir  # here, not at the top: `pfcam app --help` stays free of torch

    path = config or bundled_dir("pfcam_streamlit", ".streamlit") / "config.toml"
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return []
    flags = []
    for section, values in settings.items():
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{section}.{key}={text}")
    return flags


def streamlit_command(extra: Sequence[str] = (), entry: Path | None = None,
                      config: Path | None = None) -> list[str]:
    """The command ``pfcam app`` runs: this interpreter's Streamlit on the app's entry, settings, then ``extra``."""
    return [sys.executable, "-m", "streamlit", "run", str(entry or entry_path()), *config_flags(config), *extra]


def app_command(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("streamlit") is None:
        print("pfcam app: error: Streamlit is not installed (pip install 'pfcam[app]', or "
              "pip install -r requirements.txt in a checkout)", file=sys.stderr)
        return 2
    try:
        command = streamlit_command(args.extra)
    except FileNotFoundError as error:
        print(f"pfcam app: error: {error}", file=sys.stderr)
        return 2
    if not Path(command[4]).is_file():
        print(f"pfcam app: error: the app entry {command[4]} is missing; reinstall pfcam", file=sys.stderr)
        return 2
    sys.stdout.flush()
    if os.name == "posix":
        os.execv(sys.executable, command)  # Streamlit takes over this process: Ctrl-C reaches it directly
    import subprocess

    return subprocess.call(command)


def add_app_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``app`` on an ``argparse`` subparsers object (``pfcam app``)."""
    parser = subparsers.add_parser(
        "app", help="start the web app (Streamlit); other options go to `streamlit run`",
        description="Start the pfcam web app with Streamlit (it opens on http://localhost:8501). Options after "
                    "`pfcam app` are handed to `streamlit run`, e.g. `pfcam app --server.port 8502`.")
    parser.set_defaults(handler=app_command, pass_through=True)
    return parser
