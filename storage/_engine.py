"""Engines for the event store: URL validation, driver mapping and SQLite setup.

Invariants:
- Only two backends exist: SQLite through aiosqlite and PostgreSQL through asyncpg. Plain
  ``sqlite:///x.db`` and ``postgresql://...`` (or ``postgres://``) are mapped to those async
  drivers; any other URL raises :class:`StoreConfigError` naming the URL (password masked) and
  the fix.
- A SQLite store file is created by :func:`create_engine` with mode 0600 before SQLAlchemy ever
  opens it (SQLite gives its -wal and -shm files the same mode), so events are private to the
  owner from the first byte; an existing store (and -wal/-shm) opened for writing is made 0600.
- Statement parameters never appear in SQLAlchemy's logs or errors (``hide_parameters``), nor in
  aiosqlite's DEBUG lines (a filter on its logger drops the lines that carry them).
- Every SQLite connection runs in WAL mode with ``synchronous=NORMAL`` and a busy timeout.
  SQLAlchemy, not the sqlite3 module, emits BEGIN: ``BEGIN IMMEDIATE`` on engines derived with
  :func:`write_engine` (so a writer takes the write lock up front and never fails to upgrade a
  read lock halfway through a batch), plain deferred ``BEGIN`` otherwise (WAL readers never
  block the writer and are never blocked by it).
- On PostgreSQL the same ``busy_timeout_ms`` becomes ``lock_timeout``, so a locked table is
  reported as an error to retry rather than an unbounded wait.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from llmtrail.pipeline import require_extra

from ._base import (
    STORE_URL_ENV,
    StoreConfigError,
    mask_url,
)

__all__ = ["create_engine", "is_postgresql", "is_sqlite", "normalize_store_url", "write_engine"]

DEFAULT_BUSY_TIMEOUT_MS = 5_000

_FIX = "use sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db"
_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+aiosqlite"})
_POSTGRES_DRIVERS = frozenset({"postgresql", "postgres", "postgresql+asyncpg"})
_SQLITE_MAGIC = b"SQLite format 3\x00"
_AIOSQLITE_ARGUMENT_LINES = frozenset(
    {"executing %s", "operation %s completed", "returning exception %s"}
)
# Execution option that marks an engine's transactions as writes (see write_engine()).
_WRITE_OPTION = "llmtrail_write"


def normalize_store_url(url: str | URL) -> URL:
    """Parse and validate a store URL, mapping sync driver names to the async drivers."""
    if isinstance(url, URL):
        parsed = url
    else:
        if not isinstance(url, str) or not url.strip():
            raise StoreConfigError(f"store URL {url!r} is empty or not a string: {_FIX}")
        try:
            parsed = make_url(url.strip())
        except (ArgumentError, ValueError) as exc:
            raise StoreConfigError(
                f"store URL {mask_url(url)!r} is malformed ({exc}): {_FIX}"
            ) from None
    driver = parsed.drivername
    if driver in _SQLITE_DRIVERS:
        return parsed.set(drivername="sqlite+aiosqlite")
    if driver in _POSTGRES_DRIVERS:
        if not parsed.database:
            raise StoreConfigError(f"store URL {mask_url(parsed)!r} names no database: {_FIX}")
        return parsed.set(drivername="postgresql+asyncpg")
    raise StoreConfigError(
        f"store URL {mask_url(parsed)!r} uses the unsupported driver {driver!r}: {_FIX}"
    )


def is_sqlite(engine: AsyncEngine | URL) -> bool:
    url = engine.url if isinstance(engine, AsyncEngine) else engine
    return url.drivername.startswith("sqlite")


def is_postgresql(engine: AsyncEngine | URL) -> bool:
    url = engine.url if isinstance(engine, AsyncEngine) else engine
    return url.drivername.startswith("postgres")


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory and ``uri=true`` databases."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri"):
        return None
    return Path(database)


def _prepare_sqlite_file(url: URL, *, must_exist: bool) -> None:
    path = _sqlite_file(url)
    if path is None:
        return
    shown = mask_url(url)
    if path.is_dir():
        raise StoreConfigError(
            f"store URL {shown!r} points at the directory {str(path)!r}: "
            "name a file, e.g. sqlite+aiosqlite:///path/llmtrail.db"
        )
    if not path.exists():
        if must_exist:
            raise StoreConfigError(
                f"no event store at {str(path)!r} (store URL {shown!r}): check --store or "
                f"${STORE_URL_ENV}, or create the store with `llmtrail migrate --store URL`"
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreConfigError(
                f"cannot create the event store {str(path)!r}: the directory "
                f"{str(parent)!r} does not exist; create it or choose another path"
            )
        try:
            # O_EXCL: never chmod a file someone else just created; 0600 before first open.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreConfigError(
                f"cannot create the event store {str(path)!r}: {exc.strerror}; "
                "check the directory's permissions or choose another path"
            ) from None
        else:
            os.close(fd)
            return
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreConfigError(
            f"the event store {str(path)!r} is not readable and writable by this user: "
            "fix its permissions (chmod 600) or choose another path"
        )
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreConfigError(
            f"cannot read the event store {str(path)!r}: {exc.strerror}; "
            "check its permissions or choose another path"
        ) from None
    # An empty file is a valid, empty SQLite database (we create stores that way).
    if header and header != _SQLITE_MAGIC:
        raise StoreConfigError(
            f"{str(path)!r} is not a SQLite database (store URL {shown!r}): "
            "point --store at an llmtrail store or at a new file"
        )
    if not must_exist:
        _make_private(path)


def _make_private(path: Path) -> None:
    """Give an existing store (and its -wal/-shm) mode 0600: a store made by an older
    llmtrail, or copied with a umask of 022, would otherwise stay readable by everyone."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.stat().st_mode & 0o077 and file.stat().st_uid == os.getuid():
                file.chmod(0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreConfigError(
                f"the event store file {str(file)!r} is readable by other users and cannot be "
                f"made private ({exc.strerror}): chmod 600 it, or choose another path"
            ) from None


def _no_statement_arguments(record: logging.LogRecord) -> bool:
    """aiosqlite logs every call it hands its thread, with the arguments: whole event batches
    (error text, captured prompts). Those three DEBUG lines are dropped; the rest pass."""
    return record.msg not in _AIOSQLITE_ARGUMENT_LINES


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried briefly: switching the mode of a new file needs
    an exclusive lock, and SQLite answers "database is locked" at once, without its busy
    handler, while another connection is opening the same file (seen with concurrent first
    uses). The mode is persistent, so the first connection to succeed sets it for all."""
    for attempt in range(200):  # up to ~2 s, in the driver's thread (never the event loop)
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 199:
                raise
            time.sleep(0.01)


def _install_sqlite_hooks(
    engine: AsyncEngine,
    busy_timeout_ms: int,
    cache_size_kib: int | None,
    wal_autocheckpoint_pages: int | None,
) -> None:
    # SQLAlchemy's documented recipe for aiosqlite: take BEGIN away from the sqlite3 module
    # (isolation_level=None) and emit it ourselves, so that writes can say BEGIN IMMEDIATE.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _set_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
            if cache_size_kib is not None:
                # Negative means KiB. Index pages of random ids (event_id, call_id, trace_id)
                # are touched all over; SQLite's 2 MiB default makes each one a read.
                cursor.execute(f"PRAGMA cache_size = -{int(cache_size_kib)}")
            if wal_autocheckpoint_pages is not None:
                cursor.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint_pages)}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def create_engine(
    url: str | URL,
    *,
    must_exist: bool = False,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    application_name: str = "llmtrail",
    cache_size_kib: int | None = None,
    wal_autocheckpoint_pages: int | None = None,
    **engine_options: Any,
) -> AsyncEngine:
    """An :class:`AsyncEngine` for a validated store URL.

    ``must_exist=True`` (readers) refuses to create a missing SQLite file. ``busy_timeout_ms``
    is how long one statement waits for a lock before failing: SQLite's busy timeout,
    PostgreSQL's ``lock_timeout``. ``application_name`` labels PostgreSQL sessions;
    ``cache_size_kib`` sets SQLite's page cache per connection (default: SQLite's 2 MiB);
    ``wal_autocheckpoint_pages`` how many WAL pages a commit may leave before it checkpoints
    (default: SQLite's 1,000).
    """
    if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int):
        raise StoreConfigError(f"busy_timeout_ms={busy_timeout_ms!r} is invalid: use an int >= 0")
    if busy_timeout_ms < 0:
        raise StoreConfigError(f"busy_timeout_ms={busy_timeout_ms!r} is invalid: use an int >= 0")
    parsed = normalize_store_url(url)
    # Statement parameters hold event payloads (captured prompts, error text): never put them
    # in SQLAlchemy's log lines or exception messages.
    engine_options.setdefault("hide_parameters", True)
    if is_sqlite(parsed):
        # A filter, not a level: the application still decides what aiosqlite logs.
        aiosqlite_log = logging.getLogger("aiosqlite")
        if _no_statement_arguments not in aiosqlite_log.filters:
            aiosqlite_log.addFilter(_no_statement_arguments)
        _prepare_sqlite_file(parsed, must_exist=must_exist)
        engine = create_async_engine(parsed, **engine_options)
        _install_sqlite_hooks(engine, busy_timeout_ms, cache_size_kib, wal_autocheckpoint_pages)
        return engine
    del cache_size_kib, wal_autocheckpoint_pages  # SQLite's; PostgreSQL's are server-side
    if parsed.get_driver_name() == "asyncpg":
        require_extra("asyncpg", "postgres", "a PostgreSQL store")
    connect_args = dict(engine_options.pop("connect_args", {}))
    server_settings = dict(connect_args.pop("server_settings", {}))
    server_settings.setdefault("application_name", application_name)
    # lock_timeout=0 would mean "wait forever" on PostgreSQL; keep 0 meaning "do not wait".
    server_settings.setdefault("lock_timeout", str(max(busy_timeout_ms, 1)))
    connect_args["server_settings"] = server_settings
    return create_async_engine(parsed, connect_args=connect_args, **engine_options)


def write_engine(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` (same pool) whose transactions are writes: BEGIN IMMEDIATE on SQLite."""
    return engine.execution_options(**{_WRITE_OPTION: True})
