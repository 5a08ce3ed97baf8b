"""Progress of a long run on stderr: one line per step when the stream is not a terminal (a log, CI), one line
rewritten in place on a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``step(message)`` after each of ``total`` steps; ``close()`` ends the line on a terminal.

    Each report reads ``[prefix] i/total message (elapsed s)``.
    """

    def __init__(self, total: int, prefix: str, stream: TextIO | None = None):
        self.total = max(int(total), 0)
        self.prefix = prefix
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty()) if callable(isatty) else False
        self._open_line = False

    def step(self, message: str = "") -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        text = f"[{self.prefix}] {self.count}/{self.total} {message} ({elapsed:.0f} s)".rstrip()
        if self.terminal:
            self.stream.write("\r\x1b[K" + text)
            self._open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        """A message of its own (not a step), on its own line."""
        self._end_line()
        self.stream.write(f"[{self.prefix}] {message}\n")
        self.stream.flush()

    def close(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
