"""Workload extraction: the recorded calls of a time range, in the form a replay needs.

A call belongs to the range when its ``trace_created`` occurred in ``[since, until)``; its later
events belong to it wherever they fall. Only calls with a ``completed`` event are taken (a call
still in flight, or interrupted by a crash, has no final outcome to compare with).

Two readers feed the same :class:`WorkloadBuilder`, so they cannot disagree:
- ``extract_workload`` folds any iterable of :class:`pipeline.Event` (tests, other stores);
- ``load_workload`` reads the SQL event store with one query per event type, reading only the
  columns and types it needs (both in :mod:`storage._workload_read`).

Invariants:
- ``Workload.calls`` is sorted by arrival; ``arrival_s`` is seconds after ``Workload.start``
  (the first arrival, so the first call arrives at 0.0).
- A call's ``attempts`` are its HTTP attempts in order, each with the provider latency that was
  measured for it, its error type (``None``: answered) and the retry wait that followed it
  (``None``: the call did not retry after it). ``reached`` is False only for an attempt whose
  RPM slot was given back because the connection was refused (an ``unmarked`` event).
- Provider time is kept apart from client time: ``provider_s`` is the provider's own time on an
  answered attempt (its ``openai-processing-ms``), None when it did not say; ``latency_s`` is
  send to answer as the client measured it (provider time + network + the client's own work
  and queueing under the recorded load).
- A recorded 429 is a *limit* 429 (``limit_hit``) when its rate-limit headers showed no room
  for the request (or carried none); otherwise the provider refused it for another reason
  (load shedding, an injected fault) and a replay keeps it as an error of its own.
- ``Workload.provider_limits`` is what the provider said its limits were
  (``x-ratelimit-limit-*``; a value >= 10^9 means no limit) and its window, estimated as the
  longest ``x-ratelimit-reset-requests`` seen; None when no answer carried the headers.
- Recorded figures (``first_sent_s``, ``finished_s``, waits) are what happened; the replay
  never reads them, it only compares against them. An attempt's send time is its answer's (or
  failure's) time minus its measured latency, so ``sent`` events need not be read at all.
- Everything kept per call is a tuple of plain values (``NamedTuple``), never a dict or an
  instance: CPython stops tracking such tuples after one garbage-collector pass, so 100,000
  calls are not rescanned by every later collection (that rescanning cost more than the replay).
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from llmtrail.pipeline import ErrorType, EventType, LLMTrailError
from llmtrail.pipeline._gates import parse_reset

__all__ = [
    "FIELDS",
    "EmptyWorkloadError",
    "ProviderLimits",
    "RecordedAttempt",
    "RecordedCall",
    "RecordedSettings",
    "Workload",
    "WorkloadBuilder",
    "epoch_of",
    "paused_gc",
    "pick",
]


_RATE_LIMITED = str(ErrorType.RATE_LIMITED)


class EmptyWorkloadError(LLMTrailError, LookupError):
    """The time range holds no completed call to replay."""


class RecordedAttempt(NamedTuple):
    latency_s: float
    error_type: str | None  # None: the provider answered with a response
    retry_after_s: float | None
    reached: bool  # False: the connection was refused, the provider never saw it
    answered: bool  # an HTTP answer came back (a response, or an error status such as 429)
    wait_s: float | None  # the retry wait that followed; None: no retry after this attempt
    provider_s: float | None = None  # the provider's own time (answered attempts), if it said
    status: int | None = None
    limit_hit: bool = False  # a 429 because the provider's window was full
    retryable: bool = True
    # From ``sent`` to the request body written (the send-time hook), if recorded: the gates
    # start the slot's window at most arrival_guard_s after it, as the service does.
    body_sent_s: float | None = None


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


_LIMIT_KEYS = (
    "max_rpm",
    "max_tpm",
    "window_s",
    "max_concurrent_requests",
    "max_attempts",
    "default_max_output_tokens",
    "send_guard_s",
    "unanswered_guard_s",
    "arrival_guard_s",
)
# Limits whose recorded None means "off" rather than "not recorded".
_NONE_MEANS_OFF = frozenset({"max_rpm", "max_tpm", "send_guard_s"})
_EPOCH = datetime(1970, 1, 1)
_UNLIMITED = 1_000_000_000  # a stated limit this high means none (the local server's "none")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection during a bulk extraction or a replay.

    Each query's 100,000 rows, and a replay's tasks and futures, outlive the young
    generations, and every full collection they trigger scans the whole heap (an interpreter
    with SQLAlchemy, OpenAI's SDK and numpy loaded): measured, that tripled the time of
    extraction. What is built here is freed by reference counting (no cycles), so nothing is
    left for the collector; it resumes, as it was, on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def epoch_of(value: Any) -> float:
    """Seconds since the epoch of a stored timestamp: a datetime, or SQLite's naive UTC text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # naive values are UTC (the store writes UTC)
        return float((value - _EPOCH).total_seconds())
    return float(value.timestamp())


class _Created(NamedTuple):
    at: float
    operation: str
    model: str
    estimated_input_tokens: int
    max_output_tokens: int | None
    reserved_tokens: int
    limits: tuple[Any, ...] | None


class _Result(NamedTuple):
    attempt: int
    sent_at: float  # the answer's time minus the latency: when the attempt was sent
    latency_s: float
    error_type: str | None  # None: answered
    retry_after_s: float | None
    status: int | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    response_model: str | None
    provider_s: float | None = None
    room: tuple[int | None, int | None] = (None, None)  # remaining requests, tokens (429s)
    retryable: bool = True
    body_sent_s: float | None = None


class _Done(NamedTuple):
    at: float
    outcome: str
    error_type: str | None
    model: str | None
    total_s: float | None
    rpm_wait_s: float
    tpm_wait_s: float
    semaphore_wait_s: float


# What the provider states about its limits, on every answer (429s included).
_LIMIT_HEADERS = (
    "rate_limits.x-ratelimit-limit-requests",
    "rate_limits.x-ratelimit-limit-tokens",
    "rate_limits.x-ratelimit-reset-requests",
)

# The payload fields each event type contributes, as paths ("limits.max_rpm" is nested). Both
# readers pull exactly these, in this order, so the builder sees one shape whatever the source.
FIELDS: dict[str, tuple[str, ...]] = {
    str(EventType.TRACE_CREATED): (
        "operation_name",
        "model",
        "estimated_input_tokens",
        "max_output_tokens",
        "reserved_tokens",
        *(f"limits.{key}" for key in _LIMIT_KEYS),
    ),
    str(EventType.RECEIVED): (
        "attempt",
        "latency_s",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "response_model",
        "processing_s",
        *_LIMIT_HEADERS,
        "body_sent_s",
    ),
    str(EventType.ATTEMPT_FAILED): (
        "attempt",
        "latency_s",
        "error_type",
        "retry_after_s",
        "status",
        "retryable",
        "rate_limits.x-ratelimit-remaining-requests",
        "rate_limits.x-ratelimit-remaining-tokens",
        *_LIMIT_HEADERS,
        "body_sent_s",
    ),
    str(EventType.RETRY_SCHEDULED): ("attempt", "wait_s"),
    str(EventType.UNMARKED): ("gate", "attempt", "reason"),
    str(EventType.COMPLETED): (
        "outcome",
        "error_type",
        "model",
        "total_s",
        "rpm_wait_s",
        "tpm_wait_s",
        "semaphore_wait_s",
    ),
}

Row = tuple[str, float, Sequence[Any]]  # call_id, occurred_at (epoch seconds), FIELDS values
_Step = Callable[[Iterable[Row]], None]


def pick(payload: dict[str, Any], paths: Sequence[str]) -> list[Any]:
    """The values at ``paths`` in ``payload`` (None where absent): what SQL extracts."""
    values: list[Any] = []
    for path in paths:
        value: Any = payload
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return values


class WorkloadBuilder:
    """Collects the facts of calls from events of any type, in any order, and builds the
    :class:`Workload`. Readers feed ``add(type, rows)``, rows being
    ``(call_id, occurred_at_epoch_s, values)`` with the values of ``FIELDS[type]``.

    Facts are kept in flat dicts of plain tuples keyed by call_id (see the module docs: no
    per-call objects for the garbage collector to rescan); the rare second attempt, retry
    and refused connection go to small side dicts.
    """

    def __init__(self) -> None:
        self._created: dict[str, _Created] = {}
        self._result: dict[str, _Result] = {}  # the first result seen
        self._results_more: dict[str, list[_Result]] = {}  # further results
        self._waits: dict[tuple[str, int], float] = {}
        self._unreached: set[tuple[str, int]] = set()
        self._done: dict[str, _Done] = {}
        self._stated: list[float] = [0.0, 0.0, 0.0]  # the largest rpm, tpm, reset stated
        self._kinds: dict[str, _Step] = {
            str(EventType.TRACE_CREATED): self._on_created,
            str(EventType.RECEIVED): self._on_received,
            str(EventType.ATTEMPT_FAILED): self._on_failed,
            str(EventType.RETRY_SCHEDULED): self._on_retry,
            str(EventType.UNMARKED): self._on_unmarked,
            str(EventType.COMPLETED): self._on_completed,
        }

    def __len__(self) -> int:
        return len(self._created)

    def add(self, kind: str, rows: Iterable[Row]) -> None:
        """Fold rows of one event type (types the replay does not need are ignored)."""
        step = self._kinds.get(kind)
        if step is not None:
            step(rows)

    # The steps are loops over rows, not calls per row: this is the hot path of extraction.

    def _on_created(self, rows: Iterable[Row]) -> None:
        created = self._created
        for call_id, at, (op, model, est, max_out, reserved, *limits) in rows:
            created[call_id] = _Created(
                at,
                op or "generation",
                model or "",
                est or 0,
                max_out,
                reserved or 0,
                tuple(limits) if any(v is not None for v in limits) else None,
            )

    def _add_result(self, call_id: str, result: _Result) -> None:
        if call_id not in self._result:
            self._result[call_id] = result
        else:
            self._results_more.setdefault(call_id, []).append(result)

    def _state(self, rpm: Any, tpm: Any, reset: Any) -> None:
        """Keep the largest limits and reset the provider stated (header text)."""
        stated = self._stated
        for i, value in enumerate((_number(rpm), _number(tpm), parse_reset(reset))):
            if value is not None and value > stated[i]:
                stated[i] = value

    def _on_received(self, rows: Iterable[Row]) -> None:
        first, add, state = self._result, self._add_result, self._state
        for call_id, at, values in rows:
            attempt, latency, inp, cached, out, reasoning, rmodel, processing = values[:8]
            if values[8] is not None or values[9] is not None:
                state(*values[8:11])
            latency = latency or 0.0
            result = _Result(
                attempt or 1,
                at - latency,
                latency,
                None,
                None,
                200,
                inp or 0,
                cached or 0,
                out or 0,
                reasoning or 0,
                rmodel,
                processing,
                body_sent_s=values[-1],
            )
            if call_id in first:
                add(call_id, result)
            else:
                first[call_id] = result

    def _on_failed(self, rows: Iterable[Row]) -> None:
        for call_id, at, values in rows:
            attempt, latency, error, retry_after, status, retryable, left_r, left_t = values[:8]
            if values[8] is not None or values[9] is not None:
                self._state(*values[8:11])
            self._add_result(
                call_id,
                _Result(
                    attempt or 1,
                    at - (latency or 0.0),
                    latency or 0.0,
                    error or "unknown",
                    retry_after,
                    status,
                    0,
                    0,
                    0,
                    0,
                    None,
                    None,
                    (_number(left_r), _number(left_t)),
                    retryable is not False,
                    values[-1],
                ),
            )

    def _on_retry(self, rows: Iterable[Row]) -> None:
        for call_id, _, (attempt, wait) in rows:
            self._waits[call_id, attempt or 1] = wait or 0.0

    def _on_unmarked(self, rows: Iterable[Row]) -> None:
        for call_id, _, (gate, attempt, reason) in rows:
            if gate == "rpm" and reason == "connection_refused":
                self._unreached.add((call_id, attempt or 1))

    def _on_completed(self, rows: Iterable[Row]) -> None:
        done = self._done
        for call_id, at, (outcome, error, model, total, rpm_w, tpm_w, sem_w) in rows:
            done[call_id] = _Done(
                at,
                outcome or "failed",
                error,
                model,
                total,
                rpm_w or 0.0,
                tpm_w or 0.0,
                sem_w or 0.0,
            )

    def build(self) -> Workload:
        """The workload, sorted by arrival; raises :class:`EmptyWorkloadError` if empty."""
        created, done = self._created, self._done
        ids = [cid for cid in created if cid in done]
        incomplete = len(created) - len(ids)
        if not ids:
            raise EmptyWorkloadError(
                "no completed call to replay"
                + (f" ({incomplete} calls have not completed)" if incomplete else "")
            )
        ids.sort(key=lambda cid: created[cid].at)
        t0 = created[ids[0]].at
        variants: Counter[tuple[Any, ...]] = Counter(
            limits for cid in ids if (limits := created[cid].limits) is not None
        )
        settings = RecordedSettings()
        if variants:
            raw = dict(zip(_LIMIT_KEYS, variants.most_common(1)[0][0], strict=True))
            settings = RecordedSettings(
                **{k: v for k, v in raw.items() if v is not None or k in _NONE_MEANS_OFF}
            )
        finish = self._finish
        calls = [finish(cid, created[cid], done[cid], t0) for cid in ids]
        rpm, tpm, reset = self._stated
        stated: ProviderLimits | None = None
        if rpm or tpm:
            stated = ProviderLimits(
                int(rpm) if 0 < rpm < _UNLIMITED else None,
                int(tpm) if 0 < tpm < _UNLIMITED else None,
                math.ceil(reset * 10 - 1e-6) / 10 if reset > 0 else None,
            )
        return Workload(
            calls,
            datetime.fromtimestamp(t0, UTC),
            settings,
            settings_variants=max(len(variants), 1),
            incomplete=incomplete,
            provider_limits=stated,
        )

    def _finish(self, call_id: str, c: _Created, done: _Done, t0: float) -> RecordedCall:
        first_result = self._result.get(call_id)
        results = [] if first_result is None else [first_result]
        more = self._results_more.get(call_id)
        if more:
            results = sorted(results + more)
        waits, unreached = self._waits, self._unreached
        counted = c.estimated_input_tokens + (c.max_output_tokens or 0)
        if not waits and not unreached and len(results) == 1 and results[0].error_type is None:
            r = results[0]  # the common case, fast
            attempts: tuple[RecordedAttempt, ...] = (
                RecordedAttempt(
                    r.latency_s,
                    None,
                    None,
                    True,
                    True,
                    None,
                    r.provider_s,
                    r.status,
                    body_sent_s=r.body_sent_s,
                ),
            )
        else:
            attempts = tuple(
                [
                    RecordedAttempt(
                        r.latency_s,
                        r.error_type,
                        r.retry_after_s,
                        (call_id, r.attempt) not in unreached,
                        r.status is not None,
                        waits.get((call_id, r.attempt)),
                        r.provider_s,
                        r.status,
                        r.status == 429 and r.error_type == _RATE_LIMITED and _no_room(r, counted),
                        r.retryable,
                        r.body_sent_s,
                    )
                    for r in results
                ]
            )
        answer = None
        for r in results:
            if r.error_type is None:
                answer = r
                break
        max_out = c.max_output_tokens
        input_t = cached_t = output_t = reasoning_t = 0
        response_model: str | None = None
        if answer is not None:
            input_t, cached_t = answer.input_tokens, answer.cached_tokens
            output_t, reasoning_t = answer.output_tokens, answer.reasoning_tokens
            # `completed.model` is the answering model when there was an answer.
            response_model = answer.response_model or done.model
        retry_gate: tuple[tuple[float, float], ...] = ()
        if len(attempts) > 1:
            retry_gate = self._retry_gate_waits(results, attempts, t0)
        first = results[0].sent_at if results else None
        return RecordedCall(
            call_id,
            c.at - t0,
            c.operation,
            c.model or done.model or "",
            response_model,
            c.estimated_input_tokens,
            max_out,
            c.reserved_tokens,
            input_t,
            cached_t,
            output_t,
            reasoning_t,
            input_t + (max_out or output_t),
            attempts,
            done.outcome,
            done.error_type,
            None if first is None else first - t0,
            done.at - t0,
            done.total_s if done.total_s is not None else done.at - c.at,
            done.rpm_wait_s,
            done.tpm_wait_s,
            done.semaphore_wait_s,
            retry_gate,
        )

    @staticmethod
    def _retry_gate_waits(
        results: list[_Result], attempts: tuple[RecordedAttempt, ...], t0: float
    ) -> tuple[tuple[float, float], ...]:
        """The RPM waits of retries: from the end of the retry wait to the next send."""
        waits = []
        for before, after, attempt in zip(results, results[1:], attempts, strict=False):
            if attempt.wait_s is None:
                continue
            ready = before.sent_at + attempt.latency_s + attempt.wait_s
            if after.sent_at > ready:
                waits.append((ready - t0, after.sent_at - t0))
        return tuple(waits)


def _number(value: Any) -> int | None:
    """A header's integer (they are text), None when absent or not a number."""
    if value is None:
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _no_room(result: _Result, tokens: int) -> bool:
    """Did the 429's headers show no room for the request? (No headers: taken as yes.)"""
    requests, left_tokens = result.room
    if requests is None and left_tokens is None:
        return True
    return (requests is not None and requests <= 0) or (
        left_tokens is not None and left_tokens < tokens
    )
