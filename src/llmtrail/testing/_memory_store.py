"""An in-memory event store: a sink that keeps every event with a position, and reads them back
with the event store's own read methods.

For tests that want stored events without a database: pass it in ``sinks=[...]`` (with
``store_url=None``) and read with :meth:`read`, :meth:`events_for_call` and
:meth:`events_for_trace`, which answer as :class:`~llmtrail.storage.EventStore` does.

Invariants:
- Positions start at 1 and grow by one per event, in emit order (a database's may have gaps).
- Everything emitted is "committed" at once: :meth:`durable` is always done, :meth:`flush`
  returns at once, nothing is ever dropped, and there is no backpressure.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from llmtrail.pipeline._events import Event
from llmtrail.storage._reader import StoredEvent

__all__ = ["InMemoryEventStore"]


class InMemoryEventStore:
    """Every event in emit order, with positions; read back like the SQL store."""

    def __init__(self) -> None:
        self._stored: list[StoredEvent] = []

    # -- the sink side --------------------------------------------------------------------

    def emit(self, event: Event) -> bool:
        position = len(self._stored) + 1
        self._stored.append(StoredEvent(position, event, datetime.now(UTC)))
        return True

    def durable(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- the reader side ------------------------------------------------------------------

    async def read(self, after_position: int = 0, limit: int = 1_000) -> list[StoredEvent]:
        """Up to ``limit`` events with ``position > after_position``, in position order."""
        start = max(after_position, 0)
        return self._stored[start : start + max(limit, 0)]

    async def events_for_call(self, call_id: str) -> list[StoredEvent]:
        """Every event of one call, in order."""
        return [s for s in self._stored if s.event.call_id == call_id]

    async def events_for_trace(self, trace_id: str) -> list[StoredEvent]:
        """Every event carrying this OTel trace id."""
        return [s for s in self._stored if s.event.trace_id == trace_id]
