"""Strings every store can hold: the boundary where text enters an event.

A Python ``str`` may hold a lone surrogate (``"op\\ud83dx"``, or a provider's JSON with a
broken ``\\ud83d`` escape): no UTF-8 encoder accepts it, so SQLite would store bytes no reader
can decode again and PostgreSQL refuses the row. Every payload is passed through
:func:`storable` before it becomes an event.

Invariants:
- A well-formed surrogate pair (two code points ``"\\ud83d\\ude00"``) becomes the character it
  encodes (``"😀"``); a lone surrogate becomes U+FFFD REPLACEMENT CHARACTER. Nothing else
  changes: every other string, number and structure comes out as it went in.
- The common case costs one ``str.isascii()`` per string and allocates nothing: a value is
  copied only where something had to be replaced.
"""

from __future__ import annotations

from typing import Any

__all__ = ["storable", "storable_text"]


def storable_text(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced by U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # UTF-16 with surrogatepass joins the pairs; decoding with "replace" turns each lone
        # surrogate into U+FFFD.
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def storable(value: Any) -> Any:
    """``value`` with every string in it (dict keys included) made storable; the same object
    when nothing needed replacing."""
    cls = type(value)
    if cls is str:
        return storable_text(value)
    if cls is dict:
        for key, item in value.items():
            if storable(key) is not key or storable(item) is not item:
                return {storable(k): storable(v) for k, v in value.items()}
        return value
    if cls is list or cls is tuple:
        for item in value:
            if storable(item) is not item:
                return cls(storable(v) for v in value)
        return value
    return value
