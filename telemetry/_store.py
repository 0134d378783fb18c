"""The events ``traces export`` rebuilds from, read from the event store.

Invariants:
- Read-only: the store is opened with :meth:`storage.EventStore.open`, which refuses to
  create or migrate anything.
- A time range selects *calls* by when they started (their ``trace_created``), and then every
  event of those calls is returned, including events after ``until``: a call that started in
  the range is exported whole, never cut at the boundary.
"""

from __future__ import annotations

from datetime import datetime

from llmtrail.pipeline import Event, EventType

__all__ = ["read_events"]

_PAGE = 5_000


async def read_events(
    store_url: str | None,
    *,
    call_id: str | None = None,
    trace_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Event]:
    """Every event of the calls selected by one call id, one trace id, or a start-time range
    (``since`` inclusive, ``until`` exclusive; neither means every call in the store)."""
    from llmtrail.storage import EventStore, store_url_from_environment

    async with await EventStore.open(store_url_from_environment(store_url)) as store:
        if call_id is not None:
            return [s.event for s in await store.events_for_call(call_id)]
        if trace_id is not None:
            return [s.event for s in await store.events_for_trace(trace_id.lower())]
        if since is None and until is None:
            return [s.event async for s in store.scan(page_size=_PAGE)]
        started = {
            s.call_id
            async for s in store.scan(
                page_size=_PAGE, type=str(EventType.TRACE_CREATED), since=since, until=until
            )
        }
        if not started:
            return []
        # Events never precede their call's trace_created, so scanning from `since` is enough.
        return [
            s.event async for s in store.scan(page_size=_PAGE, since=since) if s.call_id in started
        ]
