"""Where the benchmarks write their tables: a named section of a page under docs/, with the command that measured
it, the machine and the date, so a figure in the docs is always the last output of its script.

A section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; writing it replaces only what is
between the two markers (a page without them gets the section appended). The page is replaced atomically.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def loadavg(digits: int = 2) -> str:
    """The 1, 5 and 15 minute load averages ("a / b / c"), or "n/a" where the system has none."""
    try:
        return " / ".join(f"{value:.{digits}f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    """One line naming the hardware and software a figure was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    parts = [f"{os.cpu_count()}-core {cpu} CPU"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name()} GPU")
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
    load = loadavg(1)
    if load != "n/a":
        parts.append(f"load average {load} at the end")
    return "; ".join(parts)


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, as a user would type it from the repository root."""
    args = sys.argv if argv is None else argv
    script = Path(args[0])
    try:
        script = script.resolve().relative_to(DOCS.parent)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *args[1:]])


def section_text(name: str, body: str, command: str) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!-- bench:{name} -->\n"
            f"Measured by `{command}` ({machine()}; {when}). Re-run it to update this section.\n\n"
            f"{body.strip()}\n"
            f"<!-- /bench:{name} -->")


def write_section(page: str | Path, name: str, body: str, command: str | None = None) -> Path:
    """Put ``body`` (Markdown) into the section ``name`` of ``docs/<page>``; return the page's path."""
    path = Path(page) if Path(page).is_absolute() else DOCS / page
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = section_text(name, body, command or command_line())
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section + "\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)
    return path
