"""``llmtrail sql``: one statement, read-only in effect, bounded in time, on both backends.

Invariants:
- The database decides what a statement does; nothing here parses SQL. A statement is refused
  (:class:`StatementRefusedError`, exit 2) when a database check says it would write, touch a
  file, load code, signal or lock out another session, or when it is more than one statement.
  The one look at the text is conservative: on PostgreSQL every word of the statement and of
  its plan is looked up in ``pg_proc`` (EXPLAIN does not show LIMIT, OFFSET or VALUES
  expressions), so a volatile function's name anywhere refuses it, even in a string (a false
  refusal, never a missed call; ``U&"..."`` escapes, which could spell a name, are refused).
- SQLite: the file is opened by the sqlite3 module as ``file:<percent-encoded path>?mode=ro``
  (a ``#`` or ``?`` in the path cannot reopen another file), never created, with
  ``query_only`` on and no attached database allowed (``SQLITE_LIMIT_ATTACHED`` 0, which also
  stops ``VACUUM INTO``). An authorizer allows reads only: SELECT, reading columns, recursive
  CTEs, functions other than those that load code or touch files, and the pragmas that only
  report. A progress handler aborts the statement at the deadline or on cancellation.
- PostgreSQL: the connected role must not be a superuser, have REPLICATION, or be a member of
  a role that reaches server files, programs or other sessions (:data:`PRIVILEGED_ROLES`),
  unless the caller says it knows (``allow_privileged_role``). The session has
  ``statement_timeout``, ``lock_timeout``, ``idle_in_transaction_session_timeout`` and
  ``client_connection_check_interval`` (the server drops the query when the client dies). The
  statement must be one PostgreSQL can EXPLAIN (so COPY, DO, CALL, SET, LOCK, CHECKPOINT and
  the like never run) and may name no volatile function other than :data:`HARMLESS_VOLATILE`
  (advisory locks, file reads, signals, replication slots and configuration changes are all
  volatile), in its text or in its plan. It runs in a READ ONLY transaction that is rolled
  back.
- Cancellation (Ctrl-C, SIGTERM) stops the statement on the server before it propagates:
  ``sqlite3.Connection.interrupt`` on SQLite, ``pg_cancel_backend`` from a second session on
  PostgreSQL.
- At most ``max_rows`` rows are held in memory; more is an error, not a silent cut.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from sqlalchemy.engine import URL

from llmtrail.pipeline import ConfigurationError

from ._base import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, StoreConfigError, StoreError, mask_url
from ._engine import is_sqlite, normalize_store_url

__all__ = [
    "HARMLESS_VOLATILE",
    "PRIVILEGED_ROLES",
    "QueryTimeoutError",
    "ReadOnlyLimits",
    "StatementRefusedError",
    "run_readonly_sql",
    "stop_on_signal",
]

# A reader waiting for a lock holds its place in the lock queue, and everyone queued behind it
# (a migration's ACCESS EXCLUSIVE, then every writer) waits too: give up on locks quickly.
_LOCK_TIMEOUT_S: Final = 2.0

PRIVILEGED_ROLES: Final = (
    "pg_execute_server_program",
    "pg_write_server_files",
    "pg_read_server_files",
    "pg_signal_backend",
)
# Volatile functions that change nothing outside the statement: the clock, randomness, sleeping
# (bounded by the timeout).
HARMLESS_VOLATILE: Final = frozenset(
    {
        "clock_timestamp",
        "gen_random_uuid",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "random",
        "random_normal",
        "timeofday",
    }
)

# SQLite authorizer: what a read needs. Everything else is denied.
_SQLITE_READS: Final = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, 33})  # RECURSIVE
_SQLITE_DENIED_FUNCTIONS: Final = frozenset(
    {"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit", "fsdir"}
)
# Pragmas that only report, whatever their argument (a table or index name).
_SQLITE_REPORTING_PRAGMAS: Final = frozenset(
    {
        "collation_list",
        "compile_options",
        "database_list",
        "foreign_key_check",
        "foreign_key_list",
        "function_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "module_list",
        "pragma_list",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)
# Pragmas that report when given no value (and set something when given one).
_SQLITE_SETTING_PRAGMAS: Final = frozenset(
    {
        "application_id",
        "auto_vacuum",
        "data_version",
        "encoding",
        "freelist_count",
        "journal_mode",
        "page_count",
        "page_size",
        "schema_version",
        "user_version",
    }
)
_SQLITE_REFUSED: Final = ("not authorized", "authorization denied", "readonly database")
_PROGRESS_STEPS: Final = 1_000  # SQLite VM instructions between two deadline checks

# PostgreSQL SQLSTATEs that mean "this statement is not allowed", not "this statement is wrong".
_PG_REFUSED: Final = {
    "25006": "it would write",  # read_only_sql_transaction
    "42501": "the role may not do it",  # insufficient_privilege
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
# U&"..." names an identifier through escapes, which would hide a function's name from the check.
_UNICODE_IDENTIFIER = re.compile(r'(?i)u&"')


class StatementRefusedError(StoreError, ConfigurationError):
    """``llmtrail sql`` refused a statement: it would write, reach outside the store, or is
    several statements (exit code 2). The message says which check refused it."""


class QueryTimeoutError(StoreError):
    """The statement ran past its timeout and was cancelled on the server."""


@dataclass(frozen=True, slots=True)
class ReadOnlyLimits:
    """How long a statement may run, how many rows it may return, and whether a PostgreSQL
    role that can reach server files, programs or other sessions is accepted anyway."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_rows: int = DEFAULT_MAX_ROWS
    allow_privileged_role: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float):
            raise StoreConfigError(f"--timeout {self.timeout_s!r} is invalid: use seconds > 0")
        if not 0 < self.timeout_s < 86_400:
            raise StoreConfigError(
                f"--timeout {self.timeout_s!r} is invalid: use seconds > 0 and < 86400"
            )
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int):
            raise StoreConfigError(f"--max-rows {self.max_rows!r} is invalid: use an int >= 1")
        if self.max_rows < 1:
            raise StoreConfigError(f"--max-rows {self.max_rows!r} is invalid: use an int >= 1")


def _refused(why: str, said: str | None = None) -> StatementRefusedError:
    text = f"refused: llmtrail sql is read-only and runs one query; {why}"
    if said:
        text += f"; the database said: {said}"
    return StatementRefusedError(" ".join(text.split()))


def _too_many(max_rows: int) -> StoreError:
    return StoreError(
        f"the statement returned more than --max-rows {max_rows} rows: add a LIMIT, "
        "or raise --max-rows"
    )


def _timed_out(timeout_s: float) -> QueryTimeoutError:
    return QueryTimeoutError(
        f"the statement ran longer than --timeout {timeout_s:g}s and was cancelled on the "
        "server: narrow it, or raise --timeout"
    )


async def run_readonly_sql(
    url: str | URL, statement: str, limits: ReadOnlyLimits | None = None
) -> tuple[list[str], list[list[Any]]]:
    """Run one statement read-only; return its column names and rows.

    Raises :class:`StatementRefusedError` for a statement a check refuses (or several
    statements), :class:`QueryTimeoutError` past ``limits.timeout_s``, :class:`StoreError` for
    any other database error. Cancelling the caller cancels the statement on the server.
    """
    limits = limits or ReadOnlyLimits()
    if not statement.strip():
        raise StoreConfigError("the SQL statement is empty: give one, e.g. 'SELECT * FROM calls'")
    parsed = normalize_store_url(url)
    if is_sqlite(parsed):
        return await _run_sqlite(parsed, statement, limits)
    try:
        from ._readonly_pg import run_postgresql
    except ModuleNotFoundError as exc:
        raise StoreConfigError(
            f"store URL {mask_url(parsed)!r} needs the PostgreSQL driver ({exc.name}): "
            "pip install 'llmtrail[postgres]'"
        ) from None
    return await run_postgresql(parsed, statement, limits)


# -- SQLite ---------------------------------------------------------------------------------------


def _sqlite_path(url: URL) -> Path:
    database = url.database or ""
    if not database or database == ":memory:":
        raise StoreConfigError(f"store URL {mask_url(url)!r} names no database file")
    path = Path(database)
    if not path.is_file():
        raise StoreConfigError(
            f"no event store at {database!r} (store URL {mask_url(url)!r}): check --store"
        )
    return path.resolve()


def _authorize(
    action: int, arg1: str | None, arg2: str | None, _db: str | None, _source: str | None
) -> int:
    if action in _SQLITE_READS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        denied = (arg2 or "").lower() in _SQLITE_DENIED_FUNCTIONS
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        reports = name in _SQLITE_REPORTING_PRAGMAS or (
            name in _SQLITE_SETTING_PRAGMAS and arg2 is None
        )
        return sqlite3.SQLITE_OK if reports else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        # Reported while SQLite prepares an eponymous virtual table (json_each,
        # pragma_table_info); a real write to the schema still meets mode=ro and query_only.
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _open_sqlite(path: Path, deadline: float, cancelled: threading.Event) -> sqlite3.Connection:
    # Percent-encoded, so '#', '?' and '%' in a path name this file and no other.
    uri = f"file:{quote(str(path))}?mode=ro"
    connection = sqlite3.connect(
        uri, uri=True, isolation_level=None, check_same_thread=False, timeout=_LOCK_TIMEOUT_S
    )
    try:
        connection.execute("PRAGMA query_only = ON")
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        connection.set_authorizer(_authorize)
        connection.set_progress_handler(
            lambda: int(cancelled.is_set() or time.monotonic() > deadline), _PROGRESS_STEPS
        )
    except BaseException:
        connection.close()
        raise
    return connection


def _fetch_sqlite(
    connection: sqlite3.Connection, statement: str, max_rows: int
) -> tuple[list[str], list[list[Any]]]:
    cursor = connection.execute(statement)
    try:
        if cursor.description is None:
            return [], []
        header = [column[0] for column in cursor.description]
        rows: list[list[Any]] = []
        while batch := cursor.fetchmany(1_000):
            rows.extend(list(row) for row in batch)
            if len(rows) > max_rows:
                raise _too_many(max_rows)
        return header, rows
    finally:
        cursor.close()


async def _run_sqlite(
    url: URL, statement: str, limits: ReadOnlyLimits
) -> tuple[list[str], list[list[Any]]]:
    path = _sqlite_path(url)
    deadline = time.monotonic() + limits.timeout_s
    cancelled = threading.Event()
    connection = _open_sqlite(path, deadline, cancelled)
    work = asyncio.get_running_loop().run_in_executor(
        None, _fetch_sqlite, connection, statement, limits.max_rows
    )
    try:
        return await _interruptible(work, connection.interrupt, cancelled.set)
    except (sqlite3.Warning, sqlite3.DatabaseError) as exc:
        message = str(exc)
        if "one statement at a time" in message:
            raise _refused("give a single statement", message) from None
        if message == "interrupted":
            raise _timed_out(limits.timeout_s) from None
        if any(marker in message for marker in _SQLITE_REFUSED):
            raise _refused("SQLite's authorizer allows reads only", message) from None
        if "too many attached databases" in message:
            raise _refused("it may not attach or vacuum into another file", message) from None
        raise StoreError(f"SQL error: {message}") from None
    finally:
        connection.close()


async def _interruptible(
    work: Awaitable[Any], *stops: Callable[[], object]
) -> tuple[list[str], list[list[Any]]]:
    """Await ``work`` (a statement running in a thread); when cancelled, run ``stops`` and wait
    for the statement to end before the cancellation propagates."""
    future = asyncio.ensure_future(work)
    try:
        result: tuple[list[str], list[list[Any]]] = await asyncio.shield(future)
        return result
    except asyncio.CancelledError:
        for stop in stops:
            stop()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the interruption it reports is expected
        raise


async def stop_on_signal(name: str, work: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine until it ends or Ctrl-C / SIGTERM cancels it; then exit
    130 (143 for SIGTERM), once the statement has been cancelled on the server."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signalled: list[int] = []

    def terminate() -> None:
        signalled.append(128 + signal.SIGTERM)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
        installed = True
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
        installed = False
    try:
        return await work
    except asyncio.CancelledError:
        # A command's top-level task is cancelled by a signal only (asyncio.run turns Ctrl-C
        # into a cancellation); the statement was cancelled on the server on the way here.
        print(f"llmtrail {name}: interrupted; the statement was cancelled", file=sys.stderr)
        return signalled[0] if signalled else 130
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)
