"""A recording event sink: every event a service emits, in emit order, kept in memory.

A real :class:`~llmtrail.pipeline.EventSink` (not a mock): tests and applications pass it in
``sinks=[...]`` and assert on the stream. It never applies backpressure and never fails.
"""

from __future__ import annotations

from llmtrail.pipeline._events import Event

__all__ = ["RecordingSink"]


class RecordingSink:
    """An in-memory EventSink: every event, in emit order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> bool:
        self.events.append(event)
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def by_call(self) -> dict[str, list[Event]]:
        """Each call's events, keyed by call id, in emit order."""
        calls: dict[str, list[Event]] = {}
        for event in self.events:
            calls.setdefault(event.call_id, []).append(event)
        return calls

    def types(self, call_id: str) -> list[str]:
        """The event types of one call, in emit order."""
        return [str(e.type) for e in self.events if e.call_id == call_id]
