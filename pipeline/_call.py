"""One call's identity, its event stream, and what it holds at any instant.

Invariants:
- ``seq`` grows by one per emitted event, with no gap; the stream's ids never change.
- A sink that fails is reported and skipped; it never breaks the call.
- A sink at its high-water mark is put in the shared backlog, where the next call waits for it.
"""

from __future__ import annotations

import math
import random
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, cast, overload

from opentelemetry import trace as otel_trace

from llmtrail._log import get_logger

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
    new_event_id,
)
from ._gates import GateReservation
from ._types import GenerationRequest
from .typing import EventSink

__all__ = [
    "plain_traceback",
    "SAMPLED",
    "CallState",
    "CallStream",
    "estimate_input_tokens",
    "money",
    "to_int",
]

_log = get_logger(__name__)


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
    )

    def __init__(
        self,
        sinks: Sequence[EventSink],
        instance: str,
        parent_trace: int | None,
        backlog: set[EventSink],
    ) -> None:
        self.call_id = new_event_id()  # time-ordered, like event ids: cheap to index
        self.trace_id = f"{parent_trace or random.getrandbits(128) or 1:032x}"
        self.span_id = f"{random.getrandbits(64) or 1:016x}"
        self.seq = 0
        self.sinks = sinks
        self.instance = instance
        self.backlog = backlog
        # A caller's unsampled trace stays unsampled, so no orphan HTTP span is exported.
        self.trace_flags = SAMPLED

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
        event = Event(
            self.call_id,
            self.seq,
            type_,
            datetime.now(UTC),
            self.trace_id,
            self.span_id,
            cast(dict[str, Any], payload),
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


def money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def to_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
