"""Progress lines: one per step off a terminal, one rewritten line on it."""
from __future__ import annotations

import io

from cams.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_line_per_step_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(3, "job", stream) as progress:
        progress.step("first")
        progress.log("note")
        progress.step("second")
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[job] 1/3 first", "[job] note", "[job] 2/3 second"]
    assert all(line.endswith(" s)") for line in lines if "/3" in line)


def test_a_terminal_gets_one_line_rewritten_and_ended():
    stream = Terminal()
    with Progress(2, "job", stream) as progress:
        progress.step("a")
        progress.step("b")
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")
    assert "[job] 2/2 b" in text.split("\r")[-1]
