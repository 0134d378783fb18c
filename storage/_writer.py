"""The event writer: one per process, batching lifecycle events into the store.

Invariants:
- ``emit()`` never blocks on I/O, never drops, and is safe from any thread. On the loop's
  thread it appends to an in-memory queue; from any other thread it appends to an inbox that
  is handed to the loop with ``call_soon_threadsafe`` (one wake-up per burst). Events from
  one thread keep their order.
- The queue is bounded only by the caller's cooperation: ``emit()`` returns False once
  ``max_queue`` events are waiting (emitted, not yet committed), and ``wait_for_room()``
  returns once fewer are. Nothing is ever discarded to make room.
- A single drain task writes whatever is queued, up to ``batch_size`` events per batch, as one
  multi-row ``INSERT ... ON CONFLICT (event_id) DO NOTHING`` in one transaction. A batch is
  therefore idempotent and is simply retried after a failure. The drain task never waits for a
  timer while events are queued.
- Batches commit in queue order, so ``flush()``/``aclose()`` can return as soon as as many
  events have been committed as had been emitted when they were called.
- A locked or unreachable database is retried with capped exponential backoff, forever; the
  outage is logged once (warning) and its end once (info). A row the database refuses for its
  content (a duplicate ``(call_id, seq)``, bad data) is logged as an error and counted in
  ``rejected``, so one bad event cannot wedge the writer; a payload JSON cannot hold is kept
  as its ``repr``, and logged.
- Rows and their JSON (payload fidelity, refusals, the INSERT statements) are ``_rows``'s.
- A batch is serialised to one JSON array (orjson), in slices of ``_SLICE`` events per
  loop turn, as events arrive and while the previous batch is being written (the next write
  starts as soon as the last one commits, with what is serialised by then); the database
  unpacks it (``json_each`` on SQLite, ``jsonb_array_elements`` on PostgreSQL) with the GIL
  released / in its own process. Python does little per event, and the loop is free while
  the database works.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    and_,
    case,
    func,
    select,
    text,
)
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from llmtrail._log import get_logger
from llmtrail.pipeline import Event, EventType
from llmtrail.pipeline._events import default_instance

from ._engine import (
    DEFAULT_BUSY_TIMEOUT_MS,
    StoreClosedError,
    StoreConfigError,
    StoreError,
    create_engine,
    is_postgresql,
    mask_url,
    normalize_store_url,
    write_engine,
)
from ._migrate import ensure_schema
from ._rows import Batch, RowEncoder, postgresql_insert, sqlite_insert
from ._schema import events

__all__ = ["EventWriter", "open_store_sink"]

_log = get_logger(__name__)

_T = TypeVar("_T")

# Every writer of every process takes this transaction-level advisory lock before inserting.
# Without it, two transactions can draw positions 10 and 11 and commit 11 first: a reader
# paging with `position > cursor` would then read 11, move its cursor past 10, and skip it.
_PG_APPEND_LOCK_KEY = 0x6C6C6D7472616C01

# SQLite page cache of the writer's connection: inserting random ids touches index pages all
# over the file, and a cache miss is a read system call (measured: about 20% of insert time).
_WRITER_CACHE_KIB = 65_536
# WAL pages a writer's commit may leave before it checkpoints (SQLite's default: 1,000). A
# batch of 5,000 events dirties about that many pages (random ids spread index inserts), so
# the default checkpoints, and fsyncs, on nearly every commit and copies the same index pages
# back again and again. 10,000 pages (40 MiB of WAL) checkpoints an order of magnitude less
# often; a commit stays as durable (synchronous=NORMAL either way). Measured: about 15% more
# events/s over 200,000 events.
_WRITER_WAL_AUTOCHECKPOINT_PAGES = 10_000
# Events serialised per loop turn: about a millisecond of CPU, so the loop stays responsive.
_SLICE = 500


def _describe(exc: BaseException) -> str:
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


def _is_refusal(exc: BaseException) -> bool:
    """The database refuses the rows themselves: retrying the same rows would fail forever.

    asyncpg's data errors (SQLSTATE class 22, e.g. a string JSONB cannot hold) reach us as a
    plain ``DBAPIError``, so the SQLSTATE class decides, not only the exception class.
    """
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, DBAPIError) and _sqlstate(exc)[:2] in ("22", "23")


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database is locked, unreachable or restarting (anything that is
    not a refusal of the rows themselves)."""
    if _is_refusal(exc):
        return False
    return isinstance(exc, DBAPIError | OSError | TimeoutError)


async def _cancelled(write: asyncio.Task[None] | None) -> None:
    """Cancel the batch being written and wait until it has given its connection back, as
    awaiting it would have: the engine is disposed next."""
    if write is not None and not write.done():
        write.cancel()
        await asyncio.wait((write,))


class EventWriter:
    """Appends lifecycle events to the event store (an ``EventSink`` and ``UsageHistory``).

    Build it with :func:`open_store_sink` (no I/O), then ``await writer.start()`` inside the
    event loop that will own it: that opens the engine, migrates a new store and starts the
    drain task. Events emitted before ``start()`` are kept and written after it.
    """

    def __init__(
        self,
        url: str,
        *,
        instance: str | None = None,
        max_queue: int = 10_000,
        batch_size: int = 5_000,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_backoff_s: float = 5.0,
    ) -> None:
        for name, value, low in (("max_queue", max_queue, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StoreConfigError(f"{name}={value!r} is invalid: use an int >= {low}")
        if not (isinstance(max_backoff_s, int | float) and max_backoff_s > 0):
            raise StoreConfigError(f"max_backoff_s={max_backoff_s!r} is invalid: use seconds > 0")
        self._url = normalize_store_url(url)  # validates now: no I/O, no loop needed
        self._shown_url = mask_url(self._url)
        self._instance = instance if instance is not None else default_instance()
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._busy_timeout_ms = busy_timeout_ms
        self._max_backoff_s = float(max_backoff_s)

        self._buffer: deque[Event] = deque()  # owned by the loop thread
        self._inbox: list[Event] = []  # other threads' emits, guarded by _inbox_lock
        self._inbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._accepted = 0  # events moved into _buffer (loop thread only)
        self._done = 0  # events committed or rejected (loop thread only)
        self.written = 0
        self.rejected = 0
        self.failed_attempts = 0  # batch attempts that failed and were retried
        self._idle = False
        self._wake: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._outage_since: float | None = None

        self._engine: AsyncEngine | None = None
        self._writes: AsyncEngine | None = None
        self._insert: Any = None
        self._postgresql = False
        self._encoder = RowEncoder(
            postgresql=False, instance=self._instance or None, shown_url=self._shown_url
        )
        self._start_task: asyncio.Future[None] | None = None
        self._closed = False
        self._close_done: asyncio.Event | None = None  # set by aclose(), done when closed
        self._retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(multiplier=0.05, max=self._max_backoff_s, jitter=0.05),
            before_sleep=self._on_retry,
            reraise=True,
        )

    # -- counters ------------------------------------------------------------------------

    @property
    def emitted(self) -> int:
        """Events accepted by :meth:`emit` so far."""
        return self._accepted + len(self._inbox)

    @property
    def pending(self) -> int:
        """Events emitted but not yet committed (the queue the high-water mark applies to)."""
        return self._accepted - self._done + len(self._inbox)

    @property
    def in_outage(self) -> bool:
        """True while the store is failing and batches are being retried."""
        return self._outage_since is not None

    @property
    def url(self) -> str:
        """The store URL, password masked."""
        return self._shown_url

    # -- emitting ------------------------------------------------------------------------

    def emit(self, event: Event) -> bool:
        """Queue ``event``; False once the queue is at the high-water mark (see class doc)."""
        if self._closed:
            raise StoreClosedError(
                f"event writer for {self._shown_url!r} is closed: emit before aclose()"
            )
        if threading.get_ident() == self._loop_thread:
            self._buffer.append(event)
            self._accepted += 1
            if self._idle:
                self._idle = False
                assert self._wake is not None
                self._wake.set()
            return self._accepted - self._done + len(self._inbox) < self._max_queue
        with self._inbox_lock:
            # Checked under the lock that aclose() takes to set it: no event can slip into
            # the inbox after aclose() took it for the last time.
            if self._closed:
                raise StoreClosedError(
                    f"event writer for {self._shown_url!r} is closed: emit before aclose()"
                )
            self._inbox.append(event)
            first = len(self._inbox) == 1
            loop = self._loop
            waiting = self._accepted - self._done + len(self._inbox)
        if first and loop is not None:
            try:
                loop.call_soon_threadsafe(self._take_inbox)
            except RuntimeError:  # the loop is closed: nothing will ever write this event
                raise StoreClosedError(
                    f"event writer for {self._shown_url!r} lost its event loop: "
                    "emit before the loop stops and aclose() the writer in it"
                ) from None
        return waiting < self._max_queue

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            taken, self._inbox = self._inbox, []
        if taken:
            self._buffer.extend(taken)
            self._accepted += len(taken)
            if self._idle and self._wake is not None:
                self._idle = False
                self._wake.set()

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_queue`` events wait to be committed."""
        if self._loop is None:
            return  # not started: nothing drains yet, and the buffer is unbounded until then
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.wait_for_room)
        while self.pending >= self._max_queue:
            await self._progress()

    async def flush(self) -> None:
        """Return once every event emitted before this call is committed."""
        if self._loop is None:
            if not self.emitted:
                return
            await self.start()
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.flush)
        self._take_inbox()
        target = self._accepted
        while self._done < target:
            await self._progress()

    async def _progress(self) -> None:
        """Wait for the next committed batch; raise if the drain task died."""
        self._raise_if_failed()
        if self._task is None or self._task.done():
            raise StoreClosedError(
                f"event writer for {self._shown_url!r} is closed with {self.pending} events "
                "not written"
            )
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter
        self._raise_if_failed()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise StoreError(
                f"event writer for {self._shown_url!r} stopped after an internal error "
                f"({_describe(self._failure)}); {self.pending} events are not written"
            ) from self._failure

    async def _on_own_loop(self, method: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        # Called from another event loop (e.g. a sync caller's thread): run it on ours.
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(method(), self._loop)
        return await asyncio.wrap_future(future)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (migrating a new one) and start the drain task. Idempotent."""
        if self._closed:
            raise StoreClosedError(f"event writer for {self._shown_url!r} is closed")
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._start_task)
        except BaseException:
            if self._start_task.done():
                self._start_task = None  # a failed start may be retried
            raise

    async def _start(self) -> None:
        engine = create_engine(
            self._url,
            busy_timeout_ms=self._busy_timeout_ms,
            application_name="llmtrail writer",
            cache_size_kib=_WRITER_CACHE_KIB,
            wal_autocheckpoint_pages=_WRITER_WAL_AUTOCHECKPOINT_PAGES,
            hide_parameters=True,
        )
        try:
            await ensure_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._writes = write_engine(engine)
        self._postgresql = is_postgresql(engine)
        self._insert = postgresql_insert() if self._postgresql else sqlite_insert()
        self._encoder = RowEncoder(
            postgresql=self._postgresql, instance=self._instance or None, shown_url=self._shown_url
        )
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        with self._inbox_lock:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            taken, self._inbox = self._inbox, []
        self._buffer.extend(taken)
        self._accepted += len(taken)
        self._task = loop.create_task(self._drain(), name="llmtrail event writer")

    async def aclose(self) -> None:
        """Write everything emitted so far, stop the drain task, dispose the engine.

        Idempotent; ``emit()`` raises from the moment it starts. If the caller cancels it
        (e.g. a timeout during an outage), the events not yet written are reported in one
        error line and the writer closes anyway.
        """
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.aclose)
        if self._close_done is not None:  # closing or closed already
            await self._close_done.wait()
            return
        self._close_done = asyncio.Event()
        try:
            if self._loop is None and self.emitted:
                await self.start()
            with self._inbox_lock:
                self._closed = True
            if self._task is not None:
                self._take_inbox()
                assert self._wake is not None
                self._idle = False
                self._wake.set()
                try:
                    # The drain task writes what is queued and returns. Cancelling us
                    # cancels it too: that is how a caller gives up during an outage.
                    await self._task
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._raise_if_failed()
                    raise
        finally:
            self._closed = True
            if self._task is not None and not self._task.done():  # start() raced a cancel
                self._task.cancel()
            if self._engine is not None:
                await self._engine.dispose()
            self._close_done.set()

    # -- draining ------------------------------------------------------------------------

    async def _drain(self) -> None:
        buffer = self._buffer
        batch_size = self._batch_size
        assert self._wake is not None
        wake = self._wake
        ahead: Batch | None = None  # the next batch, serialised slice by slice
        write: asyncio.Task[None] | None = None  # the batch being written
        try:
            while True:
                if self._inbox:
                    self._take_inbox()
                if write is not None and write.done():
                    finished, write = write, None
                    finished.result()  # an error the writer gives up on ends the drain
                    self._notify()
                if write is None and ahead is not None:
                    # A batch in flight stays counted in `pending` until it commits.
                    write = asyncio.ensure_future(self._write(ahead))
                    write.add_done_callback(self._wake_up)
                    ahead = None
                if buffer and (ahead is None or ahead.size < batch_size):
                    # Serialise while the database writes the previous batch (in its own
                    # thread on SQLite, its own process on PostgreSQL), one slice per loop
                    # turn so that the loop stays responsive. Waiting for the write to
                    # finish first would leave the database idle meanwhile.
                    if ahead is None:
                        ahead = Batch()
                    self._serialise(ahead, min(_SLICE, batch_size - ahead.size))
                    await asyncio.sleep(0)
                    continue
                if write is None:
                    if ahead is None and self._closed:
                        return
                elif ahead is not None and ahead.size >= batch_size:
                    await asyncio.wait((write,))  # the next batch is full: wait for the write
                    continue
                self._idle = True
                wake.clear()
                await wake.wait()
        except asyncio.CancelledError:
            await _cancelled(write)
            if self.pending:
                _log.error(
                    "event writer stopped before writing all events",
                    store=self._shown_url,
                    unwritten=self.pending,
                )
            raise
        except BaseException as exc:
            await _cancelled(write)
            self._failure = exc
            _log.exception("event writer failed", store=self._shown_url, unwritten=self.pending)
            self._notify()
            raise

    def _wake_up(self, _: object = None) -> None:
        self._idle = False
        if self._wake is not None:
            self._wake.set()

    def _serialise(self, batch: Batch, count: int) -> None:
        """Move up to ``count`` events from the queue into ``batch``, as JSON."""
        popleft = self._buffer.popleft
        taken = [popleft() for _ in range(min(len(self._buffer), count))]
        batch.size += len(taken)
        text = self._encoder.encode_rows(self._encoder.rows(taken, batch))
        if text:
            batch.parts.append(text)

    async def _write(self, batch: Batch) -> None:
        try:
            if batch.events:
                await self._attempt(batch.data())
        except DBAPIError as exc:
            if not _is_refusal(exc):
                raise
            # Some row is refused for its content; write the rows one by one to find it.
            for event in batch.events:
                row = self._encoder.encode_rows(self._encoder.rows([event], Batch(size=1)))
                try:
                    await self._attempt("[" + row + "]")
                except DBAPIError as row_exc:
                    if not _is_refusal(row_exc):
                        raise
                    self.rejected += 1
                    _log.error(
                        "event store refused an event",
                        store=self._shown_url,
                        error=_describe(row_exc),
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
        self._done += batch.size

    async def _attempt(self, data: str) -> None:
        async for attempt in self._retrying:
            with attempt:
                await self._insert_batch(data)
        if self._outage_since is not None:
            _log.info(
                "event store available again",
                store=self._shown_url,
                outage_s=round(time.monotonic() - self._outage_since, 3),
                queued=self.pending,
            )
            self._outage_since = None

    async def _insert_batch(self, data: str) -> None:
        assert self._writes is not None
        async with self._writes.begin() as connection:
            if self._postgresql:
                await connection.execute(_ADVISORY_LOCK, {"key": _PG_APPEND_LOCK_KEY})
            await connection.execute(self._insert, {"batch": data})

    def _on_retry(self, state: RetryCallState) -> None:
        self.failed_attempts += 1
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        exc = state.outcome.exception() if state.outcome is not None else None
        _log.warning(
            "event store unavailable; retrying with backoff, events are kept in memory",
            store=self._shown_url,
            error=_describe(exc) if exc is not None else "unknown",
            queued=self.pending,
            max_queue=self._max_queue,
        )

    # -- reading back ---------------------------------------------------------------------

    async def recent_sends(self, since: datetime) -> list[tuple[datetime, int]]:
        """``(sent_at, tokens)`` per ``sent`` event at or after ``since``, oldest first.

        ``tokens`` is the call's ``reserved_tokens`` (from its ``trace_created``) for attempt
        1 and 0 for retries, which is what the TPM gate reserved for each attempt.
        """
        if self._engine is None:
            raise StoreError(
                f"event writer for {self._shown_url!r} is not started: await writer.start() first"
            )
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(lambda: self.recent_sends(since))
        sent = events.alias("sent")
        created = events.alias("created")
        tokens = case(
            (
                sent.c.payload["attempt"].as_integer() == 1,
                func.coalesce(created.c.payload["reserved_tokens"].as_integer(), 0),
            ),
            else_=0,
        )
        query = (
            select(sent.c.occurred_at, tokens)
            .select_from(
                sent.outerjoin(
                    created,
                    # trace_created is seq 0: the join is one lookup in the (call_id, seq) key.
                    and_(
                        created.c.call_id == sent.c.call_id,
                        created.c.seq == 0,
                        created.c.type == str(EventType.TRACE_CREATED),
                    ),
                )
            )
            # `type || ''` keeps SQLite off the index on type (every sent event ever) and on
            # the index on occurred_at (the last window only).
            .where(sent.c.type.concat("") == str(EventType.SENT), sent.c.occurred_at >= since)
            .order_by(sent.c.occurred_at)
        )
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [(row[0], int(row[1] or 0)) for row in result]


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def open_store_sink(
    url: str,
    *,
    instance: str | None = None,
    max_queue: int = 10_000,
    **options: Any,
) -> EventWriter:
    """The ``store`` sink (entry point ``llmtrail.sinks``): an un-started :class:`EventWriter`.

    Validates ``url`` now and does no I/O; ``await writer.start()`` inside the service's loop
    opens the store. ``options`` are :class:`EventWriter`'s (``batch_size``,
    ``busy_timeout_ms``, ``max_backoff_s``).
    """
    return EventWriter(url, instance=instance, max_queue=max_queue, **options)
