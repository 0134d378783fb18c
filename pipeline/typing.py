"""The Protocols of the request path, in one place (structlog's ``typing.py`` pattern).

- :class:`EventSink` consumes lifecycle events (the store writer, the tracing sink).
- :class:`UsageHistory` lets a restarted process warm its gates from the store.
- :class:`Clock` is the time source of the gates, the semaphore and the retry waits.
- :class:`Provider` performs one HTTP attempt against an LLM API.
- :class:`GateBackend` is a rate gate (in-process by default, Redis for many processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._errors import ErrorType
    from ._events import Event
    from ._types import GenerationRequest

__all__ = [
    "Clock",
    "EventSink",
    "GateBackend",
    "Provider",
    "ProviderError",
    "ProviderResponse",
    "Reservation",
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


@dataclass(slots=True)
class ProviderResponse:
    """What one successful HTTP attempt returned, in provider-neutral terms."""

    content: Any
    raw_content: str
    response_id: str | None
    response_model: str | None
    finish_reasons: list[str]
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    status: int = 200
    provider_request_id: str | None = None
    rate_limits: dict[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    """One failed HTTP attempt, classified.

    ``reached_provider`` is False only when the request certainly never arrived (the
    connection was refused), so its rate-gate slot can be given back.
    """

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
        provider_code: str | None = None,
        provider_request_id: str | None = None,
        rate_limits: Mapping[str, str] | None = None,
        reached_provider: bool = True,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.provider_code = provider_code
        self.provider_request_id = provider_request_id
        self.rate_limits = dict(rate_limits or {})
        self.reached_provider = reached_provider


class Provider(Protocol):
    """One LLM API. The service calls :meth:`invoke` once per HTTP attempt.

    ``invoke`` must not retry by itself (the service's tenacity loop is the only retry
    layer), must raise :class:`ProviderError` for every provider or network failure, and
    must let ``asyncio.CancelledError`` through.
    """

    name: str
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

    async def aclose(self) -> None: ...


class Reservation(Protocol):
    amount: int
    waited_s: float
    waiters_ahead: int
    not_before: float

    @property
    def pending(self) -> bool: ...

    @property
    def done(self) -> bool: ...


class GateBackend(Protocol):
    """A rate gate: ``capacity`` units per sliding ``window_s``.

    ``acquire`` is one atomic check-and-reserve, FIFO among waiters, cancellation-safe: a
    cancelled waiter leaves nothing behind. A reservation is *pending* (it never expires)
    until :meth:`mark_sent`; a sent one ends one window after the earliest bound on its arrival
    (:meth:`mark_arrived`: body written + ``arrival_guard_s``; :meth:`mark_done`: the answer).
    :meth:`release` gives it back when the provider never counted it, :meth:`reconcile`
    corrects its amount.
    """

    capacity: int
    window_s: float
    lead_s: float

    async def acquire(self, amount: int) -> Reservation: ...

    def mark_sent(self, reservation: Reservation) -> None: ...

    def mark_arrived(self, reservation: Reservation, by: float) -> None: ...

    def mark_done(self, reservation: Reservation, *, unanswered_guard_s: float = 0.0) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def reconcile(self, reservation: Reservation, actual: int) -> None: ...

    def observe_provider(
        self,
        remaining: int | None,
        reset_s: float | None,
        *,
        as_of: float | None = None,
        limit: int | None = None,
    ) -> None: ...

    def preload(self, sent_ages: Iterable[tuple[float, int]], *, guard_s: float = 1.0) -> int: ...

    def used(self) -> int: ...

    def waiting(self) -> int: ...

    def reserved(self) -> int: ...
