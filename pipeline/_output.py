"""How the ``llmtrail`` commands print: tables for people, plain lines in a pipe, JSON for scripts.

Invariants:
- Every command takes ``--json`` (the same as ``--format json``); commands with more than one
  other format take ``--format``. ``auto`` (the default) is a table on a terminal and plain
  aligned lines in a pipe, as ``git`` and ``ls`` do.
- Numbers are right-aligned and printed with the same number of decimals down a column (the
  most any value needs, so nothing is rounded away); a number is never cut or ellipsised.
- On a terminal narrower than the table, headers wrap at ``_`` first; then whole columns are
  hidden, least important first, and a note names them. Plain output never hides or wraps:
  one row a line, whatever the width. Notes go to stderr in a pipe, so stdout stays data.
- Money is exact: a ``Decimal`` is printed from its digits, never through a float.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final, TextIO

__all__ = [
    "Column",
    "add_format_options",
    "chosen_format",
    "emit_rows",
    "exact_number",
    "json_value",
    "print_notes",
    "render_plain",
    "render_table",
]

_GAP: Final = 2  # characters between two columns: box.SIMPLE with collapsed padding


@dataclass(frozen=True, slots=True)
class Column:
    """One column: ``priority`` 0 is never hidden; higher numbers are hidden first."""

    name: str
    numeric: bool = False
    priority: int = 0
    wrap: bool = False  # text that may wrap onto several lines (never numbers or ids)
    decimals: int | None = None  # a float column's fixed decimals (None: as many as needed)


def add_format_options(
    parser: argparse.ArgumentParser, formats: Sequence[str] = ("table", "plain", "csv", "json")
) -> None:
    """``--format`` (``auto`` or one of ``formats``) and its shorthand ``--json``."""
    choices = ["auto", *formats] if len(formats) > 2 else list(formats)
    parser.add_argument(
        "--format",
        choices=choices,
        default=choices[0],
        help=(
            f"output format, one of {', '.join(choices)} (default {choices[0]}"
            + (f"; auto: {formats[0]} on a terminal, plain in a pipe" if "auto" in choices else "")
            + ")"
        ),
    )
    parser.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="JSON, for scripts (the same as --format json)",
    )


def chosen_format(value: str, *, terminal: str = "table", stream: TextIO | None = None) -> str:
    """``auto`` becomes ``terminal`` (``table``) on a terminal and ``plain`` otherwise."""
    if value != "auto":
        return value
    out = stream if stream is not None else sys.stdout
    return terminal if out.isatty() else "plain"


def exact_number(value: Decimal | float) -> str:
    """The shortest exact decimal, without an exponent: 4.05e-05 reads as 0.0000405."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        value = Decimal(repr(value))
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def json_value(value: Any) -> Any:
    """A JSON-ready value: Decimal becomes an exact string, times ISO 8601, bytes hex."""
    if isinstance(value, Decimal):
        return exact_number(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal | float):
        return exact_number(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _decimals(text: str) -> int:
    head, dot, tail = text.partition(".")
    return len(tail) if dot and head.lstrip("-").isdigit() else 0


def _column_texts(column: Column, values: list[Any]) -> list[str]:
    """Each value as text; numbers padded to the column's decimals."""
    if column.decimals is not None:
        return [
            f"{v:.{column.decimals}f}" if isinstance(v, float) and math.isfinite(v) else _text(v)
            for v in values
        ]
    texts = [_text(v) for v in values]
    places = max(
        (_decimals(t) for t, v in zip(texts, values, strict=True) if _is_number(v)), default=0
    )
    if places == 0:
        return texts
    out = []
    for text, value in zip(texts, values, strict=True):
        if _is_number(value) and (text[-1:].isdigit()):
            have = _decimals(text)
            text = (text if have else text + ".") + "0" * (places - have)
        out.append(text)
    return out


def _cells(
    columns: Sequence[Column], rows: Sequence[Sequence[Any]], footer: Sequence[Any] | None
) -> tuple[list[list[str]], list[str] | None]:
    """Rows (and the footer, formatted with its column) as text."""
    every = [*rows, *([footer] if footer is not None else [])]
    by_column = [
        _column_texts(column, [row[index] for row in every]) for index, column in enumerate(columns)
    ]
    texts = [list(cells) for cells in zip(*by_column, strict=True)] if by_column else []
    if footer is not None:
        return texts[:-1], texts[-1]
    return texts, None


def render_plain(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    footer: Sequence[Any] | None = None,
) -> str:
    """Aligned columns, two spaces apart, one row a line, nothing hidden or cut."""
    body, foot = _cells(columns, rows, footer)
    lines = [[c.name for c in columns], *body, *([foot] if foot is not None else [])]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for line in lines:
        cells = [
            text.rjust(widths[i]) if columns[i].numeric else text.ljust(widths[i])
            for i, text in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def _wrapped_header(name: str, width: int) -> str:
    """``input_tokens`` at width 6 reads ``input_`` / ``tokens``: cut only after ``_``."""
    parts = name.split("_")
    lines: list[str] = []
    for index, part in enumerate(parts):
        piece = part + ("_" if index < len(parts) - 1 else "")
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(lines)


def _min_width(column: Column, cells: list[str], header_lines: bool) -> int:
    data = max((len(t) for t in cells), default=0)
    if column.wrap:
        longest_word = max((len(w) for t in cells for w in t.split()), default=0)
        data = min(data, max(16, longest_word))
    header_parts = _wrapped_header(column.name, 1).splitlines() if header_lines else [column.name]
    header = max(map(len, header_parts))
    return max(data, header)


def render_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    *,
    width: int,
    title: str | None = None,
    footer: Sequence[Any] | None = None,
) -> tuple[str, list[str]]:
    """A table that fits ``width``; returns the text and the names of hidden columns."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    body, foot = _cells(columns, rows, footer)
    every = [*body, *([foot] if foot is not None else [])]
    shown = list(range(len(columns)))

    def needed(indexes: list[int], header_lines: bool) -> int:
        widths = [_min_width(columns[i], [row[i] for row in every], header_lines) for i in indexes]
        return sum(widths) + _GAP * (len(widths) - 1)

    header_lines = needed(shown, False) > width
    droppable = sorted(
        (i for i in shown if columns[i].priority > 0),
        key=lambda i: (columns[i].priority, i),
        reverse=True,
    )
    dropped: list[int] = []
    while needed(shown, header_lines) > width and droppable:
        dropped.append(droppable.pop(0))
        shown.remove(dropped[-1])
    for index in reversed(dropped):  # a narrow column hidden early may fit again
        if needed(sorted([*shown, index]), header_lines) <= width:
            shown = sorted([*shown, index])
    hidden = [columns[i].name for i in range(len(columns)) if i not in shown]

    table = Table(
        title=title,
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        show_footer=foot is not None,
    )
    for i in shown:
        column = columns[i]
        cells = [row[i] for row in every]
        data_width = max((len(t) for t in cells), default=0)
        header = column.name
        if header_lines and len(header) > data_width:
            header = _wrapped_header(header, max(data_width, _min_width(column, [], True)))
        table.add_column(
            header,
            footer=foot[i] if foot is not None else "",
            justify="right" if column.numeric else "left",
            no_wrap=not column.wrap,
            overflow="fold",
            min_width=None if column.wrap else _min_width(column, cells, header_lines),
        )
    for row in body:
        table.add_row(*(row[i] for i in shown))
    console = Console(width=max(width, needed(shown, header_lines)), record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get(), hidden


def print_notes(notes: Iterable[str], fmt: str, width: int = 80) -> None:
    """Notes under a table (wrapped to ``width``); in a pipe or CSV/JSON they go to stderr."""
    import textwrap

    for note in notes:
        if fmt == "table":
            print(textwrap.fill(note, width=width, subsequent_indent="  "))
        else:
            print(f"llmtrail: note: {note}", file=sys.stderr)


def emit_rows(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    fmt: str,
    *,
    title: str | None = None,
    footer: Sequence[Any] | None = None,
    notes: Sequence[str] = (),
    width: Callable[[], int] | None = None,
) -> None:
    """Print rows as a table, plain lines, CSV or JSON (``fmt`` already resolved)."""
    out = sys.stdout
    columns_now = 80
    if fmt == "json":
        names = [c.name for c in columns]
        records = [dict(zip(names, map(json_value, row), strict=True)) for row in rows]
        out.write(json.dumps(records, indent=2) + "\n")
    elif fmt == "csv":
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.name for c in columns])
        for row in rows:
            writer.writerow(["" if v is None else _text(v) for v in row])
    elif fmt == "plain":
        out.write(render_plain(columns, rows, footer))
    else:
        import shutil

        columns_now = width() if width is not None else shutil.get_terminal_size().columns
        text, hidden = render_table(columns, rows, width=columns_now, title=title, footer=footer)
        out.write(text)
        if hidden:
            notes = [
                *notes,
                f"hidden at {columns_now} columns: {', '.join(hidden)} "
                "(a wider terminal, --format plain or --json shows every column)",
            ]
    out.flush()
    print_notes(notes, fmt, columns_now)
