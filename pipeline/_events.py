"""Lifecycle events: the seam between the request path and everything that consumes it.

Invariants:
- One stream per call, keyed by ``call_id``. ``seq`` is 0, 1, 2 ... with no gap, in emit order.
- ``trace_created`` is the first event of a stream and ``completed`` always the last; nothing
  follows ``completed``.
- ``event_id`` is unique; a consumer may use it to make writes idempotent.
- ``occurred_at`` is UTC wall time with microsecond precision. Durations inside payloads come
  from the monotonic clock, so they never go negative when the wall clock steps.
- ``trace_id`` (32 hex digits) and ``span_id`` (16 hex digits) are the OTel ids of the call's
  CLIENT span. Child span ids are derived from them by :func:`child_span_id`, so a trace rebuilt
  from the store has exactly the ids of the live one.
- Payloads are JSON-serialisable dicts. They never hold an API key, and they hold prompt or
  response text only when the user opted in with ``capture_content``.

Payloads are typed: one ``TypedDict`` per event type below (:data:`PAYLOAD_TYPES`), used by the
request path when it emits (``CallStream.emit`` is overloaded per type, so a missing or unknown
field fails mypy at the emitter), and by consumers through :func:`payload_of`. Stored JSON is the
plain dict, byte for byte what it was before the types existed. Durations are seconds, token
counts integers, money a decimal string (``None`` when the model has no price).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, TypedDict, cast, overload

__all__ = [
    "PAYLOAD_TYPES",
    "AttemptFailedPayload",
    "CompletedPayload",
    "Event",
    "EventType",
    "FirstTokenPayload",
    "GateWaitPayload",
    "Outcome",
    "Payload",
    "ReceivedPayload",
    "RetryScheduledPayload",
    "SemaphoreAcquiredPayload",
    "SentPayload",
    "TraceCreatedPayload",
    "UnmarkedPayload",
    "child_span_id",
    "default_instance",
    "new_event_id",
    "payload_of",
]


class EventType(StrEnum):
    TRACE_CREATED = "trace_created"
    GATE_WAIT = "gate_wait"
    SEMAPHORE_ACQUIRED = "semaphore_acquired"
    SENT = "sent"
    FIRST_TOKEN = "first_token"
    RECEIVED = "received"
    ATTEMPT_FAILED = "attempt_failed"
    RETRY_SCHEDULED = "retry_scheduled"
    UNMARKED = "unmarked"
    COMPLETED = "completed"


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Never emitted: projections give this outcome to a call whose stream has no `completed`
    # because its process died.
    INTERRUPTED = "interrupted"


class _TraceCreatedFields(TypedDict):
    operation_name: str
    model: str
    request_id: str | None
    metadata: dict[str, str]
    estimated_input_tokens: int
    max_output_tokens: int | None
    reserved_tokens: int  # what the TPM gate is asked for
    rpm_at_start: int
    tpm_at_start: int
    parent_span_id: str | None  # the caller's span
    temperature: float | None
    reasoning_effort: str | None
    server_address: str | None
    server_port: int | None
    capture_content: bool
    output_type: str | None  # "json" for a structured-output request
    previous_response_id: str | None
    resource: dict[str, str] | None  # the spans' service name, version, instance; None untraced
    stream: bool  # a streamed call (pipeline/_stream.py)
    api: str  # "responses" | "chat": the provider's API


# Optional fields go in a total=False subclass: NotRequired[] inside postponed (string)
# annotations is not seen by TypedDict at run time, and the tests check shapes at run time.
class TraceCreatedPayload(_TraceCreatedFields, total=False):
    # The service's max_rpm, max_tpm, window_s, max_concurrent_requests, max_attempts,
    # default_max_output_tokens, send_guard_s, unanswered_guard_s: what a replay needs to
    # reproduce the run. Absent on a call that failed validation.
    limits: dict[str, Any]
    input: list[dict[str, str]]  # the messages, only with capture_content
    instructions: str | None  # the system prompt, only with capture_content


class GateWaitPayload(TypedDict):
    """``occurred_at`` is when the wait ended; it began ``waited_s`` earlier."""

    gate: Literal["rpm", "tpm"]
    attempt: int  # the HTTP attempt the slot is for; tpm is always 1
    amount: int
    waited_s: float
    waiters_ahead: int


class SemaphoreAcquiredPayload(TypedDict):
    """One per attempt: the permit is released between attempts."""

    attempt: int
    waited_s: float
    in_flight: int  # after acquiring
    waiters_ahead: int


class SentPayload(TypedDict):
    """``occurred_at`` is when the attempt was handed to the SDK. With write-ahead it is
    committed before the request leaves; if it cannot be (``store_unavailable``) or the call
    is cancelled meanwhile, the next event is an ``attempt_failed`` with that error type,
    ``not_sent`` true, ``latency_s`` 0 and this event's ``occurred_at``: the request never
    left."""

    attempt: int


class FirstTokenPayload(TypedDict):
    """Streamed calls only, between ``sent`` and ``received``."""

    attempt: int
    ttft_s: float  # from the attempt's ``sent`` to its first text delta (the provider's time)
    call_ttft_s: float  # from the call's start, gates and semaphore included


class _ReceivedFields(TypedDict):
    attempt: int
    latency_s: float
    status: int | None
    response_id: str | None
    response_model: str | None
    finish_reasons: list[str]
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: str | None
    provider_request_id: str | None
    rate_limits: dict[str, str]  # the x-ratelimit-* headers
    service_tier: str | None
    processing_s: float | None  # the provider's own time (``openai-processing-ms``), if sent
    # Seconds from ``sent`` until the transport wrote the request body (None without the
    # send-time hook): the start of the slot's window is body written + arrival_guard_s.
    body_sent_s: float | None
    # Seconds from ``sent`` until the answer's headers were read (its first bytes; None without
    # the hook): the provider's time on the attempt is first_byte_s - body_sent_s.
    first_byte_s: float | None


class StreamedFields(TypedDict):
    """What a streamed call's ``received`` adds."""

    streamed: bool
    partial: bool  # the stream ended before the answer was complete (abandoned, cancelled, broken)
    usage_estimated: bool  # no usage from the provider: the documented estimate of _stream.py
    chunks: int  # text deltas received


class ReceivedPayload(_ReceivedFields, total=False):
    """A streamed call's ``received`` comes when its stream ends (``latency_s`` is then the
    whole stream); it is the one event that carries billed tokens, streamed or not."""

    content: str | None  # only with capture_content
    streamed: bool  # the four below only on streamed calls
    partial: bool  # the stream ended before the answer was complete (abandoned, cancelled, broken)
    usage_estimated: bool  # no usage from the provider: the documented estimate of _stream.py
    chunks: int  # text deltas received


class AttemptFailedPayload(TypedDict):
    """``not_sent``: the attempt never left (write-ahead: its ``sent`` was not committed in
    time, or the call was cancelled meanwhile); the event then carries its ``sent``'s
    ``occurred_at`` and ``latency_s`` 0, and no projection counts that ``sent`` as a request."""

    attempt: int
    not_sent: bool
    body_sent_s: float | None  # as in ``received``
    first_byte_s: float | None  # as in ``received`` (None: no answer's headers were read)
    latency_s: float | None
    error_type: str
    status: int | None
    retryable: bool
    retry_after_s: float | None
    message: str | None
    provider_code: str | None
    provider_request_id: str | None
    rate_limits: dict[str, str]


class RetryScheduledPayload(TypedDict):
    attempt: int  # the one that failed
    next_attempt: int
    wait_s: float
    reason: str  # the failed attempt's error_type
    retry_after_s: float | None


class UnmarkedPayload(TypedDict):
    gate: Literal["rpm", "tpm"]
    attempt: int
    amount: int
    reason: str  # "not_sent" | "connection_refused" | "cancelled" | "reconciled"


class CompletedPayload(TypedDict):
    outcome: str  # an Outcome
    error_type: str | None
    error_message: str | None
    attempts: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_usd: str | None
    model: str
    response_id: str | None
    rpm_wait_s: float
    tpm_wait_s: float
    semaphore_wait_s: float
    latency_s: float | None  # the last attempt's
    total_s: float


Payload = (
    TraceCreatedPayload
    | GateWaitPayload
    | SemaphoreAcquiredPayload
    | SentPayload
    | FirstTokenPayload
    | ReceivedPayload
    | AttemptFailedPayload
    | RetryScheduledPayload
    | UnmarkedPayload
    | CompletedPayload
)

#: The payload type of each event type: the one definition every producer and consumer shares.
PAYLOAD_TYPES: dict[EventType, type[Any]] = {
    EventType.TRACE_CREATED: TraceCreatedPayload,
    EventType.GATE_WAIT: GateWaitPayload,
    EventType.SEMAPHORE_ACQUIRED: SemaphoreAcquiredPayload,
    EventType.SENT: SentPayload,
    EventType.FIRST_TOKEN: FirstTokenPayload,
    EventType.RECEIVED: ReceivedPayload,
    EventType.ATTEMPT_FAILED: AttemptFailedPayload,
    EventType.RETRY_SCHEDULED: RetryScheduledPayload,
    EventType.UNMARKED: UnmarkedPayload,
    EventType.COMPLETED: CompletedPayload,
}


def new_event_id() -> str:
    """32 hex digits: a microsecond timestamp, then 72 random bits (UUIDv7-like).

    Time-ordered ids land at the right edge of the store's unique b-tree instead of at
    random pages; on SQLite that alone roughly tripled insert throughput.
    """
    return f"{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


def default_instance() -> str:
    """``host:pid``: which process wrote an event, for logs merged from many replicas."""
    return f"{socket.gethostname()}:{os.getpid()}"


def child_span_id(call_span_id: str, name: str) -> str:
    """A child span's id, derived from the call span id and a stable name such as ``attempt 2``.

    Derived rather than random so that spans rebuilt from stored events carry the live ids.
    """
    digest = hashlib.blake2b(f"{call_span_id}/{name}".encode(), digest_size=8).hexdigest()
    # An all-zero span id is invalid in OTel; the chance is 2**-64 but the fix is free.
    return digest if digest != "0" * 16 else "0" * 15 + "1"


@dataclass(slots=True, frozen=True)
class Event:
    call_id: str
    seq: int
    type: EventType
    occurred_at: datetime
    trace_id: str
    span_id: str
    payload: dict[str, Any]
    instance: str = ""
    event_id: str = field(default_factory=new_event_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "call_id": self.call_id,
            "seq": self.seq,
            "type": str(self.type),
            "occurred_at": self.occurred_at.isoformat(),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "instance": self.instance,
            "payload": self.payload,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        occurred = data["occurred_at"]
        if isinstance(occurred, str):
            occurred = datetime.fromisoformat(occurred)
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=UTC)
        return cls(
            call_id=data["call_id"],
            seq=int(data["seq"]),
            type=EventType(data["type"]),
            occurred_at=occurred,
            trace_id=data["trace_id"],
            span_id=data["span_id"],
            payload=dict(data.get("payload") or {}),
            instance=data.get("instance") or "",
            event_id=data["event_id"],
        )


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def payload_of(event: Event, type_: Literal[EventType.TRACE_CREATED]) -> TraceCreatedPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.GATE_WAIT]) -> GateWaitPayload: ...
@overload
def payload_of(
    event: Event, type_: Literal[EventType.SEMAPHORE_ACQUIRED]
) -> SemaphoreAcquiredPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.SENT]) -> SentPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.FIRST_TOKEN]) -> FirstTokenPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.RECEIVED]) -> ReceivedPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.ATTEMPT_FAILED]) -> AttemptFailedPayload: ...
@overload
def payload_of(
    event: Event, type_: Literal[EventType.RETRY_SCHEDULED]
) -> RetryScheduledPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.UNMARKED]) -> UnmarkedPayload: ...
@overload
def payload_of(event: Event, type_: Literal[EventType.COMPLETED]) -> CompletedPayload: ...
def payload_of(event: Event, type_: EventType) -> Payload:
    """``event``'s payload as the type of ``type_`` (a consumer's typed view of a stored row).

    Raises ``ValueError`` when the event is of another type. The payload is not copied; stored
    rows written by older versions may lack fields added later, so read those with ``.get``.
    """
    if event.type is not type_:
        raise ValueError(f"event {event.event_id} is a {event.type}, not a {type_}")
    return cast(Payload, event.payload)
