"""The workload of a time range: the recorded calls, in the form a replay needs.

A call belongs to the range when its ``trace_created`` occurred in ``[since, until)``; its later
events belong to it wherever they fall. Only calls with a ``completed`` event are taken (a call
still in flight, or interrupted by a crash, has no final outcome to compare with). The events
are folded into a :class:`Workload` by :class:`~storage._workload_build.WorkloadBuilder`, fed by
the readers of :mod:`storage._workload_read`.

Invariants:
- ``Workload.calls`` is sorted by arrival; ``arrival_s`` is seconds after ``Workload.start``
  (the first arrival, so the first call arrives at 0.0).
- A call's ``attempts`` are its HTTP attempts in order, each with the provider latency that was
  measured for it, its error type (``None``: answered) and the retry wait that followed it
  (``None``: the call did not retry after it). ``reached`` is False only for an attempt whose
  RPM slot was given back because the connection was refused (an ``unmarked`` event).
- Provider time is kept apart from client time: ``provider_s`` is the provider's own time on
  an attempt (from its request body written to its answer's headers read, else its
  ``openai-processing-ms``), None when neither was recorded; ``latency_s`` is send to answer as
  the client measured it (provider time + network + the client's own work and queueing under
  the recorded load).
- A recorded 429 is a *limit* 429 (``limit_hit``) when its rate-limit headers showed no room
  for the request (or carried none); otherwise the provider refused it for another reason
  (load shedding, an injected fault) and a replay keeps it as an error of its own.
- ``Workload.provider_limits`` is what the provider said its limits were
  (``x-ratelimit-limit-*``; a value >= 10^9 means no limit) and its window, estimated as the
  longest ``x-ratelimit-reset-requests`` seen; None when no answer carried the headers.
- Recorded figures (``first_sent_s``, ``finished_s``, waits) are what happened; the replay
  never reads them, it only compares against them.
- Everything kept per call is a tuple of plain values (``NamedTuple``), never a dict or an
  instance: CPython stops tracking such tuples after one garbage-collector pass, so 100,000
  calls are not rescanned by every later collection (that rescanning cost more than the replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from llmtrail.pipeline import LLMTrailError

__all__ = [
    "EmptyWorkloadError",
    "ProviderLimits",
    "RecordedAttempt",
    "RecordedCall",
    "RecordedSettings",
    "Workload",
    "epoch_of",
]


class EmptyWorkloadError(LLMTrailError, LookupError):
    """The time range holds no completed call to replay."""


class RecordedAttempt(NamedTuple):
    latency_s: float
    error_type: str | None  # None: the provider answered with a response
    retry_after_s: float | None
    reached: bool  # False: the connection was refused, the provider never saw it
    answered: bool  # an HTTP answer came back (a response, or an error status such as 429)
    wait_s: float | None  # the retry wait that followed; None: no retry after this attempt
    provider_s: float | None = None  # the provider's own time, if recorded (module docs)
    status: int | None = None
    limit_hit: bool = False  # a 429 because the provider's window was full
    retryable: bool = True
    # From ``sent`` to the request body written (the send-time hook), if recorded: the gates
    # start the slot's window at most arrival_guard_s after it, as the service does.
    body_sent_s: float | None = None
    # From the ``sent`` event to ``sent`` itself (the write-ahead commit of that event): the
    # attempt holds its permit, and its latency has not started yet.
    pre_send_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """The provider's limits as its rate-limit headers stated them (None: no limit stated)."""

    rpm: int | None
    tpm: int | None
    window_s: float | None  # the longest reset seen, rounded up to 0.1 s; None if none seen


@dataclass(frozen=True, slots=True)
class RecordedSettings:
    """The service limits recorded in ``trace_created.payload["limits"]``."""

    max_rpm: int | None = None
    max_tpm: int | None = None
    window_s: float = 60.0
    max_concurrent_requests: int = 100
    max_attempts: int = 3
    default_max_output_tokens: int = 1024
    send_guard_s: float | None = None
    unanswered_guard_s: float = 1.0
    arrival_guard_s: float = 0.1


class RecordedCall(NamedTuple):
    call_id: str
    arrival_s: float
    operation: str
    model: str  # the model asked for
    response_model: str | None  # the model that answered (priced first, as the service does)
    estimated_input_tokens: int
    max_output_tokens: int | None
    reserved_tokens: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    tpm_counted: int  # what the provider's TPM counts if answered: input + (max_output or output)
    attempts: tuple[RecordedAttempt, ...]
    outcome: str
    error_type: str | None
    # What happened (compared with, never replayed):
    first_sent_s: float | None
    finished_s: float
    total_s: float
    rpm_wait_s: float
    tpm_wait_s: float
    semaphore_wait_s: float
    retry_gate_waits: tuple[tuple[float, float], ...]  # (start, end) of RPM waits of retries


@dataclass(slots=True)
class Workload:
    calls: list[RecordedCall]
    start: datetime
    settings: RecordedSettings
    settings_variants: int = 1  # distinct recorded limits; > 1 means several services wrote
    incomplete: int = 0  # calls in the range without a `completed` event (skipped)
    provider_limits: ProviderLimits | None = None  # from the rate-limit headers, if any

    @property
    def span_s(self) -> float:
        return self.calls[-1].arrival_s if self.calls else 0.0

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the repr of a task's result in some paths, and a
        # full repr of 100,000 calls takes seconds.
        return (
            f"Workload(calls={len(self.calls)}, start={self.start.isoformat()}, "
            f"span_s={self.span_s:.3f}, settings={self.settings!r})"
        )


_EPOCH = datetime(1970, 1, 1)


def epoch_of(value: Any) -> float:
    """Seconds since the epoch of a stored timestamp: a datetime, or SQLite's naive UTC text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # naive values are UTC (the store writes UTC)
        return float((value - _EPOCH).total_seconds())
    return float(value.timestamp())
