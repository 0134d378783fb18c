"""One call's identity, its event stream, and what it holds at any instant.

Invariants:
- ``seq`` grows by one per emitted event, with no gap; the stream's ids never change.
- Every payload is made storable before it becomes an event (``_storable``: lone surrogates
  become U+FFFD), so no string a caller or a provider hands us can poison a store.
- A sink that fails is reported and skipped; it never breaks the call.
- A sink at its high-water mark is put in the shared backlog, where the next call waits for it.
- Write-ahead: with a ``store`` (a :class:`~pipeline.typing.DurableSink`), :meth:`durable`
  waits, at most ``store_timeout_s``, until the store has committed every event of the call
  emitted so far; without one (``durability="async"``, no store) it returns at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import traceback
from collections.abc import Sequence
from contextvars import Token
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, cast, overload

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context

from llmtrail._log import get_logger

from ._errors import ErrorType
from ._events import (
    AttemptFailedPayload,
    CompletedPayload,
    Event,
    EventType,
    FirstTokenPayload,
    GateWaitPayload,
    Payload,
    ReceivedPayload,
    RetryScheduledPayload,
    SemaphoreAcquiredPayload,
    SentPayload,
    TraceCreatedPayload,
    UnmarkedPayload,
    child_span_id,
    new_event_id,
)
from ._gates import GateReservation
from ._provider_types import ProviderError
from ._storable import storable, storable_text
from ._types import GenerationRequest
from .typing import DurableSink, EventSink

__all__ = [
    "plain_traceback",
    "SAMPLED",
    "CallState",
    "CallStream",
    "estimate_input_tokens",
    "money",
    "to_int",
    "wait_for_room",
]

_log = get_logger(__name__)
_STOPPED = "the event store stopped"


def plain_traceback() -> str:
    """The current exception's traceback as text, without local variables (no prompt text)."""
    return traceback.format_exc(limit=20)


SAMPLED = otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED)


def estimate_input_tokens(request: GenerationRequest) -> int:
    """Input tokens before the call: ceil(characters / 4) per message, plus 4 per message.

    About four characters per token is the usual figure for English with OpenAI's
    tokenizers; the per-message overhead covers role markers. The estimate only sizes the TPM
    reservation: it is reconciled with the provider's real count after the call.
    """
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in request.messages())


class CallStream:
    """One call's identity and its event stream."""

    __slots__ = (
        "call_id",
        "trace_id",
        "span_id",
        "seq",
        "sinks",
        "instance",
        "backlog",
        "trace_flags",
        "store",
        "store_timeout_s",
        "sent_at",
    )

    def __init__(
        self,
        sinks: Sequence[EventSink],
        instance: str,
        parent: otel_trace.SpanContext,
        backlog: set[EventSink],
        store: DurableSink | None = None,
        store_timeout_s: float = 10.0,
    ) -> None:
        self.call_id = new_event_id()  # time-ordered, like event ids: cheap to index
        parent_trace = parent.trace_id if parent.is_valid else None
        self.trace_id = f"{parent_trace or random.getrandbits(128) or 1:032x}"
        self.span_id = f"{random.getrandbits(64) or 1:016x}"
        self.seq = 0
        self.sinks = sinks
        self.instance = storable_text(instance)
        self.backlog = backlog
        # A caller's unsampled trace stays unsampled, so no orphan HTTP span is exported (the
        # tracing sink's sampler, when there is one, decides instead: BaseLLMService).
        self.trace_flags = parent.trace_flags if parent.is_valid else SAMPLED
        self.store = store
        self.store_timeout_s = store_timeout_s
        self.sent_at: datetime | None = None  # the last `sent` event's occurred_at

    # One overload per event type: an emitter that misses or misspells a field fails mypy.
    @overload
    def emit(
        self, type_: Literal[EventType.TRACE_CREATED], payload: TraceCreatedPayload
    ) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.GATE_WAIT], payload: GateWaitPayload) -> None: ...
    @overload
    def emit(
        self, type_: Literal[EventType.SEMAPHORE_ACQUIRED], payload: SemaphoreAcquiredPayload
    ) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.SENT], payload: SentPayload) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.FIRST_TOKEN], payload: FirstTokenPayload) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.RECEIVED], payload: ReceivedPayload) -> None: ...
    @overload
    def emit(
        self, type_: Literal[EventType.ATTEMPT_FAILED], payload: AttemptFailedPayload
    ) -> None: ...
    @overload
    def emit(
        self, type_: Literal[EventType.RETRY_SCHEDULED], payload: RetryScheduledPayload
    ) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.UNMARKED], payload: UnmarkedPayload) -> None: ...
    @overload
    def emit(self, type_: Literal[EventType.COMPLETED], payload: CompletedPayload) -> None: ...
    def emit(self, type_: EventType, payload: Payload) -> None:
        at = datetime.now(UTC)
        if type_ is EventType.SENT:
            self.sent_at = at
        self._emit_at(type_, payload, at)

    def _emit_at(self, type_: EventType, payload: Payload, at: datetime) -> None:
        event = Event(
            self.call_id,
            self.seq,
            type_,
            at,
            self.trace_id,
            self.span_id,
            storable(cast(dict[str, Any], payload)),
            self.instance,
        )
        self.seq += 1
        for sink in self.sinks:
            try:
                if sink.emit(event) is False:
                    self.backlog.add(sink)  # at its high-water mark: the next call waits
            except Exception:  # a broken sink must not break the call; it is reported
                _log.error(
                    "event sink failed",
                    sink=type(sink).__name__,
                    event_type=str(type_),
                    traceback=plain_traceback(),
                )

    def enter_attempt_span(self, attempt: int) -> Token[Context]:
        """Make attempt ``attempt``'s span (its id derived as the span builder derives it)
        current, so the HTTP client's span nests under it; returns the token to detach."""
        span_context = otel_trace.SpanContext(
            int(self.trace_id, 16),
            int(child_span_id(self.span_id, f"attempt/{attempt}"), 16),
            is_remote=False,
            trace_flags=self.trace_flags,
        )
        return otel_context.attach(
            otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(span_context))
        )

    async def durable(self) -> str | None:
        """Wait until the store has committed every event emitted so far; None once it has,
        else why it has not (it did not within ``store_timeout_s``, or it stopped).

        Giving up cancels only this call's own future (the events stay queued: they are
        written when the store is back). A cancellation of the caller goes through.
        """
        if self.store is None:
            return None
        future = self.store.durable()
        if not future.done():
            try:
                # asyncio.timeout, not asyncio.wait: about 6 us per wait instead of 16 (measured),
                # and every write-ahead call waits twice.
                async with asyncio.timeout(self.store_timeout_s):
                    await future
            except TimeoutError:
                if not future.done() or future.cancelled():  # else it committed just in time
                    return (
                        f"the event store did not commit within store_timeout_s="
                        f"{self.store_timeout_s}s (is it down or locked?)"
                    )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the caller's: it goes through
                    raise
                # else the future was cancelled by its store: reported below as stopped
            except Exception:  # the store's own error, read from the future below
                pass
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            return f"{_STOPPED}: {error or 'closed'}"
        return None

    async def settle(self) -> None:
        """:meth:`durable` for the last event: the ``completed`` is committed before the
        result goes back. If the store cannot commit it in time the result goes back anyway
        (the provider has answered and billed it) and the event stays queued; logged, except
        for a store that stopped for good, which reported that itself."""
        problem = await self.durable()
        if problem is not None and not problem.startswith(_STOPPED):
            _log.warning("result returned before its completed event was committed", reason=problem)

    async def sent_durable(self, attempt: int) -> None:
        """Write-ahead: return once the attempt's ``sent`` is committed. Otherwise the request
        never leaves: an ``attempt_failed`` (``store_unavailable``, or ``cancelled`` when the
        caller gave up meanwhile) says so, and :class:`ProviderError` fails the call."""
        try:
            problem = await self.durable()
        except asyncio.CancelledError:
            self._not_sent(attempt, ErrorType.CANCELLED, "cancelled before it was sent")
            raise
        if problem is not None:
            message = f"not sent: {problem}"
            self._not_sent(attempt, ErrorType.STORE_UNAVAILABLE, message)
            raise ProviderError(
                ErrorType.STORE_UNAVAILABLE, message, retryable=False, reached_provider=False
            )

    def _not_sent(self, attempt: int, error_type: ErrorType, message: str) -> None:
        # At its `sent`'s instant, with latency 0: the attempt failed before it left, and
        # a projection that takes the `sent` back does so in the minute it counted it.
        payload: AttemptFailedPayload = {
            "attempt": attempt,
            "not_sent": True,
            "latency_s": 0.0,
            "error_type": str(error_type),
            "status": None,
            "retryable": False,
            "retry_after_s": None,
            "message": message,
            "provider_code": None,
            "provider_request_id": None,
            "rate_limits": {},
            "body_sent_s": None,  # never sent
            "first_byte_s": None,
        }
        self._emit_at(EventType.ATTEMPT_FAILED, payload, self.sent_at or datetime.now(UTC))


async def wait_for_room(backlog: set[EventSink], timeout_s: float) -> str | None:
    """Backpressure, before a call holds any slot or permit: None once every sink in the
    shared ``backlog`` has room, else why the call is refused (a sink stayed full for
    ``timeout_s``, or it stopped for good)."""
    try:
        async with asyncio.timeout(timeout_s):
            while backlog:
                # Every caller waits on the full sink (it stays in the backlog until it has
                # room again); popping it would let the next caller through while the queue
                # is full.
                for sink in list(backlog):
                    await sink.wait_for_room()
                    backlog.discard(sink)
    except TimeoutError:
        return (
            f"not sent: the event queue stayed full for store_timeout_s={timeout_s}s "
            "(is the event store down or locked?)"
        )
    except Exception as exc:  # the store stopped for good (e.g. a damaged file)
        return f"not sent: the event store cannot take events: {exc}"
    return None


class CallState:
    """What a call holds at any instant, so cleanup knows what to give back."""

    __slots__ = (
        "rpm_res",
        "tpm_res",
        "rpm_wait",
        "tpm_wait",
        "sem_wait",
        "attempts",
        "reached",
        "latency",
        "rpm_now",
        "tpm_now",
        "stream",
        "holding",
        "sent_at",
        "body_sent_s",
        "first_byte_s",
    )

    def __init__(self) -> None:
        self.rpm_res: GateReservation | None = None
        self.tpm_res: GateReservation | None = None
        self.rpm_wait = 0.0
        self.tpm_wait = 0.0
        self.sem_wait = 0.0
        self.attempts = 0
        self.reached = False
        self.latency = 0.0
        self.rpm_now = 0
        self.tpm_now = 0
        self.stream = False  # a streamed call (pipeline/_stream.py)
        self.holding = False  # an opened stream holds its semaphore permit until it ends
        self.sent_at = 0.0  # when the open stream's attempt was sent
        # The last answered attempt's time from `sent` to its body written (send-time hook).
        self.body_sent_s: float | None = None
        self.first_byte_s: float | None = None  # ... and to its answer's headers read


def money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def to_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
