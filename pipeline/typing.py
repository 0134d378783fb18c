"""The Protocols of the request path, in one place (structlog's ``typing.py`` pattern).

- :class:`EventSink` consumes lifecycle events (the store writer, the tracing sink).
- :class:`DurableSink` is a sink that says when what was emitted is committed (write-ahead).
- :class:`UsageHistory` lets a restarted process warm its gates from the store.
- :class:`Clock` is the time source of the gates, the semaphore and the retry waits.
- :class:`Provider` performs one HTTP attempt against an LLM API, plain or streamed
  (:class:`ProviderStream`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from ._events import Event
    from ._provider_types import ProviderResponse
    from ._types import GenerationRequest

__all__ = [
    "Clock",
    "DurableSink",
    "EventSink",
    "Provider",
    "ProviderStream",
    "TimerHandle",
    "UsageHistory",
]


@runtime_checkable
class EventSink(Protocol):
    """Receives every lifecycle event, in order per call.

    ``emit`` never blocks on I/O and never drops: it accepts the event and returns ``True``
    while the sink has room, ``False`` once its queue is at the high-water mark. The caller
    then awaits :meth:`wait_for_room` (backpressure). ``emit`` may be called from any thread.
    """

    def emit(self, event: Event) -> bool: ...

    async def wait_for_room(self) -> None: ...

    async def flush(self) -> None:
        """Return once everything emitted before the call is durable (or exported)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class DurableSink(EventSink, Protocol):
    """An :class:`EventSink` that commits events (the store writer), for write-ahead calls."""

    def durable(self) -> asyncio.Future[None]:
        """A new future, done once everything emitted so far (on the sink's loop) is
        committed; it fails when the sink can never commit it. It is the caller's own: the
        caller cancels it when it stops waiting, and that leaves the events queued. ``emit``
        stays non-blocking."""
        ...


@runtime_checkable
class UsageHistory(Protocol):
    """Optional capability of a store sink: the sends of the recent past, for warm gates."""

    async def recent_sends(self, since: datetime) -> list[tuple[datetime, int]]:
        """``(sent_at, tokens)`` for every HTTP attempt sent at or after ``since``."""
        ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in seconds, and timers on the same time line."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...

    async def sleep(self, delay: float) -> None: ...


class ProviderStream(Protocol):
    """One streamed answer whose HTTP headers arrived with a success status.

    Iterating it yields the answer's text deltas (non-empty strings) as they arrive. A failure
    while iterating raises :class:`ProviderError` (``stream_broken`` for a lost connection, a
    read timeout or an error event; ``invalid_response`` for a malformed event or content that
    does not validate). Nothing raised after the headers is retryable: part of the answer may
    already be with the caller. ``aclose`` releases the connection; it is idempotent.
    """

    status: int
    provider_request_id: str | None
    rate_limits: dict[str, str]
    complete: bool  # the stream ended normally (its last delta was received)

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...

    def snapshot(self, estimated_input_tokens: int) -> tuple[ProviderResponse, bool]:
        """The answer as far as it came, and whether its usage is an estimate.

        The usage is the provider's when the stream carried it; otherwise input tokens are
        ``estimated_input_tokens`` and output tokens ``ceil(characters received / 4)``, the
        same rule as the service's input estimate. ``content`` is the validated content after
        a normal end, else the text received so far.
        """
        ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    """One LLM API. The service calls :meth:`invoke` (or :meth:`open_stream` for a streamed
    call) once per HTTP attempt.

    Neither may retry by itself (the service's tenacity loop is the only retry layer); both
    raise :class:`ProviderError` for every provider or network failure and let
    ``asyncio.CancelledError`` through. ``api`` names the wire API ("responses" or "chat").
    """

    name: str
    api: str
    server_address: str | None
    server_port: int | None

    async def invoke(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ProviderResponse:
        """One HTTP attempt. ``client_request_id`` (``call_id:attempt``) is sent as
        ``X-Client-Request-Id`` so the provider's logs can be joined with the event store."""
        ...

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ProviderStream:
        """One streamed HTTP attempt: returns once the answer's headers arrived (an error
        status raises :class:`ProviderError` like :meth:`invoke`, and may be retried)."""
        ...

    async def aclose(self) -> None: ...
