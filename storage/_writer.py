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
- ``flush()`` and ``aclose()`` wait for the store at most ``store_timeout_s`` (then, on
  SQLite, at most the busy timeout of the statement in flight). Past it each logs one line
  with how many events are not stored and why; ``flush()`` leaves them queued (written when
  the store is back), ``aclose()`` drops them and stops the drain task, the batch in flight
  and the writer's connections all the same.
- :meth:`durable` is the write-ahead seam: a future done once everything emitted so far is
  committed. One batch resolves the futures of every call it holds (group commit), so a call
  pays about one commit latency, never one commit per event; ``emit()`` itself never waits.
  A commit is durable across a crash of the process (SQLite: WAL with ``synchronous=NORMAL``).
- Writing a batch (retries through outages, refused rows, a damaged store) is
  ``_inserter``'s. A damaged store stops the writer: it is reported in one line, every
  durability future fails with :class:`StoreCorruptError`, ``emit()`` reports the queue full
  (so callers go to ``wait_for_room()``, which raises at once), and ``aclose()`` returns.
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
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail._log import get_logger
from llmtrail.pipeline import Event
from llmtrail.pipeline._events import default_instance

from ._base import StoreClosedError, StoreConfigError, StoreCorruptError, StoreError, mask_url
from ._engine import DEFAULT_BUSY_TIMEOUT_MS, create_engine, normalize_store_url
from ._failures import describe
from ._inserter import BatchInserter
from ._migrate import ensure_schema
from ._reader import recent_sends
from ._rows import Batch

__all__ = ["EventWriter", "open_store_sink"]

_log = get_logger(__name__)

_T = TypeVar("_T")

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
        store_timeout_s: float = 10.0,
    ) -> None:
        for name, value, low in (("max_queue", max_queue, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StoreConfigError(f"{name}={value!r} is invalid: use an int >= {low}")
        if not (isinstance(max_backoff_s, int | float) and max_backoff_s > 0):
            raise StoreConfigError(f"max_backoff_s={max_backoff_s!r} is invalid: use seconds > 0")
        if isinstance(store_timeout_s, bool) or not (
            isinstance(store_timeout_s, int | float) and store_timeout_s > 0
        ):
            raise StoreConfigError(
                f"store_timeout_s={store_timeout_s!r} is invalid: use seconds > 0"
            )
        self._timeout_s = float(store_timeout_s)
        self._url = normalize_store_url(url)  # validates now: no I/O, no loop needed
        self._shown_url = mask_url(self._url)
        self._instance = instance if instance is not None else default_instance()
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._busy_timeout_ms = busy_timeout_ms

        self._buffer: deque[Event] = deque()  # owned by the loop thread
        self._inbox: list[Event] = []  # other threads' emits, guarded by _inbox_lock
        self._inbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._accepted = 0  # events moved into _buffer (loop thread only)
        self._done = 0  # events committed or rejected (loop thread only)
        self._idle = False
        self._wake: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # (events accepted when asked, future): resolved in order as batches commit.
        self._durable: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._engine: AsyncEngine | None = None
        self._inserter = BatchInserter(
            self._url,
            self._shown_url,
            instance=self._instance or None,
            max_backoff_s=float(max_backoff_s),
            queued=lambda: self.pending,
        )
        self._start_task: asyncio.Future[None] | None = None
        self._closed = False
        self._close_done: asyncio.Event | None = None  # set by aclose(), done when closed

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
    def written(self) -> int:
        """Events committed."""
        return self._inserter.written

    @property
    def rejected(self) -> int:
        """Events the store refused for their content (each logged)."""
        return self._inserter.rejected

    @property
    def failed_attempts(self) -> int:
        """Batch attempts that failed and were retried."""
        return self._inserter.failed_attempts

    @property
    def in_outage(self) -> bool:
        """True while the store is failing and batches are being retried."""
        return self._inserter.outage_since is not None

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
            if self._failure is not None:
                return False  # wait_for_room() raises: the caller learns the store is gone
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

    def durable(self) -> asyncio.Future[None]:
        """A future that is done once every event emitted so far on the writer's loop is
        committed (group commit: one batch resolves the futures of every call it holds).

        ``emit`` stays non-blocking; a call that must not go on before its events are durable
        awaits this future, with its own time limit. It fails with :class:`StoreError` when
        the writer stopped (a damaged store, a closed writer), and is never cancelled by the
        writer: a caller that stops waiting leaves nothing behind but the future.
        """
        loop = self._loop
        if loop is None or asyncio.get_running_loop() is not loop:
            return asyncio.ensure_future(self._committed())  # before start, or another loop
        future = loop.create_future()
        if self._failure is not None:
            future.set_exception(self._stopped_error())
        elif self._done >= self._accepted:
            future.set_result(None)
        elif self._task is None or self._task.done():
            future.set_exception(self._stopped_error())
        else:
            self._durable.append((self._accepted, future))
        return future

    def _resolve_durable(self) -> None:
        durable, done = self._durable, self._done
        while durable and durable[0][0] <= done:
            future = durable.popleft()[1]
            if not future.done():
                future.set_result(None)

    def _stopped_error(self) -> StoreError:
        if isinstance(self._failure, StoreCorruptError):
            return self._failure
        if self._failure is not None:
            return StoreError(
                f"event writer for {self._shown_url!r} stopped after an internal error "
                f"({describe(self._failure)})"
            )
        return StoreClosedError(f"event writer for {self._shown_url!r} is closed")

    def _fail_durable(self) -> None:
        error = self._stopped_error()
        while self._durable:
            future = self._durable.popleft()[1]
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: the call that gave up on it may be gone

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_queue`` events wait to be committed."""
        if self._loop is None:
            return  # not started: nothing drains yet, and the buffer is unbounded until then
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self.wait_for_room)
        while self.pending >= self._max_queue:
            await self._progress()

    async def flush(self) -> None:
        """Return once every event emitted before this call is committed; at once when the
        store is damaged (reported once already: nothing more can ever be written).

        Bounded by ``store_timeout_s``: past it, one warning line says how many events are not
        stored yet and why, and ``flush()`` returns. Those events stay queued and are written
        when the store is back (``aclose()`` gives them one more ``store_timeout_s``).
        """
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._committed()
        except StoreCorruptError:
            pass
        except TimeoutError:
            _log.warning(
                f"event store flush gave up after store_timeout_s={self._timeout_s}s: "
                f"{self.pending} events not stored yet, kept queued; "
                f"{self._inserter.why_unstored()}",
                store=self._shown_url,
                unstored=self.pending,
            )

    async def _committed(self) -> None:
        if self._loop is None:
            if not self.emitted:
                return
            await self.start()
        if asyncio.get_running_loop() is not self._loop:
            return await self._on_own_loop(self._committed)
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
        if isinstance(self._failure, StoreCorruptError):
            raise self._failure
        if self._failure is not None:
            raise StoreError(
                f"event writer for {self._shown_url!r} stopped after an internal error "
                f"({describe(self._failure)}); {self.pending} events are not written"
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
        try:
            await self._inserter.open(engine)
        except BaseException:
            await engine.dispose()
            raise
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

        Idempotent; ``emit()`` raises from the moment it starts. The wait for the store is
        bounded by ``store_timeout_s`` (plus, on SQLite, the busy timeout of the statement in
        flight): past it, or if the caller cancels it, the events not yet written are reported
        in one error line (how many, and why) and the writer closes anyway, with no task,
        thread or connection left behind. With write-ahead calls those events belong to calls
        the application already saw fail with ``store_unavailable`` (never sent: nothing
        billed) and to ``completed`` events that had not been committed in time (each such
        call logged a warning when it returned).
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
                    # The drain task writes what is queued and returns. Cancelling us (or
                    # the timeout) cancels it too: that is how a close gives up during an
                    # outage, and the drain task reports what it leaves unwritten.
                    async with asyncio.timeout(self._timeout_s):
                        await self._task
                except TimeoutError:
                    pass
                except asyncio.CancelledError:
                    raise
                except StoreCorruptError:
                    pass  # reported once, when it was found; closing must not fail on it
                except Exception:
                    self._raise_if_failed()
                    raise
        finally:
            self._closed = True
            if self._task is not None and not self._task.done():  # start() raced a cancel
                self._task.cancel()
            self._fail_durable()
            await self._inserter.aclose()
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
                if buffer and (ahead is None or ahead.size < batch_size):
                    if ahead is None:
                        ahead = Batch()
                    self._serialise(ahead, min(_SLICE, batch_size - ahead.size))
                    if write is not None:
                        # Serialise while the database writes the previous batch (in its
                        # own thread on SQLite, its own process on PostgreSQL), one slice
                        # per loop turn so that the loop stays responsive. Waiting for the
                        # write to finish first would leave the database idle meanwhile.
                        await asyncio.sleep(0)
                        continue
                if write is None and ahead is not None:
                    # The events emitted up to now (e.g. by the calls the last commit woke)
                    # are in it: a write-ahead call waits for one commit, not two.
                    # A batch in flight stays counted in `pending` until it commits.
                    write = asyncio.ensure_future(self._write(ahead))
                    write.add_done_callback(self._wake_up)
                    ahead = None
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
            why = self._inserter.why_unstored()  # before the batch in flight is given up
            await _cancelled(write)
            self._fail_durable()
            if self.pending:
                _log.error(
                    f"event writer closed with {self.pending} events not stored: {why}",
                    store=self._shown_url,
                    unstored=self.pending,
                )
            raise
        except BaseException as exc:
            await _cancelled(write)
            self._failure = exc
            if isinstance(exc, StoreCorruptError):  # one clear line; no traceback to read
                _log.error(str(exc), store=self._shown_url, unstored=self.pending)
            else:
                _log.exception("event writer failed", store=self._shown_url, unstored=self.pending)
            self._notify()
            self._fail_durable()
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
        encoder = self._inserter.encoder
        text = encoder.encode_rows(encoder.rows(taken, batch))
        if text:
            batch.parts.append(text)

    async def _write(self, batch: Batch) -> None:
        await self._inserter.write(batch)
        self._done += batch.size
        self._resolve_durable()

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
        return await recent_sends(self._engine, since)


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
