"""What a database failure means for the writer: a refusal, an outage, or a damaged store.

Invariants:
- A *refusal* (integrity or data error, SQLSTATE class 22 or 23) is about the rows
  themselves: retrying the same rows would fail forever, so they are written one by one and
  the refused one is counted and logged.
- A *damaged or foreign store* (SQLite's ``SQLITE_CORRUPT`` / ``SQLITE_NOTADB``) is not an
  outage either: it becomes :class:`~storage._base.StoreCorruptError`, whose message names
  the file and what to do, and is never retried.
- Anything else from the driver or the network is *transient* (locked, unreachable,
  restarting) and is retried with backoff.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from ._base import StoreCorruptError, mask_url
from ._engine import is_sqlite

__all__ = ["as_corruption", "describe", "is_refusal", "is_transient"]

# sqlite3's extended result codes for "the file is damaged" and "the file is not a database".
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def describe(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL or parameters."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    message = " ".join(str(cause).split()) or type(cause).__name__
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(cause).__name__}: {message}"


def _sqlstate(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return ""


def is_refusal(exc: BaseException) -> bool:
    """The database refuses the rows themselves: retrying the same rows would fail forever.

    asyncpg's data errors (SQLSTATE class 22, e.g. a string JSONB cannot hold) reach us as a
    plain ``DBAPIError``, so the SQLSTATE class decides, not only the exception class.
    """
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, DBAPIError) and _sqlstate(exc)[:2] in ("22", "23")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database is locked, unreachable or restarting (anything that is
    neither a refusal of the rows nor a damaged store)."""
    if is_refusal(exc) or isinstance(exc, StoreCorruptError):
        return False
    return isinstance(exc, DBAPIError | OSError | TimeoutError)


def as_corruption(exc: BaseException, url: URL) -> StoreCorruptError | None:
    """The :class:`StoreCorruptError` that ``exc`` means, or None when it means something else.

    Only SQLite says so reliably (its result code); a PostgreSQL server reports damage as an
    internal error of its own, which an operator sees in the server's log.
    """
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if not (is_sqlite(url) and isinstance(orig, sqlite3.DatabaseError)):
        return None
    code = getattr(orig, "sqlite_errorcode", None)
    if code is None or code & 0xFF not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return None
    path = url.database or "?"
    return StoreCorruptError(
        f"the event store file {path!r} ({mask_url(url)}) is damaged or is not an llmtrail "
        f"store ({describe(exc)}): no event can be written to it. Stop the application, move "
        "the file (and its -wal and -shm files) aside, and start again with a new file; "
        f"`sqlite3 {path} .recover` may salvage the events it still holds"
    )
