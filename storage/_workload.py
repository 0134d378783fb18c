"""Workload extraction: the recorded calls of a time range, in the form a replay needs.

A call belongs to the range when its ``trace_created`` occurred in ``[since, until)``; its later
events belong to it wherever they fall. Only calls with a ``completed`` event are taken (a call
still in flight, or interrupted by a crash, has no final outcome to compare with).

Two readers feed the same :class:`WorkloadBuilder`, so they cannot disagree:
- :func:`extract_workload` folds any iterable of :class:`pipeline.Event` (tests, other stores);
- :func:`load_workload` reads the SQL event store with one query per event type, reading only
  the columns and types it needs.

Invariants:
- ``Workload.calls`` is sorted by arrival; ``arrival_s`` is seconds after ``Workload.start``
  (the first arrival, so the first call arrives at 0.0).
- A call's ``attempts`` are its HTTP attempts in order, each with the provider latency that was
  measured for it, its error type (``None``: answered) and the retry wait that followed it
  (``None``: the call did not retry after it). ``reached`` is False only for an attempt whose
  RPM slot was given back because the connection was refused (an ``unmarked`` event).
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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Float, Text, cast, extract, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail.pipeline import Event, EventType, LLMTrailError

from ._schema import events

__all__ = [
    "FIELDS",
    "EmptyWorkloadError",
    "RecordedAttempt",
    "RecordedCall",
    "RecordedSettings",
    "Workload",
    "WorkloadBuilder",
    "extract_workload",
    "load_workload",
    "paused_gc",
    "pick",
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
)
# Limits whose recorded None means "off" rather than "not recorded".
_NONE_MEANS_OFF = frozenset({"max_rpm", "max_tpm", "send_guard_s"})
_EPOCH = datetime(1970, 1, 1)


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


def _epoch(value: Any) -> float:
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


class _Done(NamedTuple):
    at: float
    outcome: str
    error_type: str | None
    model: str | None
    total_s: float | None
    rpm_wait_s: float
    tpm_wait_s: float
    semaphore_wait_s: float


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
    ),
    str(EventType.ATTEMPT_FAILED): (
        "attempt",
        "latency_s",
        "error_type",
        "retry_after_s",
        "status",
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

    def _on_received(self, rows: Iterable[Row]) -> None:
        first, add = self._result, self._add_result
        for call_id, at, (attempt, latency, inp, cached, out, reasoning, rmodel) in rows:
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
            )
            if call_id in first:
                add(call_id, result)
            else:
                first[call_id] = result

    def _on_failed(self, rows: Iterable[Row]) -> None:
        for call_id, at, (attempt, latency, error, retry_after, status) in rows:
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
        return Workload(
            calls,
            datetime.fromtimestamp(t0, UTC),
            settings,
            settings_variants=max(len(variants), 1),
            incomplete=incomplete,
        )

    def _finish(self, call_id: str, c: _Created, done: _Done, t0: float) -> RecordedCall:
        first_result = self._result.get(call_id)
        results = [] if first_result is None else [first_result]
        more = self._results_more.get(call_id)
        if more:
            results = sorted(results + more)
        waits, unreached = self._waits, self._unreached
        if not waits and not unreached and len(results) == 1:  # the common case, fast
            r = results[0]
            attempts: tuple[RecordedAttempt, ...] = (
                RecordedAttempt(
                    r.latency_s, r.error_type, r.retry_after_s, True, r.status is not None, None
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


# -- from events ------------------------------------------------------------------------------


def extract_workload(
    stream: Iterable[Event],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Workload:
    """The workload of the calls whose ``trace_created`` lies in ``[since, until)``."""
    since, until = _utc(since), _utc(until)
    builder = WorkloadBuilder()
    created = str(EventType.TRACE_CREATED)
    for event in stream:
        kind = str(event.type)
        paths = FIELDS.get(kind)
        if paths is None:
            continue
        if kind == created:
            at = _utc(event.occurred_at)
            assert at is not None
            if (since is not None and at < since) or (until is not None and at >= until):
                continue
        row = (event.call_id, _epoch(event.occurred_at), pick(event.payload, paths))
        builder.add(kind, (row,))
    return builder.build()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- from the SQL store -----------------------------------------------------------------------

# Each type's FIELDS come out of SQL as one JSON array per row (SQLite's multi-path
# json_extract, PostgreSQL's jsonb_build_array): the payload is parsed once, in C, and Python
# decodes a short array instead of the whole payload. Timestamps come out as epoch seconds.
_TYPES = (
    EventType.TRACE_CREATED,
    EventType.RECEIVED,
    EventType.ATTEMPT_FAILED,
    EventType.RETRY_SCHEDULED,
    EventType.UNMARKED,
    EventType.COMPLETED,
)


def _columns(dialect: str, paths: Sequence[str]) -> tuple[Any, Any]:
    """(epoch seconds, JSON array text of the values at ``paths``) for one dialect."""
    at, payload = events.c.occurred_at, events.c.payload
    if dialect == "postgresql":
        parts = [payload[tuple(p.split("."))] if "." in p else payload[p] for p in paths]
        return cast(extract("epoch", at), Float), cast(func.jsonb_build_array(*parts), Text)
    # SQLite keeps SQLAlchemy's "YYYY-MM-DD HH:MM:SS.ffffff": whole seconds + the fraction.
    epoch: Any = cast(func.strftime("%s", at), Float) + cast(func.substr(at, 20), Float)
    json_paths = ["$." + p for p in paths]
    if len(json_paths) == 1:  # json_extract returns a bare value for a single path
        return epoch, func.json_array(func.json_extract(payload, json_paths[0]))
    return epoch, func.json_extract(payload, *json_paths)


def _query(dialect: str, kind: EventType, since: datetime | None, until: datetime | None) -> Any:
    epoch, values = _columns(dialect, FIELDS[str(kind)])
    stmt = select(events.c.call_id, epoch, values).where(events.c.type == str(kind))
    # A call's later events may fall after `until`; they are matched to it by call_id.
    if since is not None:
        stmt = stmt.where(events.c.occurred_at >= since)
    if until is not None and kind is EventType.TRACE_CREATED:
        stmt = stmt.where(events.c.occurred_at < until)
    return stmt


async def load_workload(
    engine: AsyncEngine,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> Workload:
    """Read the workload of ``[since, until)`` from the event store behind ``engine``.

    One query per event type; ``on_progress(event_type, rows)`` is called after each.
    """
    since, until = _utc(since), _utc(until)
    builder = WorkloadBuilder()
    loads = orjson.loads
    with paused_gc():
        async with engine.connect() as conn:
            dialect = conn.dialect.name
            for kind in _TYPES:
                result = await conn.execute(_query(dialect, kind, since, until))
                rows = result.all()
                builder.add(str(kind), ((cid, at, loads(values)) for cid, at, values in rows))
                del result, rows  # free each type's rows before reading the next
                if on_progress is not None:
                    on_progress(str(kind), len(builder))
                if kind is EventType.TRACE_CREATED and not len(builder):
                    break
        if len(builder):
            return builder.build()
    window = f"from {since.isoformat() if since else 'the beginning'} to " + (
        until.isoformat() if until else "now"
    )
    raise EmptyWorkloadError(
        f"the store has no recorded calls {window}; widen --since/--until, or record "
        "some traffic first (e.g. `llmtrail demo`)"
    )
