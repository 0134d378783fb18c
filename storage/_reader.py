"""Reading the event store back: pages, streams of one call or trace, filters, following.

Invariants:
- Every result is in ``position`` order, which is commit order: the writer serialises its
  batches (BEGIN IMMEDIATE on SQLite, a transaction-level advisory lock on PostgreSQL), so a
  reader paging with ``position > cursor`` never skips an event that commits later. Anything
  else that appends to ``events`` must take the same lock (see ``storage._writer``).
- Positions are monotonic, not contiguous (a failed batch on PostgreSQL burns sequence values).
- Reading never changes the store: :meth:`EventStore.open` refuses a missing file or a store
  without schema instead of creating or migrating one.
- Timestamps come back timezone-aware, in UTC, on every backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from sqlalchemy import ColumnElement, Select, and_, case, func, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail.pipeline import Event, EventType

from ._base import StoreClosedError, mask_url
from ._engine import create_engine
from ._schema import events, stored_payload

__all__ = ["EventStore", "IncompleteCall", "StoredEvent", "recent_sends"]

# Call ids per query when reading the streams of incomplete calls (bound parameters).
_IDS_PER_QUERY = 500


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: its global ``position`` and when the store recorded it."""

    position: int
    event: Event
    recorded_at: datetime | None = None

    @property
    def call_id(self) -> str:
        return self.event.call_id

    @property
    def type(self) -> EventType:
        return self.event.type

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the event's fields plus ``position`` and ``recorded_at``."""
        return {
            "position": self.position,
            **self.event.to_dict(),
            "recorded_at": self.recorded_at.isoformat() if self.recorded_at else None,
        }


@dataclass(frozen=True, slots=True)
class IncompleteCall:
    """A call that started and has no ``completed``: in flight, or its process died.

    ``attempt`` is the highest attempt its events name (0 before the first), ``sent`` whether
    any ``sent`` is stored (a request may then have reached the provider and been billed).
    """

    call_id: str
    trace_id: str
    operation_name: str | None
    model: str | None
    started_at: datetime
    last_event: EventType
    last_at: datetime
    attempt: int
    sent: bool
    position: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, timestamps in ISO 8601."""
        return {
            "call_id": self.call_id,
            "trace_id": self.trace_id,
            "operation_name": self.operation_name,
            "model": self.model,
            "started_at": self.started_at.isoformat(),
            "last_event": str(self.last_event),
            "last_at": self.last_at.isoformat(),
            "attempt": self.attempt,
            "sent": self.sent,
            "position": self.position,
        }


def _incomplete(created: StoredEvent, stream: list[StoredEvent]) -> IncompleteCall:
    last = stream[-1] if stream else created
    attempts = [e.event.payload.get("attempt") for e in stream]
    return IncompleteCall(
        call_id=created.call_id,
        trace_id=created.event.trace_id,
        operation_name=created.event.payload.get("operation_name"),
        model=created.event.payload.get("model"),
        started_at=created.event.occurred_at,
        last_event=last.type,
        last_at=last.event.occurred_at,
        attempt=max((a for a in attempts if isinstance(a, int)), default=0),
        sent=any(e.type is EventType.SENT for e in stream),
        position=created.position,
    )


async def recent_sends(engine: AsyncEngine, since: datetime) -> list[tuple[datetime, int]]:
    """``(sent_at, tokens)`` per ``sent`` event at or after ``since``, oldest first.

    ``tokens`` is the call's ``reserved_tokens`` (from its ``trace_created``) for attempt 1
    and 0 for retries, which is what the TPM gate reserved for each attempt.
    """
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
        # `type || ''` keeps SQLite off the index on type (every sent event ever) and on the
        # index on occurred_at (the last window only).
        .where(sent.c.type.concat("") == str(EventType.SENT), sent.c.occurred_at >= since)
        .order_by(sent.c.occurred_at)
    )
    async with engine.connect() as connection:
        result = await connection.execute(query)
        return [(row[0], int(row[1] or 0)) for row in result]


def _stored(row: Row[Any]) -> StoredEvent:
    return StoredEvent(
        position=row.position,
        event=Event(
            call_id=row.call_id,
            seq=row.seq,
            type=EventType(row.type),
            occurred_at=row.occurred_at,
            trace_id=row.trace_id or "",
            span_id=row.span_id or "",
            payload=stored_payload(row.payload),
            instance=row.instance or "",
            event_id=row.event_id,
        ),
        recorded_at=row.recorded_at,
    )


def _types(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [str(EventType(value))]
    return [str(EventType(item)) for item in value]


class EventStore:
    """Reads events from a store. Build it with :meth:`open` or from an engine you own."""

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, busy_timeout_ms: int = 5_000) -> EventStore:
        """Open an existing store for reading; raise ``StoreConfigError`` if it does not exist
        and ``StoreSchemaError`` if it has no (known) schema."""
        # Alembic (behind _migrate) loads when a store is opened, not when the CLI's parser
        # imports this module.
        from ._migrate import check_schema

        engine = create_engine(
            url,
            must_exist=True,
            busy_timeout_ms=busy_timeout_ms,
            application_name="llmtrail reader",
            hide_parameters=True,
        )
        try:
            await check_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, owns_engine=True)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def aclose(self) -> None:
        """Dispose the engine if this store created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _fetch(self, query: Select[Any]) -> list[StoredEvent]:
        if self._closed:
            raise StoreClosedError(f"event store {mask_url(self._engine.url)!r} is closed")
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [_stored(row) for row in result]

    async def read(self, after_position: int = 0, limit: int = 1_000) -> list[StoredEvent]:
        """Up to ``limit`` events with ``position > after_position``, in position order."""
        return await self.query(after_position=after_position, limit=limit)

    async def events_for_call(self, call_id: str) -> list[StoredEvent]:
        """Every event of one call, in order."""
        return await self.query(call_id=call_id)

    async def events_for_trace(self, trace_id: str) -> list[StoredEvent]:
        """Every event carrying this OTel trace id (one call, or several sharing a trace)."""
        return await self.query(trace_id=trace_id)

    async def query(
        self,
        *,
        type: str | Iterable[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        call_id: str | None = None,
        trace_id: str | None = None,
        after_position: int = 0,
        before_position: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredEvent]:
        """Events matching every given filter, in position order (``newest_first``: reversed).

        ``type`` is one type or several; ``since`` is inclusive and ``until`` exclusive
        (``occurred_at``); ``after_position`` and ``before_position`` page (both exclusive);
        ``limit`` caps the result.
        """
        query = select(events)
        if after_position:  # left out at 0, or SQLite would scan by position, not by index
            query = query.where(events.c.position > after_position)
        if before_position is not None:
            query = query.where(events.c.position < before_position)
        types = _types(type)
        if types is not None:
            query = query.where(events.c.type.in_(types))
        order_by: ColumnElement[Any] = events.c.position
        if since is not None:
            query = query.where(events.c.occurred_at >= since)
            if call_id is None and trace_id is None:
                # Without statistics SQLite would rather scan the whole log in position order
                # than use the index on occurred_at and sort; `position + 0` (same order)
                # takes the free ordering away, so a recent window is read through the index.
                order_by = events.c.position + 0
        if until is not None:
            query = query.where(events.c.occurred_at < until)
        if call_id is not None:
            query = query.where(events.c.call_id == call_id)
        if trace_id is not None:
            query = query.where(events.c.trace_id == trace_id)
        query = query.order_by(order_by.desc() if newest_first else order_by)
        if limit is not None:
            query = query.limit(limit)
        return await self._fetch(query)

    async def scan(
        self,
        *,
        after_position: int = 0,
        page_size: int = 1_000,
        newest_first: bool = False,
        **filters: Any,
    ) -> AsyncIterator[StoredEvent]:
        """Every matching event, fetched ``page_size`` at a time (for large results);
        ``newest_first`` walks the log backwards from its end."""
        cursor = after_position
        before: int | None = None
        while True:
            page = await self.query(
                after_position=cursor,
                before_position=before,
                limit=page_size,
                newest_first=newest_first,
                **filters,
            )
            for stored in page:
                yield stored
            if len(page) < page_size:
                return
            if newest_first:
                before = page[-1].position
            else:
                cursor = page[-1].position

    async def follow(
        self,
        after_position: int = 0,
        *,
        poll_s: float = 0.5,
        page_size: int = 1_000,
        **filters: Any,
    ) -> AsyncIterator[StoredEvent]:
        """Matching events after ``after_position``, then new ones as they commit; endless.

        Polls every ``poll_s`` seconds once it has caught up.
        """
        cursor = after_position
        while True:
            page = await self.query(after_position=cursor, limit=page_size, **filters)
            for stored in page:
                cursor = stored.position
                yield stored
            if len(page) < page_size:
                await asyncio.sleep(poll_s)

    async def last_position(self) -> int:
        """The highest position stored (0 for an empty store)."""
        if self._closed:
            raise StoreClosedError(f"event store {mask_url(self._engine.url)!r} is closed")
        async with self._engine.connect() as connection:
            value = await connection.scalar(select(func.max(events.c.position)))
            return int(value or 0)

    async def incomplete_calls(self) -> list[StoredEvent]:
        """The ``trace_created`` event of every call that has no ``completed`` event.

        These are calls in flight, or calls whose process died before finishing them.
        """
        done = events.alias("done")
        # NOT IN, not a correlated NOT EXISTS: SQLite would answer each row's EXISTS through
        # the index on type (all completed events), which is quadratic; this runs once.
        completed = select(done.c.call_id).where(done.c.type == str(EventType.COMPLETED))
        return await self._fetch(
            select(events)
            .where(
                events.c.type == str(EventType.TRACE_CREATED),
                events.c.call_id.not_in(completed),
            )
            .order_by(events.c.position)
        )

    async def incomplete_summaries(self) -> list[IncompleteCall]:
        """Every call that has no ``completed``, with its last event, attempt and whether it
        was sent, in the order the calls started (``llmtrail events --incomplete``)."""
        created = await self.incomplete_calls()
        streams: dict[str, list[StoredEvent]] = {c.call_id: [] for c in created}
        ids = list(streams)
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            query = select(events).where(events.c.call_id.in_(chunk))
            for stored in await self._fetch(query.order_by(events.c.call_id, events.c.seq)):
                streams[stored.call_id].append(stored)
        return [_incomplete(c, streams[c.call_id]) for c in created]
