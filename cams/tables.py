"""Result tables as text: the one printer of bench-loc's and the sanity check's tables (plain text for a terminal,
Markdown for the docs). The first ``text_columns`` columns are names (left-aligned), the rest numbers (right)."""
from __future__ import annotations

from collections.abc import Sequence

TEXT_COLUMNS = 3  # model, layer, method


def format_text(title: str, header: Sequence[str], body: Sequence[Sequence[str]],
                text_columns: int = TEXT_COLUMNS) -> str:
    """The plain-text table (what a command prints), title first, then the header, a rule and the rows."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *body, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) if index < text_columns else cell.rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths, strict=False))).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, "", line(header), rule] + [line(cells) for cells in body]) + "\n"


def format_markdown(title: str, header: Sequence[str], body: Sequence[Sequence[str]],
                    text_columns: int = TEXT_COLUMNS) -> str:
    """The same table in Markdown (numbers right-aligned)."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"
