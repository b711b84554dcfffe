"""Tables: one Markdown renderer, one plain-text renderer and one CSV writer for every result table.

Rows are lists of cells; a cell that is not a string is formatted with :func:`cell`
(``None`` -> ``-``, floats with ``digits`` decimals). Numeric columns are right-aligned in
Markdown (``---:``), text columns left-aligned; a ``|`` inside a cell is escaped.

Example::

    markdown(["head", "test acc"], [["rf", 0.98], ["svm", None]])
    # | head | test acc |
    # |---|---:|
    # | rf | 0.9800 |
    # | svm | - |
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

from .fsutil import write_text_atomic

Row = Sequence[Any]


def cell(value: Any, digits: int = 4) -> str:
    """The text of one cell: ``None`` -> ``-``, a float with ``digits`` decimals, else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def _is_number(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("±", " ").split()
    if not t:
        return False
    try:
        float(t[0])
        return True
    except ValueError:
        return False


def _texts(rows: Sequence[Row], digits: int) -> list[list[str]]:
    return [[cell(v, digits) for v in r] for r in rows]


def markdown(header: Sequence[str], rows: Sequence[Row], *, digits: int = 4, align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (ending in a newline).

    Args:
        align: one letter per column, ``l`` or ``r``; default: right for columns whose
            cells are all numbers (or ``-``), left otherwise.
    """
    body = _texts(rows, digits)
    if align is None:
        align = "".join(
            "r" if i > 0 and body and all(_is_number(r[i]) or r[i] in ("-", "n/a", "") for r in body if i < len(r))
            else "l" for i in range(len(header)))
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), rule] + [line(r) for r in body]) + "\n"


def text(header: Sequence[str], rows: Sequence[Row], *, digits: int = 4) -> str:
    """Columns padded with spaces for a terminal (numbers right-aligned)."""
    body = _texts(rows, digits)
    all_rows = [list(map(str, header))] + body
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(len(header))]
    out = []
    for r in all_rows:
        out.append("  ".join(c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Row]) -> str:
    """CSV text (``\\n`` line ends; cells as given, ``None`` as empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Row]) -> None:
    """Write a CSV file atomically (a kill leaves the old file or the new one)."""
    write_text_atomic(path, csv_text(header, rows))


def dict_rows(records: Sequence[dict], columns: Sequence[str]) -> list[list[Any]]:
    """Rows of ``columns`` from a list of dicts (missing keys -> ``None``)."""
    return [[r.get(c) for c in columns] for r in records]
