"""Writing one batch of the writer's queue: one INSERT in one transaction, retried through
outages, with a refused row isolated and a damaged store reported instead of retried.

Invariants:
- A batch is one ``INSERT ... ON CONFLICT (event_id) DO NOTHING`` in one transaction, so it is
  idempotent and simply retried after a failure.
- A locked or unreachable database is retried with capped exponential backoff, forever; the
  outage is logged once (warning) and its end once (info). The writer's callers bound their
  own waits (``store_timeout_s``), so nothing upstream hangs on it.
- A row the database refuses for its content (a duplicate ``(call_id, seq)``, bad data) is
  found by writing the rows one by one, logged as an error and counted in ``rejected``: one
  bad event cannot wedge the writer.
- A damaged SQLite file raises :class:`StoreCorruptError` at once (see ``_failures``).
- On PostgreSQL each batch takes a transaction-level advisory lock first (see below).
- On SQLite the writer keeps one pooled connection and talks to its aiosqlite driver
  connection (SQLAlchemy's ``get_raw_connection``): ``BEGIN IMMEDIATE; INSERT ...; COMMIT``
  is one ``executescript``, one hop to the driver's thread instead of eight (cursors, closes
  and the pool's reset), the batch inlined as an SQL string literal (single quotes doubled,
  the only character a SQLite literal escapes). Each hop waits for the GIL while the loop is
  busy (up to the 5 ms switch interval), and with write-ahead every call waits for two
  commits. Errors are wrapped as SQLAlchemy's, exactly as its own path would.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from ._engine import is_postgresql, write_engine
from ._failures import as_corruption, describe, is_refusal, is_transient
from ._rows import Batch, RowEncoder, postgresql_insert, sqlite_insert

__all__ = ["BatchInserter"]

_log = structlog.get_logger(__name__)

# Every writer of every process takes this transaction-level advisory lock before inserting.
# Without it, two transactions can draw positions 10 and 11 and commit 11 first: a reader
# paging with `position > cursor` would then read 11, move its cursor past 10, and skip it.
_PG_APPEND_LOCK_KEY = 0x6C6C6D7472616C01
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_MARK = "llmtrail-batch-8d1f"  # where the batch goes in the SQLite script


class BatchInserter:
    """Inserts batches into one store; counts what was written, refused and retried."""

    def __init__(
        self,
        url: URL,
        shown_url: str,
        *,
        instance: str | None,
        max_backoff_s: float,
        queued: Callable[[], int],
    ) -> None:
        self._url = url
        self._shown_url = shown_url
        self._instance = instance
        self._queued = queued  # for the outage log lines
        self.written = 0
        self.rejected = 0
        self.failed_attempts = 0  # batch attempts that failed and were retried
        self.outage_since: float | None = None
        self.last_error: str | None = None  # why the store failed, during an outage
        self.writing_since: float | None = None  # a batch in flight since (monotonic)
        self._writes: AsyncEngine | None = None
        self._postgresql = False
        self._insert: Any = None
        self._sqlite_script = ("", "")  # the transaction's text before and after the batch
        self._connection: AsyncConnection | None = None  # SQLite: held between batches
        self.encoder = RowEncoder(postgresql=False, instance=instance, shown_url=shown_url)
        self._retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.05, max=max_backoff_s, jitter=0.05),
            before_sleep=self._on_retry,
            reraise=True,
        )

    async def open(self, engine: AsyncEngine) -> None:
        """Use ``engine`` (migrated) from now on."""
        self._writes = write_engine(engine)
        self._postgresql = is_postgresql(engine)
        self._insert = postgresql_insert() if self._postgresql else sqlite_insert()
        if not self._postgresql:
            # The batch travels inside the script as an SQL string literal (quotes doubled):
            # the one form executescript takes, and one hop for the whole transaction.
            literal = sqlite_insert(_MARK).compile(
                dialect=engine.dialect, compile_kwargs={"literal_binds": True}
            )
            before, after = str(literal).split(f"'{_MARK}'")
            self._sqlite_script = ("BEGIN IMMEDIATE;\n" + before + "'", "'" + after + ";\nCOMMIT;")
            self._connection = await self._writes.connect()
        self.encoder = RowEncoder(
            postgresql=self._postgresql, instance=self._instance, shown_url=self._shown_url
        )

    async def write(self, batch: Batch) -> None:
        """Commit ``batch``; return once every row is written or refused (and logged)."""
        self.writing_since = time.monotonic()
        try:
            await self._write(batch)
        finally:
            self.writing_since = None

    def why_unstored(self) -> str:
        """Why events are not committed yet, for the line that reports them."""
        if self.outage_since is not None:
            waited = time.monotonic() - self.outage_since
            return f"the store has been failing for {waited:.1f}s: {self.last_error}"
        if self.writing_since is not None:
            waited = time.monotonic() - self.writing_since
            return (
                f"the store has not committed the batch in flight for {waited:.1f}s "
                "(is it locked by another connection, or not answering?)"
            )
        return "the writer stopped before writing them"

    async def _write(self, batch: Batch) -> None:
        try:
            if batch.events:
                await self._attempt(batch.data())
        except DBAPIError as exc:
            if not is_refusal(exc):
                raise
            # Some row is refused for its content; write the rows one by one to find it.
            for event in batch.events:
                row = self.encoder.encode_rows(self.encoder.rows([event], Batch(size=1)))
                try:
                    await self._attempt("[" + row + "]")
                except DBAPIError as row_exc:
                    if not is_refusal(row_exc):
                        raise
                    self.rejected += 1
                    _log.error(
                        "event store refused an event",
                        store=self._shown_url,
                        error=describe(row_exc),
                        event_id=event.event_id,
                        call_id=event.call_id,
                        seq=event.seq,
                        type=str(event.type),
                    )
                else:
                    self.written += 1
        else:
            self.written += len(batch.events)
        self.rejected += batch.invalid

    async def _attempt(self, data: str) -> None:
        async for attempt in self._retrying:
            with attempt:
                await self._insert_batch(data)
        if self.outage_since is not None:
            _log.info(
                "event store available again",
                store=self._shown_url,
                outage_s=round(time.monotonic() - self.outage_since, 3),
                queued=self._queued(),
            )
            self.outage_since = None
            self.last_error = None

    async def aclose(self) -> None:
        """Give back the connection held between batches (before the engine is disposed)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _insert_batch(self, data: str) -> None:
        assert self._writes is not None
        try:
            if not self._postgresql:
                await self._insert_sqlite(data)
                return
            async with self._writes.begin() as connection:
                await connection.execute(_ADVISORY_LOCK, {"key": _PG_APPEND_LOCK_KEY})
                await connection.execute(self._insert, {"batch": data})
        except DBAPIError as exc:
            corrupt = as_corruption(exc, self._url)
            if corrupt is not None:  # not an outage: retrying would hang every call
                raise corrupt from exc
            raise

    async def _insert_sqlite(self, data: str) -> None:
        """One batch in one ``BEGIN IMMEDIATE`` transaction, through the driver connection."""
        assert self._writes is not None
        if self._connection is None:
            self._connection = await self._writes.connect()
        raw = await self._connection.get_raw_connection()
        driver: Any = raw.driver_connection  # aiosqlite.Connection
        head, tail = self._sqlite_script
        try:
            try:
                await driver.executescript(head + data.replace("'", "''") + tail)
            except BaseException:
                if driver.in_transaction:  # the INSERT failed after BEGIN: end it
                    await driver.rollback()
                raise
        except sqlite3.Error as exc:
            # The same exception classes SQLAlchemy's own execution raises (IntegrityError,
            # OperationalError...), so refusals, outages and damage are told apart as ever.
            raise DBAPIError.instance(head[:200], None, exc, sqlite3.Error) from exc
        except BaseException:
            # Cancelled mid-batch: the connection's state is unknown; never reuse it.
            connection, self._connection = self._connection, None
            await connection.invalidate()
            raise

    def _on_retry(self, state: RetryCallState) -> None:
        self.failed_attempts += 1
        if self.outage_since is not None:
            return
        self.outage_since = time.monotonic()
        exc = state.outcome.exception() if state.outcome is not None else None
        self.last_error = describe(exc) if exc is not None else "unknown"
        _log.warning(
            "event store unavailable; retrying with backoff, events are kept in memory",
            store=self._shown_url,
            error=self.last_error,
            queued=self._queued(),
        )
